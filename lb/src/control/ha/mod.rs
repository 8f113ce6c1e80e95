//! Leadership of an active/standby pair (or more), through a Consul
//! session lock.
//!
//! Each instance registers itself with its local agent as service `halo-lb`
//! with a TTL check it heartbeats four times per TTL, and holds a session
//! bound to that check and to the node's `serfHealth`, with `lock_delay`.
//! Whoever holds the key `halo/<cluster>/leader` with its session is the
//! active and serves the VIPs; the others block on the key (a consistent
//! blocking query) and acquire it the moment it is free. The key's
//! `LockIndex` is the fencing epoch. This runs on a thread of its own
//! (`halo-ha`, see [`crate::run`]): nothing else shares the thread that
//! times the lease.
//!
//! # The invariant: stop before anyone else can start
//!
//! Two actives at once is the worst failure of a pair. Consul hands the
//! lock to another session only after the holder's session was invalidated
//! (its check went critical, its node failed, or it was destroyed, by
//! itself or by a standby's forced takeover) **and then** the lock delay
//! passed; or after the holder released the key itself. The active
//! therefore serves only under a lease that ends before the lock delay
//! after any invalidation could:
//!
//! - **Server-confirmed lease.** Every `lock_delay / 5` the active reads
//!   the key with `?consistent`: the Consul leader answers only after
//!   confirming its leadership with a quorum, so an answer to a read *sent*
//!   at `t` that shows our session on the key proves the session held it at
//!   some instant after `t`. Any invalidation comes later than that, and
//!   nobody can acquire before the lock delay after the invalidation, so
//!   not before `t + lock_delay`. The lease ends at `t + lock_delay -
//!   margin` (a fifth of the lock delay: timer lateness and clock-rate
//!   error) for the latest such read. Heartbeats to the local agent keep
//!   the check passing but prove nothing about what the servers decided (a
//!   local agent answers while it has lost every server), so they never
//!   extend the lease.
//! - **This covers every way of losing the lock**: the check going critical
//!   (a dead or frozen process, an agent that lost our heartbeats), the
//!   node failing in gossip (host death, cable pull, a partition from the
//!   servers), a destroy (a forced takeover by a standby's detector, or our
//!   own retirement of a suspect session), a leader election among the
//!   servers (no confirmation is possible, so the lease runs out). The one
//!   exception is a `?release` of our session or a delete of the key by
//!   someone else, which start no lock delay; nothing in halo does either
//!   to a session it does not hold, and the ACL policy in
//!   `packaging/consul/halo-lb.hcl` grants `key:write` on `halo/` to
//!   halo-lb alone.
//! - **Credentials change nothing of this.** The election's client shares
//!   the process's Consul token (a SIGHUP may swap it) and TLS settings. A
//!   token Consul refuses, or a TLS failure, makes every call fail like an
//!   unreachable Consul: no read is confirmed, so the lease runs out before
//!   the session (whose check our failed heartbeats let go critical) can be
//!   invalidated and its lock delay end.
//! - **Enforced where it matters.** When the lease ends the active stops
//!   serving ([`Server::stop_serving`], synchronous: the TCP listening
//!   sockets leave LISTEN, and each UDP VIP's gate closes, before it
//!   returns; a closed gate waits out a batch being forwarded and lets no
//!   other datagram of that VIP through, see [`crate::dataplane::udp`]).
//!   Independently, the data plane checks the lease
//!   ([`crate::dataplane::lease`], one atomic deadline) for every accepted
//!   connection and every UDP batch, so a process frozen past its lease
//!   serves nothing when it wakes, whatever order its tasks then run in.
//! - **Evidence of loss** (a confirming read, or the key watch, showing
//!   another session or none) stops the active at once. When that evidence
//!   and the lapse of the lease arrive together, the term ends as a lost
//!   lock ([`lapsed`](lease::lapsed)): either way serving stops in the same instant; the
//!   name only decides the damping that follows, never the stop.
//! - **Handover.** On SIGTERM the active stops serving first and only then
//!   releases the key, which starts no lock delay, so the standby serves
//!   within milliseconds without ever overlapping.
//! - **Promotion.** An instance serves only after its acquire succeeded and
//!   a consistent read (sent after the acquire) confirmed its session holds
//!   the key; that read starts the lease. If any VIP cannot be bound, the
//!   promotion is undone (stop serving, release the key, back off): a
//!   promotion that cannot bind is not a promotion.
//! - **Suspended.** A lease that runs out without evidence of loss (the
//!   servers did not answer in time: a leader election, a partition, a slow
//!   disk) suspends the active: it stops serving but keeps its session and
//!   keeps confirming, and serves again (same epoch, a new term) as soon as
//!   a confirming read succeeds. So a short Consul leader election costs
//!   the VIP the election plus one confirmation, not a failover.
//!
//! # The floating address
//!
//! With `vip_address`, the active also holds an address on its interface
//! ([`crate::control::floating`]). Nothing about it lets anyone serve
//! earlier, so stop-before-start holds as above:
//!
//! - **Probe before claiming.** A new lock holder first probes for the
//!   address ([`vip::wait_until_free`]: an ARP probe, or a DAD
//!   solicitation for IPv6). Hosts that have the address answer; a live
//!   halo-lb holding it also *announces* it, since an active defends its
//!   address on hearing a probe. While a live claimer announces it, the
//!   holder claims nothing and serves nothing (it says `standby`, with
//!   `vip_conflict.yielded`), keeps its lock and lease, and probes again
//!   every second. This only delays serving (by the probe, 25 ms, in
//!   every promotion). A leftover that only answers (the address still on
//!   the host of a process killed with -9) does not hold it back: the new
//!   active claims the address, announces it, and announces again every
//!   second while the leftover answers, as before.
//! - **Two live claimers** (two clusters configured with one address:
//!   their locks are independent, so this is a safety net, not the
//!   election) can still both claim it when they promote at the same
//!   moment. An active that hears another host announce the address in two
//!   probe rounds in a row applies one rule, the same on both sides: the
//!   lower MAC keeps the address. The other stops serving and removes the
//!   address exactly as on any step-down (reason `vip_yielded`), releases
//!   the lock, backs off as after a failed bind, and waits as above. A kernel never announces on
//!   its own (no `arp_notify` link event comes twice in a row), so a
//!   leftover never makes the active of the right pair give way.
//! - **Removed from under the active.** The active watches the kernel's
//!   address notifications (`RTM_DELADDR`); if the address leaves the
//!   interface while it serves (under its lease, checked first in the
//!   serving loop of [`term`]), it adds it back and announces it, and
//!   counts it in `halo_ha_vip_restored_total`. Taking it away on purpose
//!   means stopping the instance: `halo-lb release-vip` refuses while any
//!   live halo-lb in the network namespace manages the address.
//! - **Step-down** removes the address after the listeners are shut, so
//!   the address going is never what stops serving.
//!
//! # Failure detection
//!
//! Consul notices a dead process only when its check TTL runs out, and a
//! dead host only when gossip declares its node failed (seconds). So a
//! standby also probes the active directly ([`detector`], on the address
//! [`advertise`] chose, authenticated with the [`pair_key`]) and, on a
//! corroborated refusal, `probe_misses` unanswered probes, or an active
//! that keeps answering `suspended`, destroys the active's session (a
//! "forced takeover"; the lock delay applies) and acquires. Because of the
//! server-confirmed lease, a false alarm costs a needless failover, never
//! two actives; the detector's own defences keep false alarms out of an
//! attacker's reach. Forced takeovers are damped ([`damping`]): after an
//! undeserved loss, until the active has been heard again.
//!
//! # Identity
//!
//! Every process registers its own service instance and check
//! (`halo-lb-<cluster>-<id>-<instance>`). A crashed predecessor's check is
//! heartbeated by nobody, so it expires and releases the lock through
//! Consul; two live processes with one `ha.id` contend fairly and the
//! younger leaves the election ([`older_twin`](registration::older_twin)).
//!
//! # Layout
//!
//! [`run`] ties the election together on its thread, one session after
//! another. Each part is a module of its own, whose docs say what it does
//! and point back here for why that is safe:
//!
//! - [`registration`]: the service instance, its TTL check and heartbeat,
//!   the session bound to them, and one election per `ha.id`.
//! - [`key`]: the lock key's value and the consistent watch that follows it.
//! - [`contend`]: the standby, which acquires the free key or forces out a
//!   holder the detector says is gone.
//! - [`lease`]: the confirming reads that earn the lease, suspension, and
//!   the release of the lock.
//! - [`term`]: an active's term, from promotion to the step-down.
//! - [`vip`]: the floating address under the election.
//! - [`probing`]: the failure detector wired into the election;
//!   [`detector`], [`advertise`] and [`pair_key`] are the detector, where it
//!   answers, and the key that authenticates it.
//! - [`damping`]: forced takeovers held back after an undeserved loss.

pub(crate) mod advertise;
mod contend;
mod damping;
mod detector;
mod key;
mod lease;
mod pair_key;
mod probing;
mod registration;
mod term;
mod vip;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use halo_consul::Client;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use arc_swap::ArcSwap;
use contend::Contend;
use damping::Damping;
pub(crate) use detector::Evidence;
use key::KeyState;
use lease::Resume;
use pair_key::KeyRing;
use term::Serving;

pub(crate) use advertise::Advertised;

use crate::control::floating::{FloatingIp, Outcome};
use crate::control::instance::{self, close_session, unix_us};
use crate::control::server::Server;
use crate::control::status::{DetectorStatus, HaStatus, LeaderStatus, VipConflict};
pub(crate) use crate::control::status::{Role, StepDown, Term};
use crate::settings::HaSettings;

/// Back-off after a failed Consul call in the election loop.
const CONSUL_RETRY: Duration = Duration::from_millis(100);
/// How often an instance looks for an older live instance with its id.
const TWIN_RECHECK: Duration = Duration::from_secs(2);
/// The first wait after a promotion that could not bind its listeners; it
/// doubles with every failure in a row, up to [`BIND_BACKOFF_MAX`].
const BIND_BACKOFF: Duration = Duration::from_secs(1);
const BIND_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often an active with a floating address probes for other hosts
/// that have it (one round of [`vip::Conflict`]), and a holder waiting for
/// a live claimer to go away probes again.
const CONFLICT_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct State {
    role: Role,
    session: Option<String>,
    epoch: Option<u64>,
    key: Option<KeyState>,
    terms: VecDeque<Term>,
    consul_error: Option<String>,
    lease_until: Option<Instant>,
    /// An older live instance uses our `ha.id`: we stay out of the election.
    id_conflict: Option<String>,
    detector: DetectorStatus,
    damping: Damping,
    /// Other hosts that have the floating address while we hold the lock
    /// (see [`vip::record`]).
    vip_conflict: Option<VipConflict>,
    /// The session we destroyed in our last forced takeover (written into
    /// the lock's value).
    forced: Option<String>,
    /// Our session, lost while we served under a valid lease, and when: an
    /// incident for damping if the next holder says it forced that session
    /// out (see [`Leadership::observe_holder`]).
    lost_while_serving: Option<(String, Instant)>,
}

/// One instance's view of the election: shared by the election thread, the
/// admin API and `/status`.
#[derive(Debug)]
pub(crate) struct Leadership {
    settings: HaSettings,
    admin: SocketAddr,
    started: String,
    /// Microseconds since the Unix epoch at start: with `instance`, orders
    /// two live instances that share an id.
    started_us: u64,
    /// Random, new with every process: names this process's registration,
    /// check and lock value, so a restarted process never shares a check
    /// with its dead predecessor and two processes never share one.
    instance: String,
    /// Where this instance answers probes, chosen once at the start of the
    /// election.
    probe: OnceLock<Advertised>,
    /// This instance's Consul node, if the agent said.
    node: OnceLock<String>,
    /// The pair key, read once at the start of the election and followed.
    keys: OnceLock<Arc<ArcSwap<KeyRing>>>,
    /// Wakes the lock-key watch to read again at once: a session was just
    /// created, so Consul answers again, while the watch may still be
    /// waiting out a request the outage left hanging, or a back-off.
    key_refresh: tokio::sync::Notify,
    state: Mutex<State>,
}

impl Leadership {
    /// The view of a new instance (role: starting).
    pub(crate) fn new(settings: HaSettings, admin: SocketAddr) -> Arc<Leadership> {
        let now = SystemTime::now();
        Arc::new(Leadership {
            settings,
            admin,
            started: halo_health::server::rfc3339(now),
            started_us: unix_us(now),
            instance: instance::new_instance(),
            probe: OnceLock::new(),
            node: OnceLock::new(),
            keys: OnceLock::new(),
            key_refresh: tokio::sync::Notify::new(),
            state: Mutex::new(State {
                role: Role::Starting,
                session: None,
                epoch: None,
                key: None,
                terms: VecDeque::new(),
                consul_error: None,
                lease_until: None,
                id_conflict: None,
                detector: DetectorStatus::default(),
                damping: Damping::default(),
                vip_conflict: None,
                forced: None,
                lost_while_serving: None,
            }),
        })
    }

    /// This process's service and check IDs at the agent.
    pub(crate) fn ids(&self) -> instance::Ids {
        instance::Ids::new(&self.settings, &self.instance)
    }

    /// This process's service ID at the agent:
    /// `halo-lb-<cluster>-<id>-<instance>`.
    pub(crate) fn service_id(&self) -> String {
        self.ids().service
    }

    /// This process's TTL check ID at the agent.
    pub(crate) fn check_id(&self) -> String {
        self.ids().check
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("leadership state poisoned")
    }

    /// This instance's `ha.id`.
    pub(crate) fn id(&self) -> &str {
        &self.settings.id
    }

    /// The `[ha]` settings.
    pub(crate) fn settings(&self) -> &HaSettings {
        &self.settings
    }

    /// This instance's role.
    pub(crate) fn role(&self) -> Role {
        self.state().role
    }

    /// The active's admin address as the key names it, unless that is us.
    pub(crate) fn leader_admin(&self) -> Option<String> {
        let state = self.state();
        let key = state.key.as_ref()?;
        key.session.as_ref()?;
        let holder = key.holder.as_ref()?;
        (holder.instance != self.instance).then(|| holder.admin.clone())
    }

    /// The `ha` part of `/status`.
    pub(crate) fn status(&self) -> HaStatus {
        let state = self.state();
        let now = Instant::now();
        let leader = state.key.as_ref().and_then(|k| {
            k.session.as_ref().map(|_| LeaderStatus {
                id: k.holder.as_ref().map(|h| h.id.clone()),
                admin: k.holder.as_ref().map(|h| h.admin.clone()),
                instance: k.holder.as_ref().map(|h| h.instance.clone()),
                epoch: k.lock_index,
            })
        });
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        HaStatus {
            cluster: self.settings.cluster.clone(),
            id: self.settings.id.clone(),
            instance: self.instance.clone(),
            role: state.role,
            epoch: state.epoch,
            leader,
            session: state.session.clone(),
            lease_remaining_ms: state
                .lease_until
                .map(|until| millis(until.saturating_duration_since(now))),
            check_ttl_ms: millis(self.settings.check_ttl),
            lock_delay_ms: millis(self.settings.lock_delay),
            probe: self.probe.get().map(|p| p.addr.to_string()).unwrap_or_default(),
            probe_reason: self
                .probe
                .get()
                .map_or_else(|| self.settings.probe.to_string(), |p| p.why.clone()),
            node: self.node.get().cloned(),
            detector: DetectorStatus {
                damped_for_ms: state.damping.until(now).map(|u| millis(u - now)),
                damped_until_heard: state.damping.waits_to_hear(),
                ..state.detector.clone()
            },
            vip_conflict: state.vip_conflict.clone(),
            consul_error: state.consul_error.clone(),
            id_conflict: state.id_conflict.clone(),
            terms: state.terms.iter().cloned().collect(),
        }
    }

    fn set_role(&self, role: Role) {
        self.state().role = role;
        // Which pair this instance belongs to, for alerts that count actives
        // per cluster (`halo_ha_active` carries no labels of its own).
        metrics::gauge!("halo_ha_info", "cluster" => self.settings.cluster.clone(), "id" => self.settings.id.clone())
            .set(1.0);
        metrics::gauge!("halo_ha_active").set(if role == Role::Active { 1.0 } else { 0.0 });
        metrics::gauge!("halo_ha_suspended").set(if role == Role::Suspended { 1.0 } else { 0.0 });
    }

    fn set_consul_error(&self, error: Option<String>) {
        self.state().consul_error = error;
    }

    fn set_lease(&self, until: Option<Instant>) {
        self.state().lease_until = until;
    }
}

/// Registers the election's counters at zero, each label value included, so
/// that `rate()` and `increase()` see them from the start rather than from
/// the first event (which they would miss, having no earlier sample).
fn register_metrics() {
    for name in [
        "halo_ha_promotions_total",
        "halo_ha_confirm_failures_total",
        "halo_ha_heartbeat_failures_total",
        "halo_ha_forced_takeovers_damped_total",
        "halo_ha_probe_misses_total",
        "halo_ha_probe_refusals_uncorroborated_total",
        "halo_ha_id_conflicts_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for reason in ["unauthenticated", "rate_limited"] {
        metrics::counter!("halo_ha_probes_rejected_total", "reason" => reason).increment(0);
    }
    for reason in [
        StepDown::LeaseExpired,
        StepDown::SessionLost,
        StepDown::LockLost,
        StepDown::BindFailed,
        StepDown::VipYielded,
        StepDown::Shutdown,
    ] {
        metrics::counter!("halo_ha_step_downs_total", "reason" => reason.as_str()).increment(0);
    }
    // Every kind a forced takeover can be made on (not SelfAnswered, which
    // never forces one).
    for evidence in [
        Evidence::Refused,
        Evidence::Silent(0),
        Evidence::Replaced(String::new()),
        Evidence::NotServing(0),
    ] {
        metrics::counter!("halo_ha_forced_takeovers_total", "evidence" => evidence.kind()).increment(0);
    }
    metrics::gauge!("halo_ha_vip_conflict").set(0.0);
}

/// Runs the election until `stop` is cancelled, promoting and demoting
/// `server`. `probe` is the socket this instance answers probes on when the
/// config fixed its address (bound at start, so that a taken address is a
/// start-up error); otherwise the address is chosen from what the local
/// agent says ([`advertise`], in [`probing::start`]). On return this
/// instance no longer serves and has released the lock if it held it.
pub(crate) async fn run(
    leadership: Arc<Leadership>,
    client: Client,
    server: Arc<Server>,
    floating: Option<Arc<FloatingIp>>,
    probe: Option<std::net::UdpSocket>,
    stop: CancellationToken,
) {
    let settings = leadership.settings.clone();
    crate::dataplane::lease::revoke();
    register_metrics();
    if let Some(floating) = &floating {
        // A previous process may have died while active and left the
        // address behind; a standby must not carry it.
        match vip::release_address(floating).await {
            Ok(Outcome::Changed) => {
                tracing::warn!(address = %floating.address(), "removed a floating address left behind")
            }
            Ok(Outcome::Unchanged) => {}
            Err(e) => tracing::error!(error = %e, "cannot check the floating address"),
        }
    }
    // Short calls: heartbeats, acquire, confirm. The blocking watch adds
    // its wait to this itself.
    let client = client.with_timeout(
        settings
            .check_ttl
            .clamp(Duration::from_millis(500), Duration::from_secs(5)),
    );
    let tasks = stop.child_token();

    // Who we are to our peers: our node, where we answer probes, and the
    // key that authenticates them. Nothing below can start without Consul.
    if !probing::start(&leadership, &client, probe, &stop, &tasks).await {
        return;
    }
    // The check: until when it is known to pass (last successful
    // heartbeat + TTL).
    let (check_tx, mut check) = watch::channel(None::<Instant>);
    tokio::spawn(registration::heartbeat(
        Arc::clone(&leadership),
        client.clone(),
        check_tx,
        tasks.clone(),
    ));
    let (key_tx, mut key) = watch::channel(None::<Option<KeyState>>);
    tokio::spawn(key::watch_key(
        Arc::clone(&leadership),
        client.clone(),
        key_tx,
        tasks.clone(),
    ));

    let mut bind_backoff = BIND_BACKOFF;
    'sessions: loop {
        let Some(session) = registration::open_session(&leadership, &client, &mut check, &stop).await else {
            break;
        };
        leadership.set_role(Role::Standby);
        let (mut epoch, mut lease_until) =
            match contend::contend(&leadership, &client, &session, &mut key, &mut check, &stop).await {
                Contend::Acquired { epoch, lease_until } => (epoch, lease_until),
                Contend::SessionLost => {
                    leadership.state().session = None;
                    continue;
                }
                Contend::Twin => {
                    close_session(&client, &session).await;
                    leadership.state().session = None;
                    continue;
                }
                Contend::Stopped => {
                    close_session(&client, &session).await;
                    break;
                }
            };
        // Terms under this session: suspended in between when the servers
        // could not confirm in time.
        let reason = loop {
            let term = Serving {
                server: &server,
                floating: floating.as_ref(),
                session: &session,
                epoch,
                lease_until,
            };
            let reason = term::lead(&leadership, &client, term, &mut key, &stop).await;
            if matches!(reason, StepDown::LockLost | StepDown::SessionLost) {
                // Taken from us while we served under a valid lease: from
                // here, a takeover we did not deserve (a broken link to the
                // peer, not a dead active). Damp our own forced takeovers,
                // or we would take the lock straight back.
                leadership.lost_lock(&session);
            }
            if reason != StepDown::LeaseExpired {
                break reason;
            }
            match lease::suspend(&leadership, &client, &session, &mut key, &stop).await {
                Resume::Confirmed {
                    epoch: e,
                    lease_until: l,
                } => {
                    tracing::info!(epoch = e, "the servers confirm our lock again: resuming");
                    (epoch, lease_until) = (e, l);
                }
                Resume::Lost => break StepDown::LockLost,
                Resume::Stopped => break StepDown::Shutdown,
            }
        };
        match reason {
            StepDown::Shutdown => {
                // Stopped serving already; now hand over. A release starts
                // no lock delay, so the standby can take over at once.
                lease::release_lock(&leadership, &client, &session).await;
                close_session(&client, &session).await;
                break 'sessions;
            }
            StepDown::BindFailed | StepDown::VipYielded => {
                // Hand the lock to whoever can bind, then wait before
                // contending again (the obstacle may be ours to outlast).
                lease::release_lock(&leadership, &client, &session).await;
                close_session(&client, &session).await;
                leadership.state().session = None;
                leadership.set_role(Role::Starting);
                if reason == StepDown::VipYielded {
                    tracing::warn!(retry_in = ?bind_backoff, "gave the floating address way to another live host; contending again later");
                } else {
                    tracing::warn!(retry_in = ?bind_backoff, "promotion undone: a vip could not be bound");
                }
                tokio::select! {
                    () = stop.cancelled() => break 'sessions,
                    () = tokio::time::sleep(bind_backoff) => {}
                }
                bind_backoff = (bind_backoff * 2).min(BIND_BACKOFF_MAX);
            }
            StepDown::LockLost | StepDown::SessionLost | StepDown::LeaseExpired => {
                bind_backoff = BIND_BACKOFF;
                if leadership.state().lost_while_serving.is_some() {
                    // Taken from us while we served: whoever took it waits
                    // out the lock delay before it can acquire. Do not race
                    // it for the lock (we would win half the time, and it
                    // would take the lock back); contend again after that.
                    tokio::select! {
                        () = stop.cancelled() => break 'sessions,
                        () = tokio::time::sleep(settings.lock_delay * 3) => {}
                    }
                }
                // Not a standby until it has a session again (its node may
                // still be failed in gossip, its check critical).
                leadership.set_role(Role::Starting);
                // The session is suspect (or gone). Destroy it, which frees
                // the lock after the lock delay if it still held it, and
                // contend again with a fresh one.
                tokio::spawn(registration::retire_session(client.clone(), session, stop.clone()));
                leadership.state().session = None;
            }
        }
    }
    tasks.cancel();
    if let Err(e) = client.deregister_service(&leadership.service_id()).await {
        tracing::warn!(error = %e, "cannot deregister the halo-lb instance; Consul removes it a minute after its check fails");
    }
    leadership.set_role(Role::Standby);
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::key::{watch_key, LeaderValue};
    use super::lease::lapsed;
    use super::*;
    use crate::settings::ProbeListen;

    /// A re-plugged standby's key watch may be stuck in a request the cut
    /// left hanging in its agent (until the request's 11.6 s deadline);
    /// creating a session wakes it to read afresh, so the standby knows
    /// whom to probe at once. (Before: the holder stayed unknown, and a
    /// cable pulled then took 1.1 s to fail over instead of 0.75.)
    #[tokio::test]
    async fn a_new_session_makes_a_hanging_key_watch_read_afresh() {
        let consul = halo_testkit::ConsulAgent::start().await;
        let proxy = halo_testkit::fault::FaultProxy::start(consul.http_addr()).await;
        let direct = Client::from_address(consul.http_url()).unwrap();
        let via_proxy = Client::from_address(proxy.http_url()).unwrap();
        let leadership = leadership("n1");
        let key = leadership.settings.lock_key();
        let (tx, mut rx) = watch::channel(None::<Option<KeyState>>);
        let stop = CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        tokio::spawn(watch_key(Arc::clone(&leadership), via_proxy, tx, stop));
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| v.is_some()))
            .await
            .expect("a first answer")
            .unwrap();

        // The cut: the watch's request hangs; the key changes meanwhile;
        // then the path heals for new connections only.
        // (Its next blocking read went out with the first answer; cut now,
        // it is held whether it reached the agent or not.)
        proxy.cut();
        assert!(direct.kv_put(&key, "{}").await.unwrap());
        proxy.heal_new_only();
        leadership.key_refresh.notify_one();
        let seen = tokio::time::timeout(Duration::from_secs(3), rx.wait_for(|v| matches!(v, Some(Some(_))))).await;
        assert!(seen.is_ok(), "the watch read the key afresh when told to");
    }

    #[test]
    fn a_term_whose_confirmer_saw_the_lock_taken_ends_as_a_lost_lock() {
        let (tx, mut lost) = oneshot::channel::<()>();
        assert_eq!(
            lapsed(&mut lost),
            StepDown::LeaseExpired,
            "nothing said: the lease ran out"
        );
        tx.send(()).unwrap();
        assert_eq!(lapsed(&mut lost), StepDown::LockLost, "said: the lock is gone");
        let (tx, mut lost) = oneshot::channel::<()>();
        drop(tx);
        assert_eq!(lapsed(&mut lost), StepDown::LeaseExpired, "ended without a word");
    }

    fn leadership(node: &str) -> Arc<Leadership> {
        let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
        let settings = HaSettings {
            cluster: "c".into(),
            id: "a".into(),
            id_is_default: false,
            check_ttl: Duration::from_secs(1),
            lock_delay: Duration::from_millis(300),
            heartbeat: Duration::from_millis(250),
            margin: Duration::from_millis(60),
            lease: Duration::from_millis(240),
            confirm_every: Duration::from_millis(60),
            probe: ProbeListen::AgentAddress { port: 9901, admin },
            probe_interval: Duration::from_millis(100),
            probe_misses: 3,
            floating: None,
            ecmp: None,
        };
        let l = Leadership::new(settings, admin);
        l.node.get_or_init(|| node.to_owned());
        l
    }

    fn holder(node: &str, protocol: Option<u32>) -> LeaderValue {
        LeaderValue {
            id: "b".into(),
            admin: "127.0.0.1:9901".into(),
            start: String::new(),
            instance: "00000000000000bb".into(),
            probe: None,
            node: Some(node.into()),
            probe_protocol: protocol,
            forced: None,
        }
    }

    /// The cable-pull outliers of the failover bench: an instance whose own
    /// session Consul ended (its node flapping in gossip after a re-plug)
    /// was damped as if a peer had forced it out, and its next real
    /// takeover waited for Consul's detection (6.3 s). Only a holder that
    /// says it forced our session out makes the loss an incident.
    #[test]
    fn only_a_peer_that_forced_us_out_damps_us() {
        let key = |holder: LeaderValue| KeyState {
            session: Some("theirs".into()),
            lock_index: 2,
            holder: Some(holder),
        };
        let now = Instant::now();
        // Consul ended our session; a peer acquired without forcing: no damping.
        let me = leadership("lb1");
        me.lost_lock("ours");
        me.observe_holder(Some(&KeyState {
            session: None,
            lock_index: 1,
            holder: None,
        }));
        assert!(me.state().lost_while_serving.is_some(), "free: undecided yet");
        me.observe_holder(Some(&KeyState {
            session: Some("ours".into()),
            lock_index: 1,
            holder: Some(holder("lb1", Some(detector::PROTOCOL))),
        }));
        assert!(
            me.state().lost_while_serving.is_some(),
            "a view from before the loss: undecided yet"
        );
        me.observe_holder(Some(&key(holder("lb2", Some(detector::PROTOCOL)))));
        assert!(me.state().damping.allows(now), "not damped");
        assert!(me.state().lost_while_serving.is_none());
        // A peer that forced our session out: damped.
        me.lost_lock("ours");
        let mut forcer = holder("lb2", Some(detector::PROTOCOL));
        forcer.forced = Some("ours".into());
        me.observe_holder(Some(&key(forcer)));
        assert!(!me.state().damping.allows(Instant::now()), "damped");
    }

    #[test]
    fn which_holders_are_probed() {
        let me = leadership("lb2");
        let reachable: SocketAddr = "198.18.0.11:9901".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:9901".parse().unwrap();
        let current = Some(detector::PROTOCOL);
        assert_eq!(me.unwatchable(&holder("lb1", current), reachable), None);
        // A loopback address is probed only on the holder's own node.
        assert_eq!(me.unwatchable(&holder("lb2", current), loopback), None);
        let why = me.unwatchable(&holder("lb1", current), loopback).unwrap();
        assert!(why.contains("loopback") && why.contains("lb1"), "{why}");
        // An older halo-lb (no protocol in its value) is left to Consul: its
        // answers could never be authentic, and silence would force a
        // needless takeover in the middle of a rolling upgrade.
        let why = me.unwatchable(&holder("lb1", None), reachable).unwrap();
        assert!(why.contains("protocol 1"), "{why}");
    }
}
