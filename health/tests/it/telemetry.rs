//! Logs written to a pipe carry no ANSI escape codes.

use std::process::{Command, Stdio};

/// Set in the child run of this test, which logs instead of spawning.
const CHILD: &str = "HALO_HEALTH_TEST_LOG_CHILD";

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    if std::env::var_os(CHILD).is_some() {
        // The child: log through the real set-up to stdout (a pipe).
        let _prometheus = halo_health::telemetry::init();
        tracing::info!(answer = 42, "hello from the log child");
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "telemetry::logs_to_a_pipe_carry_no_colour_codes",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("hello from the log child"), "{stdout}");
    assert!(stdout.contains("answer=42"), "{stdout}");
    assert!(!stdout.contains('\u{1b}'), "escape codes in a piped log: {stdout:?}");
}
