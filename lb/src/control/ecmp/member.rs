//! One membership: what an instance does under one session, from taking
//! its member key until it loses the key or shuts down.
//!
//! [`member`] reads the cluster's keys with `?consistent` every
//! `confirm_every` (several reads in flight when answers are slow). A read
//! that lists our key under our session earns the lease; one that does not
//! ends the membership at once. Between reads it decides what to announce
//! ([`apply`]): nothing once the lease has run out, while the cluster's
//! name is held by a pair, or beyond `max_announcing`; otherwise every
//! address whose VIPs can serve. It keeps the member key's value current
//! ([`publish_value`]), and the handoff to a draining peer
//! ([`update_handoff`]).
//!
//! When an instance may announce, and why a lease earned this way can be
//! trusted, is argued in "When an instance announces" in [the module
//! docs](super).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use halo_consul::{Client, Consistency, Error as ConsulError, KvPair, QueryOptions};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{handoff, Announcer, MemberState, MemberValue, Membership, Withdrawal, CONSUL_RETRY};
use crate::control::instance::AbortOnDrop;
use crate::control::server::Server;

/// How often what may be announced is looked at again between reads (a
/// table that lost its last backend, a listener that came up).
const EVALUATE_EVERY: Duration = Duration::from_millis(100);
/// Membership reads in flight at once, at most.
const READS_IN_FLIGHT: usize = 4;

impl Membership {
    /// Takes in a confirmed read of the members.
    fn set_members(&self, pairs: &[KvPair]) {
        let prefix = self.prefix();
        let mut members: Vec<(u64, MemberValue)> = pairs
            .iter()
            .filter(|p| p.session.is_some() && p.key.starts_with(&prefix))
            .filter_map(|p| {
                let value = p.value.as_ref()?;
                match serde_json::from_slice::<MemberValue>(value) {
                    Ok(v) => Some((p.create_index, v)),
                    Err(e) => {
                        tracing::debug!(key = %p.key, error = %e, "a member key holds no member value; ignored");
                        None
                    }
                }
            })
            .collect();
        members.sort_by_key(|(index, _)| *index);
        let cluster = self.settings.cluster.clone();
        metrics::gauge!("halo_ecmp_members", "cluster" => cluster.clone()).set(members.len() as f64);
        for state in [MemberState::Ready, MemberState::Announcing, MemberState::Draining] {
            let count = members.iter().filter(|(_, m)| m.state == state).count();
            metrics::gauge!("halo_ecmp_members_by_state", "cluster" => cluster.clone(), "state" => state.as_str())
                .set(count as f64);
        }
        self.state().members = members;
    }

    /// The member to hand over to: the longest-standing draining one other
    /// than us with an IPv4 address; none while we drain ourselves.
    fn handoff_target(&self) -> Option<(String, Ipv4Addr)> {
        let state = self.state();
        if state.state == MemberState::Draining {
            return None;
        }
        state
            .members
            .iter()
            .filter(|(_, m)| m.state == MemberState::Draining && m.instance != self.instance)
            .find_map(|(_, m)| {
                let address = m.address.as_deref()?.parse::<Ipv4Addr>().ok()?;
                Some((m.instance.clone(), address))
            })
    }

    /// How many longer-standing members announce, as the last confirmed
    /// read listed them (a member that cannot serve does not hold a place
    /// under the cap); `None` if that read did not list us.
    fn rank(&self) -> Option<usize> {
        let state = self.state();
        let ours = state.members.iter().position(|(_, m)| m.instance == self.instance)?;
        Some(
            state.members[..ours]
                .iter()
                .filter(|(_, m)| m.state == MemberState::Announcing)
                .count(),
        )
    }
}

/// How a membership ended.
pub(super) enum Left {
    /// Shutdown: the addresses are still announced, for the drain to
    /// withdraw; with the lease in force.
    Shutdown(Option<Instant>),
    /// The membership was lost: everything is withdrawn.
    Lost,
}

/// One membership (one session): reads the members, keeps the lease,
/// announces and withdraws.
pub(super) async fn member(
    membership: &Arc<Membership>,
    client: &Client,
    server: &Arc<Server>,
    announcer: &mut Announcer,
    mut handoff: Option<&mut handoff::Handoff>,
    session: &str,
    stop: &CancellationToken,
) -> Left {
    let ecmp = membership.ecmp.clone();
    let key = membership.key();
    let mut reads: JoinSet<(Instant, Result<Vec<KvPair>, ConsulError>)> = JoinSet::new();
    let mut read_tick = tokio::time::interval(ecmp.confirm_every);
    read_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut evaluate_tick = tokio::time::interval(EVALUATE_EVERY);
    evaluate_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The member key's value, written by a task of its own so a slow write
    // never holds up a withdrawal; the latest value wins.
    let (publish, published) = watch::channel(membership.value());
    let _publisher = AbortOnDrop(tokio::spawn(publish_value(
        client.clone(),
        key.clone(),
        session.to_owned(),
        published,
    )));
    let mut lease_until: Option<Instant> = None;
    let mut failing = false;
    let mut pair_conflict = false;
    loop {
        let lease_end = lease_until.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            biased;
            () = stop.cancelled() => return Left::Shutdown(lease_until),
            () = tokio::time::sleep_until(lease_end), if lease_until.is_some() => {}
            Some(done) = reads.join_next() => {
                let Ok((sent, result)) = done else { continue };
                match result {
                    Ok(pairs) => {
                        let ours = pairs.iter().find(|p| p.key == key);
                        if ours.and_then(|p| p.session.as_deref()) != Some(session) {
                            tracing::warn!(
                                holder = ?ours.and_then(|p| p.session.clone()),
                                "the servers no longer list this instance's membership (its session ended: node failed in gossip, or its check went critical); withdrawing"
                            );
                            membership.state().lease_until = None;
                            apply(membership, announcer, &BTreeSet::new(), Withdrawal::MembershipLost, Some("membership lost; joining again".to_owned()));
                            membership.set_member_state(MemberState::Ready);
                            return Left::Lost;
                        }
                        let until = sent + ecmp.lease;
                        if lease_until.is_none_or(|current| until > current) {
                            lease_until = Some(until);
                            membership.state().lease_until = Some(until);
                        }
                        membership.set_members(&pairs);
                        // The same cluster name run as a pair would serve
                        // the VIPs too, from its own active.
                        let leader = format!("halo/{}/leader", membership.settings.cluster);
                        pair_conflict = pairs.iter().any(|p| p.key == leader && p.session.is_some());
                        if failing {
                            tracing::info!("membership confirmed by the Consul servers again");
                            membership.set_consul_error(None);
                        }
                        failing = false;
                    }
                    Err(e) => {
                        metrics::counter!("halo_ecmp_confirm_failures_total").increment(1);
                        if !failing {
                            tracing::warn!(error = %e, "cannot confirm the membership with the Consul servers; announcing until the lease runs out");
                        }
                        failing = true;
                        membership.set_consul_error(Some(e.to_string()));
                    }
                }
            }
            _ = read_tick.tick() => {
                if reads.len() < READS_IN_FLIGHT {
                    // The cluster's whole tree: the members, and a pair's
                    // lock should someone run the cluster as a pair.
                    let (client, prefix, lease) = (client.clone(), format!("halo/{}/", membership.settings.cluster), ecmp.lease);
                    reads.spawn(async move {
                        let sent = Instant::now();
                        let read = client.kv_list(&prefix, QueryOptions::with_consistency(Consistency::Consistent));
                        // A read older than a lease can no longer extend it.
                        let result = match tokio::time::timeout(lease, read).await {
                            Ok(result) => result.map(|r| r.value),
                            Err(_) => Err(ConsulError::Config(format!("no answer within {}", halo_consul::duration::format(lease)))),
                        };
                        (sent, result)
                    });
                }
                continue;
            }
            _ = evaluate_tick.tick() => {}
        }
        // Decide what to announce now.
        let now = Instant::now();
        let (wanted, reason, withheld) = if lease_until.is_none_or(|until| until <= now) {
            let why = if lease_until.is_some() {
                format!(
                    "lease ran out: no read of the membership confirmed by the Consul servers in the last {}",
                    halo_consul::duration::format(ecmp.lease)
                )
            } else {
                "waiting for the Consul servers to confirm the membership".to_owned()
            };
            if lease_until.is_some() {
                lease_until = None;
                membership.state().lease_until = None;
                tracing::warn!("{why}; withdrawing");
            }
            (BTreeSet::new(), Withdrawal::LeaseExpired, Some(why))
        } else if pair_conflict {
            (
                BTreeSet::new(),
                Withdrawal::NotReady,
                Some(format!(
                    "halo/{}/leader is held: an instance runs cluster {0:?} as a pair; give the ECMP cluster another name",
                    membership.settings.cluster
                )),
            )
        } else if let Some((rank, cap)) = ecmp
            .max_announcing
            .and_then(|cap| membership.rank().map(|rank| (rank, cap)))
            .filter(|(rank, cap)| *rank >= *cap as usize)
        {
            (
                BTreeSet::new(),
                Withdrawal::OverCap,
                Some(format!(
                    "hot spare: {rank} longer-standing members may announce and max_announcing is {cap}"
                )),
            )
        } else {
            let addresses = server.announceable();
            let wanted: BTreeSet<IpAddr> = addresses
                .iter()
                .filter(|(_, why)| why.is_none())
                .map(|(ip, _)| *ip)
                .collect();
            let withheld: Vec<String> = addresses
                .iter()
                .filter_map(|(ip, why)| why.as_ref().map(|why| format!("{ip}: {why}")))
                .collect();
            (
                wanted,
                Withdrawal::NotReady,
                (!withheld.is_empty()).then(|| withheld.join("; ")),
            )
        };
        apply(membership, announcer, &wanted, reason, withheld);
        let state = if announcer.announced().is_empty() {
            MemberState::Ready
        } else {
            MemberState::Announcing
        };
        let mut changed = membership.set_member_state(state);
        if let Some(handoff) = handoff.as_deref_mut() {
            changed |= update_handoff(membership, server, handoff).await;
        }
        if changed {
            publish.send_replace(membership.value());
        }
    }
}

/// Hands over to the draining member the last confirmed read names, if
/// any; true if the member value changed.
async fn update_handoff(membership: &Membership, server: &Server, handoff: &mut handoff::Handoff) -> bool {
    let target = membership.handoff_target();
    let address = target.as_ref().map(|(_, address)| *address);
    match handoff.set(&server.tcp_vips_v4(), address).await {
        Ok(true) => {}
        // Retrying later (after a failure, not before RETRY).
        Ok(false) => return false,
        Err(e) => {
            tracing::warn!(error = %e, "cannot change the handoff rules; trying again in 5s");
            return false;
        }
    }
    let target = if handoff.target() == address { target } else { None };
    let mut state = membership.state();
    if state.handoff_to == target {
        return false;
    }
    match &target {
        Some((instance, address)) => {
            tracing::info!(%address, instance, "a member drains: handing over packets of connections we do not know to it");
        }
        None => tracing::info!("no member drains any more: handoff off"),
    }
    metrics::gauge!("halo_ecmp_handoff_active").set(if handoff.target().is_some() { 1.0 } else { 0.0 });
    state.handoff_to = target;
    true
}

/// Makes the announced set `wanted`, recording and counting what changed.
pub(super) fn apply(
    membership: &Membership,
    announcer: &mut Announcer,
    wanted: &BTreeSet<IpAddr>,
    reason: Withdrawal,
    withheld: Option<String>,
) {
    let result = announcer.set(wanted);
    let cluster = membership.settings.cluster.clone();
    metrics::gauge!("halo_ecmp_announced_addresses", "cluster" => cluster).set(announcer.announced().len() as f64);
    let withheld = match result {
        Ok(changed) => {
            if !changed.is_empty() {
                let why = if changed.withdrawn.is_empty() {
                    "ready"
                } else {
                    metrics::counter!("halo_ecmp_withdrawals_total", "reason" => reason.as_str()).increment(1);
                    reason.as_str()
                };
                tracing::info!(announced = ?changed.announced, withdrawn = ?changed.withdrawn, reason = why, "announcements changed");
                membership.record(&changed.announced, &changed.withdrawn, why);
            }
            withheld
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot change the announced addresses");
            Some(e.to_string())
        }
    };
    let mut state = membership.state();
    state.announced = announcer.announced().clone();
    state.withheld = withheld;
}

/// Writes the latest member value to the member key (with our session),
/// retrying a failed write until a newer value or success.
async fn publish_value(client: Client, key: String, session: String, mut values: watch::Receiver<String>) {
    loop {
        if values.changed().await.is_err() {
            return;
        }
        loop {
            let value = values.borrow_and_update().clone();
            match client.kv_acquire(&key, value, &session).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot write the member value; retrying");
                    tokio::time::sleep(CONSUL_RETRY).await;
                }
            }
        }
    }
}
