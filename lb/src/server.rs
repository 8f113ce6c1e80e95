//! The running balancer: VIP listeners, reloads, status, and the drain on
//! shutdown.
//!
//! Tables and discovery run all the time; listeners only while the server
//! is *serving*. A balancer without `[ha]` serves from the start; one of an
//! HA pair serves only while it is the active (see [`crate::ha`]), and
//! [`Server::stop_serving`] takes it off every VIP synchronously.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::active_check::{self, ActiveChecks};
use crate::backend::Backend;
use crate::config::{ConsulConfig, Validated, ValidatedVip};
use crate::discovery::{self, Discovery, Target};
use crate::dns::DnsDiscovery;
use crate::proxy;
use crate::table::{Vip, VipSettings};
use crate::workers::Workers;

/// A Consul client for the `[consul]` section.
pub fn consul_client(c: &ConsulConfig) -> Result<halo_consul::Client, halo_consul::Error> {
    halo_consul::Client::new(halo_consul::Config {
        address: c.address.clone(),
        token: c.token.clone(),
        datacenter: None,
        timeout: None,
        max_response_bytes: None,
    })
}

/// One configured VIP.
#[derive(Debug)]
struct Running {
    vip: Arc<Vip>,
    listen: SocketAddr,
    backlog: u32,
    /// The listening socket and its accept loops, while serving.
    listener: Option<Listening>,
    /// A socket bound and listening but not accepted on, kept by a standby
    /// with a floating address so that promotion needs no bind. (The
    /// address is not on the host until promotion, so nothing arrives.)
    prebound: Option<std::net::TcpListener>,
    /// Consul discovery, for VIPs with `service`; dropping it stops it.
    discovery: Option<Discovery>,
    /// DNS discovery, for VIPs with `dns`; dropping it stops it.
    dns: Option<DnsDiscovery>,
    /// Active checks of the VIP's backends; dropping it stops them.
    #[expect(dead_code, reason = "held for its Drop, which stops the checks")]
    checks: ActiveChecks,
}

/// A VIP's listening socket and the token of its accept loops.
#[derive(Debug)]
struct Listening {
    /// One handle on the socket; each worker registered its own clone.
    socket: std::net::TcpListener,
    /// Cancels the accept loops (their connections carry on).
    stop: CancellationToken,
}

impl Listening {
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

/// The balancer's state, shared by the accept loops, the admin API and the
/// signal handlers.
#[derive(Debug)]
pub struct Server {
    vips: Mutex<BTreeMap<String, Running>>,
    /// Every proxied connection, so a drain can wait for them.
    connections: TaskTracker,
    draining: AtomicBool,
    admin: SocketAddr,
    drain_timeout: Mutex<Duration>,
    prometheus: Option<PrometheusHandle>,
    workers: Workers,
    /// The Consul settings discovery tasks were started with.
    consul: Mutex<Option<ConsulConfig>>,
    /// Whether VIPs have listeners: always for a lone balancer, only while
    /// active for one of an HA pair. Written only with `vips` locked.
    serving: AtomicBool,
    /// `[ha]` as started; it cannot change on reload.
    ha: Option<crate::config::HaSettings>,
    /// Whether a standby keeps listeners pre-bound (floating address mode;
    /// on one host the active holds the ports, so the standby cannot).
    prebind: bool,
}

/// Why a configuration could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The `[consul]` section cannot be used.
    #[error("consul: {0}")]
    Consul(#[from] halo_consul::Error),
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

fn static_backends(vip: &ValidatedVip) -> Vec<Backend> {
    vip.backends
        .iter()
        .map(|b| Backend {
            addr: b.addr,
            weight: b.weight,
            zone: b.zone.clone(),
        })
        .collect()
}

impl Server {
    /// A server with no VIPs yet; [`Server::apply`] adds them. With
    /// `serving` false it keeps tables but binds nothing until
    /// [`Server::start_serving`].
    pub fn new(
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
            drain_timeout: Mutex::new(config.config.drain_timeout),
            prometheus,
            workers,
            consul: Mutex::new(None),
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
    pub fn apply(&self, config: &Validated) -> Result<(), ApplyError> {
        if config.admin != self.admin {
            tracing::warn!(running = %self.admin, configured = %config.admin, "admin.listen changes take effect only on restart");
        }
        let mut vips = self.vips.lock().expect("vip registry poisoned");

        // 0. A Consul client, if any VIP discovers its backends (before any
        // change, so a bad [consul] section changes nothing).
        let client = if config.vips.iter().any(|v| v.config.service.is_some()) {
            Some(consul_client(&config.config.consul)?)
        } else {
            None
        };

        // 1. Bind whatever needs a new listener.
        let serving = self.serving.load(Ordering::Relaxed);
        let mut new_listeners: BTreeMap<String, std::net::TcpListener> = BTreeMap::new();
        for v in &config.vips {
            let needs_bind = vips
                .get(&v.config.name)
                .is_none_or(|r| r.listen != v.listen || (r.listener.is_none() && r.prebound.is_none()));
            if (serving || self.prebind) && needs_bind {
                let listener = proxy::bind(v.listen, v.config.backlog).map_err(|source| ApplyError::Bind {
                    vip: v.config.name.clone(),
                    addr: v.listen,
                    source,
                })?;
                new_listeners.insert(v.config.name.clone(), listener);
            }
        }

        // 2. Remove VIPs no longer configured: stop accepting, let their
        // connections finish.
        let keep: Vec<&str> = config.vips.iter().map(|v| v.config.name.as_str()).collect();
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
        *self.drain_timeout.lock().expect("poisoned") = config.config.drain_timeout;
        let consul_changed = {
            let mut current = self.consul.lock().expect("poisoned");
            let changed = current.as_ref() != Some(&config.config.consul);
            *current = Some(config.config.consul.clone());
            changed
        };
        let wait = config.config.consul.wait.unwrap_or(discovery::DEFAULT_WAIT);
        for v in &config.vips {
            let name = &v.config.name;
            let settings = VipSettings::from_config(v);
            let target = v.config.service.as_ref().map(|service| Target {
                service: service.clone(),
                tag: v.config.service_tag.clone(),
            });
            let running = match vips.get_mut(name) {
                Some(running) => {
                    running.vip.set_settings(settings);
                    running.listen = v.listen;
                    running.backlog = v.config.backlog;
                    if let Some(socket) = new_listeners.remove(name) {
                        if let Some(old) = running.listener.take() {
                            old.close();
                        }
                        if serving {
                            running.listener = Some(self.spawn_accept(&running.vip, socket));
                        } else {
                            running.prebound = Some(socket);
                        }
                    }
                    running
                }
                None => {
                    let vip = Vip::new(name, settings, Vec::new());
                    let (listener, prebound) = match new_listeners.remove(name) {
                        Some(socket) if serving => (Some(self.spawn_accept(&vip, socket)), None),
                        socket => (None, socket),
                    };
                    vips.entry(name.clone()).or_insert(Running {
                        checks: ActiveChecks::spawn(Arc::clone(&vip)),
                        vip,
                        listen: v.listen,
                        backlog: v.config.backlog,
                        listener,
                        prebound,
                        discovery: None,
                        dns: None,
                    })
                }
            };
            match target {
                None if v.dns.is_some() => {
                    running.discovery = None;
                    let dns = v.dns.clone().expect("checked by the guard");
                    if running.dns.as_ref().is_none_or(|d| d.target != dns) {
                        running.dns = Some(DnsDiscovery::spawn(Arc::clone(&running.vip), dns));
                    }
                }
                None => {
                    running.discovery = None;
                    running.dns = None;
                    running.vip.set_backends(static_backends(v));
                }
                Some(target) => {
                    running.dns = None;
                    let keep = !consul_changed && running.discovery.as_ref().is_some_and(|d| d.target == target);
                    if !keep {
                        running.discovery = Some(Discovery::spawn(
                            client.clone().expect("made above when a vip has a service"),
                            Arc::clone(&running.vip),
                            target,
                            wait,
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts serving every VIP: binds the listeners that are not bound yet
    /// and starts their accept loops. Returns the VIPs that could not be
    /// bound (with why); they stay unbound and a later call retries them.
    pub fn start_serving(&self) -> Vec<ApplyError> {
        let mut vips = self.vips.lock().expect("vip registry poisoned");
        self.serving.store(true, Ordering::Relaxed);
        let mut failed = Vec::new();
        for (name, running) in vips.iter_mut() {
            if running.listener.is_some() {
                continue;
            }
            let bound = match running.prebound.take() {
                Some(socket) => Ok(socket),
                None => proxy::bind(running.listen, running.backlog),
            };
            match bound {
                Ok(socket) => running.listener = Some(self.spawn_accept(&running.vip, socket)),
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
    pub fn stop_serving(&self) {
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
            for (name, running) in vips.iter_mut() {
                match proxy::bind(running.listen, running.backlog) {
                    Ok(socket) => running.prebound = Some(socket),
                    Err(e) => tracing::warn!(vip = %name, error = %e, "cannot pre-bind the listener"),
                }
            }
        }
    }

    /// `[ha]` as the process started with it.
    pub fn ha_settings(&self) -> Option<crate::config::HaSettings> {
        self.ha.clone()
    }

    /// How many VIPs have their listener bound and accepting.
    pub fn listening_count(&self) -> usize {
        let vips = self.vips.lock().expect("vip registry poisoned");
        vips.values().filter(|r| r.listener.is_some()).count()
    }

    /// Whether the VIPs are being served (listeners bound).
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// Runs an accept loop for `listener` on every worker: each registers
    /// its own clone of the socket with its own runtime, and whichever
    /// accepts a connection serves it to the end on that thread.
    fn spawn_accept(&self, vip: &Arc<Vip>, listener: std::net::TcpListener) -> Listening {
        let stop = CancellationToken::new();
        for worker in self.workers.handles() {
            let listener = match listener.try_clone() {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(vip = vip.name(), error = %e, "cannot share the listener with a worker");
                    continue;
                }
            };
            let (vip, stop, tracker) = (Arc::clone(vip), stop.clone(), self.connections.clone());
            worker.spawn(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => proxy::accept_loop(vip, listener, stop, tracker).await,
                    Err(e) => tracing::error!(vip = vip.name(), error = %e, "cannot register the listener"),
                }
            });
        }
        Listening { socket: listener, stop }
    }

    /// The VIP named `name`.
    pub fn vip(&self, name: &str) -> Option<Arc<Vip>> {
        let vips = self.vips.lock().expect("vip registry poisoned");
        vips.get(name).map(|r| Arc::clone(&r.vip))
    }

    /// Whether a drain is under way.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Prometheus text, if a recorder is installed.
    pub fn render_metrics(&self) -> Option<String> {
        self.prometheus.as_ref().map(PrometheusHandle::render)
    }

    /// The `/status` document.
    pub fn status(&self) -> serde_json::Value {
        // Snapshot under the registry lock, render without it: the election
        // thread takes that lock to stop serving, and a /status of a large
        // table takes milliseconds to render.
        let snapshot: Vec<(Arc<Vip>, SocketAddr, bool, Option<serde_json::Value>)> = {
            let vips = self.vips.lock().expect("vip registry poisoned");
            vips.values()
                .map(|r| {
                    let discovery = r
                        .discovery
                        .as_ref()
                        .map(|d| json!(d.status()))
                        .or_else(|| r.dns.as_ref().map(|d| json!(d.status())));
                    (Arc::clone(&r.vip), r.listen, r.listener.is_some(), discovery)
                })
                .collect()
        };
        let now = Vip::now();
        let list: Vec<serde_json::Value> = snapshot
            .into_iter()
            .map(|(vip, listen, listening, discovery)| {
                let table = vip.table();
                let backends: Vec<serde_json::Value> = table
                    .entries
                    .iter()
                    .map(|e| {
                        let (health, remaining) = e.state.health(now);
                        let state = if e.disabled {
                            "disabled"
                        } else if e.state.check_failing() {
                            "check_failing"
                        } else {
                            match health {
                                crate::backend::Health::Healthy => "healthy",
                                crate::backend::Health::Ejected => "ejected",
                            }
                        };
                        json!({
                            "address": e.backend.addr.to_string(),
                            "weight": e.backend.weight,
                            "zone": e.backend.zone,
                            "state": state,
                            "ejected_for_ms": remaining.as_millis() as u64,
                            "active_connections": e.state.active(),
                            "check": active_check::status(&e.state),
                        })
                    })
                    .collect();
                json!({
                    "name": vip.name(),
                    "listen": listen.to_string(),
                    "listening": listening,
                    "algorithm": table.settings.algorithm,
                    "copy": table.settings.copy,
                    "proxy_protocol": table.settings.proxy_protocol,
                    "max_connections": table.settings.max_connections,
                    "active_connections": vip.active(),
                    "table_version": table.version,
                    "table_error": vip.build_error(),
                    "discovery": discovery,
                    "zone": table.zone_status(now),
                    "backends": backends,
                })
            })
            .collect();
        json!({
            "draining": self.is_draining(),
            "serving": self.is_serving(),
            "admin": self.admin.to_string(),
            "vips": list,
        })
    }

    /// Stops accepting on every VIP and waits for live connections to end,
    /// up to the drain timeout. Returns how many were still open.
    pub async fn drain(&self) -> usize {
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
