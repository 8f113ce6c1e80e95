//! `POST /drain` and `POST /undrain` are protected: the bearer token of
//! `admin.token_file` (or `HALO_ADMIN_TOKEN_FILE`), or without one a
//! loopback peer with `X-Halo-Request`; browsers (a cross-origin form, a
//! DNS-rebinding Host) are refused. Through the real binary.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use halo_testkit::http::{admin_post, get, request_with_headers};
use halo_testkit::netns::{self, Topology};
use halo_testkit::{eventually, ConsulAgent};
use serde_json::Value;

use super::*;

fn token_file(dir: &Path, name: &str, token: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// `config` with `admin.token_file`.
fn with_token_file(config: &str, admin: SocketAddr, path: &Path) -> String {
    let listen = format!("listen = \"{admin}\"\n");
    assert!(config.contains(&listen), "{config}");
    config.replacen(&listen, &format!("{listen}token_file = \"{}\"\n", path.display()), 1)
}

fn reason(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {body}"))
        .to_owned()
}

async fn draining(admin: SocketAddr) -> bool {
    let (code, body) = get(admin, "/status").await.unwrap();
    assert_eq!(code, 200);
    serde_json::from_str::<Value>(&body).unwrap()["draining"] == true
}

#[tokio::test]
async fn without_a_token_drain_needs_loopback_and_the_header_and_browsers_are_refused() {
    let consul = ConsulAgent::start().await;
    let app = App::start().await;
    let admin = admin_addr();
    let sidecar = Sidecar::start(&config(&consul, &app, admin, "500ms", "30s"), admin).await;

    let form = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Origin", "http://evil.example"),
    ];
    let (code, body) = request_with_headers(admin, "POST", "/drain", &form).await.unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(reason(&body).contains("cross-origin"), "{body}");
    let (code, body) = request_with_headers(admin, "POST", "/drain", &form[..1]).await.unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(reason(&body).contains("X-Halo-Request"), "{body}");
    let rebinding = format!("evil.example:{}", admin.port());
    let (code, body) = request_with_headers(
        admin,
        "POST",
        "/drain",
        &[("Host", &rebinding), ("X-Halo-Request", "1")],
    )
    .await
    .unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(reason(&body).contains("Host"), "{body}");
    assert!(!draining(admin).await, "no refused write drained it");
    let log = sidecar.log();
    let refused = log
        .lines()
        .find(|l| l.contains("admin write refused"))
        .expect("refusals are logged");
    assert!(refused.contains("client=127.0.0.1:"), "{refused}");

    let (code, body) = admin_post(admin, "/drain").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(draining(admin).await);
    let log = sidecar.log();
    let line = log
        .lines()
        .find(|l| l.contains("drain requested through the admin API"))
        .unwrap();
    assert!(
        line.contains("client=127.0.0.1:") && line.contains("auth=\"loopback\""),
        "{line}"
    );
    let (code, body) = admin_post(admin, "/undrain").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(!draining(admin).await);
}

#[tokio::test]
async fn with_a_token_drain_needs_it_and_the_drain_subcommand_sends_it() {
    let consul = ConsulAgent::start().await;
    let app = App::start().await;
    let admin = admin_addr();
    let dir = tempfile::tempdir().unwrap();
    let path = token_file(dir.path(), "token", "sidecar-token-42", 0o600);
    let config = with_token_file(&config(&consul, &app, admin, "500ms", "30s"), admin, &path);
    let mut sidecar = Sidecar::start(&config, admin).await;

    let (code, body) = admin_post(admin, "/drain").await.unwrap();
    assert_eq!(code, 401, "{body}");
    let (code, body) = request_with_headers(admin, "POST", "/drain", &[("Authorization", "Bearer sidecar-token-4")])
        .await
        .unwrap();
    assert_eq!(code, 401, "{body}");
    assert_eq!(reason(&body), "wrong bearer token");
    assert!(!draining(admin).await);

    // The subcommand reads the same config, so it has the token.
    let out = tokio::task::spawn_blocking({
        let path = sidecar.config_path.clone();
        move || {
            sidecar_command()
                .arg("--config")
                .arg(path)
                .arg("drain")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(draining(admin).await);
    let (code, body) = request_with_headers(
        admin,
        "POST",
        "/undrain",
        &[("Authorization", "Bearer sidecar-token-42")],
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(!draining(admin).await);
    let log = sidecar.log();
    assert!(log.contains("auth=\"token\""), "{log}");
    assert!(!log.contains("sidecar-token"), "the token is never logged: {log}");
    sidecar.kill();
}

#[tokio::test]
async fn the_token_file_can_come_from_halo_admin_token_file_and_bad_files_are_refused() {
    let consul = ConsulAgent::start().await;
    let app = App::start().await;
    let admin = admin_addr();
    let dir = tempfile::tempdir().unwrap();
    let good = token_file(dir.path(), "good", "from-env-token", 0o400);
    let sidecar = Sidecar::start_with_env(
        &config(&consul, &app, admin, "500ms", "30s"),
        admin,
        &[("HALO_ADMIN_TOKEN_FILE", good.as_os_str())],
    )
    .await;
    assert_eq!(admin_post(admin, "/drain").await.unwrap().0, 401);
    let (code, body) = request_with_headers(admin, "POST", "/drain", &[("Authorization", "Bearer from-env-token")])
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    drop(sidecar);

    let open = token_file(dir.path(), "open", "readable-by-all", 0o644);
    let empty = token_file(dir.path(), "empty", "", 0o600);
    let missing = dir.path().join("missing");
    for (file, why) in [(&open, "mode 644"), (&empty, "is empty"), (&missing, "cannot read")] {
        let out = sidecar_command()
            .arg("check")
            .env("HALO_SERVICE_NAME", "web")
            .env("HALO_SERVICE_PORT", "80")
            .env("HALO_ADMIN_TOKEN_FILE", file)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("admin.token_file: ") && err.contains(why), "{why}: {err}");
        assert!(!err.contains("readable-by-all"), "{err}");
    }
}

/// A minimal config whose Consul agent is never reached (the admin API
/// serves regardless).
fn offline_config(admin: SocketAddr, token: Option<&Path>) -> String {
    let mut config = format!(
        "[consul]\naddress = \"http://127.0.0.1:1\"\n[service]\nname = \"web\"\nid = \"web-1\"\naddress = \"127.0.0.1\"\nport = 9000\n[admin]\nlisten = \"{admin}\"\n"
    );
    if let Some(token) = token {
        config = with_token_file(&config, admin, token);
    }
    config
}

/// Without a token a peer that is not loopback may not drain, even with the
/// header; with one it may. The admin API listens on a host's non-loopback
/// address in a network namespace; another host asks.
#[tokio::test]
async fn non_loopback_peers_need_the_token() {
    if !netns::required("admin_auth::non_loopback_peers_need_the_token (sidecar)") {
        return;
    }
    let topology = Topology::start();
    let (client, host) = (topology.client(), topology.lb1());
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), "token", "netns-token-1", 0o600);
    let mut processes = Vec::new();
    let admins = [SocketAddr::from((host.ip(), 9902)), SocketAddr::from((host.ip(), 9903))];
    for (n, (admin, token)) in admins.iter().zip([None, Some(token.as_path())]).enumerate() {
        let path = dir.path().join(format!("sidecar{n}.toml"));
        std::fs::write(&path, offline_config(*admin, token)).unwrap();
        let mut cmd = host.command(env!("CARGO_BIN_EXE_halo-sidecar"));
        cmd.arg("--config").arg(&path).env("NO_COLOR", "1");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HALO_") {
                cmd.env_remove(key);
            }
        }
        processes.push(host.spawn_logged(cmd, &dir.path().join(format!("sidecar{n}.log"))));
    }
    let post = |admin: SocketAddr, headers: Vec<(&'static str, &'static str)>| async move {
        let stream = client.connect(admin).await.unwrap();
        halo_testkit::http::request_with_headers_over(stream, admin, "POST", "/drain", &headers)
            .await
            .unwrap()
    };
    for admin in admins {
        eventually(DEADLINE, &format!("the admin API on {admin}"), || async {
            let stream = client.connect(admin).await.ok()?;
            halo_testkit::http::request_over(stream, admin, "GET", "/health/live").await
        })
        .await;
    }
    let (code, body) = post(admins[0], vec![("X-Halo-Request", "1")]).await;
    assert_eq!(code, 403, "{body}");
    assert!(reason(&body).contains("only from loopback"), "{body}");
    let (code, body) = post(admins[1], vec![("X-Halo-Request", "1")]).await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = post(admins[1], vec![("Authorization", "Bearer netns-token-1")]).await;
    assert_eq!(code, 200, "{body}");
    let log = processes[1].log_tail(64 * 1024);
    let line = log
        .lines()
        .find(|l| l.contains("drain requested through the admin API"))
        .unwrap();
    assert!(line.contains(&format!("client={}:", client.ip())), "{line}");
    let start_log = processes[0].log_tail(64 * 1024);
    assert!(
        start_log.contains("POST /drain and /undrain are accepted only from loopback peers"),
        "the start-up log states the rule: {start_log}"
    );
}
