//! halo-sidecar against a production-shaped agent: HTTPS (with and without a
//! required client certificate, certificates from `consul tls`), and ACLs
//! with `default_policy = "deny"` and exactly the shipped policy
//! (`packaging/consul/halo-sidecar.hcl`), the token from a file that SIGHUP
//! reads again.

use std::ffi::OsStr;
use std::time::Duration;

use halo_consul::{Client, Config};
use halo_testkit::tls::Certs;
use halo_testkit::{eventually, AgentOptions, ConsulAgent};
use serde_json::Value;

use crate::*;

const MASTER: &str = "5b0e8a9c-1d2e-4f3a-9b4c-00000000a013";

/// The sidecar's config with `[consul]` replaced by `consul_section`.
fn config_with_consul(consul: &ConsulAgent, app: &App, admin: std::net::SocketAddr, consul_section: &str) -> String {
    let base = config(consul, app, admin, "200ms", "1s");
    base.replace(
        &format!("[consul]\naddress = \"{}\"\n", consul.http_url()),
        &format!("[consul]\n{consul_section}\n"),
    )
}

async fn status(admin: std::net::SocketAddr) -> Option<Value> {
    let (code, body) = halo_testkit::http::get(admin, "/status").await?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

fn master_client(consul: &ConsulAgent) -> Client {
    Client::with_env(
        Config {
            address: Some(consul.http_url()),
            token: Some(MASTER.to_owned()),
            ..Config::default()
        },
        |_| None,
    )
    .unwrap()
}

#[tokio::test]
async fn registers_and_pushes_over_https_with_and_without_a_client_certificate() {
    let certs = Certs::create();
    let app = App::start().await;

    // verify_incoming_https: the sidecar shows the client certificate.
    let (consul, https) = ConsulAgent::start_with_tls(&certs, true, AgentOptions::default()).await;
    let admin = admin_addr();
    let section = format!(
        "address = \"https://{https}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        certs.ca_file().display(),
        certs.client_cert().display(),
        certs.client_key().display()
    );
    let sidecar = Sidecar::start(&config_with_consul(&consul, &app, admin, &section), admin).await;
    let plain = Client::from_address(consul.http_url()).unwrap();
    wait_passing(&plain, &["web-1"], DEADLINE).await;
    drop(sidecar);

    // No client certificate required; TLS chosen by CONSUL_HTTP_SSL and the
    // CA from CONSUL_CACERT, as Consul's own tools take them.
    let (consul, https) = ConsulAgent::start_with_tls(&certs, false, AgentOptions::default()).await;
    let admin = admin_addr();
    let section = format!("address = \"{https}\"");
    let ca = certs.ca_file();
    let sidecar = Sidecar::start_with_env(
        &config_with_consul(&consul, &app, admin, &section),
        admin,
        &[
            ("CONSUL_HTTP_SSL", OsStr::new("true")),
            ("CONSUL_CACERT", ca.as_os_str()),
        ],
    )
    .await;
    let plain = Client::from_address(consul.http_url()).unwrap();
    wait_passing(&plain, &["web-1"], DEADLINE).await;
    drop(sidecar);

    // The agent's CA unknown to the sidecar: it says so and keeps retrying.
    let other = Certs::create();
    let admin = admin_addr();
    let section = format!(
        "address = \"https://{https}\"\nca_file = \"{}\"",
        other.ca_file().display()
    );
    let _sidecar = Sidecar::start(&config_with_consul(&consul, &app, admin, &section), admin).await;
    let s = eventually(DEADLINE, "the TLS failure in /status", || async {
        let s = status(admin).await?;
        let e = s["consul"]["last_error"].as_str()?.to_owned();
        (s["consul"]["attempts"].as_u64()? >= 2).then_some(e)
    })
    .await;
    assert!(s.contains("certificate verify failed: UnknownIssuer"), "{s}");
}

#[tokio::test]
async fn the_shipped_policy_is_enough_and_a_weak_token_recovers_by_token_file_and_sighup() {
    let consul = ConsulAgent::start_with_acl(MASTER).await;
    let rules = std::fs::read_to_string(halo_testkit::workspace_root().join("packaging/consul/halo-sidecar.hcl"))
        .unwrap()
        .replace("WEB", "web");
    let good = consul.create_token(MASTER, "halo-sidecar-web", &rules).await;
    // Write on another service only: too weak for "web".
    let weak = consul
        .create_token(
            MASTER,
            "halo-sidecar-other",
            "service \"other\" { policy = \"write\" }\nnode_prefix \"\" { policy = \"read\" }",
        )
        .await;
    let master = master_client(&consul);
    let app = App::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("consul-token");

    // No token at all: refused, said so, retried.
    let admin = admin_addr();
    let mut anonymous = Sidecar::start(&config(&consul, &app, admin, "200ms", "1s"), admin).await;
    let e = eventually(DEADLINE, "the anonymous refusal in /status", || async {
        let s = status(admin).await?;
        (s["consul"]["refusals"].as_u64()? >= 1).then(|| s["consul"]["last_error"].as_str().map(str::to_owned))?
    })
    .await;
    assert!(e.contains("403") && e.contains("Permission denied"), "{e}");
    assert!(
        anonymous.log().contains("Consul refused the request"),
        "{}",
        anonymous.log()
    );
    anonymous.kill();

    // A token too weak: the same, then the good one by file + SIGHUP.
    std::fs::write(&token_file, format!("{weak}\n")).unwrap();
    // A secret: owner-only, or refused (later writes keep the mode).
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let admin = admin_addr();
    let section = format!(
        "address = \"{}\"\ntoken_file = \"{}\"",
        consul.http_url(),
        token_file.display()
    );
    let mut sidecar = Sidecar::start(&config_with_consul(&consul, &app, admin, &section), admin).await;
    let e = eventually(DEADLINE, "the weak token's refusal in /status", || async {
        let s = status(admin).await?;
        (s["consul"]["refusals"].as_u64()? >= 1).then(|| s["consul"]["last_error"].as_str().map(str::to_owned))?
    })
    .await;
    assert!(
        e.contains("Permission denied") && e.contains("agent/service/register"),
        "{e}"
    );

    std::fs::write(&token_file, &good).unwrap();
    let sighup_at = std::time::Instant::now();
    signal(&sidecar, nix::sys::signal::Signal::SIGHUP);
    // Well before the 60 s refusal back-off: SIGHUP retries at once.
    wait_passing(&master, &["web-1"], Duration::from_secs(15)).await;
    let recovered_in = sighup_at.elapsed();
    assert!(recovered_in < Duration::from_secs(15), "{recovered_in:?}");
    // Consul lists the instance as soon as the registration call returns;
    // the sidecar's /status follows when the whole pass (registration and
    // check pushes) has finished.
    eventually(DEADLINE, "/status to drop the refusal", || async {
        status(admin).await?["consul"]["last_error"].is_null().then_some(())
    })
    .await;

    // A bad file on SIGHUP: logged, the good token stays in use.
    std::fs::write(&token_file, "  \n").unwrap();
    signal(&sidecar, nix::sys::signal::Signal::SIGHUP);
    eventually(DEADLINE, "the bad token file in the log", || async {
        sidecar
            .log()
            .contains("cannot read the Consul token file; keeping the token in use")
            .then_some(())
    })
    .await;
    // Pushes go on with the good token: flip the app and see it in Consul.
    app.set_healthy(false);
    wait_passing(&master, &[], DEADLINE).await;
    app.set_healthy(true);
    wait_passing(&master, &["web-1"], DEADLINE).await;

    // Drain (maintenance, then deregistration) works with the policy too.
    let (code, body) = halo_testkit::http::admin_post(admin, "/drain").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(sidecar.wait_exit().await.success(), "{}", sidecar.log());
    assert!(master.agent_service("web-1").await.unwrap().is_none(), "deregistered");

    let log = sidecar.log();
    for secret in [&good, &weak] {
        assert!(!log.contains(secret.as_str()), "a token in the log:\n{log}");
    }
    eprintln!("sidecar recovered {recovered_in:?} after SIGHUP");
}

/// Issue 17: with the sidecar's token revoked, Consul refuses the
/// maintenance and the deregistration (403), and the instance stays
/// registered. `drain --wait` used to take the sidecar's exit (connection
/// refused on /status) for success, print "drained" and exit 0; it must fail,
/// saying what Consul answered.
#[tokio::test]
async fn drain_wait_fails_with_consuls_reason_when_the_token_is_revoked() {
    let consul = ConsulAgent::start_with_acl(MASTER).await;
    let rules = std::fs::read_to_string(halo_testkit::workspace_root().join("packaging/consul/halo-sidecar.hcl"))
        .unwrap()
        .replace("WEB", "web");
    let good = consul.create_token(MASTER, "halo-sidecar-web", &rules).await;
    let master = master_client(&consul);
    let app = App::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("consul-token");
    std::fs::write(&token_file, format!("{good}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let admin = admin_addr();
    let section = format!(
        "address = \"{}\"\ntoken_file = \"{}\"",
        consul.http_url(),
        token_file.display()
    );
    // grace 1s: the sidecar gives up and exits within about 4 s.
    let mut sidecar = Sidecar::start(&config_with_consul(&consul, &app, admin, &section), admin).await;
    wait_passing(&master, &["web-1"], DEADLINE).await;

    consul.revoke_token(MASTER, &good).await;
    let mut cmd = crate::sidecar_command();
    cmd.arg("--config")
        .arg(&sidecar.config_path)
        .args(["drain", "--wait", "--timeout", "20s"])
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("CONSUL_HTTP_ADDR");
    let out = tokio::task::spawn_blocking(move || halo_testkit::output_within(cmd, Duration::from_secs(30)))
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stdout.contains("drained"), "{stdout}");
    assert!(
        stderr.contains("drain failed") && stderr.contains("403") && stderr.contains("ACL not found"),
        "{stderr}"
    );
    assert!(!stderr.contains(good.as_str()), "the token leaked: {stderr}");
    // And it was right: Consul still has the instance, not in maintenance.
    assert!(sidecar.wait_exit().await.success());
    assert!(
        master.agent_service("web-1").await.unwrap().is_some(),
        "still registered"
    );
    let checks = master.agent_checks().await.unwrap();
    assert!(!checks.contains_key("_service_maintenance:web-1"), "{checks:?}");
    eprintln!("drain --wait said: {stderr}");
}

fn signal(sidecar: &Sidecar, signal: nix::sys::signal::Signal) {
    sidecar.signal(signal);
}
