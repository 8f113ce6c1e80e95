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
//!   lock ([`lapsed`]): either way serving stops in the same instant; the
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
//!   interface while it serves (under its lease, checked first in
//!   [`serve`]), it adds it back and announces it, and counts it in
//!   `halo_ha_vip_restored_total`. Taking it away on purpose means
//!   stopping the instance: `halo-lb release-vip` refuses while any live
//!   halo-lb in the network namespace manages the address.
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
//! younger leaves the election ([`older_twin`]).

pub(crate) mod advertise;
mod damping;
mod detector;
mod pair_key;
mod vip;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use halo_consul::{
    Client, Consistency, Error as ConsulError, HealthQuery, QueryOptions, ServiceRegistration, SessionBehavior,
    SessionChecks, SessionRequest, Watch,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use arc_swap::ArcSwap;
use damping::Damping;
pub(crate) use detector::Evidence;
use detector::{AnswerRole, PeerWatch};
use pair_key::KeyRing;

pub(crate) use advertise::Advertised;

use crate::control::floating::{FloatingIp, Outcome};
use crate::control::instance::{self, close_session, unix_us, AbortOnDrop};
use crate::control::server::Server;
use crate::control::status::{DetectorStatus, HaStatus, LeaderStatus, VipConflict};
pub(crate) use crate::control::status::{Role, StepDown, Term};
use crate::settings::HaSettings;

/// How long the key watch blocks per call.
const KEY_WAIT: Duration = Duration::from_secs(10);
/// How often a standby retries an acquire refused while the key is free (a
/// lock delay is running).
const ACQUIRE_RETRY: Duration = Duration::from_millis(10);
/// Back-off after a failed Consul call in the election loop.
const CONSUL_RETRY: Duration = Duration::from_millis(100);
/// How long a standby leaves a peer alone whose probe address led back to
/// itself (a misconfigured `probe_listen`).
const SELF_ANSWERED_RETRY: Duration = Duration::from_secs(60);
/// How long a damped standby waits after a verdict it may not act on
/// before probing again (to hear the active, which lifts the damping).
const DAMPED_RECHECK: Duration = Duration::from_secs(1);
/// How often an instance looks for an older live instance with its id.
const TWIN_RECHECK: Duration = Duration::from_secs(2);
/// Confirming reads of the lock in flight at once, at most.
const CONFIRMS_IN_FLIGHT: usize = 4;
/// The first wait after a promotion that could not bind its listeners; it
/// doubles with every failure in a row, up to [`BIND_BACKOFF_MAX`].
const BIND_BACKOFF: Duration = Duration::from_secs(1);
const BIND_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often an active with a floating address probes for other hosts
/// that have it (one round of [`vip::Conflict`]), and a holder waiting for
/// a live claimer to go away probes again.
const CONFLICT_CHECK: Duration = Duration::from_secs(1);
/// Terms kept for `/status`.
const HISTORY: usize = 64;

/// The lock key's value: who holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LeaderValue {
    /// The holder's `ha.id`.
    pub id: String,
    /// The holder's admin address, where a standby forwards writes.
    pub admin: String,
    /// When the holder's process started (RFC 3339).
    pub start: String,
    /// The holder's process: random, new with every start. Empty in values
    /// written by older versions.
    #[serde(default)]
    pub instance: String,
    /// Where the holder answers probes (UDP). `None` in values written by
    /// older versions: no detector then.
    #[serde(default)]
    pub probe: Option<String>,
    /// The holder's Consul node. A standby on another node never probes a
    /// loopback probe address (it would reach its own host).
    #[serde(default)]
    pub node: Option<String>,
    /// The probe protocol the holder answers: [`detector::PROTOCOL`].
    /// Absent in values written by versions before authenticated probes,
    /// whose holders a standby does not probe (see [`Leadership::unwatchable`]).
    #[serde(default)]
    pub probe_protocol: Option<u32>,
    /// The session this holder destroyed in its last forced takeover. The
    /// instance that held that session learns from it that it was forced
    /// out by a peer (and damps, see [`damping`]), rather than losing its
    /// session to Consul (its own node failing in gossip, its check).
    #[serde(default)]
    pub forced: Option<String>,
}

/// The lock key as last seen by the consistent watch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyState {
    session: Option<String>,
    lock_index: u64,
    holder: Option<LeaderValue>,
}

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

    /// This instance lost `session`'s lock while serving under a valid
    /// lease. Whether that was a peer's forced takeover (an incident for
    /// damping: the link between us may be what broke) or Consul
    /// invalidating the session (our node failed in gossip, our check went
    /// critical: nothing to damp) is known once the next holder's value is
    /// seen.
    fn lost_lock(&self, session: &str) {
        self.state().lost_while_serving = Some((session.to_owned(), Instant::now()));
    }

    /// A holder of the lock as the key watch sees it: if it forced out the
    /// session we lost while serving, that loss was an incident.
    fn observe_holder(&self, key: Option<&KeyState>) {
        let mut state = self.state();
        let Some((lost, at)) = state.lost_while_serving.clone() else {
            return;
        };
        let Some(key) = key.filter(|k| k.session.is_some()) else {
            // Free: nobody has acquired yet.
            return;
        };
        if key.session.as_deref() == Some(lost.as_str()) {
            // A view from before the loss: undecided yet.
            return;
        }
        let Some(holder) = key.holder.as_ref() else {
            return;
        };
        if holder.instance == self.instance {
            // We took it again ourselves: nobody forced us out.
            state.lost_while_serving = None;
        } else if holder.forced.as_deref() == Some(lost.as_str()) {
            state.lost_while_serving = None;
            state.damping.incident(at);
            tracing::warn!(holder = %holder.id, "we were forced out by a peer while serving: damping our own forced takeovers until we hear the active again");
        } else {
            state.lost_while_serving = None;
            tracing::info!(holder = %holder.id, "the lock went to a peer that did not force us out (Consul ended our session): not damped");
        }
    }

    fn value(&self) -> String {
        serde_json::to_string(&LeaderValue {
            id: self.settings.id.clone(),
            admin: self.admin.to_string(),
            start: self.started.clone(),
            instance: self.instance.clone(),
            probe: self.probe.get().map(|p| p.addr.to_string()),
            node: self.node.get().cloned(),
            probe_protocol: Some(detector::PROTOCOL),
            forced: self.state().forced.clone(),
        })
        .expect("a struct of strings serialises")
    }

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
    fn unwatchable(&self, holder: &LeaderValue, probe: SocketAddr) -> Option<String> {
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
/// start-up error); otherwise the address is chosen here, from what the
/// local agent says ([`advertise`]). On return this instance no longer
/// serves and has released the lock if it held it.
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
        match release_address(floating).await {
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
    let Some(agent) = advertise::ask_agent(&leadership, &client, &stop).await else {
        return;
    };
    if let Ok(agent) = &agent {
        leadership.node.get_or_init(|| agent.node_name.clone());
    }
    let Some(keys) = fetch_pair_key(&leadership, &client, &settings.cluster, &stop).await else {
        return;
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
        Some(socket) => spawn_responder(&leadership, socket, &advertised, &keys, &tasks),
        None => tracing::error!("not answering probes; peers fall back to Consul's detection"),
    }
    // The check: until when it is known to pass (last successful
    // heartbeat + TTL).
    let (check_tx, mut check) = watch::channel(None::<Instant>);
    tokio::spawn(heartbeat(
        Arc::clone(&leadership),
        client.clone(),
        check_tx,
        tasks.clone(),
    ));
    let (key_tx, mut key) = watch::channel(None::<Option<KeyState>>);
    tokio::spawn(watch_key(
        Arc::clone(&leadership),
        client.clone(),
        key_tx,
        tasks.clone(),
    ));

    let mut bind_backoff = BIND_BACKOFF;
    'sessions: loop {
        let Some(session) = open_session(&leadership, &client, &mut check, &stop).await else {
            break;
        };
        leadership.set_role(Role::Standby);
        let (mut epoch, mut lease_until) =
            match contend(&leadership, &client, &session, &mut key, &mut check, &stop).await {
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
            let reason = lead(&leadership, &client, term, &mut key, &stop).await;
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
            match suspend(&leadership, &client, &session, &mut key, &stop).await {
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
                release_lock(&leadership, &client, &session).await;
                close_session(&client, &session).await;
                break 'sessions;
            }
            StepDown::BindFailed | StepDown::VipYielded => {
                // Hand the lock to whoever can bind, then wait before
                // contending again (the obstacle may be ours to outlast).
                release_lock(&leadership, &client, &session).await;
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
                tokio::spawn(retire_session(client.clone(), session, stop.clone()));
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

async fn release_lock(leadership: &Leadership, client: &Client, session: &str) {
    match client
        .kv_release(&leadership.settings.lock_key(), leadership.value(), session)
        .await
    {
        Ok(released) => tracing::info!(released, "lock released for the standby"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot release the lock; the standby waits for the session to end")
        }
    }
}

/// Creates a session bound to our check and the node's `serfHealth`, once
/// the check passes. Retries until it succeeds or `stop`.
async fn open_session(
    leadership: &Leadership,
    client: &Client,
    check: &mut watch::Receiver<Option<Instant>>,
    stop: &CancellationToken,
) -> Option<String> {
    let settings = &leadership.settings;
    // While Consul refuses (its servers out of reach, our node failed in
    // gossip), retry with a growing pause and log the first refusal only.
    let mut retry = CONSUL_RETRY;
    let mut failing = false;
    loop {
        // A session can only be bound to a passing check.
        while check.borrow_and_update().is_none_or(|until| until <= Instant::now()) {
            tokio::select! {
                () = stop.cancelled() => return None,
                changed = check.changed() => if changed.is_err() { return None },
            }
        }
        if !wait_out_twin(leadership, client, stop).await {
            return None;
        }
        let request = SessionRequest {
            name: Some(format!("halo-lb {}/{}", settings.cluster, settings.id)),
            node: None,
            lock_delay: Some(settings.lock_delay),
            behavior: Some(SessionBehavior::Release),
            ttl: None,
            checks: SessionChecks::Bound {
                node_checks: vec!["serfHealth".to_owned()],
                service_checks: vec![leadership.check_id()],
            },
        };
        match client.session_create(&request).await {
            Ok(id) => {
                tracing::info!(session = %id, "session created");
                leadership.state().session = Some(id.clone());
                // The key view may be as old as the outage that ended our
                // last session: have it read afresh now, so a holder that
                // dies in the next instant is already being probed.
                leadership.key_refresh.notify_one();
                return Some(id);
            }
            Err(e) => {
                if failing {
                    tracing::debug!(error = %e, "still cannot create a session");
                } else {
                    tracing::warn!(error = %e, "cannot create a session; retrying");
                }
                failing = true;
                leadership.set_consul_error(Some(e.to_string()));
            }
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(Duration::from_secs(2));
    }
}

/// Destroys a session we stepped down from, retrying until Consul confirms
/// (or says it is gone already) or the process stops.
async fn retire_session(client: Client, session: String, stop: CancellationToken) {
    loop {
        match client.session_destroy(&session).await {
            Ok(()) | Err(ConsulError::NotFound { .. }) => return,
            Err(e) => tracing::debug!(session, error = %e, "cannot destroy the old session yet"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(CONSUL_RETRY) => {}
        }
    }
}

/// How contending ended.
enum Contend {
    /// We hold the key: its epoch, and the lease the confirming read earned.
    Acquired {
        epoch: u64,
        lease_until: Instant,
    },
    SessionLost,
    /// An older live instance uses our id: leave the election.
    Twin,
    Stopped,
}

/// The detector's watch of one holder.
struct Watching {
    /// The holder's session, destroyed on a forced takeover.
    session: String,
    task: AbortOnDrop<std::io::Result<Evidence>>,
}

/// The standby: waits for the key to be free and acquires it; meanwhile
/// probes the holder and takes the lock from it when it is gone.
async fn contend(
    leadership: &Arc<Leadership>,
    client: &Client,
    session: &str,
    key: &mut watch::Receiver<Option<Option<KeyState>>>,
    check: &mut watch::Receiver<Option<Instant>>,
    stop: &CancellationToken,
) -> Contend {
    let settings = &leadership.settings;
    let lock_key = settings.lock_key();
    let mut twin_check = tokio::time::interval(TWIN_RECHECK);
    twin_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    twin_check.reset();
    let mut watching: Option<Watching> = None;
    // After a damped verdict: no new watch until the window ends.
    let mut damped_until: Option<Instant> = None;
    // The holder session a second "suspended" verdict (soon after) forces
    // out, and since when.
    let mut armed: Option<(String, Instant)> = None;
    // A session we destroyed: the key watch shows it a moment longer; do not
    // probe (and "force") it again.
    let mut forced: Option<String> = None;
    loop {
        let seen = key.borrow_and_update().clone();
        // Unknown until the watch answers once; absent or without a session
        // means free.
        let free = match &seen {
            None => false,
            Some(None) => true,
            Some(Some(k)) => k.session.is_none() || k.session.as_deref() == Some(session),
        };
        let check_passing = check.borrow_and_update().is_some_and(|until| until > Instant::now());
        let mut retry_after = None;
        if free && check_passing {
            let sent = Instant::now();
            match client.kv_acquire(&lock_key, leadership.value(), session).await {
                Ok(true) => match confirm(client, &lock_key, session).await {
                    // The confirming read was sent after `sent`: the lease
                    // counts from then, conservatively.
                    Ok(Some(epoch)) => {
                        return Contend::Acquired {
                            epoch,
                            lease_until: sent + settings.lease,
                        }
                    }
                    Ok(None) => retry_after = Some(ACQUIRE_RETRY),
                    Err(e) => {
                        tracing::warn!(error = %e, "acquired the lock but cannot confirm it; retrying");
                        retry_after = Some(CONSUL_RETRY);
                    }
                },
                // Free but refused: a lock delay is running (or someone
                // else won). Retry soon; the delay is short.
                Ok(false) => retry_after = Some(ACQUIRE_RETRY),
                Err(ConsulError::InvalidSession { .. }) => {
                    tracing::warn!(session, "session no longer valid; creating a new one");
                    return Contend::SessionLost;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "acquire failed; retrying");
                    leadership.set_consul_error(Some(e.to_string()));
                    retry_after = Some(CONSUL_RETRY);
                }
            }
        }
        // Probe whoever else holds the key.
        let holder = match &seen {
            Some(Some(k)) => k
                .session
                .as_ref()
                .filter(|s| s.as_str() != session)
                .and_then(|s| Some((s.clone(), k.holder.clone()?))),
            _ => None,
        };
        let wanted = holder
            .filter(|(_, h)| h.instance != leadership.instance)
            .and_then(|(s, h)| Some((s, h.probe.as_deref()?.parse::<SocketAddr>().ok()?, h)));
        // A holder whose probe address cannot be reached from here is left
        // to Consul's detection.
        let unwatchable = wanted
            .as_ref()
            .and_then(|(_, probe, h)| leadership.unwatchable(h, *probe));
        let reported = leadership.state().detector.unwatchable.clone();
        if unwatchable != reported {
            if let Some(why) = &unwatchable {
                tracing::error!(why = %why, "cannot probe the active; relying on Consul's detection");
            }
            leadership.state().detector.unwatchable.clone_from(&unwatchable);
        }
        let wanted = wanted
            .filter(|_| unwatchable.is_none())
            .map(|(s, probe, h)| (s, probe, h.instance));
        let now = Instant::now();
        match (&wanted, &watching) {
            (Some((s, _, _)), Some(w)) if *s == w.session => {}
            (Some((s, _, _)), None) if forced.as_deref() == Some(s.as_str()) => {}
            (Some((s, peer, instance)), _) if damped_until.is_none_or(|u| now >= u) => {
                damped_until = None;
                if armed.as_ref().is_some_and(|(a, _)| a != s) {
                    armed = None;
                }
                let (peer, instance, me) = (*peer, instance.clone(), Arc::clone(leadership));
                leadership.state().detector.peer = Some(peer.to_string());
                watching = Some(Watching {
                    session: s.clone(),
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
                });
            }
            (None, Some(_)) => {
                watching = None;
                leadership.state().detector.peer = None;
            }
            _ => {}
        }
        let retry = async {
            match retry_after {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let verdict = async {
            match watching.as_mut() {
                Some(w) => (&mut w.task.0).await,
                None => std::future::pending().await,
            }
        };
        let undamp = async {
            match damped_until {
                Some(u) => tokio::time::sleep_until(u).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return Contend::Stopped,
            changed = key.changed() => if changed.is_err() { return Contend::Stopped },
            changed = check.changed() => if changed.is_err() { return Contend::Stopped },
            () = retry => {}
            () = undamp => {}
            verdict = verdict => {
                let target = watching.take().map(|w| w.session);
                match verdict {
                    Ok(Ok(evidence @ Evidence::SelfAnswered)) => {
                        // A misconfiguration, not a failure: never force on
                        // it; say so, and look again in a while.
                        tracing::error!(%evidence, "cannot probe the active; relying on Consul's detection");
                        damped_until = Some(Instant::now() + SELF_ANSWERED_RETRY);
                    }
                    Ok(Ok(evidence @ Evidence::NotServing(_))) => {
                        // The active is alive but cannot confirm its lease.
                        // If we cannot reach the servers either, Consul
                        // itself is out (an election): the active resumes on
                        // its own when it is back, and forcing would only
                        // race it. So force only on a second such verdict
                        // with a read the servers answered us in between.
                        if let Some(target) = target {
                            let fresh = settings.probe_interval * (settings.probe_misses * 2) + settings.lease;
                            if armed.as_ref().is_some_and(|(s, at)| *s == target && at.elapsed() <= fresh) {
                                armed = None;
                                damped_until = after_force(
                                    force_takeover(leadership, client, &target, &evidence).await,
                                    &target,
                                    &mut forced,
                                );
                            } else {
                                let reachable = tokio::time::timeout(
                                    settings.lease,
                                    client.kv_get(&lock_key, QueryOptions::with_consistency(Consistency::Consistent)),
                                )
                                .await
                                .is_ok_and(|r| r.is_ok());
                                if reachable {
                                    tracing::info!(%evidence, "the servers answer us; forcing a takeover if the active stays suspended");
                                    armed = Some((target, Instant::now()));
                                }
                            }
                        }
                    }
                    Ok(Ok(evidence)) => {
                        if let Some(target) = target {
                            damped_until = after_force(
                                force_takeover(leadership, client, &target, &evidence).await,
                                &target,
                                &mut forced,
                            );
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot probe the active; relying on Consul's detection");
                        damped_until = Some(Instant::now() + TWIN_RECHECK);
                    }
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => tracing::error!(error = %e, "the probe task failed"),
                }
            }
            _ = twin_check.tick() => match older_twin(leadership, client).await {
                Ok(Some(twin)) => {
                    tracing::error!(id = %settings.id, twin = %twin, "an older live instance uses our ha.id; leaving the election");
                    return Contend::Twin;
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "cannot look for instances sharing our id"),
            },
        }
    }
}

/// Records a forced takeover's outcome for [`contend`]: the session it
/// destroyed, and until when a damped detector must wait.
fn after_force(outcome: Forced, target: &str, forced: &mut Option<String>) -> Option<Instant> {
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
enum Forced {
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
async fn force_takeover(leadership: &Leadership, client: &Client, target: &str, evidence: &Evidence) -> Forced {
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

/// A consistent read of the key: the epoch if `session` holds it.
async fn confirm(client: &Client, key: &str, session: &str) -> Result<Option<u64>, ConsulError> {
    let answer = client
        .kv_get(key, QueryOptions::with_consistency(Consistency::Consistent))
        .await?;
    Ok(answer
        .value
        .filter(|pair| pair.session.as_deref() == Some(session))
        .map(|pair| pair.lock_index))
}

/// What an active serves with, for one term.
struct Serving<'a> {
    server: &'a Server,
    floating: Option<&'a Arc<FloatingIp>>,
    session: &'a str,
    epoch: u64,
    lease_until: Instant,
}

/// Adds the floating address and announces it, off this thread (netlink and
/// packet sockets block); logged, not fatal: the active retries.
async fn claim(floating: &Arc<FloatingIp>) -> bool {
    let f = Arc::clone(floating);
    let started = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || f.claim()).await {
        Ok(Ok(_)) => {
            tracing::info!(address = %floating.address(), interface = floating.interface(), took = ?started.elapsed(), "floating address claimed and announced");
            true
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot claim the floating address; retrying");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "the claim task failed; retrying");
            false
        }
    }
}

async fn release_address(floating: &Arc<FloatingIp>) -> Result<Outcome, crate::control::floating::Error> {
    let f = Arc::clone(floating);
    match tokio::task::spawn_blocking(move || f.release()).await {
        Ok(result) => result,
        Err(e) => Err(crate::control::floating::Error::Task(e.to_string())),
    }
}

/// Reads the key with `?consistent` every `confirm_every` (several in
/// flight when answers are slow) and publishes the lease each confirming
/// answer earns: its send time plus the lease length. Says `lost` when an
/// answer shows the key is not ours.
async fn confirm_lease(
    client: Client,
    key: String,
    session: String,
    settings: HaSettings,
    lease: watch::Sender<Instant>,
    lost: oneshot::Sender<()>,
) {
    let mut tick = tokio::time::interval(settings.confirm_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inflight = JoinSet::new();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if inflight.len() < CONFIRMS_IN_FLIGHT {
                    let (c, k, s) = (client.clone(), key.clone(), session.clone());
                    let limit = settings.lease;
                    inflight.spawn(async move {
                        let sent = Instant::now();
                        (sent, tokio::time::timeout(limit, confirm(&c, &k, &s)).await)
                    });
                }
            }
            Some(done) = inflight.join_next() => match done {
                Ok((sent, Ok(Ok(Some(_))))) => {
                    if failing {
                        tracing::info!("lock confirmations succeed again");
                        failing = false;
                    }
                    let until = sent + settings.lease;
                    lease.send_if_modified(|current| {
                        let later = until > *current;
                        if later {
                            *current = until;
                        }
                        later
                    });
                }
                Ok((_, Ok(Ok(None)))) => {
                    tracing::warn!("a confirming read shows the lock is no longer ours");
                    if lost.send(()).is_err() {
                        tracing::debug!("the term already ended");
                    }
                    return;
                }
                Ok((_, Ok(Err(e)))) => {
                    metrics::counter!("halo_ha_confirm_failures_total").increment(1);
                    if !failing {
                        tracing::warn!(error = %e, "cannot confirm the lock with the servers; the lease runs out unless a read succeeds");
                        failing = true;
                    }
                }
                Ok((_, Err(_elapsed))) => {
                    metrics::counter!("halo_ha_confirm_failures_total").increment(1);
                    if !failing {
                        tracing::warn!(after = ?settings.lease, "a confirming read got no answer in time");
                        failing = true;
                    }
                }
                Err(e) => tracing::error!(error = %e, "a confirming read failed to run"),
            },
        }
    }
}

/// The active: serves until a reason to step down, then stops serving
/// before returning.
async fn lead(
    leadership: &Leadership,
    client: &Client,
    term: Serving<'_>,
    key: &mut watch::Receiver<Option<Option<KeyState>>>,
    stop: &CancellationToken,
) -> StepDown {
    let Serving {
        server,
        floating,
        session,
        epoch,
        lease_until,
    } = term;
    let settings = &leadership.settings;
    // Invariant: we hold the lock, confirmed by a consistent read sent
    // before `lease_until - lease`; checked once more right before binding.
    if lease_until <= Instant::now() {
        tracing::warn!("the lease ran out while acquiring; not promoting");
        return StepDown::LeaseExpired;
    }
    let (lease_tx, mut lease) = watch::channel(lease_until);
    let (lost_tx, mut lost) = oneshot::channel();
    let _confirming = AbortOnDrop(tokio::spawn(confirm_lease(
        client.clone(),
        settings.lock_key(),
        session.to_owned(),
        settings.clone(),
        lease_tx,
        lost_tx,
    )));
    leadership.set_lease(Some(lease_until));
    metrics::counter!("halo_ha_vip_restored_total").increment(0);
    // With a floating address: not while another live host claims it (see
    // the module docs). This only delays serving; it serves nothing.
    if let Some(f) = floating {
        if let Err(reason) = vip::wait_until_free(leadership, f, &mut lease, &mut lost, key, session, stop).await {
            vip::record(leadership, &[], &[], false);
            leadership.set_lease(None);
            tracing::info!(
                reason = reason.as_str(),
                "the term ended before it began: the floating address was never claimed"
            );
            return reason;
        }
    }
    // Invariant, again after any wait: the lease the latest confirming
    // read earned has not run out.
    let lease_until = *lease.borrow_and_update();
    if lease_until <= Instant::now() {
        tracing::warn!("the lease ran out while probing for the floating address; not promoting");
        leadership.set_lease(None);
        return StepDown::LeaseExpired;
    }
    crate::dataplane::lease::serve_until(lease_until.into_std());
    leadership.set_lease(Some(lease_until));
    let from = SystemTime::now();
    let failed = server.start_serving();
    // A term is recorded if anything was bound, however briefly: a
    // promotion that bound nothing served nothing.
    let bound_any = server.listening_count() > 0;
    if bound_any {
        let mut state = leadership.state();
        state.epoch = Some(epoch);
        state.terms.push_back(Term {
            epoch,
            from_unix_us: unix_us(from),
            to_unix_us: None,
            ended_by: None,
        });
        while state.terms.len() > HISTORY {
            state.terms.pop_front();
        }
    }
    let reason = if failed.is_empty() {
        leadership.set_role(Role::Active);
        metrics::gauge!("halo_ha_epoch").set(epoch as f64);
        metrics::counter!("halo_ha_promotions_total").increment(1);
        tracing::info!(epoch, id = %settings.id, "promoted: active, serving the vips");
        serve(leadership, floating, epoch, &mut lease, &mut lost, key, session, stop).await
    } else {
        for e in &failed {
            tracing::error!(error = %e, "cannot serve a vip: undoing the promotion");
        }
        StepDown::BindFailed
    };
    // Stop before anyone else can start: the data plane first (one atomic
    // store), then the listeners (synchronous), before any call that could
    // let another instance in (release, destroy).
    crate::dataplane::lease::revoke();
    server.stop_serving();
    let stopped = SystemTime::now();
    {
        let mut state = leadership.state();
        // Serving ended when the listeners shut, or when the lease ran out
        // if that was earlier: past it the data plane accepted nothing (a
        // process frozen past its lease stops here only when it wakes).
        let now = Instant::now();
        let to = match state.lease_until {
            Some(end) if end < now => stopped - (now - end),
            _ => stopped,
        };
        if bound_any {
            if let Some(term) = state.terms.back_mut() {
                term.to_unix_us = Some(unix_us(to));
                term.ended_by = Some(reason);
            }
        }
        state.lease_until = None;
    }
    // A holder that gave the address way keeps saying so while it backs
    // off and contends again; any other end clears it.
    if leadership.state().vip_conflict.as_ref().is_none_or(|c| !c.yielded) {
        vip::record(leadership, &[], &[], false);
    }
    if let Some(f) = floating {
        // After the listeners: the address going is not what stops us
        // serving, and the new active's announcement wins either way.
        if let Err(e) = release_address(f).await {
            tracing::error!(error = %e, "cannot remove the floating address");
        }
    }
    tracing::info!(
        epoch,
        from_unix_us = unix_us(from),
        to_unix_us = unix_us(stopped),
        reason = reason.as_str(),
        "term ended"
    );
    leadership.set_role(if reason == StepDown::LeaseExpired {
        Role::Suspended
    } else {
        Role::Standby
    });
    metrics::counter!("halo_ha_step_downs_total", "reason" => reason.as_str()).increment(1);
    if reason == StepDown::Shutdown {
        tracing::info!(epoch, "stepped down for shutdown: vips no longer served");
    } else {
        tracing::warn!(epoch, reason = reason.as_str(), "stepped down: vips no longer served");
    }
    reason
}

/// Why a term ends whose lease lapsed, or whose confirming task ended:
/// a lost lock if that task saw the lock taken, else an expired lease.
///
/// The two arrive in the same instant when a confirming read shows the lock
/// gone (the task reports it on `lost`, ends, and the lease stops moving),
/// and the serving loop's biased `select!` may see either first. Read as an
/// expired lease, a forced-out instance was never damped and forced
/// straight back (the soak's dropped probes found it). Both stop serving at
/// once; only the damping afterwards differs.
fn lapsed(lost: &mut oneshot::Receiver<()>) -> StepDown {
    if lost.try_recv().is_ok() {
        StepDown::LockLost
    } else {
        StepDown::LeaseExpired
    }
}

/// The active's loop, once every VIP is bound: follows the lease and
/// watches for evidence of loss. Nothing here waits on Consul (confirming
/// runs beside it), so the deadline fires on time.
#[allow(clippy::too_many_arguments)]
async fn serve(
    leadership: &Leadership,
    floating: Option<&Arc<FloatingIp>>,
    epoch: u64,
    lease: &mut watch::Receiver<Instant>,
    lost: &mut oneshot::Receiver<()>,
    key: &mut watch::Receiver<Option<Option<KeyState>>>,
    session: &str,
    stop: &CancellationToken,
) -> StepDown {
    let settings = &leadership.settings;
    // Removals are watched from before the claim (which can only run once
    // this loop waits), so none after it is missed. The neighbour listener
    // takes milliseconds to open: off this thread, beside the claim.
    let mut removals = floating.and_then(|f| vip::removals(f));
    let mut listener: Option<tokio::io::unix::AsyncFd<crate::control::floating::Listener>> = None;
    let mut opening = floating.map(|f| {
        let f = Arc::clone(f);
        AbortOnDrop(tokio::task::spawn_blocking(move || vip::listener(&f)))
    });
    let mut conflict = vip::Conflict::new(floating.and_then(|f| f.mac()).unwrap_or_default());
    // The address last: listeners are ready before any packet for it can
    // arrive. Claimed off this thread; retried every heartbeat until done.
    let mut claiming = floating.map(|f| {
        let f = Arc::clone(f);
        AbortOnDrop(tokio::spawn(async move { claim(&f).await }))
    });
    let mut claim_retry = tokio::time::interval(settings.heartbeat);
    claim_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut claimed = floating.is_none();
    // The address was removed while a claim was under way: that claim's
    // success does not mean the address is there.
    let mut stale_claim = false;
    // Announce once more a little later, as keepalived does, for neighbours
    // that missed the first burst.
    let reannounce = tokio::time::sleep(crate::control::floating::REANNOUNCE_AFTER);
    tokio::pin!(reannounce);
    let mut reannounced = floating.is_none();
    // Once claimed, probe every second for other hosts that have the
    // address (one killed with -9 keeps it; another cluster's active may
    // claim it), and announce again while one does.
    let mut conflict_check = tokio::time::interval(CONFLICT_CHECK);
    conflict_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let announce = |why: &'static str| {
        if let Some(f) = floating {
            let f = Arc::clone(f);
            tokio::task::spawn_blocking(move || {
                if let Err(e) = f.announce() {
                    tracing::warn!(error = %e, why, "cannot announce the floating address");
                }
            });
        }
    };
    loop {
        let deadline = *lease.borrow_and_update();
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => {
                // The lease may have moved just now: look again before acting.
                if *lease.borrow() <= Instant::now() {
                    tracing::warn!(epoch, "no read of the lock confirmed in time: the lease ran out");
                    return lapsed(lost);
                }
            }
            () = stop.cancelled() => return StepDown::Shutdown,
            changed = lease.changed() => {
                if changed.is_err() {
                    // The confirming task ended (it says why on `lost`).
                    return lapsed(lost);
                }
                let until = *lease.borrow();
                crate::dataplane::lease::serve_until(until.into_std());
                leadership.set_lease(Some(until));
            }
            _ = &mut *lost => return StepDown::LockLost,
            changed = key.changed() => {
                let ours = key
                    .borrow_and_update()
                    .as_ref()
                    .is_some_and(|k| k.as_ref().is_some_and(|k| k.session.as_deref() == Some(session)));
                if changed.is_err() || !ours {
                    return StepDown::LockLost;
                }
            }
            done = async { (&mut claiming.as_mut().expect("guarded").0).await }, if claiming.is_some() => {
                claiming = None;
                claimed = matches!(done, Ok(true)) && !stale_claim;
                stale_claim = false;
            }
            _ = claim_retry.tick(), if !claimed && claiming.is_none() => {
                let f = Arc::clone(floating.expect("unclaimed implies a floating address"));
                claiming = Some(AbortOnDrop(tokio::spawn(async move { claim(&f).await })));
            }
            opened = async { (&mut opening.as_mut().expect("guarded").0).await }, if opening.is_some() => {
                opening = None;
                match opened {
                    Ok(l) => listener = l.and_then(vip::watch),
                    Err(e) => tracing::error!(error = %e, "the task opening the neighbour listener failed"),
                }
            }
            ready = async { removals.as_mut().expect("guarded").readable_mut().await }, if removals.is_some() => {
                let removed = match ready {
                    Ok(mut guard) => match guard.try_io(|r| r.get_mut().removed()) {
                        Ok(result) => result,
                        Err(_would_block) => Ok(false),
                    },
                    Err(e) => Err(e),
                };
                match removed {
                    Ok(false) => {}
                    Ok(true) => {
                        // Under a valid lease (checked first, above): the
                        // address is ours to hold. Something on this host
                        // removed it (a stray `ip addr del`, a network
                        // manager); without it nobody is served.
                        metrics::counter!("halo_ha_vip_restored_total").increment(1);
                        let f = floating.expect("removals imply a floating address");
                        tracing::error!(
                            address = %f.address(),
                            interface = f.interface(),
                            "the floating address was removed from under the active: adding it back and announcing it \
                             (to take it away, stop this instance instead)"
                        );
                        claimed = false;
                        if claiming.is_some() {
                            stale_claim = true;
                        } else {
                            let f = Arc::clone(f);
                            claiming = Some(AbortOnDrop(tokio::spawn(async move { claim(&f).await })));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read address notifications; no longer watching the floating address for removals");
                        removals = None;
                    }
                }
            }
            ready = async { listener.as_ref().expect("guarded").readable().await }, if listener.is_some() => {
                match ready {
                    Ok(mut guard) => {
                        let mut defend = false;
                        for _ in 0..crate::control::floating::READ_BURST {
                            match guard.try_io(|l| l.get_ref().recv()) {
                                Ok(Ok(Some(heard))) => defend |= conflict.heard(heard, Instant::now()),
                                Ok(Ok(None)) => {}
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "cannot read neighbour frames");
                                    break;
                                }
                                Err(_would_block) => break,
                            }
                        }
                        // Another host probes for our address, about to
                        // claim it: tell it (and everyone) it is taken.
                        if defend && claimed {
                            announce("defending the address against a probe");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for other holders of the floating address any more");
                        listener = None;
                    }
                }
            }
            _ = conflict_check.tick(), if claimed && listener.is_some() => {
                let round = conflict.round();
                if let Some(keeper) = round.yield_to {
                    // Two live claimers (two clusters configured with one
                    // address: each holds its own lock). Both apply this
                    // rule and the lowest MAC keeps the address; a leftover
                    // never announces, so a failover never gets here.
                    tracing::error!(
                        epoch,
                        keeper = %vip::mac_string(&keeper),
                        "another live host claims the floating address and wins the tie-break (lower MAC): \
                         giving it up and serving nothing (two clusters configured with one vip_address?)"
                    );
                    vip::record(leadership, &round.others, &round.live, true);
                    return StepDown::VipYielded;
                }
                let had = leadership.state().vip_conflict.is_some();
                if vip::record(leadership, &round.others, &round.live, false) {
                    if round.others.is_empty() {
                        tracing::info!("no other host answers for the floating address any more");
                    } else {
                        let macs: Vec<String> = round.others.iter().map(vip::mac_string).collect();
                        let live: Vec<String> = round.live.iter().map(vip::mac_string).collect();
                        tracing::warn!(macs = ?macs, live = ?live, new = !had, "another host has the floating address; announcing again while it does");
                    }
                }
                let f = Arc::clone(floating.expect("claimed implies a floating address"));
                let others = !round.others.is_empty();
                tokio::task::spawn_blocking(move || {
                    if others {
                        if let Err(e) = f.announce() {
                            tracing::warn!(error = %e, "cannot announce the floating address");
                        }
                    }
                    if let Err(e) = f.send_probe() {
                        tracing::debug!(error = %e, "cannot probe for other holders of the floating address");
                    }
                });
            }
            () = &mut reannounce, if !reannounced => {
                reannounced = true;
                announce("re-announcing after the claim");
            }
        }
    }
}

/// How a suspension ended.
enum Resume {
    /// The servers confirm the lock is still ours.
    Confirmed {
        epoch: u64,
        lease_until: Instant,
    },
    /// It is not.
    Lost,
    Stopped,
}

/// The suspended active: serves nothing, keeps its session, and reads the
/// key until the servers confirm it is still ours (resume) or show it is
/// not (lost).
async fn suspend(
    leadership: &Leadership,
    client: &Client,
    session: &str,
    key: &mut watch::Receiver<Option<Option<KeyState>>>,
    stop: &CancellationToken,
) -> Resume {
    let settings = &leadership.settings;
    let lock_key = settings.lock_key();
    leadership.set_role(Role::Suspended);
    let mut tick = tokio::time::interval(settings.confirm_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Resume::Stopped,
            changed = key.changed() => {
                let theirs = key.borrow_and_update().as_ref().is_some_and(|k| {
                    k.as_ref().is_none_or(|k| k.session.as_deref() != Some(session))
                });
                if changed.is_err() || theirs {
                    return Resume::Lost;
                }
            }
            _ = tick.tick() => {
                let sent = Instant::now();
                match tokio::time::timeout(settings.lease, confirm(client, &lock_key, session)).await {
                    Ok(Ok(Some(epoch))) => {
                        return Resume::Confirmed { epoch, lease_until: sent + settings.lease };
                    }
                    Ok(Ok(None)) => return Resume::Lost,
                    Ok(Err(e)) => tracing::debug!(error = %e, "still cannot confirm the lock"),
                    Err(_) => tracing::debug!("a confirming read got no answer in time"),
                }
            }
        }
    }
}

/// Registers the instance and heartbeats its check ([`instance::heartbeat`]),
/// reporting Consul errors into `/status`. (This keeps the session valid;
/// it does not extend the active's lease: only the servers can.)
async fn heartbeat(
    leadership: Arc<Leadership>,
    client: Client,
    check: watch::Sender<Option<Instant>>,
    stop: CancellationToken,
) {
    let (settings, ids) = (leadership.settings.clone(), leadership.ids());
    instance::heartbeat(
        client,
        settings,
        ids,
        || registration(&leadership),
        |error| leadership.set_consul_error(error),
        check,
        stop,
    )
    .await;
}

/// Another live (passing) instance registered with our cluster and id that
/// started before us (ties broken by instance), described for logs.
///
/// Two live processes with one id would otherwise both believe the key's
/// holder is "us". Before instance IDs, a restarted process destroyed any
/// session holding the lock under its id, taking it for a dead
/// predecessor's; two live twins then destroyed each other's sessions in a
/// loop. Now every process registers its own check, a dead predecessor's
/// check simply expires (its session and lock go with it), and of two live
/// twins the younger stays out of the election, loudly.
async fn older_twin(leadership: &Leadership, client: &Client) -> Result<Option<String>, ConsulError> {
    let settings = &leadership.settings;
    // cluster and id are validated names: letters, digits, '-', '_', '.'.
    let filter = format!(
        "Service.Meta.cluster == \"{}\" and Service.Meta.id == \"{}\"",
        settings.cluster, settings.id
    );
    let query = HealthQuery {
        passing: true,
        tag: None,
        filter: Some(&filter),
    };
    let answer = client.health_service("halo-lb", query, QueryOptions::default()).await?;
    let me = (leadership.started_us, leadership.instance.as_str());
    let own = leadership.service_id();
    for e in answer.value.iter().filter(|e| e.service.id != own) {
        let Some(start) = e.service.meta.get("start_us").and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        let Some(instance) = e.service.meta.get("instance") else {
            continue;
        };
        if (start, instance.as_str()) >= me {
            continue;
        }
        // Its check may still pass for up to a TTL after it died (a restart
        // right after kill -9): ask the process itself, when it says where.
        if let Some(probe) = e.service.meta.get("probe").and_then(|p| p.parse::<SocketAddr>().ok()) {
            // We hold that very address (bound without SO_REUSEPORT): the
            // process that advertised it is gone.
            if leadership.probe.get().is_some_and(|p| p.addr == probe) {
                tracing::info!(instance = %instance, "an older instance with our id is registered, but we hold its probe address: it is gone");
                continue;
            }
            let settings = &leadership.settings;
            let silence = settings.probe_interval * (settings.probe_misses + 1);
            if let Some(keys) = leadership.keys.get() {
                let watch = PeerWatch {
                    instance,
                    me: &leadership.instance,
                    interval: settings.probe_interval,
                    misses: settings.probe_misses,
                    keys,
                };
                let verdict = tokio::time::timeout(silence, detector::watch_peer(probe, watch, || {})).await;
                // Anything but its own live answers: refused, silent, or
                // another process (perhaps this one) answering there.
                if matches!(
                    verdict,
                    Ok(Ok(Evidence::Refused
                        | Evidence::Silent(_)
                        | Evidence::Replaced(_)
                        | Evidence::SelfAnswered))
                ) {
                    tracing::info!(instance = %instance, "an older instance with our id is registered but gone");
                    continue;
                }
            }
        }
        return Ok(Some(format!(
            "service {} on node {} (admin {}:{})",
            e.service.id, e.node.node, e.service.address, e.service.port
        )));
    }
    Ok(None)
}

/// Waits while an older live instance uses our id, saying so in the log and
/// `/status`. Returns false if `stop` came first.
async fn wait_out_twin(leadership: &Leadership, client: &Client, stop: &CancellationToken) -> bool {
    let mut reported = false;
    loop {
        match older_twin(leadership, client).await {
            Ok(None) => {
                if reported {
                    tracing::info!("no other live instance uses our ha.id any more; joining the election");
                }
                leadership.state().id_conflict = None;
                return true;
            }
            Ok(Some(twin)) => {
                if !reported {
                    tracing::error!(
                        id = %leadership.settings.id,
                        twin = %twin,
                        "ha.id is taken by an older live instance; staying out of the election until it is gone (give each instance its own ha.id)"
                    );
                    metrics::counter!("halo_ha_id_conflicts_total").increment(1);
                }
                reported = true;
                leadership.set_role(Role::Starting);
                leadership.state().id_conflict = Some(format!("ha.id {:?} is taken by {twin}", leadership.settings.id));
            }
            // Not knowing is no reason to stay out: the lock still decides
            // who serves, and a twin cannot destroy our session any more.
            Err(e) => {
                tracing::debug!(error = %e, "cannot look for instances sharing our id; joining the election");
                return true;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(TWIN_RECHECK) => {}
        }
    }
}

/// This instance's registration; its probe address is known only once the
/// election has chosen it, so it is made anew for every registration.
fn registration(leadership: &Leadership) -> ServiceRegistration {
    let settings = &leadership.settings;
    let meta = [
        ("cluster".to_owned(), settings.cluster.clone()),
        ("id".to_owned(), settings.id.clone()),
        ("instance".to_owned(), leadership.instance.clone()),
        ("start_us".to_owned(), leadership.started_us.to_string()),
        (
            "probe".to_owned(),
            leadership.probe.get().map(|p| p.addr.to_string()).unwrap_or_default(),
        ),
    ]
    .into_iter()
    .collect();
    instance::registration(settings, &leadership.ids(), leadership.admin, &[], meta)
}

/// Watches the lock key with consistent blocking reads, publishing what it
/// holds whenever that changes (`Some(None)`: the key does not exist).
///
/// When a session is created ([`Leadership::key_refresh`]) the request in
/// flight and any back-off are abandoned for an immediate read. Only the
/// standby's view gets fresher by it: whether the active may serve is
/// decided by its own confirming reads and lease, never by this watch.
async fn watch_key(
    leadership: Arc<Leadership>,
    client: Client,
    tx: watch::Sender<Option<Option<KeyState>>>,
    stop: CancellationToken,
) {
    let key = leadership.settings.lock_key();
    let mut w = Watch::new(KEY_WAIT)
        .consistency(Consistency::Consistent)
        // Handovers move the key a few times in a burst; never delay those.
        .rate_limit(50, 50.0)
        .backoff(Duration::from_millis(50), Duration::from_secs(1));
    let mut failing = false;
    loop {
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            () = leadership.key_refresh.notified() => {
                w.retry_now();
                continue;
            }
            answer = w.next(|options| client.kv_get(&key, options)) => answer,
        };
        match answer {
            Ok(answer) => {
                failing = false;
                let state = answer.value.map(|pair| KeyState {
                    holder: pair
                        .value
                        .as_deref()
                        .and_then(|v| serde_json::from_slice::<LeaderValue>(v).ok()),
                    session: pair.session,
                    lock_index: pair.lock_index,
                });
                leadership.state().key.clone_from(&state);
                leadership.observe_holder(state.as_ref());
                tx.send_if_modified(|current| {
                    let changed = current.as_ref() != Some(&state);
                    if changed {
                        *current = Some(state);
                    }
                    changed
                });
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot watch the lock key; retrying");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
