//! The pair on two network-namespace hosts, with a floating VIP that follows
//! the active between them; and halo-lb in such a host ([`HostLb`], asked
//! from inside its namespace), which the other namespace tests use too.

use std::net::SocketAddr;
use std::time::Instant;

use halo_testkit::eventually;
use serde_json::Value;

use super::role;
use crate::support::*;

/// A halo-lb in a namespace host, with its log in a temp dir.
pub(crate) struct HostLb {
    pub(crate) process: halo_testkit::netns::HostProcess,
    pub(crate) admin: SocketAddr,
    log: std::path::PathBuf,
    pub(crate) config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl HostLb {
    pub(crate) fn start(host: &halo_testkit::netns::Host, config: &str, admin: SocketAddr) -> HostLb {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.toml");
        std::fs::write(&path, config).unwrap();
        let log = dir.path().join("lb.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = host.command(env!("CARGO_BIN_EXE_halo-lb"));
        cmd.arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info,halo_lb=debug")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        HostLb {
            process: host.spawn(cmd),
            admin,
            log,
            config: path,
            _dir: dir,
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `/status` of an instance on `host`, asked from inside its namespace.
pub(crate) async fn host_status(host: &halo_testkit::netns::Host, admin: SocketAddr) -> Option<Value> {
    let stream = host.connect(admin).await.ok()?;
    let (code, body) = halo_testkit::http::request_over(stream, admin, "GET", "/status").await?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

pub(crate) async fn host_role(host: &halo_testkit::netns::Host, lb: &HostLb, want: &str) -> Value {
    eventually(DEADLINE, &format!("{} to be {want}", host.name()), || async {
        let s = host_status(host, lb.admin).await?;
        (role(&s) == want).then_some(s)
    })
    .await
}

/// One request through the VIP from the client host: the backend (Consul's
/// HTTP API on the backend host) answers 200.
pub(crate) async fn through_vip(client: &halo_testkit::netns::Host, vip: SocketAddr) -> bool {
    let Ok(stream) = client.connect(vip).await else {
        return false;
    };
    matches!(
        halo_testkit::http::request_over(stream, vip, "GET", "/v1/status/leader").await,
        Some((200, _))
    )
}

/// A UDP echo server (argv: address, port), for the netns hosts.
const UDP_ECHO: &str = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind((sys.argv[1],int(sys.argv[2])))\nwhile True:\n d,a=s.recvfrom(2048)\n s.sendto(d,a)\n";

/// Sends one datagram to argv's address and port; prints "ok" if it comes
/// back within 300 ms from that address.
const UDP_ASK: &str = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(0.3)\nt=(sys.argv[1],int(sys.argv[2]))\ns.sendto(b'halo',t)\ntry:\n d,a=s.recvfrom(64)\n print('ok' if d==b'halo' and a==t else 'wrong')\nexcept OSError:\n print('none')\n";

#[tokio::test]
async fn a_floating_vip_follows_the_active_between_hosts() {
    use halo_testkit::netns::{self, Topology, INTERFACE};
    if !netns::required("ha::hosts::a_floating_vip_follows_the_active_between_hosts") {
        return;
    }
    let topology = Topology::start();
    let (client, lb1, lb2, backend) = (topology.client(), topology.lb1(), topology.lb2(), topology.backend());
    // Consul runs on the backend host; its HTTP API doubles as the backend.
    let consul_http = SocketAddr::from((backend.ip(), 8500));
    let mut consul = backend.command(halo_testkit::consul_binary());
    let consul_dir = tempfile::tempdir().unwrap();
    consul
        .args(["agent", "-dev", "-node=backend", "-http-port=8500", "-dns-port=8600"])
        .arg(format!("-bind={}", backend.ip()))
        .arg(format!("-client={}", backend.ip()))
        .arg("-hcl=disable_update_check = true")
        .stdout(std::fs::File::create(consul_dir.path().join("consul.log")).unwrap())
        .stderr(std::process::Stdio::null());
    let _consul = backend.spawn(consul);
    eventually(DEADLINE, "Consul on the backend host to have a leader", || async {
        let stream = backend.connect(consul_http).await.ok()?;
        let (code, body) = halo_testkit::http::request_over(stream, consul_http, "GET", "/v1/status/leader").await?;
        (code == 200 && body.contains(':')).then_some(())
    })
    .await;

    let vip = SocketAddr::from((topology.vip(), 8080));
    // A UDP VIP on the same floating address: an echo on the backend host.
    let udp_vip = SocketAddr::from((topology.vip(), 5353));
    let udp_backend = SocketAddr::from((backend.ip(), 7053));
    let _echo = backend.spawn({
        let mut echo = backend.command("python3");
        echo.args([
            "-c",
            UDP_ECHO,
            &udp_backend.ip().to_string(),
            &udp_backend.port().to_string(),
        ]);
        echo
    });
    let config = |host: &halo_testkit::netns::Host, id: &str| {
        format!(
            "[admin]\nlisten = \"{}:9901\"\n[consul]\naddress = \"http://{consul_http}\"\n[ha]\ncluster = \"float\"\nid = \"{id}\"\nvip_address = \"{}/24\"\nvip_interface = \"{INTERFACE}\"\n[[vip]]\nname = \"web\"\nlisten = \"{vip}\"\nbackends = [\"{consul_http}\"]\n[[vip]]\nname = \"dns\"\nlisten = \"{udp_vip}\"\nprotocol = \"udp\"\nbackends = [\"{udp_backend}\"]\n",
            host.ip(),
            topology.vip()
        )
    };
    // One datagram from the client host through the UDP VIP, echoed.
    let udp_through = || {
        client
            .run(
                "python3",
                ["-c", UDP_ASK, &udp_vip.ip().to_string(), &udp_vip.port().to_string()],
            )
            .trim()
            == "ok"
    };
    let admin1 = SocketAddr::from((lb1.ip(), 9901));
    let admin2 = SocketAddr::from((lb2.ip(), 9901));
    let mut one = HostLb::start(lb1, &config(lb1, "lb1"), admin1);
    host_role(lb1, &one, "active").await;
    let two = HostLb::start(lb2, &config(lb2, "lb2"), admin2);
    host_role(lb2, &two, "standby").await;

    assert!(
        lb1.addresses().contains(&topology.vip()),
        "the active holds the address"
    );
    assert!(!lb2.addresses().contains(&topology.vip()), "the standby does not");
    eventually(DEADLINE, "the client to be served through lb1", || async {
        through_vip(client, vip).await.then_some(())
    })
    .await;
    assert_eq!(client.neighbour(topology.vip()).as_deref(), Some(lb1.mac()));
    eventually(DEADLINE, "a datagram echoed through the UDP VIP on lb1", || async {
        udp_through().then_some(())
    })
    .await;

    // kill -9 of the active host's balancer: lb2 claims the address and its
    // gratuitous ARP repoints the client.
    let killed = Instant::now();
    one.process.kill();
    host_role(lb2, &two, "active").await;
    assert!(lb2.addresses().contains(&topology.vip()), "{}", two.log());
    eventually(DEADLINE, "the client's neighbour entry to move to lb2", || async {
        (client.neighbour(topology.vip()).as_deref() == Some(lb2.mac())).then_some(())
    })
    .await;
    eventually(DEADLINE, "the client to be served through lb2", || async {
        through_vip(client, vip).await.then_some(())
    })
    .await;
    eprintln!(
        "floating failover: served through lb2 {:?} after kill -9 of lb1",
        killed.elapsed()
    );
    eventually(DEADLINE, "a datagram echoed through the UDP VIP on lb2", || async {
        udp_through().then_some(())
    })
    .await;
    let udp_out = |s: &serde_json::Value| {
        s["vips"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "dns"))
            .map(|v| v["udp"]["datagrams_out"].as_u64().unwrap_or(0))
    };
    assert!(
        udp_out(&host_status(lb2, two.admin).await.unwrap()).unwrap_or(0) >= 1,
        "lb2 forwarded it"
    );

    // lb1 died holding the address, and its kernel still answers ARP for
    // it: the new active's ARP probe sees that and says so.
    assert!(lb1.addresses().contains(&topology.vip()), "the leftover address");
    let conflict = eventually(DEADLINE, "lb2 to report the other holder", || async {
        let s = host_status(lb2, two.admin).await?;
        s["ha"]["vip_conflict"]["macs"].as_array().cloned()
    })
    .await;
    assert_eq!(conflict, vec![serde_json::json!(lb1.mac())], "{}", two.log());

    // Restarted, lb1 removes it and stands by; the conflict clears.
    let one_again = HostLb::start(lb1, &config(lb1, "lb1"), admin1);
    host_role(lb1, &one_again, "standby").await;
    assert!(
        !lb1.addresses().contains(&topology.vip()),
        "a restarted standby removes the address it died with:\n{}",
        one_again.log()
    );
    eventually(DEADLINE, "lb2's conflict to clear", || async {
        let s = host_status(lb2, two.admin).await?;
        s["ha"]["vip_conflict"].is_null().then_some(())
    })
    .await;

    // SIGTERM on lb2: the address moves back with the lock.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(two.process.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    host_role(lb1, &one_again, "active").await;
    eventually(DEADLINE, "the address to move back to lb1", || async {
        (lb1.addresses().contains(&topology.vip()) && !lb2.addresses().contains(&topology.vip())).then_some(())
    })
    .await;
    eventually(DEADLINE, "the client to be served through lb1 again", || async {
        through_vip(client, vip).await.then_some(())
    })
    .await;
    eventually(
        DEADLINE,
        "a datagram echoed through the UDP VIP on lb1 again",
        || async { udp_through().then_some(()) },
    )
    .await;
    assert_eq!(client.neighbour(topology.vip()).as_deref(), Some(lb1.mac()));
    drop(one);

    // `halo-lb release-vip` (a unit's ExecStopPost=): refused while halo-lb
    // runs with that config, then removes the address a kill -9 left.
    let release = |lb: &HostLb| {
        lb1.command(env!("CARGO_BIN_EXE_halo-lb"))
            .arg("--config")
            .arg(&lb.config)
            .arg("release-vip")
            .output()
            .unwrap()
    };
    let refused = release(&one_again);
    assert!(!refused.status.success(), "refused while halo-lb runs");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is in use"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        lb1.addresses().contains(&topology.vip()),
        "the live active keeps its address"
    );
    let mut one_again = one_again;
    one_again.process.kill();
    let removed = eventually(DEADLINE, "the killed process's admin port to be free", || async {
        let out = release(&one_again);
        out.status.success().then_some(out)
    })
    .await;
    assert!(
        String::from_utf8_lossy(&removed.stdout).contains("removed"),
        "{}",
        String::from_utf8_lossy(&removed.stdout)
    );
    assert!(
        !lb1.addresses().contains(&topology.vip()),
        "the leftover address is gone"
    );
    let again = release(&one_again);
    assert!(again.status.success(), "idempotent");
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to release"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
}
