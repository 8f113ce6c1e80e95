//! Reloading an instance of a pair: what the election uses cannot change
//! under it, and what does not change must not be read as a change.

use std::net::SocketAddr;
use std::process::Command;

use halo_testkit::{eventually, ConsulAgent};

use crate::support::*;

/// One VIP with `max_connections` (a setting a reload can visibly change).
fn config(admin: SocketAddr, vip: SocketAddr, backend: SocketAddr, consul: &str, id: Option<&str>, max: u32) -> String {
    let mut c = one_vip(admin, vip, &[backend], &format!("max_connections = {max}\n"));
    c.push_str(&format!(
        "\n[consul]\naddress = \"{consul}\"\n\n[ha]\ncluster = \"reload\"\n"
    ));
    if let Some(id) = id {
        c.push_str(&format!("id = \"{id}\"\n"));
    }
    c
}

async fn wait_active(lb: &Lb) {
    eventually(DEADLINE, "the instance to be active", || async {
        (lb.status().await["ha"]["role"] == "active").then_some(())
    })
    .await;
}

/// Defect: a `[consul]` change at reload moved discovery to the new agent
/// and left the election on the old one, and "reload applied" was logged.
/// Now the reload is rejected, naming the field, and the running config
/// stays in force; a reload that changes something else still applies.
#[tokio::test]
async fn a_consul_address_change_at_reload_is_refused_naming_the_field() {
    let consul = ConsulAgent::start().await;
    let other = ConsulAgent::start().await;
    let backend = TestBackend::start("one", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let lb = Lb::start(
        &config(admin, vip, backend.addr, &consul.http_url(), Some("a"), 100),
        admin,
        &[],
    )
    .await;
    wait_active(&lb).await;

    lb.write_config(&config(admin, vip, backend.addr, &other.http_url(), Some("a"), 200));
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(DEADLINE, "the reload to be rejected", || async {
        lb.log().contains("reload rejected").then_some(())
    })
    .await;
    let log = lb.log();
    assert!(log.contains("consul.address"), "the field is named:\n{log}");
    assert!(!log.contains("reload applied"), "nothing applied:\n{log}");
    let status = lb.status().await;
    assert_eq!(
        status["vips"][0]["max_connections"], 100,
        "the running config stays: {status}"
    );

    // The same change without the address: applied.
    lb.write_config(&config(admin, vip, backend.addr, &consul.http_url(), Some("a"), 200));
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(DEADLINE, "the second reload to apply", || async {
        lb.log().contains("reload applied").then_some(())
    })
    .await;
    assert_eq!(lb.status().await["ha"]["role"], "active");
}

/// Defect: with the default `ha.id` (derived from the host name), a host
/// name change made every later reload fail with "[ha] changes need a
/// restart", silently stopping token rotation by SIGHUP. The process now
/// keeps the id it started with. halo-lb runs in a UTS namespace of its own
/// (`unshare --uts`) whose host name the test changes; needs root.
#[tokio::test]
async fn a_host_name_change_does_not_block_reloads_with_the_default_id() {
    if !halo_testkit::netns::required("ha_reload::a_host_name_change_does_not_block_reloads_with_the_default_id") {
        return;
    }
    let consul = ConsulAgent::start().await;
    let backend = TestBackend::start("one", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let mut cmd = Command::new("unshare");
    cmd.args(["--uts", "--"]).arg(env!("CARGO_BIN_EXE_halo-lb"));
    let lb = Lb::start_command(
        cmd,
        &config(admin, vip, backend.addr, &consul.http_url(), None, 100),
        admin,
        &[],
    )
    .await;
    wait_active(&lb).await;
    let id = lb.status().await["ha"]["id"].as_str().unwrap().to_owned();

    let renamed = Command::new("nsenter")
        .args(["--uts", "-t", &lb.pid().to_string(), "hostname", "halo-renamed-host"])
        .status()
        .expect("run nsenter hostname");
    assert!(renamed.success(), "rename the host in halo-lb's UTS namespace");

    lb.write_config(&config(admin, vip, backend.addr, &consul.http_url(), None, 200));
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(DEADLINE, "the reload to apply", || async {
        let log = lb.log();
        assert!(!log.contains("reload rejected"), "rejected:\n{log}");
        log.contains("reload applied").then_some(())
    })
    .await;
    let status = lb.status().await;
    assert_eq!(status["ha"]["id"], id.as_str(), "the id the process runs with is kept");
    assert_eq!(status["vips"][0]["max_connections"], 200, "{status}");
    assert_eq!(status["ha"]["role"], "active");
}
