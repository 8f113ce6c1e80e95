//! The admin API's write protection, through the real binary: the bearer
//! token (from the file, from `HALO_ADMIN_TOKEN_FILE`, re-read on SIGHUP),
//! loopback-only writes without one, and what stops a browser (a form POST
//! from another origin, a DNS-rebinding Host). The standby's forwarding
//! with the token is in `ha/election.rs`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use halo_testkit::eventually;
use halo_testkit::http::{admin_post, get, request_with_headers};
use halo_testkit::netns::{self, Topology};
use serde_json::Value;

use crate::support::*;

/// Writes `token` to `dir/name` with `mode`; its path.
pub fn token_file(dir: &Path, name: &str, token: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// `config` (one made by [`one_vip`] for `admin`) with `admin.token_file`.
pub fn with_token_file(config: &str, admin: SocketAddr, path: &Path) -> String {
    let listen = format!("listen = \"{admin}\"\n");
    assert!(config.contains(&listen), "{config}");
    config.replacen(&listen, &format!("{listen}token_file = \"{}\"\n", path.display()), 1)
}

/// `POST path` with `Authorization: Bearer <token>` and nothing else.
async fn post_with_token(admin: SocketAddr, path: &str, token: &str) -> (u16, String) {
    let bearer = format!("Bearer {token}");
    request_with_headers(admin, "POST", path, &[("Authorization", &bearer)])
        .await
        .expect("the admin API answers")
}

/// The `error` of a refusal, which must be a short JSON reason.
fn reason(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    let reason = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {body}"))
        .to_owned();
    assert!(!reason.is_empty() && reason.len() < 200, "{reason}");
    reason
}

async fn disabled_count(lb: &Lb) -> usize {
    let status = lb.status().await;
    status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "disabled")
        .count()
}

#[tokio::test]
async fn without_a_token_writes_need_loopback_and_the_custom_header_and_browsers_are_refused() {
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let b = TestBackend::start("b", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let lb = Lb::start(&one_vip(admin, vip, &[a.addr, b.addr], ""), admin, &[vip]).await;
    let disable = format!("/vips/web/backends/{}/disable", a.addr);
    let enable = format!("/vips/web/backends/{}/enable", a.addr);

    // A plain HTML form POST from another origin.
    let form = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Origin", "http://evil.example"),
    ];
    let (code, body) = request_with_headers(admin, "POST", &disable, &form).await.unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(reason(&body).contains("cross-origin"), "{body}");
    // The same without Origin (a no-referrer form, an old browser): still no
    // custom header.
    let (code, body) = request_with_headers(admin, "POST", &disable, &form[..1]).await.unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(reason(&body).contains("X-Halo-Request"), "{body}");
    // DNS rebinding: the attacker's name in Host, even with the header.
    let rebinding = [
        ("Host", format!("evil.example:{}", admin.port())),
        ("X-Halo-Request", "1".into()),
    ];
    let rebinding: Vec<(&str, &str)> = rebinding.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, body) = request_with_headers(admin, "POST", &disable, &rebinding).await.unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(reason(&body).contains("Host"), "{body}");
    assert_eq!(disabled_count(&lb).await, 0, "no refused write changed anything");
    let log = lb.log();
    let refused = log
        .lines()
        .find(|l| l.contains("admin write refused"))
        .expect("refusals are logged");
    assert!(refused.contains("client=127.0.0.1:"), "{refused}");

    // Loopback with the header: accepted, and logged with how.
    let (code, body) = admin_post(admin, &disable).await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(disabled_count(&lb).await, 1);
    let log = lb.log();
    let line = log
        .lines()
        .find(|l| l.contains("backend state set by operator"))
        .unwrap();
    assert!(
        line.contains("client=127.0.0.1:") && line.contains("auth=\"loopback\""),
        "{line}"
    );
    // Same-origin and `localhost` are fine.
    let same = [
        ("Host", format!("localhost:{}", admin.port())),
        ("Origin", format!("http://localhost:{}", admin.port())),
        ("X-Halo-Request", "1".into()),
    ];
    let same: Vec<(&str, &str)> = same.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, body) = request_with_headers(admin, "POST", &enable, &same).await.unwrap();
    assert_eq!(code, 200, "{body}");
    // Reads need nothing.
    assert_eq!(get(admin, "/status").await.unwrap().0, 200);
    assert_eq!(get(admin, "/health").await.unwrap().0, 200);
    assert_eq!(get(admin, "/metrics").await.unwrap().0, 200);
}

#[tokio::test]
async fn with_a_token_writes_need_it_and_sighup_reads_it_again() {
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let dir = tempfile::tempdir().unwrap();
    let path = token_file(dir.path(), "token", "first-token-0123456789", 0o600);
    let config = with_token_file(&one_vip(admin, vip, &[a.addr], ""), admin, &path);
    let lb = Lb::start(&config, admin, &[vip]).await;
    let disable = format!("/vips/web/backends/{}/disable", a.addr);
    let enable = format!("/vips/web/backends/{}/enable", a.addr);

    // Loopback and the custom header are not enough any more.
    let (code, body) = admin_post(admin, &disable).await.unwrap();
    assert_eq!(code, 401, "{body}");
    assert!(reason(&body).contains("bearer token"), "{body}");
    let (code, body) = post_with_token(admin, &disable, "first-token-012345678X").await;
    assert_eq!(code, 401, "{body}");
    assert_eq!(reason(&body), "wrong bearer token");
    assert_eq!(disabled_count(&lb).await, 0);
    // The right token is enough on its own (it makes the request non-simple).
    let (code, body) = post_with_token(admin, &disable, "first-token-0123456789").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(disabled_count(&lb).await, 1);
    let log = lb.log();
    let line = log
        .lines()
        .find(|l| l.contains("backend state set by operator"))
        .unwrap();
    assert!(line.contains("auth=\"token\""), "{line}");
    // ...but not from a rebinding page that somehow had it.
    let rebinding = [
        ("Host", "evil.example"),
        ("Authorization", "Bearer first-token-0123456789"),
    ];
    assert_eq!(
        request_with_headers(admin, "POST", &enable, &rebinding)
            .await
            .unwrap()
            .0,
        403
    );

    // A new token on SIGHUP; the old one stops working.
    token_file(dir.path(), "token", "second-token-9876543210", 0o600);
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(DEADLINE, "the reloaded token to be in force", || async {
        (post_with_token(admin, &enable, "second-token-9876543210").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(post_with_token(admin, &enable, "first-token-0123456789").await.0, 401);
    assert!(lb.log().contains("admin token changed"), "{}", lb.log());

    // A token file others can read rejects the reload; the running token stays.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(DEADLINE, "the reload to be rejected", || async {
        let log = lb.log();
        log.lines()
            .any(|l| l.contains("reload rejected") && l.contains("admin.token_file") && l.contains("mode 644"))
            .then_some(())
    })
    .await;
    assert_eq!(post_with_token(admin, &enable, "second-token-9876543210").await.0, 200);

    // The token is nowhere to be read.
    let (_, status) = get(admin, "/status").await.unwrap();
    let (_, metrics) = get(admin, "/metrics").await.unwrap();
    for text in [lb.log(), status, metrics] {
        assert!(
            !text.contains("first-token") && !text.contains("second-token"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn the_token_file_can_come_from_the_environment_and_bad_files_are_config_errors() {
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let dir = tempfile::tempdir().unwrap();
    let path = token_file(dir.path(), "env-token", "from-the-environment", 0o400);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_halo-lb"));
    cmd.env("HALO_ADMIN_TOKEN_FILE", &path);
    let lb = Lb::start_command(cmd, &one_vip(admin, vip, &[a.addr], ""), admin, &[vip]).await;
    let disable = format!("/vips/web/backends/{}/disable", a.addr);
    assert_eq!(admin_post(admin, &disable).await.unwrap().0, 401);
    assert_eq!(post_with_token(admin, &disable, "from-the-environment").await.0, 200);
    drop(lb);

    let config_path = dir.path().join("lb.toml");
    let check = |config: String, env: Option<&Path>| {
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_halo-lb"));
        cmd.arg("--config").arg(&config_path).arg("check");
        cmd.env_remove("HALO_ADMIN_TOKEN_FILE");
        if let Some(env) = env {
            cmd.env("HALO_ADMIN_TOKEN_FILE", env);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let base = one_vip(admin, vip, &[a.addr], "");
    let missing = dir.path().join("missing");
    let empty = token_file(dir.path(), "empty", "", 0o600);
    let open = token_file(dir.path(), "open", "readable-by-all", 0o644);
    let huge = dir.path().join("huge");
    std::fs::write(&huge, vec![b'x'; 1 << 20]).unwrap();
    std::fs::set_permissions(&huge, std::fs::Permissions::from_mode(0o600)).unwrap();
    for (file, why) in [
        (&missing, "cannot read"),
        (&empty, "is empty"),
        (&open, "mode 644"),
        (&huge, "larger than 4096 bytes"),
    ] {
        let err = check(with_token_file(&base, admin, file), None);
        assert!(err.contains("admin.token_file: ") && err.contains(why), "{why}: {err}");
        assert!(!err.contains("readable-by-all") && !err.contains("xxxx"), "{err}");
    }
    let err = check(base, Some(&missing));
    assert!(err.contains("HALO_ADMIN_TOKEN_FILE: cannot read"), "{err}");
}

/// Without a token, a peer that is not loopback is refused even with the
/// custom header; with one, it may write. The admin API listens on a
/// host's own non-loopback address in a network namespace, and both the
/// host itself (its eth0 address as the source) and another host ask.
#[tokio::test]
async fn non_loopback_peers_need_the_token() {
    if !netns::required("admin_auth::non_loopback_peers_need_the_token") {
        return;
    }
    let topology = Topology::start();
    let (client, lb1) = (topology.client(), topology.lb1());
    let dir = tempfile::tempdir().unwrap();
    let backend = SocketAddr::from(([127, 0, 0, 1], 9));
    let path = token_file(dir.path(), "token", "pair-token-abcdef", 0o600);

    let mut processes = Vec::new();
    let mut admins = Vec::new();
    for (n, token) in [(0u16, None), (1, Some(&path))] {
        let admin = SocketAddr::from((lb1.ip(), 9901 + n));
        let vip = SocketAddr::from(([127, 0, 0, 1], 8080 + n));
        let mut config = one_vip(admin, vip, &[backend], "");
        if let Some(token) = token {
            config = with_token_file(&config, admin, token);
        }
        let config_path = dir.path().join(format!("lb{n}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = lb1.command(env!("CARGO_BIN_EXE_halo-lb"));
        cmd.arg("--config").arg(&config_path).env("NO_COLOR", "1");
        processes.push(lb1.spawn_logged(cmd, &dir.path().join(format!("lb{n}.log"))));
        admins.push(admin);
    }
    for &admin in &admins {
        eventually(DEADLINE, &format!("the admin API on {admin}"), || async {
            let stream = client.connect(admin).await.ok()?;
            halo_testkit::http::request_over(stream, admin, "GET", "/status").await
        })
        .await;
    }
    let post = |host: &'static str, admin: SocketAddr, headers: Vec<(&'static str, String)>| {
        let host = if host == "client" { client } else { lb1 };
        async move {
            let stream = host.connect(admin).await.unwrap();
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            halo_testkit::http::request_with_headers_over(
                stream,
                admin,
                "POST",
                &format!("/vips/web/backends/{backend}/disable"),
                &headers,
            )
            .await
            .unwrap()
        }
    };
    let header = || vec![("X-Halo-Request", "1".to_owned())];
    let bearer = || vec![("Authorization", "Bearer pair-token-abcdef".to_owned())];

    // No token configured: neither another host nor the host's own
    // non-loopback address may write.
    for from in ["client", "lb1"] {
        let (code, body) = post(from, admins[0], header()).await;
        assert_eq!(code, 403, "from {from}: {body}");
        assert!(reason(&body).contains("only from loopback"), "{body}");
    }
    // A token configured: the right one is accepted from anywhere, none is 401.
    let (code, body) = post("client", admins[1], header()).await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = post("client", admins[1], bearer()).await;
    assert_eq!(code, 200, "{body}");
    let log = processes[1].log_tail(64 * 1024);
    let line = log
        .lines()
        .find(|l| l.contains("backend state set by operator"))
        .unwrap();
    assert!(line.contains(&format!("client={}:", client.ip())), "{line}");
    let start_log = processes[0].log_tail(64 * 1024);
    assert!(
        start_log.contains("writes (disable/enable) are accepted only from loopback peers"),
        "the start-up log states the rule: {start_log}"
    );
}

/// Issue 17, through the binary: an absolute-form target naming another
/// host, two `Authorization` headers, and an `X-Halo-Forwarded-By` sent by
/// a client rather than a standby with the token.
#[tokio::test]
async fn absolute_targets_two_credentials_and_a_spoofed_forwarder_are_not_believed() {
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let lb = Lb::start(&one_vip(admin, vip, &[a.addr], ""), admin, &[vip]).await;
    let disable = format!("/vips/web/backends/{}/disable", a.addr);
    let enable = format!("/vips/web/backends/{}/enable", a.addr);

    let absolute = format!("http://evil.example:{}{disable}", admin.port());
    let (code, body) = request_with_headers(admin, "POST", &absolute, &[("X-Halo-Request", "1")])
        .await
        .unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(reason(&body).contains("Host"), "{body}");
    let two = [
        ("X-Halo-Request", "1"),
        ("Authorization", "Bearer one"),
        ("Authorization", "Bearer two"),
    ];
    let (code, body) = request_with_headers(admin, "POST", &disable, &two).await.unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(reason(&body).contains("more than one Authorization"), "{body}");
    assert_eq!(disabled_count(&lb).await, 0);

    // A loopback write may proceed, but its forwarder claim is not logged.
    let spoofed = [("X-Halo-Request", "1"), ("X-Halo-Forwarded-By", "spoofed-standby")];
    let (code, body) = request_with_headers(admin, "POST", &disable, &spoofed).await.unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, _) = admin_post(admin, &enable).await.unwrap();
    assert_eq!(code, 200);
    let log = lb.log();
    let line = log
        .lines()
        .find(|l| l.contains("backend state set by operator"))
        .unwrap();
    assert!(!log.contains("spoofed-standby"), "{line}");
}
