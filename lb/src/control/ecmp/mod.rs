//! `ha.mode = "ecmp"`: every healthy instance of a cluster serves the VIPs at
//! once, and announces their addresses to the routers, which spread flows
//! over the instances with equal-cost multipath.
//!
//! halo decides *when* this host may announce; a routing daemon on the host
//! (BIRD 2 in the shipped example, `packaging/bird/`) speaks BGP and BFD to
//! the routers. The coupling is one interface: halo holds each announced
//! VIP address as a /32 (or /128) on a TUN device of its own
//! ([`tun::Announcer`]), and the daemon exports that interface's addresses.
//! Consul remains the one source of membership and health.
//!
//! # When an instance announces
//!
//! An address is announced only while all of these hold:
//!
//! - **Confirmed by the servers.** Each instance holds a session (bound to
//!   its own TTL check and its node's `serfHealth`, behaviour `delete`) and
//!   with it the key `halo/<cluster>/members/<id>`, whose value says what it
//!   does. Every `announce_lease / 5` it reads the cluster's members with
//!   `?consistent`: the Consul leader answers only after confirming its
//!   leadership with a quorum, so an answer to a read *sent* at `t` that
//!   shows our key held by our session proves the servers still counted us
//!   a live member at some instant after `t`. That earns a lease until `t +
//!   announce_lease`. An instance cut off from the servers (a partition, a
//!   Consul outage, an agent that lost them) gets no confirmation and
//!   withdraws when the lease runs out, before its view of the backends
//!   (served from the last good state meanwhile) can be far out of date.
//!   A read that shows our key gone or held by another session (our
//!   session was invalidated: our node failed in gossip, our check went
//!   critical) withdraws at once, and the instance starts over with a new
//!   session. Heartbeats to the local agent prove nothing about what the
//!   servers decided and never extend the lease.
//! - **Able to serve.** Every VIP on the address has its listener bound and
//!   at least one backend it may pick ([`Server::announceable`]).
//! - **Within the cap.** With `max_announcing = N`, a member announces
//!   only while fewer than N longer-standing members (ordered by the
//!   `CreateIndex` of their member keys) announce, as the last confirmed
//!   read listed them; the others serve nothing and wait as hot spares. A
//!   member that cannot serve (no backend, no lease) holds no place, so a
//!   spare takes over from it. The cap can be passed by a read interval or
//!   two: when an older member becomes able to serve again, or while a
//!   member that was cut off is still inside its own lease (at most one
//!   lease). Nothing is unsafe about that (every instance picks the same
//!   backends, see below): the cap is for the routers' path limits and for
//!   capacity, not a lock.
//! - **Not draining.**
//!
//! The lease is checked by its own timer, not only after reads: a read
//! that hangs (a server that accepted the connection and went silent)
//! cannot keep a stale instance announcing. Reads run as tasks of their
//! own; what the loop itself awaits is bounded (an `nft` run is killed
//! after 2 s; netlink requests are answered by the kernel at once, 2 s at
//! most). A drain does not extend the lease: the wait for the peers'
//! handoff ends when the lease does.
//!
//! # What withdraws, and how fast
//!
//! - **kill -9, a crash, an OOM kill**: the kernel deletes the TUN device
//!   with the process, the daemon sees its addresses go and withdraws at
//!   once (8 ms to the router's table measured in the testbed).
//! - **Host death, a cable pull**: BFD between the daemon and the router
//!   (300 ms in the example config).
//! - **Cut off from Consul**: within `announce_lease` (3 s by default).
//! - **SIGTERM** (drain): the member key says `draining`; the instance
//!   waits (up to 3 s) until every announcing peer says it hands over to
//!   it ([`handoff`]: the peers pass on the packets of connections they do
//!   not know, which after the withdrawal are the drained instance's);
//!   then the addresses are withdrawn but kept local, and the listeners
//!   keep accepting for `withdraw_wait` (1 s) while the routers stop
//!   sending new flows; only then do they close, and the usual drain waits
//!   for the connections to finish, their packets arriving through the
//!   peers. The route is gone before the listeners close, so no client is
//!   refused, and the drained instance's connections finish unbroken.
//!
//! What no instance can prevent: a router that hashes by hash-threshold
//! (Linux, BIRD 2) moves some flows *between the other instances* when a
//! next hop leaves or joins, and nobody knows those flows' owner; they are
//! reset. Routers with resilient hashing move only the leaving one's
//! flows (docs/ecmp.md, "What the router's hashing costs").
//!
//! # The same backend whichever balancer the router picks
//!
//! Maglev on the client address (TCP) or address and port (UDP flows)
//! builds the same table from the same backend set on every instance, so a
//! client's new connections, and a UDP flow the routers move to another
//! balancer, reach the same backend. Every instance reads the same Consul
//! health view; an operator's disable (`POST /vips/…/disable`) is local to
//! the instance it is sent to and must be sent to each.
//!
//! # What the network can do
//!
//! Nothing received from the network changes what is announced: the
//! decision uses only this process's own state and Consul reads over the
//! authenticated (ACL token, TLS) client. The routing daemon's sessions are
//! the daemon's to protect (BGP MD5/TCP-AO or GTSM in its config).
//!
//! # Layout
//!
//! [`run`] takes one membership after another and drains on shutdown:
//!
//! - [`registration`]: the instance's registration, TTL check and session.
//! - [`member`]: one membership: the confirming reads, the lease, and what
//!   to announce.
//! - [`drain`]: what a drain waits for from the peers.
//! - [`handoff`]: passing a draining member's packets on to it.
//! - [`tun`]: the announce interface the routing daemon exports.

mod drain;
mod handoff;
mod member;
mod registration;
mod tun;

use std::collections::{BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use halo_consul::Client;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(crate) use self::drain::HANDOFF_WAIT;
use self::member::Left;
pub(crate) use self::tun::Announcer;
use crate::control::instance::{self, close_session, unix_us, AbortOnDrop};
use crate::control::server::Server;
pub(crate) use crate::control::status::MemberState;
use crate::control::status::{AnnounceChange, EcmpMember, EcmpStatus};
use crate::settings::{EcmpSettings, HaSettings};

/// Back-off after a failed Consul call, doubling up to [`CONSUL_RETRY_MAX`].
const CONSUL_RETRY: Duration = Duration::from_millis(100);
const CONSUL_RETRY_MAX: Duration = Duration::from_secs(2);
/// How long a process whose membership key another live process holds
/// waits before trying again.
const TWIN_RETRY: Duration = Duration::from_secs(2);
/// How long the `draining` value may take to reach Consul before the
/// withdrawal goes ahead without it.
const DRAINING_WRITE: Duration = Duration::from_millis(300);
/// Changes kept for `/status`.
const HISTORY: usize = 64;

/// A member key's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MemberValue {
    id: String,
    instance: String,
    admin: String,
    state: MemberState,
    /// When `state` began (RFC 3339).
    since: String,
    /// Where peers hand this member's packets to while it drains.
    #[serde(default)]
    address: Option<String>,
    /// The draining member (its instance) this member hands over to.
    #[serde(default)]
    handoff: Option<String>,
    /// Whether this member can hand over at all (a draining member waits
    /// for the acknowledgement of those that can).
    #[serde(default)]
    can_handoff: bool,
}

#[derive(Debug)]
struct State {
    state: MemberState,
    since: SystemTime,
    session: Option<String>,
    lease_until: Option<Instant>,
    announced: BTreeSet<IpAddr>,
    withheld: Option<String>,
    /// Members as the last confirmed read listed them, by `CreateIndex`.
    members: Vec<(u64, MemberValue)>,
    consul_error: Option<String>,
    id_conflict: Option<String>,
    changes: VecDeque<AnnounceChange>,
    /// The draining member handed over to: its instance and address.
    handoff_to: Option<(String, Ipv4Addr)>,
    /// Why this instance cannot hand over, if it cannot.
    handoff_off: Option<String>,
}

/// One instance's view of its ECMP cluster: shared by the membership thread
/// and `/status`.
#[derive(Debug)]
pub(crate) struct Membership {
    settings: HaSettings,
    ecmp: EcmpSettings,
    admin: SocketAddr,
    /// Random, new with every process (see the pair's
    /// [`crate::control::ha`]: the same identity scheme).
    instance: String,
    /// This host's address as its Consul agent advertises it: where peers
    /// hand over this instance's packets while it drains.
    address: OnceLock<IpAddr>,
    state: Mutex<State>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Membership {
    /// The view of a new instance, announcing nothing. `settings.ecmp` must
    /// be set.
    pub(crate) fn new(settings: HaSettings, admin: SocketAddr) -> Arc<Membership> {
        let ecmp = settings.ecmp.clone().expect("ecmp settings for an ecmp membership");
        Arc::new(Membership {
            settings,
            ecmp,
            admin,
            instance: instance::new_instance(),
            address: OnceLock::new(),
            state: Mutex::new(State {
                state: MemberState::Ready,
                since: SystemTime::now(),
                session: None,
                lease_until: None,
                announced: BTreeSet::new(),
                withheld: Some("starting".to_owned()),
                members: Vec::new(),
                consul_error: None,
                id_conflict: None,
                changes: VecDeque::new(),
                handoff_to: None,
                handoff_off: Some("not started".to_owned()),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("membership state poisoned")
    }

    /// `ha.withdraw_wait`.
    pub(crate) fn withdraw_wait(&self) -> Duration {
        self.ecmp.withdraw_wait
    }

    /// The `ha.announce_interface` the routing daemon exports.
    pub(crate) fn interface(&self) -> &str {
        &self.ecmp.interface
    }

    fn ids(&self) -> instance::Ids {
        instance::Ids::new(&self.settings, &self.instance)
    }

    fn prefix(&self) -> String {
        format!("halo/{}/members/", self.settings.cluster)
    }

    fn key(&self) -> String {
        format!("{}{}", self.prefix(), self.settings.id)
    }

    fn value(&self) -> String {
        let state = self.state();
        serde_json::to_string(&MemberValue {
            id: self.settings.id.clone(),
            instance: self.instance.clone(),
            admin: self.admin.to_string(),
            state: state.state,
            since: halo_health::server::rfc3339(state.since),
            address: self.address.get().map(ToString::to_string),
            handoff: state.handoff_to.as_ref().map(|(instance, _)| instance.clone()),
            can_handoff: state.handoff_off.is_none(),
        })
        .expect("a struct of strings serialises")
    }

    /// The `ecmp` part of `/status`.
    pub(crate) fn status(&self) -> EcmpStatus {
        let state = self.state();
        let now = Instant::now();
        EcmpStatus {
            cluster: self.settings.cluster.clone(),
            id: self.settings.id.clone(),
            instance: self.instance.clone(),
            state: state.state,
            announced: state.announced.iter().map(ToString::to_string).collect(),
            withheld: state.withheld.clone(),
            interface: self.ecmp.interface.clone(),
            session: state.session.clone(),
            lease_remaining_ms: state
                .lease_until
                .map(|until| millis(until.saturating_duration_since(now))),
            lease_ms: millis(self.ecmp.lease),
            max_announcing: self.ecmp.max_announcing,
            expect_announcing: self.ecmp.expect_announcing,
            members: state
                .members
                .iter()
                .map(|(_, m)| EcmpMember {
                    id: m.id.clone(),
                    instance: m.instance.clone(),
                    admin: m.admin.clone(),
                    state: m.state,
                    since: m.since.clone(),
                    address: m.address.clone(),
                    handoff: m.handoff.clone(),
                })
                .collect(),
            consul_error: state.consul_error.clone(),
            id_conflict: state.id_conflict.clone(),
            address: self.address.get().map(ToString::to_string),
            handoff_to: state.handoff_to.as_ref().map(|(_, address)| address.to_string()),
            handoff_off: state.handoff_off.clone(),
            changes: state.changes.iter().cloned().collect(),
        }
    }

    fn set_consul_error(&self, error: Option<String>) {
        self.state().consul_error = error;
    }

    /// Records this instance's state; true if it changed (and should be
    /// written to its member key).
    fn set_member_state(&self, new: MemberState) -> bool {
        let mut state = self.state();
        if state.state == new {
            return false;
        }
        state.state = new;
        state.since = SystemTime::now();
        let cluster = self.settings.cluster.clone();
        metrics::gauge!("halo_ecmp_announcing", "cluster" => cluster).set(if new == MemberState::Announcing {
            1.0
        } else {
            0.0
        });
        true
    }

    fn record(&self, announced: &[IpAddr], withdrawn: &[IpAddr], reason: &str) {
        let now = SystemTime::now();
        let mut state = self.state();
        state.changes.push_back(AnnounceChange {
            at: halo_health::server::rfc3339(now),
            at_unix_us: unix_us(now),
            announced: announced.iter().map(ToString::to_string).collect(),
            withdrawn: withdrawn.iter().map(ToString::to_string).collect(),
            reason: reason.to_owned(),
        });
        while state.changes.len() > HISTORY {
            state.changes.pop_front();
        }
    }
}

/// Registers the metrics at their starting values.
fn register_metrics(membership: &Membership) {
    let cluster = membership.settings.cluster.clone();
    metrics::gauge!("halo_ecmp_info", "cluster" => cluster.clone(), "id" => membership.settings.id.clone()).set(1.0);
    metrics::gauge!("halo_ecmp_announcing", "cluster" => cluster.clone()).set(0.0);
    metrics::gauge!("halo_ecmp_announced_addresses", "cluster" => cluster.clone()).set(0.0);
    if let Some(expect) = membership.ecmp.expect_announcing {
        metrics::gauge!("halo_ecmp_expected_announcing", "cluster" => cluster.clone()).set(f64::from(expect));
    }
    metrics::counter!("halo_ecmp_confirm_failures_total").increment(0);
    metrics::gauge!("halo_ecmp_handoff_active").set(0.0);
    for reason in Withdrawal::ALL {
        metrics::counter!("halo_ecmp_withdrawals_total", "reason" => reason.as_str()).increment(0);
    }
}

/// Why addresses were withdrawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Withdrawal {
    /// No confirmed read within the lease.
    LeaseExpired,
    /// A confirmed read showed our member key gone or held by another
    /// session.
    MembershipLost,
    /// A VIP on the address has no listener or no backend.
    NotReady,
    /// Beyond `max_announcing`.
    OverCap,
    /// SIGTERM.
    Drain,
}

impl Withdrawal {
    const ALL: [Withdrawal; 5] = [
        Withdrawal::LeaseExpired,
        Withdrawal::MembershipLost,
        Withdrawal::NotReady,
        Withdrawal::OverCap,
        Withdrawal::Drain,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Withdrawal::LeaseExpired => "lease_expired",
            Withdrawal::MembershipLost => "membership_lost",
            Withdrawal::NotReady => "not_ready",
            Withdrawal::OverCap => "over_cap",
            Withdrawal::Drain => "drain",
        }
    }
}

/// How the shutdown goes: `stop` begins it (withdraw, wait, close the
/// listeners, then say so on `withdrawn`); `exit` ends it once the caller
/// drained the connections (the member key says `draining` until then).
pub(crate) struct Shutdown {
    pub(crate) stop: CancellationToken,
    pub(crate) withdrawn: oneshot::Sender<()>,
    pub(crate) exit: CancellationToken,
}

/// Runs the membership until shutdown, announcing on `announcer` what
/// `server` can serve while the lease holds.
pub(crate) async fn run(
    membership: Arc<Membership>,
    client: Client,
    server: Arc<Server>,
    mut announcer: Announcer,
    shutdown: Shutdown,
) {
    register_metrics(&membership);
    let Shutdown { stop, withdrawn, exit } = shutdown;
    let mut handoff = match handoff::Handoff::start(server.tcp_vips_v4()).await {
        Ok(handoff) => {
            membership.state().handoff_off = None;
            Some(handoff)
        }
        Err(why) => {
            tracing::warn!(
                why,
                "no handoff of draining members' connections: a drain here resets the connections the routers move"
            );
            membership.state().handoff_off = Some(why);
            None
        }
    };
    let (check_tx, mut check) = watch::channel(None);
    let _heartbeat = AbortOnDrop(tokio::spawn(registration::heartbeat(
        Arc::clone(&membership),
        client.clone(),
        check_tx,
        exit.clone(),
    )));
    let mut session: Option<String> = None;
    let mut lease_at_stop: Option<Instant> = None;
    let _resolver = AbortOnDrop(tokio::spawn(drain::resolve_address(
        Arc::clone(&membership),
        client.clone(),
    )));
    while !stop.is_cancelled() {
        if let Some(old) = session.take() {
            close_session(&client, &old).await;
        }
        let Some(id) = registration::open_session(&membership, &client, &mut check, &stop).await else {
            break;
        };
        membership.state().session = Some(id.clone());
        session = Some(id.clone());
        let key = membership.key();
        let acquired = tokio::select! {
            () = stop.cancelled() => break,
            acquired = client.kv_acquire(&key, membership.value(), &id) => acquired,
        };
        match acquired {
            Ok(true) => {
                membership.state().id_conflict = None;
                membership.set_consul_error(None);
            }
            Ok(false) => {
                let why = format!(
                    "another live process holds {} (the same ha.cluster and ha.id); this one stays out until it goes",
                    membership.key()
                );
                tracing::error!("{why}");
                membership.state().id_conflict = Some(why);
                wait(&stop, TWIN_RETRY).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot take the membership key; retrying");
                membership.set_consul_error(Some(e.to_string()));
                wait(&stop, CONSUL_RETRY).await;
                continue;
            }
        }
        tracing::info!(key = %membership.key(), session = %id, "member of the ecmp cluster");
        match member::member(
            &membership,
            &client,
            &server,
            &mut announcer,
            handoff.as_mut(),
            &id,
            &stop,
        )
        .await
        {
            Left::Shutdown(lease) => lease_at_stop = lease,
            // Withdrawn already; start over with a new session.
            Left::Lost => continue,
        }
    }
    // Shutdown: say so, let the peers set up the handoff, withdraw (keeping
    // the addresses local for the connections we still carry), let the
    // routers stop sending, close the listeners; the caller drains.
    membership.set_member_state(MemberState::Draining);
    membership.state().handoff_to = None;
    if let Some(handoff) = handoff.as_mut() {
        if let Err(e) = handoff.set(&server.tcp_vips_v4(), None).await {
            tracing::warn!(error = %e, "cannot stop handing over");
        }
    }
    if let Some(id) = &session {
        let (key, value) = (membership.key(), membership.value());
        match tokio::time::timeout(DRAINING_WRITE, client.kv_acquire(&key, value, id)).await {
            Ok(Ok(true)) if membership.address.get().is_some_and(IpAddr::is_ipv4) => {
                drain::await_handoff(&membership, &client, id, lease_at_stop).await;
            }
            Ok(Ok(true)) => tracing::warn!("this host's IPv4 address is not known: withdrawing without a handoff"),
            Ok(Ok(false)) => tracing::warn!("the member key is no longer ours: withdrawing without a handoff"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot say draining in the member key; withdrawing without a handoff")
            }
            Err(_) => tracing::warn!("saying draining in the member key takes too long; withdrawing without a handoff"),
        }
    }
    match announcer.withdraw_keeping_local() {
        Ok(withdrawn) => {
            if !withdrawn.is_empty() {
                metrics::counter!("halo_ecmp_withdrawals_total", "reason" => Withdrawal::Drain.as_str()).increment(1);
                tracing::info!(withdrawn = ?withdrawn, reason = "drain", "announcements changed");
                membership.record(&[], &withdrawn, Withdrawal::Drain.as_str());
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot withdraw while keeping the addresses local; withdrawing them");
            member::apply(&membership, &mut announcer, &BTreeSet::new(), Withdrawal::Drain, None);
        }
    }
    {
        let mut state = membership.state();
        state.announced.clear();
        state.withheld = Some("draining".to_owned());
    }
    metrics::gauge!("halo_ecmp_announced_addresses", "cluster" => membership.settings.cluster.clone()).set(0.0);
    tracing::info!(
        wait = %halo_consul::duration::format(membership.ecmp.withdraw_wait),
        "withdrawn for shutdown; accepting until the routers have stopped sending"
    );
    tokio::time::sleep(membership.ecmp.withdraw_wait).await;
    server.stop_serving();
    membership.record(&[], &[], "listeners_closed");
    tracing::info!("listeners closed; draining connections");
    if withdrawn.send(()).is_err() {
        tracing::debug!("nobody waits for the withdrawal");
    }
    exit.cancelled().await;
    if let Some(id) = session {
        close_session(&client, &id).await;
    }
    if let Some(handoff) = &handoff {
        handoff.remove().await;
    }
    match client.deregister_service(&membership.ids().service).await {
        Ok(()) => {}
        Err(e) => tracing::debug!(error = %e, "cannot deregister; the agent removes the instance later"),
    }
}

/// Sleeps for `pause` unless `stop` comes first.
async fn wait(stop: &CancellationToken, pause: Duration) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(pause) => {}
    }
}
