//! What a drain waits for from the peers before this instance withdraws
//! its routes: this host's address, where they pass on the packets of our
//! connections ([`resolve_address`]), and their word that they do
//! ([`await_handoff`]).
//!
//! The drain itself (say `draining`, wait for the handoff, withdraw, keep
//! accepting for `withdraw_wait`, close the listeners) is the end of
//! [`run`](super::run); the handoff's packet path is [`super::handoff`].
//! Why the order matters is in "What withdraws, and how fast" in [the
//! module docs](super).

use std::sync::Arc;
use std::time::Duration;

use halo_consul::{Client, Consistency, QueryOptions};
use tokio::time::Instant;

use super::{MemberState, MemberValue, Membership};

/// How long a draining instance waits for its peers to set up the handoff
/// before it withdraws anyway (their reads come every `announce_lease / 5`).
pub(crate) const HANDOFF_WAIT: Duration = Duration::from_secs(3);

/// Waits until every announcing peer that can hand over says it hands over
/// to us, or [`HANDOFF_WAIT`] passes, or our lease ends (`lease_until`:
/// announcing is not extended by a drain): only then do our withdrawn
/// flows reach peers that pass them on instead of resetting them. Writes
/// `draining` again should a member value written before it (a write in
/// flight when the membership loop ended) have landed after it.
pub(super) async fn await_handoff(
    membership: &Membership,
    client: &Client,
    session: &str,
    lease_until: Option<Instant>,
) {
    let began = Instant::now();
    let deadline = lease_until.map_or(began, |until| until.min(began + HANDOFF_WAIT));
    let prefix = membership.prefix();
    let key = membership.key();
    loop {
        let now = Instant::now();
        if now >= deadline {
            tracing::warn!(
                "peers did not set up the handoff in time (or the lease ran out); withdrawing: the connections the routers move to them are reset"
            );
            return;
        }
        let read = client.kv_list(&prefix, QueryOptions::with_consistency(Consistency::Consistent));
        if let Ok(Ok(answer)) = tokio::time::timeout(deadline - now, read).await {
            let members: Vec<(String, MemberValue)> = answer
                .value
                .iter()
                .filter(|p| p.session.is_some())
                .filter_map(|p| {
                    Some((
                        p.key.clone(),
                        serde_json::from_slice::<MemberValue>(p.value.as_ref()?).ok()?,
                    ))
                })
                .collect();
            if members
                .iter()
                .any(|(k, m)| *k == key && m.state != MemberState::Draining)
            {
                if let Err(e) = client.kv_acquire(&key, membership.value(), session).await {
                    tracing::debug!(error = %e, "cannot write draining again");
                }
            }
            let waiting: Vec<&str> = members
                .iter()
                .map(|(_, m)| m)
                .filter(|m| m.instance != membership.instance && m.state == MemberState::Announcing && m.can_handoff)
                .filter(|m| m.handoff.as_deref() != Some(membership.instance.as_str()))
                .map(|m| m.id.as_str())
                .collect();
            if waiting.is_empty() {
                tracing::info!(took = ?began.elapsed(), "every announcing peer hands our connections over");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks the agent for this host's address (where peers hand our packets
/// to while we drain: the address the agent advertises, which is how the
/// other hosts reach us) until it answers, every 5 s.
pub(super) async fn resolve_address(membership: Arc<Membership>, client: Client) {
    let mut failing = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), client.agent_self()).await {
            Ok(Ok(agent)) => {
                if membership.address.set(agent.address).is_err() {
                    tracing::debug!("the address was known already");
                }
                if !agent.address.is_ipv4() {
                    tracing::warn!(address = %agent.address, "the agent advertises an IPv6 address: peers cannot hand this instance's connections over on a drain (IPv4 only)");
                }
                return;
            }
            Ok(Err(e)) if !failing => {
                tracing::warn!(error = %e, "cannot ask the agent for this host's address; asking again every 5s");
            }
            Err(_) if !failing => {
                tracing::warn!("the agent did not say this host's address in 2s; asking again every 5s")
            }
            _ => {}
        }
        failing = true;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
