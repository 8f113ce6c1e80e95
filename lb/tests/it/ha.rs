//! The active/standby pair against real Consul: election, failover on
//! kill -9, handover on SIGTERM, a cut-off active, Consul leader loss, and
//! write forwarding from the standby.
//!
//! # Layout
//! - `ha.rs`: a pair on one host ([`pair`]) and what the tests ask of its
//!   instances: roles, terms, no two actives.
//! - [`election`]: who is elected and what the standby does meanwhile:
//!   writes forwarded (with the pair's token), a restart, two processes
//!   with one id, no Consul at all.
//! - [`failover`]: kill -9 and SIGSTOP of the active, SIGTERM on either
//!   instance, and a UDP VIP through all of them.
//! - [`consul_loss`]: the active cut off from Consul, and the Consul leader
//!   lost.
//! - [`hosts`]: the pair on two network-namespace hosts with a floating VIP,
//!   and the helpers for halo-lb in such hosts that other tests use too.

mod consul_loss;
mod election;
mod failover;
mod hosts;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use halo_testkit::eventually;
use serde_json::Value;

use crate::support::*;
pub(crate) use hosts::{host_role, host_status, through_vip, HostLb};

/// The defaults the bounds are stated for.
const CHECK_TTL: Duration = Duration::from_secs(1);
const LOCK_DELAY: Duration = Duration::from_millis(200);

/// A config for one instance of the pair `cluster`, serving `vip` from
/// static `backends`, talking to Consul at `consul_url`.
fn ha_config(
    id: &str,
    cluster: &str,
    consul_url: &str,
    admin: SocketAddr,
    vip: SocketAddr,
    backends: &[SocketAddr],
) -> String {
    let mut config = one_vip(admin, vip, backends, "");
    config.push_str(&format!(
        "\n[consul]\naddress = \"{consul_url}\"\n\n[ha]\ncluster = \"{cluster}\"\nid = \"{id}\"\n"
    ));
    config
}

/// Starts an instance and waits until its admin API answers (it serves
/// nothing until elected).
async fn start(config: &str, admin: SocketAddr) -> Lb {
    Lb::start(config, admin, &[]).await
}

pub(crate) fn role(status: &Value) -> &str {
    status["ha"]["role"].as_str().unwrap_or("?")
}

async fn wait_role(lb: &Lb, want: &str) -> Value {
    eventually(DEADLINE, &format!("{} to be {want}", lb.admin), || async {
        let status = halo_testkit::http::get(lb.admin, "/status").await?;
        let status: Value = serde_json::from_str(&status.1).ok()?;
        (role(&status) == want).then_some(status)
    })
    .await
}

/// A pair on one host: the first instance elected before the second starts.
struct Pair {
    a: Lb,
    b: Lb,
    vip: SocketAddr,
    _backends: Vec<TestBackend>,
}

async fn pair(cluster: &str, url_a: &str, url_b: &str) -> Pair {
    let backends = vec![
        TestBackend::start("one", Behavior::GreetEcho).await,
        TestBackend::start("two", Behavior::GreetEcho).await,
    ];
    let backend_addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (admin_a, vip) = addrs();
    let admin_b = SocketAddr::from(([127, 0, 0, 1], port()));
    let a = start(&ha_config("a", cluster, url_a, admin_a, vip, &backend_addrs), admin_a).await;
    wait_role(&a, "active").await;
    let b = start(&ha_config("b", cluster, url_b, admin_b, vip, &backend_addrs), admin_b).await;
    wait_role(&b, "standby").await;
    Pair {
        a,
        b,
        vip,
        _backends: backends,
    }
}

/// One of an instance's terms as active: `[from, to)` in its own wall-clock
/// microseconds; a running term ends "now".
fn terms(status: &Value) -> Vec<(u64, u64, u64)> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    status["ha"]["terms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["epoch"].as_u64().unwrap(),
                t["from_unix_us"].as_u64().unwrap(),
                t["to_unix_us"].as_u64().unwrap_or(now),
            )
        })
        .collect()
}

/// Panics if any term of `a` overlaps any term of `b`.
fn assert_never_both_active(a: &Value, b: &Value) {
    for (ea, fa, ta) in terms(a) {
        for (eb, fb, tb) in terms(b) {
            assert!(
                ta <= fb || tb <= fa,
                "two actives at once: a's epoch {ea} [{fa}, {ta}) overlaps b's epoch {eb} [{fb}, {tb})"
            );
            assert_ne!(ea, eb, "two terms with the same epoch");
        }
    }
}
