//! The failure detector wired into the election ([`super::detector`] is
//! the detector itself: probes, answers, verdicts).
//!
//! At the start of the election, [`start`] makes this instance known to its
//! peers: its Consul node, where it answers probes ([`super::advertise`])
//! and the pair key that authenticates them ([`super::pair_key`]); from
//! then on it answers probes on a thread of its own, in any role. A
//! standby probes the lock's holder ([`Watching`]) unless the holder cannot
//! be reached from here ([`Leadership::unwatchable`]), and on the
//! detector's evidence destroys the holder's session ([`force_takeover`]),
//! unless forced takeovers are damped ([`super::damping`]). The standby's
//! loop that ties these together is [`super::contend`].
//!
//! A false alarm costs a needless failover, never two actives: see "Failure
//! detection" in [the module docs](super), where the safety argument is.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use halo_consul::{Client, Error as ConsulError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::advertise::{self, Advertised};
use super::detector::{self, AnswerRole, Evidence, PeerWatch};
use super::key::LeaderValue;
use super::pair_key::{self, KeyRing};
use super::{Leadership, Role, CONSUL_RETRY};
use crate::control::instance::AbortOnDrop;

/// How long a damped standby waits after a verdict it may not act on
/// before probing again (to hear the active, which lifts the damping).
const DAMPED_RECHECK: Duration = Duration::from_secs(1);

/// Makes this instance known to its peers: asks the agent for our Consul
/// node, reads the pair key (and follows it until `tasks`), settles where
/// we answer probes and answers there until `tasks`. `probe` is the socket
/// to answer on when the config fixed its address (bound at start, so that
/// a taken address is a start-up error); otherwise the address is chosen
/// here, from what the local agent says ([`advertise`]). False if `stop`
/// came first.
pub(super) async fn start(
    leadership: &Arc<Leadership>,
    client: &Client,
    probe: Option<std::net::UdpSocket>,
    stop: &CancellationToken,
    tasks: &CancellationToken,
) -> bool {
    let settings = &leadership.settings;
    let Some(agent) = advertise::ask_agent(leadership, client, stop).await else {
        return false;
    };
    if let Ok(agent) = &agent {
        leadership.node.get_or_init(|| agent.node_name.clone());
    }
    let Some(keys) = fetch_pair_key(leadership, client, &settings.cluster, stop).await else {
        return false;
    };
    let keys = Arc::clone(leadership.keys.get_or_init(|| keys));
    tokio::spawn({
        let (client, cluster, keys, tasks) = (
            client.clone(),
            settings.cluster.clone(),
            Arc::clone(&keys),
            tasks.clone(),
        );
        async move {
            tokio::select! {
                () = tasks.cancelled() => {}
                () = pair_key::follow(client, cluster, keys) => {}
            }
        }
    });
    let (advertised, socket) = match probe {
        Some(socket) => (advertise::choose(settings.probe, &agent), Some(socket)),
        None => bind_probe(advertise::choose(settings.probe, &agent), leadership.admin),
    };
    if advertised.reachable {
        tracing::info!(probe = %advertised.addr, why = %advertised.why, "answering the pair's probes (UDP, and TCP for corroboration)");
    } else if advertised.addr.ip().is_loopback() && matches!(&agent, Ok(a) if a.address.is_loopback()) {
        tracing::info!(probe = %advertised.addr, why = %advertised.why, "answering the pair's probes; peers on other hosts cannot reach this address");
    } else {
        tracing::error!(probe = %advertised.addr, why = %advertised.why, "peers on other hosts cannot probe this instance: they rely on Consul's detection (seconds) to notice it die");
    }
    leadership.probe.get_or_init(|| advertised.clone());
    match socket {
        Some(socket) => spawn_responder(leadership, socket, &advertised, &keys, tasks),
        None => tracing::error!("not answering probes; peers fall back to Consul's detection"),
    }
    true
}

/// Reads (or creates) the cluster's pair key, retrying until it succeeds
/// or `stop`.
async fn fetch_pair_key(
    leadership: &Leadership,
    client: &Client,
    cluster: &str,
    stop: &CancellationToken,
) -> Option<Arc<ArcSwap<KeyRing>>> {
    let mut failing = false;
    loop {
        match pair_key::fetch(client, cluster).await {
            Ok(secret) => {
                leadership.set_consul_error(None);
                return Some(Arc::new(ArcSwap::from_pointee(KeyRing::new(&secret))));
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, key = %pair_key::kv_key(cluster), "cannot read the pair key that authenticates probes; retrying");
                }
                leadership.set_consul_error(Some(e.to_string()));
                failing = true;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(CONSUL_RETRY * 5) => {}
        }
    }
}

/// Binds the chosen probe address over UDP; if that fails (the agent's
/// address is not this host's), the admin address, saying so.
fn bind_probe(advertised: Advertised, admin: SocketAddr) -> (Advertised, Option<std::net::UdpSocket>) {
    let bind = |addr: SocketAddr| std::net::UdpSocket::bind(addr).and_then(|s| s.set_nonblocking(true).map(|()| s));
    match bind(advertised.addr) {
        Ok(socket) => (advertised, Some(socket)),
        Err(e) if advertised.addr != admin => {
            let why = format!(
                "the admin address, because {} ({}) cannot be bound here: {e}; set ha.probe_listen",
                advertised.addr, advertised.why
            );
            let fallback = Advertised {
                addr: admin,
                why,
                reachable: !admin.ip().is_loopback(),
            };
            match bind(admin) {
                Ok(socket) => (fallback, Some(socket)),
                Err(e) => {
                    tracing::error!(error = %e, probe = %admin, "cannot listen for probes");
                    (fallback, None)
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, probe = %advertised.addr, "cannot listen for probes");
            (advertised, None)
        }
    }
}

/// Answers probes on a thread of its own (`halo-probe`), so that a flood of
/// datagrams never competes with the election's lease timing, until
/// `stop`. Also listens for TCP on the probe address, unless the admin API
/// already does there: a refusal the peers can corroborate (see
/// [`detector`]).
fn spawn_responder(
    leadership: &Arc<Leadership>,
    socket: std::net::UdpSocket,
    advertised: &Advertised,
    keys: &Arc<ArcSwap<KeyRing>>,
    stop: &CancellationToken,
) {
    let tcp = if advertised.addr == leadership.admin {
        None
    } else {
        match std::net::TcpListener::bind(advertised.addr).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::error!(error = %e, probe = %advertised.addr, "cannot listen for TCP on the probe address: the peers cannot corroborate a refusal and wait for silence instead");
                None
            }
        }
    };
    let (me, keys, stop) = (Arc::clone(leadership), Arc::clone(keys), stop.clone());
    let spawned = std::thread::Builder::new().name("halo-probe".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the probe responder's runtime; peers fall back to Consul's detection");
                return;
            }
        };
        runtime.block_on(async move {
            let socket = match tokio::net::UdpSocket::from_std(socket) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot answer probes; peers fall back to Consul's detection");
                    return;
                }
            };
            let tcp = tcp.and_then(|l| match tokio::net::TcpListener::from_std(l) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::error!(error = %e, "cannot accept on the probe address over TCP");
                    None
                }
            });
            detector::respond(socket, tcp, keys, move || (me.instance.clone(), me.answer_role()), stop).await;
        });
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the probe responder's thread; peers fall back to Consul's detection");
    }
}

impl Leadership {
    /// The role as a probe answer states it.
    fn answer_role(&self) -> AnswerRole {
        match self.role() {
            Role::Active => AnswerRole::Active,
            Role::Suspended => AnswerRole::Suspended,
            Role::Standby => AnswerRole::Standby,
            Role::Starting => AnswerRole::Starting,
        }
    }

    /// Why the key's holder cannot be probed from here, if it cannot.
    pub(super) fn unwatchable(&self, holder: &LeaderValue, probe: SocketAddr) -> Option<String> {
        // During a rolling upgrade: an older active answers another
        // protocol, and probing it would only ever hear silence (a needless
        // forced takeover). Consul's detection covers it; a SIGTERM hands
        // it over without a takeover.
        if holder.probe_protocol != Some(detector::PROTOCOL) {
            return Some(format!(
                "the active answers probe protocol {}, this instance {}: it runs another halo-lb version (upgrade it; SIGTERM hands over without a takeover)",
                holder.probe_protocol.map_or_else(|| "1".to_owned(), |p| p.to_string()),
                detector::PROTOCOL
            ));
        }
        let theirs = holder.node.as_deref()?;
        let ours = self.node.get()?;
        (probe.ip().is_loopback() && theirs != ours).then(|| {
            format!(
                "the active advertises a loopback probe address ({probe}) from node {theirs}, and this is node {ours}: set ha.probe_listen, or let the agent advertise a reachable address"
            )
        })
    }
}

/// The detector's watch of one holder.
pub(super) struct Watching {
    /// The holder's session, destroyed on a forced takeover.
    pub(super) session: String,
    pub(super) task: AbortOnDrop<std::io::Result<Evidence>>,
}

impl Watching {
    /// Starts probing `peer`, where the holder of `session` (its process:
    /// `instance`) answers; the task ends with the detector's verdict.
    pub(super) fn start(leadership: &Arc<Leadership>, session: String, peer: SocketAddr, instance: String) -> Watching {
        let me = Arc::clone(leadership);
        Watching {
            session,
            task: AbortOnDrop(tokio::spawn(async move {
                let Some(keys) = me.keys.get() else {
                    return Err(std::io::Error::other("no pair key yet"));
                };
                let watch = PeerWatch {
                    instance: &instance,
                    me: &me.instance,
                    interval: me.settings.probe_interval,
                    misses: me.settings.probe_misses,
                    keys,
                };
                // Hearing the active lifts a damping that waits for it.
                detector::watch_peer(peer, watch, || me.state().damping.heard()).await
            })),
        }
    }
}

/// Records a forced takeover's outcome for
/// [`contend`](super::contend::contend): the session it destroyed, and
/// until when a damped detector must wait.
pub(super) fn after_force(outcome: Forced, target: &str, forced: &mut Option<String>) -> Option<Instant> {
    match outcome {
        Forced::Done => {
            *forced = Some(target.to_owned());
            None
        }
        Forced::Damped(until) => Some(until.unwrap_or_else(|| Instant::now() + DAMPED_RECHECK)),
        Forced::Failed => None,
    }
}

/// What a forced takeover came to.
pub(super) enum Forced {
    /// The holder's session is gone (destroyed by us, or already).
    Done,
    /// Held back by damping until then (`None`: until the active is heard,
    /// which needs probing on).
    Damped(Option<Instant>),
    /// Consul refused; probe on and try again.
    Failed,
}

/// Destroys the holder's session on the detector's evidence, unless
/// damped.
pub(super) async fn force_takeover(
    leadership: &Leadership,
    client: &Client,
    target: &str,
    evidence: &Evidence,
) -> Forced {
    let now = Instant::now();
    {
        let mut state = leadership.state();
        if !state.damping.allows(now) {
            state.detector.damped += 1;
            let until = state.damping.until(now);
            let first = state.damping.first_report();
            let unheard = state.damping.waits_to_hear();
            drop(state);
            metrics::counter!("halo_ha_forced_takeovers_damped_total").increment(1);
            if first {
                tracing::warn!(%evidence, damped_for = ?until.map(|u| u - now), until_heard = unheard, "the active looks gone, but forced takeovers are damped (we lost the lock ourselves while serving: the link between us may be what broke); waiting for Consul's own detection, or to hear the active again");
            } else {
                tracing::debug!(%evidence, "still damped");
            }
            return Forced::Damped(until);
        }
    }
    match client.session_destroy(target).await {
        Ok(()) => {
            let mut state = leadership.state();
            state.detector.forced_takeovers += 1;
            state.forced = Some(target.to_owned());
            state.detector.last_evidence = Some(evidence.to_string());
            drop(state);
            metrics::counter!("halo_ha_forced_takeovers_total", "evidence" => evidence.kind()).increment(1);
            tracing::warn!(session = target, %evidence, "forced takeover: destroyed the active's session; acquiring after the lock delay");
            Forced::Done
        }
        // Gone already: Consul (or another standby) got there first.
        Err(ConsulError::NotFound { .. }) => Forced::Done,
        Err(e) => {
            tracing::warn!(error = %e, %evidence, "cannot destroy the active's session; probing on");
            Forced::Failed
        }
    }
}
