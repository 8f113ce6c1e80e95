//! The systems compared (the halo-lb pair, keepalived, `consul lock`), the
//! events injected (kill -9, power-off, cable pull), and what
//! `benches/failover.sh` passes in the environment.

use std::path::PathBuf;

use crate::Res;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum System {
    Halo,
    Keepalived,
    ConsulLock,
}

impl System {
    pub(crate) fn key(self) -> &'static str {
        match self {
            System::Halo => "halo",
            System::Keepalived => "keepalived",
            System::ConsulLock => "consul-lock",
        }
    }
    pub(crate) fn label(self) -> &'static str {
        match self {
            System::Halo => "halo-lb pair ([ha] defaults: check_ttl 1s, lock_delay 300ms, probe 100ms × 3)",
            System::Keepalived => "keepalived VRRP (`advert_int 1`, unicast)",
            System::ConsulLock => "`consul lock` (defaults: session TTL 15s, lock-delay 15s)",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Event {
    Kill,
    PowerOff,
    Cable,
}

impl Event {
    pub(crate) fn key(self) -> &'static str {
        match self {
            Event::Kill => "kill",
            Event::PowerOff => "power-off",
            Event::Cable => "cable",
        }
    }
    pub(crate) fn label(self, system: System) -> &'static str {
        match (self, system) {
            (Event::Kill, System::Halo) => "kill -9 of the active halo-lb",
            (Event::Kill, System::Keepalived) => "kill -9 of the master's keepalived + server",
            (Event::Kill, System::ConsulLock) => "kill -9 of the holder's `consul lock` + child",
            (Event::PowerOff, _) => "power-off of the active host",
            (Event::Cable, _) => "cable pull of the active host",
        }
    }
}

/// What failover.sh passes in the environment.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) halo_lb: PathBuf,
    pub(crate) halo_commit: String,
    pub(crate) python: String,
    pub(crate) failover_py: PathBuf,
    pub(crate) keepalived: Option<PathBuf>,
    pub(crate) keepalived_note: Option<String>,
    pub(crate) consul: PathBuf,
    pub(crate) out: PathBuf,
    pub(crate) table: Option<PathBuf>,
    pub(crate) systems: Vec<System>,
    pub(crate) events: Vec<Event>,
    pub(crate) rounds: usize,
    pub(crate) consul_rounds: usize,
    pub(crate) fault_seconds: u64,
    /// FAILOVER_CABLE_FRESH=1: after a cable round, restart the old
    /// active (now the standby), so the next round's standby carries no
    /// damping of forced takeovers from the round before.
    pub(crate) cable_fresh: bool,
    pub(crate) keepalived_rounds: usize,
    pub(crate) max_seconds: u64,
}

impl Settings {
    pub(crate) fn from_env() -> Res<Settings> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let need = |k: &str| var(k).ok_or_else(|| format!("{k} is not set (run benches/failover.sh)"));
        let num = |k: &str, d: u64| -> Res<u64> {
            var(k).map_or(Ok(d), |v| v.parse().map_err(|e| format!("{k}={v:?}: {e}")))
        };
        let mut systems = Vec::new();
        for s in var("FAILOVER_SYSTEMS")
            .unwrap_or_else(|| "halo,keepalived,consul-lock".into())
            .split(',')
        {
            systems.push(match s.trim() {
                "halo" => System::Halo,
                "keepalived" => System::Keepalived,
                "consul-lock" => System::ConsulLock,
                other => return Err(format!("FAILOVER_SYSTEMS: unknown system {other:?}")),
            });
        }
        let mut events = Vec::new();
        for e in var("FAILOVER_EVENTS")
            .unwrap_or_else(|| "kill,power-off,cable".into())
            .split(',')
        {
            events.push(match e.trim() {
                "kill" => Event::Kill,
                "power-off" => Event::PowerOff,
                "cable" => Event::Cable,
                other => return Err(format!("FAILOVER_EVENTS: unknown event {other:?}")),
            });
        }
        Ok(Settings {
            halo_lb: need("FAILOVER_HALO_LB")?.into(),
            halo_commit: var("FAILOVER_HALO_COMMIT").unwrap_or_else(|| "?".into()),
            python: need("FAILOVER_PYTHON")?,
            failover_py: need("FAILOVER_PY")?.into(),
            keepalived: var("FAILOVER_KEEPALIVED").map(PathBuf::from),
            keepalived_note: var("FAILOVER_KEEPALIVED_NOTE"),
            consul: halo_testkit::consul_binary(),
            out: need("FAILOVER_OUT")?.into(),
            table: var("FAILOVER_TABLE").map(PathBuf::from),
            systems,
            events,
            rounds: usize::try_from(num("FAILOVER_ROUNDS", 20)?).map_err(|e| e.to_string())?,
            consul_rounds: usize::try_from(num("FAILOVER_CONSUL_ROUNDS", 3)?).map_err(|e| e.to_string())?,
            fault_seconds: num("FAILOVER_FAULT_SECONDS", 10)?,
            cable_fresh: var("FAILOVER_CABLE_FRESH").as_deref() == Some("1"),
            keepalived_rounds: usize::try_from(num("FAILOVER_KEEPALIVED_ROUNDS", num("FAILOVER_ROUNDS", 20)?)?)
                .map_err(|e| e.to_string())?,
            max_seconds: num("FAILOVER_MAX_SECONDS", 3600)?,
        })
    }
}
