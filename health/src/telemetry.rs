//! Logging and metrics set-up shared by halo's binaries.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Installs the `tracing` subscriber (filter from `RUST_LOG`, default
/// `info`) and the Prometheus recorder. Returns the recorder's handle for
/// `/metrics`, or `None` (logged) if one is already installed.
pub fn init() -> Option<PrometheusHandle> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match PrometheusBuilder::new().install_recorder() {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::error!(error = %e, "cannot install the metrics recorder; /metrics disabled");
            None
        }
    }
}
