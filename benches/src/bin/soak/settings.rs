//! What `benches/soak.sh` passes in the environment: the binaries, the
//! output directory, the run's length and seed, the faults to inject and
//! the clients' load.

use std::path::PathBuf;
use std::time::Duration;

use crate::fault::Fault;
use crate::{unix_us, Res};

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) halo_lb: PathBuf,
    pub(crate) halo_sidecar: PathBuf,
    pub(crate) halo_commit: String,
    pub(crate) out: PathBuf,
    pub(crate) seconds: u64,
    pub(crate) seed: u64,
    pub(crate) faults: Vec<Fault>,
    /// New connections per second.
    pub(crate) rate: u64,
    pub(crate) streams: usize,
    /// Steady time between a recovery and the next fault.
    pub(crate) quiet: Duration,
}

impl Settings {
    pub(crate) fn from_env() -> Res<Settings> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let need = |k: &str| var(k).ok_or_else(|| format!("{k} is not set (run benches/soak.sh)"));
        let num = |k: &str, d: u64| -> Res<u64> {
            var(k).map_or(Ok(d), |v| v.parse().map_err(|e| format!("{k}={v:?}: {e}")))
        };
        let mut faults = Vec::new();
        match var("SOAK_FAULTS") {
            None => faults.extend(Fault::ALL),
            Some(list) => {
                for f in list.split(',') {
                    let f = f.trim();
                    faults.push(
                        *Fault::ALL
                            .iter()
                            .find(|k| k.key() == f)
                            .ok_or_else(|| format!("SOAK_FAULTS: unknown fault {f:?}"))?,
                    );
                }
            }
        }
        let seed = match var("SOAK_SEED") {
            Some(v) => v.parse().map_err(|e| format!("SOAK_SEED={v:?}: {e}"))?,
            None => unix_us() % 1_000_000_007,
        };
        let rate = num("SOAK_RATE", 100)?;
        if rate == 0 || rate > 2000 {
            return Err(format!("SOAK_RATE={rate}: 1..=2000 connections per second"));
        }
        Ok(Settings {
            halo_lb: need("SOAK_HALO_LB")?.into(),
            halo_sidecar: need("SOAK_HALO_SIDECAR")?.into(),
            halo_commit: var("SOAK_HALO_COMMIT").unwrap_or_else(|| "?".into()),
            out: need("SOAK_OUT")?.into(),
            seconds: num("SOAK_SECONDS", 1800)?,
            seed,
            faults,
            rate,
            streams: usize::try_from(num("SOAK_STREAMS", 4)?).map_err(|e| e.to_string())?,
            quiet: Duration::from_millis(num("SOAK_QUIET_MS", 2000)?),
        })
    }
}
