//! Token files that are not regular files (issue 17): a FIFO as
//! `admin.token_file` or `[consul] token_file` used to block `open(2)` until
//! a writer came, wedging the SIGHUP reload and, behind it, SIGTERM. Now it
//! is refused at once, naming the file and what it is; the process keeps
//! answering and exits promptly on SIGTERM. Through the real binary.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use halo_testkit::{eventually, ConsulAgent};

use crate::admin_auth::{token_file, with_token_file};
use crate::support::*;

/// SIGTERM with no connections open: the drain has nothing to wait for.
const PROMPT_EXIT: Duration = Duration::from_secs(5);

/// Replaces `path` with a FIFO that nobody ever writes to.
fn make_fifo(path: &Path) {
    if path.exists() {
        std::fs::remove_file(path).unwrap();
    }
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// SIGHUP with a FIFO where the token file was: the reload is rejected,
/// naming the file as a FIFO, `/health` answers throughout, the running
/// token stays, and SIGTERM ends the process promptly.
async fn sighup_with_a_fifo_then_sigterm(mut lb: Lb, fifo: &Path, field: &str) {
    make_fifo(fifo);
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    let line = eventually(DEADLINE, "the reload to be rejected", || async {
        lb.log()
            .lines()
            .find(|l| l.contains("reload rejected") && l.contains("FIFO"))
            .map(str::to_owned)
    })
    .await;
    assert!(
        line.contains(field)
            && line.contains(&format!(
                "{} is a FIFO (named pipe), not a regular file",
                fifo.display()
            )),
        "{line}"
    );
    let (code, body) = halo_testkit::http::get(lb.admin, "/health")
        .await
        .expect("/health answers");
    assert_eq!(code, 200, "{body}");

    let asked = Instant::now();
    lb.signal(nix::sys::signal::Signal::SIGTERM);
    let status = lb.wait_exit().await;
    let took = asked.elapsed();
    assert!(status.success(), "{status}:\n{}", lb.log());
    assert!(took < PROMPT_EXIT, "exited {took:?} after SIGTERM:\n{}", lb.log());
}

#[tokio::test]
async fn a_fifo_as_admin_token_file_at_reload_is_refused_and_sigterm_still_works() {
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let dir = tempfile::tempdir().unwrap();
    let path = token_file(dir.path(), "token", "first-token-0123456789", 0o600);
    let lb = Lb::start(
        &with_token_file(&one_vip(admin, vip, &[a.addr], ""), admin, &path),
        admin,
        &[vip],
    )
    .await;
    sighup_with_a_fifo_then_sigterm(lb, &path, "admin.token_file").await;
}

#[tokio::test]
async fn a_fifo_as_consul_token_file_at_reload_is_refused_and_sigterm_still_works() {
    let consul = ConsulAgent::start().await;
    let (admin, vip) = addrs();
    let dir = tempfile::tempdir().unwrap();
    let path = token_file(
        dir.path(),
        "consul-token",
        "3c9d0f6e-2a4b-4c8d-8e1f-0000000000aa",
        0o600,
    );
    let config = format!(
        "[admin]\nlisten = \"{admin}\"\n[consul]\naddress = \"{}\"\ntoken_file = \"{}\"\n\
         [[vip]]\nname = \"web\"\nlisten = \"{vip}\"\nservice = \"web\"\n",
        consul.http_url(),
        path.display()
    );
    let lb = Lb::start(&config, admin, &[vip]).await;
    sighup_with_a_fifo_then_sigterm(lb, &path, "token_file").await;
}

/// At start (and in `halo-lb check`) a FIFO is a config error naming the
/// field and the file, at once, for either token file; a Consul token file
/// others can read is refused as the admin one is.
#[tokio::test]
async fn token_files_that_are_fifos_or_readable_by_others_are_config_errors() {
    let (admin, vip) = addrs();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    make_fifo(&fifo);
    let loose = token_file(dir.path(), "loose", "3c9d0f6e-2a4b-4c8d-8e1f-0000000000bb", 0o640);
    let consul_config = |file: &Path| {
        format!(
            "[admin]\nlisten = \"{admin}\"\n[consul]\naddress = \"127.0.0.1:1\"\ntoken_file = \"{}\"\n\
             [[vip]]\nname = \"web\"\nlisten = \"{vip}\"\nservice = \"web\"\n",
            file.display()
        )
    };
    let admin_config = with_token_file(
        &one_vip(admin, vip, &["127.0.0.1:9".parse().unwrap()], ""),
        admin,
        &fifo,
    );
    let config_path = dir.path().join("lb.toml");
    for (config, want) in [
        (
            admin_config,
            format!(
                "admin.token_file: {} is a FIFO (named pipe), not a regular file",
                fifo.display()
            ),
        ),
        (
            consul_config(&fifo),
            format!(
                "token_file: {} is a FIFO (named pipe), not a regular file",
                fifo.display()
            ),
        ),
        (consul_config(&loose), "mode 640".to_owned()),
    ] {
        std::fs::write(&config_path, config).unwrap();
        for subcommand in [Some("check"), None] {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_halo-lb"));
            cmd.arg("--config")
                .arg(&config_path)
                .env_remove("HALO_ADMIN_TOKEN_FILE");
            if let Some(sub) = subcommand {
                cmd.arg(sub);
            }
            let out = halo_testkit::output_within(cmd, PROMPT_EXIT);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{subcommand:?}: {out:?}");
            assert!(stderr.contains(&want), "{subcommand:?}: want {want:?} in:\n{stderr}");
            assert!(!stderr.contains("0000000000bb"), "{stderr}");
        }
    }
}
