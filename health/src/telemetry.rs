//! Logging and metrics set-up shared by halo's binaries.

use std::ffi::OsStr;
use std::io::IsTerminal;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Installs the `tracing` subscriber (filter from `RUST_LOG`, default
/// `info`) and the Prometheus recorder. Returns the recorder's handle for
/// `/metrics`, or `None` (logged) if one is already installed.
///
/// Logs go to stdout, coloured only when stdout is a terminal and
/// `NO_COLOR` is unset or empty (<https://no-color.org>): a log file, a pipe
/// or journald gets plain text.
pub fn init() -> Option<PrometheusHandle> {
    let ansi = colour_wanted(std::io::stdout().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    tracing_subscriber::fmt()
        // fmt's default writer; `colour_wanted` looked at the same stream.
        .with_writer(std::io::stdout)
        .with_ansi(ansi)
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

/// Whether logs get ANSI colours: only on a terminal, and only if
/// `NO_COLOR` (its value given here, `None` if unset) is unset or empty.
fn colour_wanted(log_stream_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    log_stream_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(true, None));
        assert!(
            colour_wanted(true, Some(OsStr::new(""))),
            "an empty NO_COLOR does not count"
        );
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(!colour_wanted(false, None), "a pipe or file gets no escape codes");
        assert!(!colour_wanted(false, Some(OsStr::new("1"))));
    }
}
