//! halo-lb against a production-shaped agent: Consul discovery and an
//! elected pair over HTTPS (client certificate required or not,
//! certificates from `consul tls`), and with ACLs on, `default_policy =
//! "deny"` and exactly the shipped policy (`packaging/consul/halo-lb.hcl`):
//! no token or a weak one is refused with Consul's reason in `/status` and
//! the log, and a good one arriving by token file + SIGHUP recovers both
//! discovery and the election.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use halo_consul::{Client, Config};
use halo_testkit::tls::Certs;
use halo_testkit::{eventually, AgentOptions, ConsulAgent};
use serde_json::Value;

use crate::discovery::register;
use crate::support::*;

const MASTER: &str = "3c9d0f6e-2a4b-4c8d-8e1f-00000000b013";

/// One instance: `[consul]` is `consul_section`; a VIP fed by Consul
/// service "web"; `[ha]` when `ha_id` is set.
fn lb_config(admin: SocketAddr, vip: SocketAddr, consul_section: &str, ha_id: Option<&str>) -> String {
    let mut c = format!(
        "[admin]\nlisten = \"{admin}\"\n[consul]\n{consul_section}\nwait = \"30s\"\n\
         [[vip]]\nname = \"web\"\nlisten = \"{vip}\"\nservice = \"web\"\n"
    );
    if let Some(id) = ha_id {
        c.push_str(&format!("[ha]\ncluster = \"prod\"\nid = \"{id}\"\n"));
    }
    c
}

async fn status_of(admin: SocketAddr) -> Option<Value> {
    let (code, body) = halo_testkit::http::get(admin, "/status").await?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

async fn wait_role(lb: &Lb, want: &str) -> Value {
    eventually(DEADLINE, &format!("{} to be {want}", lb.admin), || async {
        let s = status_of(lb.admin).await?;
        (s["ha"]["role"] == want).then_some(s)
    })
    .await
}

async fn wait_table(lb: &Lb, want: &[String]) {
    eventually(DEADLINE, &format!("{}'s table to be {want:?}", lb.admin), || async {
        (table_addrs(lb).await == want).then_some(())
    })
    .await;
}

#[tokio::test]
async fn discovery_and_the_pair_work_over_https() {
    let certs = Certs::create();
    let backend = TestBackend::start("one", Behavior::GreetEcho).await;
    let want = vec![backend.addr.to_string()];

    // verify_incoming_https: a pair, one instance configured in its file,
    // the other by Consul's variables, both showing the client certificate.
    let (consul, https) = ConsulAgent::start_with_tls(&certs, true, AgentOptions::default()).await;
    register(
        &Client::from_address(consul.http_url()).unwrap(),
        "web-1",
        &backend,
        "a",
    )
    .await;
    let (admin_a, vip) = addrs();
    let section_a = format!(
        "address = \"https://{https}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        certs.ca_file().display(),
        certs.client_cert().display(),
        certs.client_key().display()
    );
    let a = Lb::start(&lb_config(admin_a, vip, &section_a, Some("a")), admin_a, &[]).await;
    wait_role(&a, "active").await;
    wait_table(&a, &want).await;
    let admin_b = SocketAddr::from(([127, 0, 0, 1], port()));
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_halo-lb"));
    cmd.env("CONSUL_HTTP_SSL", "true")
        .env("CONSUL_CACERT", certs.ca_file())
        .env("CONSUL_CLIENT_CERT", certs.client_cert())
        .env("CONSUL_CLIENT_KEY", certs.client_key());
    let b = Lb::start_command(
        cmd,
        &lb_config(admin_b, vip, &format!("address = \"{https}\""), Some("b")),
        admin_b,
        &[],
    )
    .await;
    let sb = wait_role(&b, "standby").await;
    assert_eq!(sb["ha"]["leader"]["id"], "a", "{sb}");
    wait_table(&b, &want).await;
    assert_eq!(greeting(vip).await.unwrap().0, "one");
    drop((a, b));

    // No client certificate required: a lone balancer with the CA only.
    let (consul, https) = ConsulAgent::start_with_tls(&certs, false, AgentOptions::default()).await;
    register(
        &Client::from_address(consul.http_url()).unwrap(),
        "web-1",
        &backend,
        "a",
    )
    .await;
    let (admin, vip) = addrs();
    let section = format!(
        "address = \"https://{https}\"\nca_file = \"{}\"",
        certs.ca_file().display()
    );
    let lone = Lb::start(&lb_config(admin, vip, &section, None), admin, &[vip]).await;
    wait_table(&lone, &want).await;

    // Another CA: discovery says what TLS refused, in /status.
    let other = Certs::create();
    let (admin, vip) = addrs();
    let section = format!(
        "address = \"https://{https}\"\nca_file = \"{}\"",
        other.ca_file().display()
    );
    let wrong = Lb::start(&lb_config(admin, vip, &section, None), admin, &[vip]).await;
    let error = eventually(DEADLINE, "the TLS failure in /status", || async {
        let s = wrong.status().await;
        attempt_error(&s)
    })
    .await;
    assert!(error.contains("certificate verify failed: UnknownIssuer"), "{error}");

    // Verification off: the wrong CA no longer matters, and the log says so
    // loudly.
    let (admin, vip) = addrs();
    let section = format!(
        "address = \"https://{https}\"\nca_file = \"{}\"\ntls_skip_verify = true",
        other.ca_file().display()
    );
    let unverified = Lb::start(&lb_config(admin, vip, &section, None), admin, &[vip]).await;
    wait_table(&unverified, &want).await;
    let log = unverified.log();
    assert!(
        log.contains("WARN") && log.contains("TLS certificate verification of the Consul agent is OFF"),
        "{log}"
    );
}

#[tokio::test]
async fn the_shipped_policy_is_enough_and_a_good_token_file_plus_sighup_recovers() {
    let consul = ConsulAgent::start_with_acl(MASTER).await;
    let master = Client::with_env(
        Config {
            address: Some(consul.http_url()),
            token: Some(MASTER.to_owned()),
            ..Config::default()
        },
        |_| None,
    )
    .unwrap();
    let backend = TestBackend::start("one", Behavior::GreetEcho).await;
    register(&master, "web-1", &backend, "a").await;
    let want = vec![backend.addr.to_string()];
    let rules = std::fs::read_to_string(halo_testkit::workspace_root().join("packaging/consul/halo-lb.hcl")).unwrap();
    let good = consul.create_token(MASTER, "halo-lb", &rules).await;
    // Discovery's rules only: no registration, lock or session.
    let weak = consul
        .create_token(
            MASTER,
            "discovery-only",
            "service_prefix \"\" { policy = \"read\" }\nnode_prefix \"\" { policy = \"read\" }",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let (file_a, file_b) = (dir.path().join("token-a"), dir.path().join("token-b"));
    // Token files are secrets: owner-only, or refused (writes keep the mode).
    for file in [&file_a, &file_b] {
        std::fs::write(file, "").unwrap();
        std::fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    std::fs::write(&file_b, format!("{weak}\n")).unwrap();

    // a: no token at all; b: the weak one, from its token file.
    let (admin_a, vip) = addrs();
    let admin_b = SocketAddr::from(([127, 0, 0, 1], port()));
    let plain = format!("address = \"{}\"", consul.http_url());
    let config_a = lb_config(admin_a, vip, &plain, Some("a"));
    let with_file = |file: &std::path::Path| format!("{plain}\ntoken_file = \"{}\"", file.display());
    let config_b = lb_config(admin_b, vip, &with_file(&file_b), Some("b"));
    let a = Lb::start(&config_a, admin_a, &[]).await;
    let b = Lb::start(&config_b, admin_b, &[]).await;

    for lb in [&a, &b] {
        let s = eventually(DEADLINE, "the election's refusal in /status", || async {
            let s = lb.status().await;
            s["ha"]["consul_error"].as_str().is_some().then_some(s)
        })
        .await;
        let e = s["ha"]["consul_error"].as_str().unwrap();
        assert!(e.contains("403") && e.contains("Permission denied"), "{e}");
        assert_ne!(s["ha"]["role"], "active", "{s}");
        eprintln!("{}: ha.consul_error = {e}", lb.admin);
    }
    // Without a token discovery sees nothing, and says it may be the ACLs.
    let s = eventually(DEADLINE, "a's discovery to suspect an ACL filter", || async {
        let s = a.status().await;
        (s["vips"][0]["discovery"]["acl_filter_suspected"] == true).then_some(s)
    })
    .await;
    let e = s["vips"][0]["discovery"]["last_error"].as_str().unwrap_or_default();
    assert!(e.contains("service:read"), "{s}");
    eprintln!("a: discovery.last_error = {e}");
    // The weak token reads services: b's table is whole.
    wait_table(&b, &want).await;
    // Still refused a while later: retried, never elected.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for lb in [&a, &b] {
        let s = lb.status().await;
        assert_ne!(s["ha"]["role"], "active", "{s}");
        assert!(lb.log().contains("Permission denied"), "{}", lb.log());
    }

    // The good token: a gets a token_file in its config, b's file changes.
    std::fs::write(&file_a, &good).unwrap();
    std::fs::write(&file_b, &good).unwrap();
    a.write_config(&lb_config(admin_a, vip, &with_file(&file_a), Some("a")));
    let sighup_at = Instant::now();
    a.signal(nix::sys::signal::Signal::SIGHUP);
    b.signal(nix::sys::signal::Signal::SIGHUP);
    let (first, second) = eventually(DEADLINE, "one active and one standby", || async {
        let (sa, sb) = (status_of(admin_a).await?, status_of(admin_b).await?);
        match (sa["ha"]["role"].as_str()?, sb["ha"]["role"].as_str()?) {
            ("active", "standby") => Some((&a, &b)),
            ("standby", "active") => Some((&b, &a)),
            _ => None,
        }
    })
    .await;
    let elected_in = sighup_at.elapsed();
    wait_table(first, &want).await;
    wait_table(second, &want).await;
    assert_eq!(greeting(vip).await.unwrap().0, "one");
    for lb in [&a, &b] {
        let s = lb.status().await;
        assert!(s["ha"]["consul_error"].is_null(), "{s}");
        let text = s.to_string();
        let log = lb.log();
        for secret in [&good, &weak] {
            assert!(
                !text.contains(secret.as_str()) && !log.contains(secret.as_str()),
                "a token leaked"
            );
        }
    }
    eprintln!("pair elected {elected_in:?} after SIGHUP");

    // An empty token file at SIGHUP: the reload is rejected, naming the
    // file, and the token in use stays (the pair carries on).
    std::fs::write(&file_b, "\n").unwrap();
    b.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(DEADLINE, "the rejected reload in the log", || async {
        let log = b.log();
        (log.contains("reload rejected") && log.contains("empty, no ACL token")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for lb in [&a, &b] {
        let s = lb.status().await;
        assert!(s["ha"]["consul_error"].is_null(), "{s}");
    }

    // kill -9 of the active: the standby destroys the dead active's session
    // (session write on the active's node, which session_prefix grants) and
    // takes over, with the same token.
    let (mut first, second) = if std::ptr::eq(first, &a) { (a, b) } else { (b, a) };
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first.wait_exit().await;
    let s = wait_role(&second, "active").await;
    assert!(s["ha"]["detector"]["forced_takeovers"].as_u64() >= Some(1), "{s}");
    assert!(s["ha"]["consul_error"].is_null(), "{s}");
    assert_eq!(greeting(vip).await.unwrap().0, "one");
}

/// Issue 17: `user:pw@` in the Consul address was echoed in `/status`
/// (discovery's last error) and the log. It is never sent, so never shown.
#[tokio::test]
async fn userinfo_in_the_consul_address_is_never_shown() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = closed.local_addr().unwrap();
    drop(closed);
    let (admin, vip) = addrs();
    let section = format!("address = \"http://halo-user:hunter2@{agent}\"");
    let lb = Lb::start(&lb_config(admin, vip, &section, None), admin, &[vip]).await;
    let error = eventually(DEADLINE, "discovery's failure in /status", || async {
        let s = lb.status().await;
        attempt_error(&s)
    })
    .await;
    assert!(error.contains(&agent.to_string()), "{error}");
    let status = lb.status().await.to_string();
    for text in [status, lb.log()] {
        assert!(!text.contains("hunter2") && !text.contains("halo-user"), "{text}");
    }
}

/// Discovery's error from a `/status` once it has tried: `None` before the
/// first answer, whose placeholder ("no answer from Consul yet") is not the
/// failure these tests wait for.
fn attempt_error(status: &Value) -> Option<String> {
    let error = status["vips"][0]["discovery"]["last_error"].as_str()?;
    (!error.ends_with(" yet")).then(|| error.to_owned())
}
