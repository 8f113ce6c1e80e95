//! The running balancer: VIP listeners, reloads, status, and the drain on
//! shutdown.
//!
//! Tables and discovery run all the time; listeners only while the server
//! is *serving*. A balancer without `[ha]` serves from the start; one of an
//! HA pair serves only while it is the active (see [`crate::control::ha`]), and
//! [`Server::stop_serving`] takes it off every VIP synchronously.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::table::Vip;
use crate::control::series;
use crate::control::status::{self, Status, VipStatus};
use crate::dataplane::workers::Workers;
use crate::dataplane::{proxy, udp};
use crate::settings::{BackendSource, ConsulSettings, DataPlane, HaSettings, Protocol, Validated};
use crate::sources::checks::ActiveChecks;
use crate::sources::Discovery;

/// One configured VIP.
#[derive(Debug)]
struct Running {
    vip: Arc<Vip>,
    listen: SocketAddr,
    protocol: Protocol,
    backlog: u32,
    /// The listening socket and its accept loops, while serving.
    listener: Option<Listening>,
    /// A UDP VIP's counters; they outlive its sockets (a step-down, a
    /// rebind).
    udp: Option<Arc<udp::Stats>>,
    /// A socket bound and listening but not accepted on, kept by a standby
    /// with a floating address so that promotion needs no bind. (The
    /// address is not on the host until promotion, so nothing arrives.)
    /// TCP only: a UDP VIP binds at promotion (a few microseconds).
    prebound: Option<std::net::TcpListener>,
    /// Consul or DNS discovery; `None` for static backends. Dropping it
    /// stops it.
    discovery: Option<Discovery>,
    /// Active checks of the VIP's backends; dropping it stops them.
    #[expect(dead_code, reason = "held for its Drop, which stops the checks")]
    checks: ActiveChecks,
}

/// A VIP being served.
#[derive(Debug)]
enum Listening {
    /// A TCP VIP's listening socket and the token of its accept loops.
    Tcp(TcpListening),
    /// A UDP VIP's sockets on the UDP workers, behind their gate.
    Udp(udp::Serving),
}

impl Listening {
    /// Stops serving, synchronously: see [`TcpListening::close`] and
    /// [`udp::Serving::close`].
    fn close(self) {
        match self {
            Listening::Tcp(l) => l.close(),
            Listening::Udp(s) => s.close(),
        }
    }
}

/// A VIP's sockets, bound, not serving yet.
enum Bound {
    Tcp(std::net::TcpListener),
    Udp(Vec<std::net::UdpSocket>),
}

/// A TCP VIP's listening socket and the token of its accept loops.
#[derive(Debug)]
struct TcpListening {
    /// One handle on the socket; each worker registered its own clone.
    socket: std::net::TcpListener,
    /// Cancels the accept loops (their connections carry on).
    stop: CancellationToken,
}

impl TcpListening {
    /// Takes the socket out of the LISTEN state at once, from this thread.
    ///
    /// `shutdown(SHUT_RD)` on a listening socket acts on the socket itself,
    /// not on this one descriptor: the kernel refuses new connections from
    /// this instant, resets those still in the backlog, and lets another
    /// socket (with SO_REUSEADDR) bind the port, even while the workers'
    /// clones are still registered with their runtimes. This is what makes
    /// a step-down synchronous: when [`Server::stop_serving`] returns, no
    /// new connection can reach this process on any VIP, whatever the
    /// worker threads are doing. The cancelled accept loops then drop their
    /// clones.
    fn close(self) {
        // Cancel first, so the loops woken by the shutdown know why.
        self.stop.cancel();
        if let Err(e) = socket2::SockRef::from(&self.socket).shutdown(std::net::Shutdown::Read) {
            // ENOTCONN is not expected for a listening socket; anything else
            // is logged, and dropping the socket below still closes it once
            // the accept loops have exited.
            tracing::warn!(error = %e, "cannot shut the listening socket down");
        }
    }
}

/// A UDP VIP's counters; `None` for TCP.
fn udp_stats(protocol: Protocol) -> Option<Arc<udp::Stats>> {
    (protocol == Protocol::Udp).then(Arc::default)
}

/// The balancer's state, shared by the accept loops, the admin API and the
/// signal handlers.
#[derive(Debug)]
pub(crate) struct Server {
    vips: Mutex<BTreeMap<String, Running>>,
    /// Every proxied connection, so a drain can wait for them.
    connections: TaskTracker,
    draining: AtomicBool,
    admin: SocketAddr,
    drain_timeout: Mutex<Duration>,
    prometheus: Option<PrometheusHandle>,
    workers: Workers,
    /// The UDP workers, started with the first UDP VIP.
    udp: udp::Workers,
    /// `data_plane` as started; it changes only on restart.
    data_plane: DataPlane,
    /// The Consul settings discovery tasks were started with.
    consul: Mutex<Option<ConsulSettings>>,
    /// The ACL token every Consul client of this process reads (discovery
    /// on this runtime, the election on its own thread): each apply moves
    /// the configured token (a token file read again on SIGHUP) into it.
    consul_token: halo_consul::Token,
    /// Whether VIPs have listeners: always for a lone balancer, only while
    /// active for one of an HA pair. Written only with `vips` locked.
    serving: AtomicBool,
    /// `[ha]` as started; it cannot change on reload.
    ha: Option<HaSettings>,
    /// Whether a standby keeps listeners pre-bound (floating address mode;
    /// on one host the active holds the ports, so the standby cannot).
    prebind: bool,
}

/// Why a configuration could not be applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    /// The `[consul]` section cannot be used.
    #[error("consul: {0}")]
    Consul(#[from] halo_consul::Error),
    /// The config needs Consul but the caller read no token for it (a bug:
    /// see [`Validated::consul_token`]).
    #[error("consul: no ACL token was resolved for this configuration")]
    NoConsulToken,
    /// A listener could not be bound.
    #[error("cannot listen on {addr} for vip {vip:?}: {source}")]
    Bind {
        /// The VIP.
        vip: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

impl Server {
    /// A server with no VIPs yet; [`Server::apply`] adds them. With
    /// `serving` false it keeps tables but binds nothing until
    /// [`Server::start_serving`].
    pub(crate) fn new(
        config: &Validated,
        prometheus: Option<PrometheusHandle>,
        workers: Workers,
        serving: bool,
    ) -> Arc<Server> {
        Arc::new(Server {
            vips: Mutex::new(BTreeMap::new()),
            connections: TaskTracker::new(),
            draining: AtomicBool::new(false),
            admin: config.admin,
            drain_timeout: Mutex::new(config.drain_timeout),
            prometheus,
            workers,
            udp: udp::Workers::default(),
            data_plane: config.data_plane,
            consul: Mutex::new(None),
            consul_token: halo_consul::Token::default(),
            serving: AtomicBool::new(serving),
            ha: config.ha.clone(),
            prebind: config.ha.as_ref().is_some_and(|ha| ha.floating.is_some()),
        })
    }

    /// Applies a validated configuration: adds, changes and removes VIPs.
    /// All-or-nothing for listeners: every new listener is bound before
    /// anything changes, so a bind failure leaves the running config intact.
    /// While not serving, nothing is bound: the VIPs get their tables and
    /// discovery, and listeners wait for [`Server::start_serving`].
    ///
    /// `token` is the Consul ACL token `config` names
    /// ([`Validated::consul_token`]), read by the caller where a file read
    /// may block: this runs on the control runtime's thread and reads no
    /// token file.
    pub(crate) fn apply(&self, config: &Validated, token: Option<halo_consul::Token>) -> Result<(), ApplyError> {
        if config.admin != self.admin {
            tracing::warn!(running = %self.admin, configured = %config.admin, "admin.listen changes take effect only on restart");
        }
        if config.data_plane != self.data_plane {
            tracing::warn!(running = ?self.data_plane, configured = ?config.data_plane, "data_plane changes take effect only on restart");
        }
        let mut vips = self.vips.lock().expect("vip registry poisoned");

        // 0. The Consul settings, if any VIP discovers its backends there,
        // make a client (before any change, so a bad [consul] section
        // changes nothing; validation has already tried the same).
        let token = if config.needs_consul() {
            let token = token.ok_or(ApplyError::NoConsulToken)?;
            config.consul.client_sharing(&token)?;
            Some(token)
        } else {
            None
        };

        // 1. Bind whatever needs a new listener.
        let serving = self.serving.load(Ordering::Relaxed);
        let mut new_listeners: BTreeMap<String, Bound> = BTreeMap::new();
        for v in &config.vips {
            let needs_bind = vips.get(&v.name).is_none_or(|r| {
                r.listen != v.listen || r.protocol != v.protocol || (r.listener.is_none() && r.prebound.is_none())
            });
            // A standby pre-binds TCP listeners only (see `prebound`).
            let prebind = self.prebind && v.protocol == Protocol::Tcp;
            if (serving || prebind) && needs_bind {
                let bound = self
                    .bind(v.protocol, v.listen, v.backlog)
                    .map_err(|source| ApplyError::Bind {
                        vip: v.name.clone(),
                        addr: v.listen,
                        source,
                    })?;
                new_listeners.insert(v.name.clone(), bound);
            }
        }

        // 2. Remove VIPs no longer configured: stop accepting, let their
        // connections finish.
        let keep: Vec<&str> = config.vips.iter().map(|v| v.name.as_str()).collect();
        vips.retain(|name, running| {
            let stays = keep.contains(&name.as_str());
            if !stays {
                tracing::info!(vip = %name, "vip removed by reload; live connections continue");
                if let Some(listening) = running.listener.take() {
                    listening.close();
                }
            }
            stays
        });

        // 3. Update or start the rest. Discovery restarts when its target or
        // the Consul settings change; otherwise it carries on undisturbed.
        *self.drain_timeout.lock().expect("poisoned") = config.drain_timeout;
        // A new token (a token file changed before SIGHUP) restarts Consul
        // discovery like any other Consul change: a blocking query in flight
        // would otherwise carry the old token until its wait ends, and the
        // token's ACL check is redone. The election picks it up from its
        // next call (it shares the cell).
        let first_apply = self.consul.lock().expect("poisoned").is_none();
        let token_changed = token.is_some_and(|token| {
            let changed = self.consul_token.adopt(&token);
            if changed && !first_apply {
                // Never the token itself in the log: only where it came from.
                tracing::info!(
                    token_file = ?token.file(),
                    "Consul ACL token changed: discovery restarts with it, the election uses it from its next call"
                );
            }
            changed
        });
        let consul_changed = {
            let mut current = self.consul.lock().expect("poisoned");
            let changed = current.as_ref() != Some(&config.consul);
            *current = Some(config.consul.clone());
            changed || token_changed
        };
        for v in &config.vips {
            let name = &v.name;
            let running = match vips.get_mut(name) {
                Some(running) => {
                    running.vip.set_settings(v.settings.clone());
                    running.listen = v.listen;
                    running.backlog = v.backlog;
                    if running.protocol != v.protocol {
                        running.protocol = v.protocol;
                        running.prebound = None;
                        running.udp = udp_stats(v.protocol);
                    }
                    if let Some(bound) = new_listeners.remove(name) {
                        if let Some(old) = running.listener.take() {
                            old.close();
                        }
                        match bound {
                            Bound::Tcp(socket) if !serving => running.prebound = Some(socket),
                            bound => running.listener = Some(self.serve(&running.vip, running.udp.as_ref(), bound)?),
                        }
                    }
                    running
                }
                None => {
                    let vip = Vip::new(name, v.settings.clone(), Vec::new());
                    let udp = udp_stats(v.protocol);
                    let (listener, prebound) = match new_listeners.remove(name) {
                        Some(Bound::Tcp(socket)) if !serving => (None, Some(socket)),
                        Some(bound) => (Some(self.serve(&vip, udp.as_ref(), bound)?), None),
                        None => (None, None),
                    };
                    vips.entry(name.clone()).or_insert(Running {
                        checks: ActiveChecks::spawn(Arc::clone(&vip)),
                        vip,
                        listen: v.listen,
                        protocol: v.protocol,
                        backlog: v.backlog,
                        listener,
                        udp,
                        prebound,
                        discovery: None,
                    })
                }
            };
            // A running discovery carries on undisturbed unless its source
            // changed (or, for Consul, the Consul settings did).
            let keep = running.discovery.as_ref().is_some_and(|d| {
                d.source() == &v.source && !(consul_changed && matches!(v.source, BackendSource::Consul(_)))
            });
            if !keep {
                running.discovery = None;
                running.discovery = Discovery::start(&running.vip, &v.source, &config.consul, &self.consul_token)?;
            }
        }
        Ok(())
    }

    /// Starts serving every VIP: binds the listeners that are not bound yet
    /// and starts their accept loops. Returns the VIPs that could not be
    /// bound (with why); they stay unbound and a later call retries them.
    pub(crate) fn start_serving(&self) -> Vec<ApplyError> {
        let mut vips = self.vips.lock().expect("vip registry poisoned");
        self.serving.store(true, Ordering::Relaxed);
        let mut failed = Vec::new();
        for (name, running) in vips.iter_mut() {
            if running.listener.is_some() {
                continue;
            }
            let bound = match running.prebound.take() {
                Some(socket) => Ok(Bound::Tcp(socket)),
                None => self.bind(running.protocol, running.listen, running.backlog),
            };
            match bound.and_then(|bound| {
                self.serve(&running.vip, running.udp.as_ref(), bound)
                    .map_err(|e| match e {
                        ApplyError::Bind { source, .. } => source,
                        other => std::io::Error::other(other.to_string()),
                    })
            }) {
                Ok(listening) => running.listener = Some(listening),
                Err(source) => failed.push(ApplyError::Bind {
                    vip: name.clone(),
                    addr: running.listen,
                    source,
                }),
            }
        }
        failed
    }

    /// Stops serving every VIP, synchronously: when this returns, every
    /// listening socket is out of the LISTEN state, so no new connection
    /// reaches this process (see [`Listening::close`]). Connections already
    /// proxied carry on. Tables and discovery keep running.
    pub(crate) fn stop_serving(&self) {
        let mut vips = self.vips.lock().expect("vip registry poisoned");
        self.serving.store(false, Ordering::Relaxed);
        for running in vips.values_mut() {
            if let Some(listening) = running.listener.take() {
                listening.close();
            }
        }
        if self.prebind && !self.is_draining() {
            // Ready for the next promotion; a failure here only means that
            // promotion binds instead.
            for (name, running) in vips.iter_mut().filter(|(_, r)| r.protocol == Protocol::Tcp) {
                match proxy::bind(running.listen, running.backlog) {
                    Ok(socket) => running.prebound = Some(socket),
                    Err(e) => tracing::warn!(vip = %name, error = %e, "cannot pre-bind the listener"),
                }
            }
        }
    }

    /// `[ha]` as the process started with it.
    pub(crate) fn ha_settings(&self) -> Option<HaSettings> {
        self.ha.clone()
    }

    /// The `[consul]` settings in force (`None` before the first apply).
    pub(crate) fn consul_settings(&self) -> Option<ConsulSettings> {
        self.consul.lock().expect("poisoned").clone()
    }

    /// The ACL token cell every Consul client of this process shares.
    pub(crate) fn consul_token(&self) -> &halo_consul::Token {
        &self.consul_token
    }

    /// How many VIPs have their listener bound and accepting.
    pub(crate) fn listening_count(&self) -> usize {
        let vips = self.vips.lock().expect("vip registry poisoned");
        vips.values().filter(|r| r.listener.is_some()).count()
    }

    /// Whether the VIPs are being served (listeners bound).
    pub(crate) fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// Each VIP address with whether it may be announced now (ECMP mode,
    /// see [`crate::control::ecmp`]): every VIP listening on it has its
    /// listener bound and at least one backend it may pick. An instance
    /// with an empty table would only refuse the share of clients the
    /// routers send it. `None` in the second place: ready; otherwise why
    /// not.
    pub(crate) fn announceable(&self) -> BTreeMap<std::net::IpAddr, Option<String>> {
        let vips = self.vips.lock().expect("vip registry poisoned");
        let mut addresses: BTreeMap<std::net::IpAddr, Option<String>> = BTreeMap::new();
        for (name, running) in vips.iter() {
            let why = if self.is_draining() {
                Some("draining".to_owned())
            } else if running.listener.is_none() {
                Some(format!("vip {name}: not listening"))
            } else if running.vip.table().selectable_len() == 0 {
                Some(format!("vip {name}: no backend to send to"))
            } else {
                None
            };
            let entry = addresses.entry(running.listen.ip()).or_insert(None);
            if entry.is_none() {
                *entry = why;
            }
        }
        addresses
    }

    /// The address and port of every TCP VIP on IPv4 (what the ECMP
    /// handoff marks and forwards, see `control::ecmp`).
    pub(crate) fn tcp_vips_v4(&self) -> Vec<(std::net::Ipv4Addr, u16)> {
        let vips = self.vips.lock().expect("vip registry poisoned");
        let mut out: Vec<(std::net::Ipv4Addr, u16)> = vips
            .values()
            .filter(|r| r.protocol == Protocol::Tcp)
            .filter_map(|r| match r.listen {
                SocketAddr::V4(v4) => Some((*v4.ip(), v4.port())),
                SocketAddr::V6(_) => None,
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Binds a VIP's sockets: one TCP listener, or one UDP socket per
    /// worker (see [`udp::bind`]).
    fn bind(&self, protocol: Protocol, listen: SocketAddr, backlog: u32) -> std::io::Result<Bound> {
        match protocol {
            Protocol::Tcp => proxy::bind(listen, backlog).map(Bound::Tcp),
            Protocol::Udp => udp::bind(listen, self.udp.count(self.workers.len())).map(Bound::Udp),
        }
    }

    /// Serves a VIP on its bound sockets. TCP: an accept loop on every
    /// worker, each on its own clone of the socket, and whichever accepts a
    /// connection serves it to the end on that thread. UDP: each UDP
    /// worker takes one socket of the group.
    fn serve(&self, vip: &Arc<Vip>, stats: Option<&Arc<udp::Stats>>, bound: Bound) -> Result<Listening, ApplyError> {
        match bound {
            Bound::Tcp(listener) => {
                let stop = CancellationToken::new();
                self.workers.spawn_accept(vip, &listener, &stop, &self.connections);
                Ok(Listening::Tcp(TcpListening { socket: listener, stop }))
            }
            Bound::Udp(sockets) => {
                let addr = sockets.first().and_then(|s| s.local_addr().ok());
                let stats = stats.cloned().unwrap_or_default();
                self.udp
                    .serve(vip, sockets, &stats)
                    .map(Listening::Udp)
                    .map_err(|source| ApplyError::Bind {
                        vip: vip.name().to_owned(),
                        addr: addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                        source,
                    })
            }
        }
    }

    /// The VIP named `name`.
    pub(crate) fn vip(&self, name: &str) -> Option<Arc<Vip>> {
        let vips = self.vips.lock().expect("vip registry poisoned");
        vips.get(name).map(|r| Arc::clone(&r.vip))
    }

    /// Whether a drain is under way.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Prometheus text, if a recorder is installed: the registry's series,
    /// then the per-backend ones rendered from the live tables.
    pub(crate) fn render_metrics(&self) -> Option<String> {
        let handle = self.prometheus.as_ref()?;
        let vips: Vec<(Arc<Vip>, Option<Arc<udp::Stats>>)> = {
            let vips = self.vips.lock().expect("vip registry poisoned");
            vips.values().map(|r| (Arc::clone(&r.vip), r.udp.clone())).collect()
        };
        let mut text = handle.render();
        text.push_str(&series::render(&vips));
        Some(text)
    }

    /// The `/status` document, without its `ha` part (the admin API adds
    /// it from the election).
    pub(crate) fn status(&self) -> Status {
        // Snapshot under the registry lock, render without it: the election
        // thread takes that lock to stop serving, and a /status of a large
        // table takes milliseconds to render.
        let snapshot: Vec<_> = {
            let vips = self.vips.lock().expect("vip registry poisoned");
            vips.values()
                .map(|r| {
                    let discovery = r.discovery.as_ref().map(Discovery::status);
                    (
                        Arc::clone(&r.vip),
                        r.listen,
                        r.listener.is_some(),
                        discovery,
                        r.udp.clone(),
                    )
                })
                .collect()
        };
        let vips: Vec<VipStatus> = snapshot
            .into_iter()
            .map(|(vip, listen, listening, discovery, udp)| {
                status::vip_status(&vip, listen, listening, discovery, udp.as_deref())
            })
            .collect();
        Status {
            draining: self.is_draining(),
            serving: self.is_serving(),
            admin: self.admin.to_string(),
            data_plane: self.workers.plane().to_owned(),
            vips,
            ha: None,
            ecmp: None,
        }
    }

    /// Stops accepting on every VIP and waits for live connections to end,
    /// up to the drain timeout. Returns how many were still open.
    pub(crate) async fn drain(&self) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        let timeout = *self.drain_timeout.lock().expect("poisoned");
        self.stop_serving();
        self.connections.close();
        let live = self.connections.len();
        tracing::info!(
            live,
            ?timeout,
            "draining: accepting stopped, waiting for live connections"
        );
        if tokio::time::timeout(timeout, self.connections.wait()).await.is_ok() {
            tracing::info!("drained: every connection finished");
            0
        } else {
            let left = self.connections.len();
            tracing::warn!(left, "drain timeout: closing the remaining connections");
            left
        }
    }
}
