//! Leadership of an active/standby pair, through a Consul session lock.
//!
//! Each instance registers itself with its local agent as service `halo-lb`
//! with a TTL check, heartbeats that check four times per TTL, and holds a
//! session bound to the check and to the node's `serfHealth`. Whoever holds
//! the key `halo/<cluster>/leader` with its session is the active and
//! serves the VIPs; the other blocks on the key and acquires it the moment
//! it is free. The key's `LockIndex` is the fencing epoch.
//!
//! # The invariant: stop before anyone else can start
//!
//! Two actives at once is the worst failure of a pair. Consul hands the
//! lock to the standby only after the active's session is invalidated
//! (its check went critical, it was destroyed, or its node failed) plus
//! the session's lock delay; or after the active released the key itself.
//! The active therefore stops serving on its own clock, before Consul
//! could hand the lock on:
//!
//! - **Lease.** A heartbeat *sent* at `t` that succeeds restarts the
//!   agent's TTL clock no earlier than `t`, so the check cannot go critical
//!   before `t + check_ttl`. The active's lease ends at
//!   `t + check_ttl - margin` for the last successful heartbeat; when it
//!   ends the active stops serving ([`Server::stop_serving`], synchronous:
//!   the listening sockets leave the LISTEN state before it returns). The
//!   margin (a fifth of the TTL) covers timer lateness on our side; the
//!   lock delay (at least the margin) lies on top of it on Consul's side.
//! - **Consul says so.** A renew answering 404 (the session is gone) or the
//!   consistent watch of the key showing another session, or none, makes
//!   the active stop at once.
//! - **Handover.** On SIGTERM the active stops serving first and only then
//!   releases the key, which starts no lock delay, so the standby can serve
//!   within milliseconds without ever overlapping.
//! - **Promotion.** An instance starts serving only after its acquire
//!   succeeded, a consistent read confirmed its session holds the key, and
//!   its own lease is valid.
//!
//! - **Identity.** Every process registers its own service instance and
//!   check (`halo-lb-<cluster>-<id>-<instance>`), and its session is bound
//!   to that check alone (and `serfHealth`). No process ever destroys a
//!   session it did not create, so the lock is lost only in the ways above.
//!   A crashed predecessor's check is heartbeated by nobody, so it expires
//!   and releases the lock through Consul (lock delay included); two live
//!   processes with one `ha.id` contend fairly, and the younger leaves the
//!   election ([`older_twin`]).
//!
//! Consul prefers liveness to safety in one case this cannot cover: if the
//! agent stays reachable from halo-lb but loses its servers for longer than
//! gossip takes to declare the node failed, the session is invalidated
//! while heartbeats still succeed. The lock delay is then the only guard,
//! and the active learns of it when its watch reaches a server again. See
//! the README's HA section.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use halo_consul::{
    CheckRegistration, CheckStatus, Client, Consistency, Error as ConsulError, HealthQuery, QueryOptions,
    ServiceRegistration, SessionBehavior, SessionChecks, SessionRequest, Watch,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::HaSettings;
use crate::floating::{FloatingIp, Outcome};
use crate::server::Server;

/// How long the key watch blocks per call.
const KEY_WAIT: Duration = Duration::from_secs(10);
/// How often a standby retries an acquire refused while the key is free (a
/// lock delay is running).
const ACQUIRE_RETRY: Duration = Duration::from_millis(20);
/// Back-off after a failed Consul call in the election loop.
const CONSUL_RETRY: Duration = Duration::from_millis(100);
/// How often an instance looks for an older live instance with its id.
const TWIN_RECHECK: Duration = Duration::from_secs(2);
/// Terms kept for `/status`.
const HISTORY: usize = 64;
/// Deregister the `halo-lb` instance of a process that died without
/// cleaning up (Consul's minimum).
const DEREGISTER_AFTER: Duration = Duration::from_secs(60);

/// An instance's role in the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Not yet registered with a valid session.
    Starting,
    /// Warm: tables and discovery run, listeners are closed.
    Standby,
    /// Holds the lock and serves the VIPs.
    Active,
}

/// Why an active stopped being active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepDown {
    /// No heartbeat succeeded in time: the lease ran out.
    LeaseExpired,
    /// A renew answered 404: the session was invalidated.
    SessionLost,
    /// The key shows another session, or none.
    LockLost,
    /// The process is shutting down and handed the lock over.
    Shutdown,
}

impl StepDown {
    fn as_str(self) -> &'static str {
        match self {
            StepDown::LeaseExpired => "lease_expired",
            StepDown::SessionLost => "session_lost",
            StepDown::LockLost => "lock_lost",
            StepDown::Shutdown => "shutdown",
        }
    }
}

/// The lock key's value: who holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderValue {
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
}

/// The lock key as last seen by the consistent watch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyState {
    session: Option<String>,
    lock_index: u64,
    holder: Option<LeaderValue>,
}

/// One period as active, on this process's own clock.
#[derive(Debug, Clone, Serialize)]
pub struct Term {
    /// The fencing epoch (the key's LockIndex).
    pub epoch: u64,
    /// Wall-clock microseconds since the epoch, taken just before the
    /// listeners were bound (so the real serving time lies inside).
    pub from_unix_us: u64,
    /// Taken just after the listeners were shut; `None` while still active.
    pub to_unix_us: Option<u64>,
    /// Why the term ended.
    pub ended_by: Option<StepDown>,
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
}

/// One instance's view of the pair: shared by the election task, the admin
/// API and `/status`.
#[derive(Debug)]
pub struct Leadership {
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
    state: Mutex<State>,
}

fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl Leadership {
    /// The view of a new instance (role: starting).
    pub fn new(settings: HaSettings, admin: SocketAddr) -> Arc<Leadership> {
        let now = SystemTime::now();
        Arc::new(Leadership {
            settings,
            admin,
            started: halo_health::server::rfc3339(now),
            started_us: unix_us(now),
            instance: format!("{:016x}", fastrand::u64(..)),
            state: Mutex::new(State {
                role: Role::Starting,
                session: None,
                epoch: None,
                key: None,
                terms: VecDeque::new(),
                consul_error: None,
                lease_until: None,
                id_conflict: None,
            }),
        })
    }

    /// This process's service ID at the agent:
    /// `halo-lb-<cluster>-<id>-<instance>`.
    pub fn service_id(&self) -> String {
        format!(
            "halo-lb-{}-{}-{}",
            self.settings.cluster,
            self.settings.id,
            &self.instance[..8]
        )
    }

    /// This process's TTL check ID at the agent.
    pub fn check_id(&self) -> String {
        format!("{}:ttl", self.service_id())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("leadership state poisoned")
    }

    /// This instance's `ha.id`.
    pub fn id(&self) -> &str {
        &self.settings.id
    }

    /// This instance's role.
    pub fn role(&self) -> Role {
        self.state().role
    }

    /// The active's admin address as the key names it, unless that is us.
    pub fn leader_admin(&self) -> Option<String> {
        let state = self.state();
        let key = state.key.as_ref()?;
        key.session.as_ref()?;
        let holder = key.holder.as_ref()?;
        (holder.instance != self.instance).then(|| holder.admin.clone())
    }

    /// The `ha` part of `/status`.
    pub fn status(&self) -> serde_json::Value {
        let state = self.state();
        let now = Instant::now();
        let leader = state.key.as_ref().and_then(|k| {
            k.session.as_ref().map(|_| {
                json!({
                    "id": k.holder.as_ref().map(|h| h.id.clone()),
                    "admin": k.holder.as_ref().map(|h| h.admin.clone()),
                    "epoch": k.lock_index,
                })
            })
        });
        json!({
            "cluster": self.settings.cluster,
            "id": self.settings.id,
            "role": state.role,
            "epoch": state.epoch,
            "leader": leader,
            "session": state.session,
            "lease_remaining_ms": state
                .lease_until
                .map(|until| until.saturating_duration_since(now).as_millis() as u64),
            "check_ttl_ms": self.settings.check_ttl.as_millis() as u64,
            "lock_delay_ms": self.settings.lock_delay.as_millis() as u64,
            "consul_error": state.consul_error,
            "id_conflict": state.id_conflict,
            "instance": self.instance,
            "terms": state.terms,
        })
    }

    fn set_role(&self, role: Role) {
        self.state().role = role;
        metrics::gauge!("halo_ha_active").set(if role == Role::Active { 1.0 } else { 0.0 });
    }

    fn set_consul_error(&self, error: Option<String>) {
        self.state().consul_error = error;
    }

    fn value(&self) -> String {
        serde_json::to_string(&LeaderValue {
            id: self.settings.id.clone(),
            admin: self.admin.to_string(),
            start: self.started.clone(),
            instance: self.instance.clone(),
        })
        .expect("a struct of strings serialises")
    }
}

/// Consul calls of the election, with the deadlines they need.
#[derive(Debug, Clone)]
struct Consul {
    /// Short calls: heartbeats, acquire, renew.
    fast: Client,
    /// The blocking key watch.
    blocking: Client,
}

/// Runs the election until `stop` is cancelled, promoting and demoting
/// `server`. On return this instance no longer serves and has released the
/// lock if it held it.
pub async fn run(
    leadership: Arc<Leadership>,
    client: Client,
    server: Arc<Server>,
    floating: Option<FloatingIp>,
    stop: CancellationToken,
) {
    let settings = leadership.settings.clone();
    if let Some(floating) = &floating {
        // A previous process may have died while active and left the
        // address behind; a standby must not carry it.
        match floating.release() {
            Ok(Outcome::Changed) => {
                tracing::warn!(address = %floating.address(), "removed a floating address left behind")
            }
            Ok(Outcome::Unchanged) => {}
            Err(e) => tracing::error!(error = %e, "cannot check the floating address"),
        }
    }
    let consul = Consul {
        fast: client.with_timeout(settings.check_ttl.max(Duration::from_millis(500))),
        blocking: client.with_timeout(KEY_WAIT + KEY_WAIT / 16 + Duration::from_secs(2)),
    };
    let tasks = stop.child_token();

    // The lease: the deadline from the last successful heartbeat.
    let (lease_tx, mut lease) = watch::channel(None::<Instant>);
    tokio::spawn(heartbeat(
        Arc::clone(&leadership),
        consul.fast.clone(),
        lease_tx,
        tasks.clone(),
    ));
    let (key_tx, mut key) = watch::channel(None::<Option<KeyState>>);
    tokio::spawn(watch_key(
        Arc::clone(&leadership),
        consul.blocking.clone(),
        key_tx,
        tasks.clone(),
    ));

    loop {
        let Some(session) = open_session(&leadership, &consul.fast, &mut lease, &stop).await else {
            break;
        };
        leadership.set_role(Role::Standby);
        let epoch = match contend(&leadership, &consul.fast, &session, &mut key, &mut lease, &stop).await {
            Contend::Acquired(epoch) => epoch,
            Contend::SessionLost => {
                leadership.state().session = None;
                continue;
            }
            Contend::Twin => {
                close_session(&consul.fast, &session).await;
                leadership.state().session = None;
                continue;
            }
            Contend::Stopped => {
                close_session(&consul.fast, &session).await;
                break;
            }
        };
        let term = Serving {
            server: &server,
            floating: floating.as_ref(),
            session: &session,
            epoch,
        };
        let reason = lead(&leadership, &consul.fast, term, &mut key, &mut lease, &stop).await;
        if reason == StepDown::Shutdown {
            // Stopped serving already; now hand over. A release starts no
            // lock delay, so the standby can take over at once.
            match consul
                .fast
                .kv_release(&settings.lock_key(), leadership.value(), &session)
                .await
            {
                Ok(released) => tracing::info!(released, "lock released for the standby"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot release the lock; the standby waits for the session to expire")
                }
            }
            close_session(&consul.fast, &session).await;
            break;
        }
        // Stepped down for cause: this session is suspect (or gone). Destroy
        // it, which frees the lock after the lock delay if it was still held
        // (otherwise a session whose check we keep passing would hold it for
        // ever), and contend again with a fresh one.
        tokio::spawn(retire_session(consul.fast.clone(), session, stop.clone()));
        leadership.state().session = None;
    }
    tasks.cancel();
    if let Err(e) = consul.fast.deregister_service(&leadership.service_id()).await {
        tracing::warn!(error = %e, "cannot deregister the halo-lb instance; Consul removes it a minute after its check fails");
    }
    leadership.set_role(Role::Standby);
}

/// Registers the instance and creates a session bound to its check and to
/// the node's `serfHealth`. Retries until it succeeds or `stop`.
async fn open_session(
    leadership: &Leadership,
    client: &Client,
    lease: &mut watch::Receiver<Option<Instant>>,
    stop: &CancellationToken,
) -> Option<String> {
    let settings = &leadership.settings;
    loop {
        // A session can only be bound to a passing check: wait for a
        // heartbeat to have succeeded.
        while lease.borrow_and_update().is_none_or(|until| until <= Instant::now()) {
            tokio::select! {
                () = stop.cancelled() => return None,
                changed = lease.changed() => if changed.is_err() { return None },
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
                return Some(id);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a session; retrying");
                leadership.set_consul_error(Some(e.to_string()));
            }
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(CONSUL_RETRY) => {}
        }
    }
}

async fn close_session(client: &Client, session: &str) {
    match client.session_destroy(session).await {
        Ok(()) | Err(ConsulError::NotFound { .. }) => {}
        Err(e) => tracing::warn!(session, error = %e, "cannot destroy the session"),
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
    Acquired(u64),
    SessionLost,
    /// An older live instance uses our id: leave the election.
    Twin,
    Stopped,
}

/// The standby: waits for the key to be free and acquires it.
async fn contend(
    leadership: &Leadership,
    client: &Client,
    session: &str,
    key: &mut watch::Receiver<Option<Option<KeyState>>>,
    lease: &mut watch::Receiver<Option<Instant>>,
    stop: &CancellationToken,
) -> Contend {
    let settings = &leadership.settings;
    let lock_key = settings.lock_key();
    let mut twin_check = tokio::time::interval(TWIN_RECHECK);
    twin_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    twin_check.reset();
    loop {
        let seen = key.borrow_and_update().clone();
        // Unknown until the watch answers once; absent or without a session
        // means free.
        let free = match &seen {
            None => false,
            Some(None) => true,
            Some(Some(k)) => k.session.is_none() || k.session.as_deref() == Some(session),
        };
        let lease_valid = lease.borrow_and_update().is_some_and(|until| until > Instant::now());
        let mut retry_after = None;
        if free && lease_valid {
            match client.kv_acquire(&lock_key, leadership.value(), session).await {
                Ok(true) => match confirm(client, &lock_key, session).await {
                    Ok(Some(epoch)) => return Contend::Acquired(epoch),
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
        let retry = async {
            match retry_after {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return Contend::Stopped,
            _ = key.changed() => {}
            _ = lease.changed() => {}
            () = retry => {}
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
    Ok(answer.value.iter().filter(|e| e.service.id != own).find_map(|e| {
        let start: u64 = e.service.meta.get("start_us")?.parse().ok()?;
        let instance = e.service.meta.get("instance")?;
        ((start, instance.as_str()) < me).then(|| {
            format!(
                "service {} on node {} (admin {}:{})",
                e.service.id, e.node.node, e.service.address, e.service.port
            )
        })
    }))
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
                tracing::warn!(error = %e, "cannot look for instances sharing our id; joining the election");
                return true;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(TWIN_RECHECK) => {}
        }
    }
}

/// A consistent read of the key after an acquire: the epoch if `session`
/// holds it.
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
    floating: Option<&'a FloatingIp>,
    session: &'a str,
    epoch: u64,
}

/// Adds the floating address and announces it; logged, not fatal: the
/// active retries every heartbeat while it has not got the address.
fn claim(floating: &FloatingIp) -> bool {
    let started = std::time::Instant::now();
    match floating.claim() {
        Ok(_) => {
            tracing::info!(address = %floating.address(), interface = floating.interface(), took = ?started.elapsed(), "floating address claimed and announced");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot claim the floating address; retrying");
            false
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
    lease: &mut watch::Receiver<Option<Instant>>,
    stop: &CancellationToken,
) -> StepDown {
    let Serving {
        server,
        floating,
        session,
        epoch,
    } = term;
    let settings = &leadership.settings;
    // Invariant: we hold the lock (acquire + consistent confirm) and our
    // lease is valid; checked once more right before binding.
    if lease.borrow_and_update().is_none_or(|until| until <= Instant::now()) {
        tracing::warn!("lease ran out while acquiring; not promoting");
        return StepDown::LeaseExpired;
    }
    let from = SystemTime::now();
    let failed = server.start_serving();
    {
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
    leadership.set_role(Role::Active);
    metrics::gauge!("halo_ha_epoch").set(epoch as f64);
    metrics::counter!("halo_ha_promotions_total").increment(1);
    tracing::info!(epoch, id = %settings.id, "promoted: active, serving the vips");
    for e in &failed {
        tracing::error!(error = %e, "cannot serve a vip; retrying every heartbeat");
    }
    let mut unbound = !failed.is_empty();
    // The address last: listeners are ready (pre-bound) before any packet
    // for it can arrive.
    let mut unclaimed = floating.is_some_and(|f| !claim(f));
    // Announce once more a little later, as keepalived does, for neighbours
    // that missed the first burst.
    let reannounce = tokio::time::sleep(crate::floating::REANNOUNCE_AFTER);
    tokio::pin!(reannounce);
    let mut reannounced = floating.is_none();

    // Renewing runs beside this loop, never inside it: nothing here may
    // wait on Consul, or a hanging call would hold the loop past the lease
    // deadline.
    let (gone_tx, mut gone) = oneshot::channel();
    let renewer = AbortOnDrop(tokio::spawn(renew_until_gone(
        client.clone(),
        session.to_owned(),
        settings.heartbeat,
        gone_tx,
    )));
    let mut retry_bind = tokio::time::interval(settings.heartbeat);
    retry_bind.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason = loop {
        let deadline = lease.borrow_and_update().unwrap_or_else(Instant::now);
        leadership.state().lease_until = Some(deadline);
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => {
                // The lease may have moved just now: look again before acting.
                if lease.borrow().is_none_or(|until| until <= Instant::now()) {
                    break StepDown::LeaseExpired;
                }
            }
            () = stop.cancelled() => break StepDown::Shutdown,
            _ = key.changed() => {
                let ours = key
                    .borrow_and_update()
                    .as_ref()
                    .is_some_and(|k| k.as_ref().is_some_and(|k| k.session.as_deref() == Some(session)));
                if !ours {
                    break StepDown::LockLost;
                }
            }
            _ = lease.changed() => {}
            Ok(()) = &mut gone => break StepDown::SessionLost,
            _ = retry_bind.tick(), if unbound || unclaimed => {
                if unbound {
                    let failed = server.start_serving();
                    for e in &failed {
                        tracing::warn!(error = %e, "still cannot serve a vip");
                    }
                    unbound = !failed.is_empty();
                }
                if let Some(f) = floating.filter(|_| unclaimed) {
                    unclaimed = !claim(f);
                }
            }
            () = &mut reannounce, if !reannounced => {
                reannounced = true;
                if let Some(f) = floating {
                    if let Err(e) = f.announce() {
                        tracing::warn!(error = %e, "cannot re-announce the floating address");
                    }
                }
            }
        }
    };
    drop(renewer);
    // Stop before anyone else can start: synchronous, and before any call
    // that could let the standby in (release, destroy).
    server.stop_serving();
    let to = SystemTime::now();
    {
        let mut state = leadership.state();
        if let Some(term) = state.terms.back_mut() {
            term.to_unix_us = Some(unix_us(to));
            term.ended_by = Some(reason);
        }
        state.lease_until = None;
    }
    if let Some(f) = floating {
        // After the listeners: the address going is not what stops us
        // serving, and the new active's announcement wins either way.
        if let Err(e) = f.release() {
            tracing::error!(error = %e, "cannot remove the floating address");
        }
    }
    tracing::info!(
        epoch,
        from_unix_us = unix_us(from),
        to_unix_us = unix_us(to),
        reason = reason.as_str(),
        "term ended"
    );
    leadership.set_role(Role::Standby);
    metrics::counter!("halo_ha_step_downs_total", "reason" => reason.as_str()).increment(1);
    if reason == StepDown::Shutdown {
        tracing::info!(epoch, "stepped down for shutdown: vips no longer served");
    } else {
        tracing::warn!(epoch, reason = reason.as_str(), "stepped down: vips no longer served");
    }
    reason
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Renews `session` every `every` until Consul answers 404 (it is gone),
/// then says so on `gone`. Other failures (no leader, agent unreachable)
/// are no reason to step down by themselves; the lease decides those.
async fn renew_until_gone(client: Client, session: String, every: Duration, gone: oneshot::Sender<()>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match client.session_renew(&session).await {
            Ok(_) => {}
            Err(ConsulError::NotFound { .. }) => {
                tracing::warn!(session, "renew: the session is gone");
                let _receiver_gone = gone.send(());
                return;
            }
            Err(e) => tracing::debug!(error = %e, "session renew failed"),
        }
    }
}

/// Registers the instance, then passes its check every `heartbeat`,
/// publishing the lease each success earns. Re-registers when the agent
/// no longer knows the check.
async fn heartbeat(
    leadership: Arc<Leadership>,
    client: Client,
    lease: watch::Sender<Option<Instant>>,
    stop: CancellationToken,
) {
    let settings = leadership.settings.clone();
    let check_id = leadership.check_id();
    let earned = settings.check_ttl - settings.margin;
    let mut registered = false;
    let mut failing = false;
    let mut tick = tokio::time::interval(settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sent = Instant::now();
        let result = if registered {
            match client.check_pass(&check_id, "").await {
                Err(e) if e.is_not_found() => {
                    tracing::warn!("the agent lost our check; registering again");
                    registered = false;
                    register(&leadership, &client).await
                }
                other => other,
            }
        } else {
            register(&leadership, &client).await
        };
        match result {
            Ok(()) => {
                // Registration sets the check passing too: either way the
                // TTL clock restarted no earlier than `sent`.
                registered = true;
                lease.send_replace(Some(sent + earned));
                if failing {
                    tracing::info!("heartbeats reach the agent again");
                    leadership.set_consul_error(None);
                }
                failing = false;
            }
            Err(e) => {
                metrics::counter!("halo_ha_heartbeat_failures_total").increment(1);
                if !failing {
                    tracing::warn!(error = %e, "heartbeat failed; the lease runs out unless one succeeds");
                }
                leadership.set_consul_error(Some(e.to_string()));
                failing = true;
            }
        }
    }
}

async fn register(leadership: &Leadership, client: &Client) -> Result<(), ConsulError> {
    let settings = &leadership.settings;
    let mut check = CheckRegistration::ttl(
        leadership.check_id(),
        "halo-lb heartbeat",
        settings.check_ttl,
        CheckStatus::Passing,
    );
    check.deregister_critical_service_after = Some(DEREGISTER_AFTER);
    let registration = ServiceRegistration {
        id: leadership.service_id(),
        name: "halo-lb".to_owned(),
        tags: vec![format!("cluster-{}", settings.cluster)],
        address: Some(leadership.admin.ip().to_string()),
        port: Some(leadership.admin.port()),
        meta: [
            ("cluster".to_owned(), settings.cluster.clone()),
            ("id".to_owned(), settings.id.clone()),
            ("instance".to_owned(), leadership.instance.clone()),
            ("start_us".to_owned(), leadership.started_us.to_string()),
        ]
        .into_iter()
        .collect(),
        weights: None,
        checks: vec![check],
    };
    client.register_service(&registration).await
}

/// Watches the lock key with consistent blocking reads, publishing what it
/// holds whenever that changes (`Some(None)`: the key does not exist).
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
