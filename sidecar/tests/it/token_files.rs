//! Token files that are not regular files (issue 17): a FIFO as
//! `admin.token_file` or `[consul] token_file` used to block `open(2)` until
//! a writer came: at start the sidecar never started, and on SIGHUP the
//! token reload wedged the task that also handles SIGTERM. Now a FIFO is
//! refused at once, naming the file and what it is. Through the real binary.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use halo_testkit::{eventually, ConsulAgent};

use super::*;

/// Well above the 1 s grace plus a deregistration, well below a hang.
const PROMPT_EXIT: Duration = Duration::from_secs(8);

/// Replaces `path` with a FIFO that nobody ever writes to.
fn make_fifo(path: &Path) {
    if path.exists() {
        std::fs::remove_file(path).unwrap();
    }
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

fn secret_file(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn a_fifo_as_consul_token_file_at_sighup_is_refused_and_sigterm_still_drains() {
    let consul = ConsulAgent::start().await;
    let app = App::start().await;
    let admin = admin_addr();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("consul-token");
    // ACLs are off on this agent: any token is accepted.
    secret_file(&token_file, "5b0e8a9c-1d2e-4f3a-9b4c-0000000000aa\n", 0o600);
    let config = config(&consul, &app, admin, "200ms", "1s").replace(
        &format!("address = \"{}\"\n", consul.http_url()),
        &format!(
            "address = \"{}\"\ntoken_file = \"{}\"\n",
            consul.http_url(),
            token_file.display()
        ),
    );
    let mut sidecar = Sidecar::start(&config, admin).await;
    let plain = Client::from_address(consul.http_url()).unwrap();
    wait_passing(&plain, &["web-1"], DEADLINE).await;

    make_fifo(&token_file);
    sidecar.signal(nix::sys::signal::Signal::SIGHUP);
    let line = eventually(DEADLINE, "the refused token file in the log", || async {
        sidecar
            .log()
            .lines()
            .find(|l| l.contains("cannot read the Consul token file"))
            .map(str::to_owned)
    })
    .await;
    assert!(
        line.contains(&format!(
            "{} is a FIFO (named pipe), not a regular file",
            token_file.display()
        )),
        "{line}"
    );
    let (code, _) = halo_testkit::http::get(admin, "/health/live")
        .await
        .expect("/health/live answers");
    assert_eq!(code, 200);

    let asked = Instant::now();
    sidecar.sigterm();
    let status = sidecar.wait_exit().await;
    let took = asked.elapsed();
    assert!(status.success(), "{status}");
    assert!(took < PROMPT_EXIT, "exited {took:?} after SIGTERM");
    assert!(plain.agent_service("web-1").await.unwrap().is_none(), "deregistered");
}

/// At start, a FIFO as either token file (or a Consul token file others can
/// read) is a config error naming the field and the file, at once: in
/// `check` and when running.
#[tokio::test]
async fn fifos_and_loose_token_files_are_refused_at_start_at_once() {
    let admin = admin_addr();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    make_fifo(&fifo);
    let loose = dir.path().join("loose");
    secret_file(&loose, "5b0e8a9c-1d2e-4f3a-9b4c-0000000000bb\n", 0o640);
    let config = |extra_consul: &str, extra_admin: &str| {
        format!(
            "[consul]\naddress = \"http://127.0.0.1:1\"\n{extra_consul}\n[service]\nname = \"web\"\nid = \"web-1\"\n\
             address = \"127.0.0.1\"\nport = 9000\n[admin]\nlisten = \"{admin}\"\n{extra_admin}\n"
        )
    };
    let path = dir.path().join("sidecar.toml");
    let not_regular = format!("{} is a FIFO (named pipe), not a regular file", fifo.display());
    for (text, want) in [
        (
            config("", &format!("token_file = \"{}\"", fifo.display())),
            format!("admin.token_file: {not_regular}"),
        ),
        (
            config(&format!("token_file = \"{}\"", fifo.display()), ""),
            format!("token_file: {not_regular}"),
        ),
        (
            config(&format!("token_file = \"{}\"", loose.display()), ""),
            "mode 640".to_owned(),
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        for subcommand in [Some("check"), None] {
            let mut cmd = sidecar_command();
            cmd.arg("--config").arg(&path).env_remove("CONSUL_HTTP_TOKEN_FILE");
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
