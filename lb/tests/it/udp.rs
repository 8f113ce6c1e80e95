//! UDP VIPs against real DNS servers and clients (dnsmasq behind the VIP,
//! dig and dnsperf in front), and a UDP echo backend for what DNS cannot
//! show (empty and maximum-size datagrams, PROXY headers, floods).

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halo_testkit::dnsd::{dig, dnsperf, free_udp_port, Dnsmasq};
use halo_testkit::eventually;

use crate::support::*;

fn udp_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_udp_port(Ipv4Addr::LOCALHOST)))
}

/// Three dnsmasq backends, answering 198.18.0.1, .2 and .3.
fn three_dns() -> Vec<Dnsmasq> {
    (1..=3).map(|i| Dnsmasq::start(Ipv4Addr::new(198, 18, 0, i))).collect()
}

fn udp_vip(admin: SocketAddr, vip: SocketAddr, backends: &[SocketAddr], extra: &str) -> String {
    one_vip(
        admin,
        vip,
        backends,
        &format!("protocol = \"udp\"\nalgorithm = \"maglev\"\n{extra}"),
    )
}

/// The VIP's `udp` part of `/status`.
async fn udp_status(lb: &Lb) -> serde_json::Value {
    lb.status().await["vips"][0]["udp"].clone()
}

/// The UDP status once `counter` has reached `at_least`: a worker counts a
/// reply after `sendmmsg` returns, which may be after the client has read
/// it; every other counter is as of that moment (or later).
async fn udp_status_once(lb: &Lb, counter: &str, at_least: u64) -> serde_json::Value {
    eventually(
        DEADLINE,
        &format!("the UDP {counter} counter to reach {at_least}"),
        || async {
            let udp = udp_status(lb).await;
            (n(&udp[counter]) >= at_least).then_some(udp)
        },
    )
    .await
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// A process's open descriptors and resident memory (KiB).
fn fds_and_rss(pid: i32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (fds, rss)
}

/// Waits until halo-lb holds no more descriptors than `fds_before` (polled:
/// the admin API's own connection for a /status just read may still be
/// closing), then checks its memory is within 8 MiB of `rss_before`.
async fn assert_back_to(lb: &Lb, fds_before: usize, rss_before: u64) {
    let pid = lb.pid();
    eventually(DEADLINE, &format!("descriptors back to {fds_before}"), || async move {
        (fds_and_rss(pid).0 <= fds_before).then_some(())
    })
    .await;
    let (_, rss_after) = fds_and_rss(pid);
    assert!(
        rss_after <= rss_before + 8 * 1024,
        "memory back within 8 MiB: {rss_before} → {rss_after} KiB"
    );
}

/// A UDP echo server on loopback: every datagram goes back to its sender
/// as it came. Stops when dropped.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// The first datagrams it saw, for the PROXY test.
    seen: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl Echo {
    fn start() -> Echo {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, keep) = (Arc::clone(&stop), Arc::clone(&seen));
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !s.load(Ordering::Relaxed) {
                if let Ok((len, from)) = socket.recv_from(&mut buf) {
                    {
                        let mut seen = keep.lock().unwrap();
                        if seen.len() < 16 {
                            seen.push(buf[..len].to_vec());
                        }
                    }
                    let _ = socket.send_to(&buf[..len], from);
                }
            }
        });
        Echo { addr, stop, seen }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sends `data` to `vip` from `socket` and waits (up to 2 s) for the echo.
fn round_trip(socket: &UdpSocket, vip: SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    socket.send_to(data, vip).ok()?;
    let mut buf = vec![0u8; 65_536];
    let (len, from) = socket.recv_from(&mut buf).ok()?;
    assert_eq!(from, vip, "the reply comes from the VIP's address");
    Some(buf[..len].to_vec())
}

#[tokio::test]
async fn a_flow_sticks_to_one_backend_and_flows_spread_over_all() {
    let dns = three_dns();
    let (admin, vip) = (addrs().0, udp_addr());
    let backends: Vec<SocketAddr> = dns.iter().map(|d| d.addr).collect();
    let lb = Lb::start(&udp_vip(admin, vip, &backends, "udp_responses = 1"), admin, &[vip]).await;
    let answers: Vec<String> = dns.iter().map(|d| d.answer.to_string()).collect();
    let mut seen = HashSet::new();
    for _ in 0..24 {
        let port = free_udp_port(Ipv4Addr::LOCALHOST);
        // The same client address and port: the same backend every time
        // (each query is a flow of its own, udp_responses = 1, and Maglev
        // hashes the address and port).
        let first = tokio::task::spawn_blocking(move || dig(vip, "x.example.test", Some(port)))
            .await
            .unwrap()
            .expect("an answer through the VIP");
        assert!(answers.contains(&first), "{first} is one of the backends' answers");
        for _ in 0..3 {
            let again = tokio::task::spawn_blocking(move || dig(vip, "y.example.test", Some(port)))
                .await
                .unwrap();
            assert_eq!(again.as_deref(), Some(first.as_str()), "flow from port {port} moved");
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3, "24 flows reached every backend: {seen:?}");
    let udp = udp_status_once(&lb, "datagrams_out", 96).await;
    assert_eq!(n(&udp["flows_created"]), 96, "{udp}");
    assert_eq!(n(&udp["flows_ended"]["answered"]), 96, "{udp}");
    assert_eq!(n(&udp["datagrams_in"]), 96);
    assert_eq!(n(&udp["datagrams_out"]), 96);
    // Per backend, in /metrics too.
    let (_, metrics) = halo_testkit::http::get(admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("halo_vip_udp_flows_created_total{vip=\"web\"} 96"),
        "{metrics}"
    );
    for d in &dns {
        assert!(
            metrics.contains(&format!(
                "halo_backend_udp_datagrams_total{{vip=\"web\",backend=\"{}\",direction=\"in\"}}",
                d.addr
            )),
            "{metrics}"
        );
    }
}

#[tokio::test]
async fn a_backend_killed_under_load_costs_under_one_percent_from_a_second_after() {
    let mut dns = three_dns();
    let (admin, vip) = (addrs().0, udp_addr());
    let backends: Vec<SocketAddr> = dns.iter().map(|d| d.addr).collect();
    let lb = Lb::start(&udp_vip(admin, vip, &backends, "udp_responses = 1"), admin, &[vip]).await;
    // Load before, across and after the kill: 30 clients (flows), 600
    // queries a second, for 6 s.
    let load = tokio::task::spawn_blocking(move || dnsperf(vip, 6, 30, 600));
    // Under way: answers flow.
    eventually(DEADLINE, "load through the VIP", || async {
        (n(&udp_status(&lb).await["datagrams_out"]) > 300).then_some(())
    })
    .await;
    dns[0].kill();
    let killed = Instant::now();
    // From one second after the kill, for three seconds, with fresh
    // clients (new flows, some of which Maglev sends to the dead backend).
    tokio::time::sleep_until((killed + Duration::from_secs(1)).into()).await;
    let after = tokio::task::spawn_blocking(move || dnsperf(vip, 3, 30, 600))
        .await
        .unwrap();
    let during = load.await.unwrap();
    assert!(after.sent > 1000, "{after:?}");
    assert!(
        after.answered() >= 0.99,
        "from 1 s after the kill, {:.2} % answered ({after:?}); over the whole run {during:?}\n{}",
        after.answered() * 100.0,
        udp_status(&lb).await
    );
    // The dead backend is ejected (ICMP errors count as failed connects).
    let status = lb.status().await;
    let dead = status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == dns[0].addr.to_string())
        .unwrap()
        .clone();
    assert_ne!(dead["state"], "healthy", "{dead}");
    let (_, metrics) = halo_testkit::http::get(admin, "/metrics").await.unwrap();
    let failures = metrics
        .lines()
        .find(|l| {
            l.starts_with("halo_backend_connect_failures_total{") && l.contains(&format!("backend=\"{}\"", dns[0].addr))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(failures >= 2, "its ICMP errors counted as failed connects: {failures}");
}

#[tokio::test]
async fn a_backend_that_comes_back_takes_new_flows() {
    let mut dns = three_dns();
    let (admin, vip) = (addrs().0, udp_addr());
    let backends: Vec<SocketAddr> = dns.iter().map(|d| d.addr).collect();
    let lb = Lb::start(
        &udp_vip(
            admin,
            vip,
            &backends,
            "udp_responses = 1\n[vip.passive]\nbase_ejection = \"500ms\"\nmax_ejection = \"1s\"",
        ),
        admin,
        &[vip],
    )
    .await;
    let back = dns[0].answer.to_string();
    dns[0].kill();
    // Flows that would go to it fail over to the others (their first
    // datagram is retried), and it gets ejected.
    for _ in 0..20 {
        let answer = tokio::task::spawn_blocking(move || dig(vip, "x.example.test", None))
            .await
            .unwrap();
        assert!(
            answer.is_some_and(|a| a != back),
            "answered by the others while it is dead"
        );
    }
    dns[0].restart();
    // Once its ejection ends, new flows reach it again.
    eventually(DEADLINE, "new flows on the restarted backend", || async {
        let answer = tokio::task::spawn_blocking(move || dig(vip, "x.example.test", None))
            .await
            .unwrap();
        (answer.as_deref() == Some(back.as_str())).then_some(())
    })
    .await;
    drop(lb);
}

#[tokio::test]
async fn empty_and_largest_datagrams_pass_and_a_flood_stays_within_the_flow_limit() {
    let echo = Echo::start();
    let (admin, vip) = (addrs().0, udp_addr());
    let lb = Lb::start(
        &udp_vip(
            admin,
            vip,
            &[echo.addr],
            "max_connections = 200\nudp_idle_timeout = \"1s\"",
        ),
        admin,
        &[vip],
    )
    .await;
    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    assert_eq!(
        round_trip(&client, vip, b"").as_deref(),
        Some(&b""[..]),
        "a zero-length datagram"
    );
    let big: Vec<u8> = (0..65_507u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        round_trip(&client, vip, &big),
        Some(big.clone()),
        "a 65,507-byte datagram"
    );
    let udp = udp_status_once(&lb, "datagrams_out", 2).await;
    assert_eq!(n(&udp["datagrams_in"]), 2, "{udp}");
    assert_eq!(n(&udp["datagrams_out"]), 2, "{udp}");

    let (fds_before, rss_before) = fds_and_rss(lb.pid());
    // A flood bounded in time: 1,000 source ports (flows) × 20 datagrams,
    // as fast as this thread sends them, past the 200-flow limit.
    let flood = tokio::task::spawn_blocking(move || {
        let sockets: Vec<UdpSocket> = (0..1000)
            .map(|_| UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
            .collect();
        let started = Instant::now();
        let mut sent = 0u64;
        'outer: for round in 0..20u8 {
            for s in &sockets {
                if s.send_to(&[round; 64], vip).is_ok() {
                    sent += 1;
                }
                if started.elapsed() > Duration::from_secs(10) {
                    break 'outer;
                }
            }
        }
        sent
    })
    .await
    .unwrap();
    assert!(flood > 1000);
    let udp = udp_status(&lb).await;
    assert!(n(&udp["flows_active"]) <= 200, "the limit holds: {udp}");
    assert!(
        n(&udp["flows_ended"]["evicted"]) > 0,
        "new flows took the place of idle ones: {udp}"
    );
    let (fds_during, _) = fds_and_rss(lb.pid());
    assert!(
        fds_during <= fds_before + 200 + 8,
        "one descriptor per live flow: {fds_before} → {fds_during}"
    );
    // Idle flows expire; descriptors and memory come back.
    eventually(DEADLINE, "the flood's flows to expire", || async {
        (n(&udp_status(&lb).await["flows_active"]) == 0).then_some(())
    })
    .await;
    assert_back_to(&lb, fds_before, rss_before).await;
}

#[tokio::test]
async fn a_hundred_thousand_short_flows_leave_descriptors_and_memory_where_they_started() {
    let echo = Echo::start();
    let (admin, vip) = (addrs().0, udp_addr());
    let lb = Lb::start(
        &udp_vip(
            admin,
            vip,
            &[echo.addr],
            "max_connections = 15000\nudp_idle_timeout = \"250ms\"",
        ),
        admin,
        &[vip],
    )
    .await;
    // Warm up (the worker's first flows allocate its tables), then measure.
    let warm = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    assert!(round_trip(&warm, vip, b"warm").is_some());
    eventually(DEADLINE, "the warm-up flow to expire", || async {
        (n(&udp_status(&lb).await["flows_active"]) == 0).then_some(())
    })
    .await;
    let (fds_before, rss_before) = fds_and_rss(lb.pid());
    // 100,000 flows and more: a fresh socket for each query, from
    // 127.0.0.2 to 127.0.0.9, four threads in lockstep with their echoes
    // (110,000 queries: the kernel gives a port back now and then while
    // its last flow is still live, which continues that flow).
    let created_before = n(&udp_status(&lb).await["flows_created"]);
    let answered = tokio::task::spawn_blocking(move || {
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut ok = 0u32;
                    for i in 0..27_500u32 {
                        let src = Ipv4Addr::new(127, 0, 0, 2 + t * 2 + (i % 2) as u8);
                        let s = UdpSocket::bind((src, 0)).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut buf = [0u8; 16];
                        if s.send_to(&i.to_be_bytes(), vip).is_ok() && s.recv_from(&mut buf).is_ok() {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum::<u32>()
    })
    .await
    .unwrap();
    let udp = udp_status(&lb).await;
    assert!(answered >= 108_900, "{answered} of 110,000 answered: {udp}");
    assert!(
        n(&udp["flows_created"]) - created_before >= 100_000,
        "at least 100,000 flows: {udp}"
    );
    eventually(DEADLINE, "every flow to expire", || async {
        (n(&udp_status(&lb).await["flows_active"]) == 0).then_some(())
    })
    .await;
    let udp = udp_status(&lb).await;
    assert_eq!(n(&udp["flows_ended"]["evicted"]), 0, "expired, not evicted: {udp}");
    assert_back_to(&lb, fds_before, rss_before).await;
}

#[tokio::test]
async fn proxy_protocol_v2_puts_the_dgram_header_in_front_of_every_datagram() {
    let echo = Echo::start();
    let (admin, vip) = (addrs().0, udp_addr());
    let _lb = Lb::start(
        &udp_vip(admin, vip, &[echo.addr], "proxy_protocol = \"v2\""),
        admin,
        &[vip],
    )
    .await;
    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let from = client.local_addr().unwrap();
    for payload in [&b"one"[..], b"two"] {
        let back = round_trip(&client, vip, payload).expect("echoed");
        // The echo returns what it got: the header, then the payload.
        let header = &back[..back.len() - payload.len()];
        assert_eq!(&back[back.len() - payload.len()..], payload);
        assert_eq!(&header[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(header[12], 0x21, "version 2, PROXY");
        assert_eq!(header[13], 0x12, "UDP over IPv4");
        assert_eq!(&header[16..20], &[127, 0, 0, 1], "the client's address");
        assert_eq!(
            &header[20..24],
            &vip.ip().to_string().parse::<Ipv4Addr>().unwrap().octets()
        );
        assert_eq!(
            u16::from_be_bytes([header[24], header[25]]),
            from.port(),
            "the client's port"
        );
        assert_eq!(
            u16::from_be_bytes([header[26], header[27]]),
            vip.port(),
            "the VIP's port"
        );
    }
    assert_eq!(echo.seen.lock().unwrap().len(), 2, "one datagram each, header included");
}

#[tokio::test]
async fn udp_and_tcp_vips_share_a_port_and_a_removed_udp_vip_stops_at_once() {
    let echo = Echo::start();
    let tcp_backend = TestBackend::start("tcp", Behavior::GreetEcho).await;
    let (admin, vip) = (addrs().0, udp_addr());
    let both = format!(
        "[admin]\nlisten = \"{admin}\"\n[[vip]]\nname = \"tcp\"\nlisten = \"{vip}\"\nbackends = [\"{}\"]\n[[vip]]\nname = \"udp\"\nlisten = \"{vip}\"\nprotocol = \"udp\"\nbackends = [\"{}\"]\n",
        tcp_backend.addr, echo.addr
    );
    let lb = Lb::start(&both, admin, &[vip]).await;
    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    assert_eq!(round_trip(&client, vip, b"ping").as_deref(), Some(&b"ping"[..]));
    let (name, _conn) = greeting(vip).await.unwrap();
    assert_eq!(name, "tcp");
    // Reload without the UDP VIP: its socket closes, the TCP VIP serves on.
    let only_tcp = format!(
        "[admin]\nlisten = \"{admin}\"\n[[vip]]\nname = \"tcp\"\nlisten = \"{vip}\"\nbackends = [\"{}\"]\n",
        tcp_backend.addr
    );
    lb.write_config(&only_tcp);
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(DEADLINE, "the UDP VIP gone", || async {
        (lb.status().await["vips"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    // The port is free for anyone else now: the reload waited for the
    // workers to close the group.
    assert!(UdpSocket::bind(vip).is_ok(), "the UDP port released with the VIP");
    let (name, _conn) = greeting(vip).await.unwrap();
    assert_eq!(name, "tcp");
}

#[tokio::test]
async fn a_udp_vip_takes_its_backends_from_consul_and_a_failing_instance_leaves() {
    use halo_consul::{CheckRegistration, CheckStatus, Client, ServiceRegistration};
    let consul = halo_testkit::ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let dns = three_dns();
    for (i, d) in dns.iter().take(2).enumerate() {
        client
            .register_service(&ServiceRegistration {
                id: format!("dns-{i}"),
                name: "dns".into(),
                address: Some("127.0.0.1".into()),
                port: Some(d.addr.port()),
                checks: vec![CheckRegistration::ttl(
                    format!("dns-{i}:ttl"),
                    "ttl",
                    Duration::from_secs(300),
                    CheckStatus::Passing,
                )],
                ..ServiceRegistration::default()
            })
            .await
            .unwrap();
    }
    let (admin, vip) = (addrs().0, udp_addr());
    let config = format!(
        "[admin]\nlisten = \"{admin}\"\n[consul]\naddress = \"{}\"\nwait = \"30s\"\n[[vip]]\nname = \"web\"\nlisten = \"{vip}\"\nprotocol = \"udp\"\nalgorithm = \"maglev\"\nservice = \"dns\"\nudp_responses = 1\n",
        consul.http_url()
    );
    let lb = Lb::start(&config, admin, &[vip]).await;
    let two: HashSet<String> = dns.iter().take(2).map(|d| d.answer.to_string()).collect();
    let answers = |n: usize| async move {
        tokio::task::spawn_blocking(move || {
            (0..n)
                .filter_map(|_| dig(vip, "x.example.test", None))
                .collect::<HashSet<String>>()
        })
        .await
        .unwrap()
    };
    eventually(DEADLINE, "both Consul instances to answer", || async {
        (answers(16).await == two).then_some(())
    })
    .await;
    client.check_fail("dns-0:ttl", "down").await.unwrap();
    let one = HashSet::from([dns[1].answer.to_string()]);
    eventually(DEADLINE, "the failing instance to leave", || async {
        (table_addrs(&lb).await == [dns[1].addr.to_string()]).then_some(())
    })
    .await;
    assert_eq!(answers(12).await, one);
}

#[tokio::test]
async fn a_udp_vip_serves_ipv6_clients_and_backends() {
    // An echo on [::1], a VIP on [::1].
    let backend = UdpSocket::bind("[::1]:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = backend.recv_from(&mut buf) {
            // The backend sees the balancer's address, and says so.
            let mut reply = buf[..n].to_vec();
            reply.extend_from_slice(format!(" via {}", from.ip()).as_bytes());
            let _ = backend.send_to(&reply, from);
        }
    });
    let port = {
        let s = UdpSocket::bind("[::1]:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let vip: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let admin = addrs().0;
    let lb = Lb::start(&udp_vip(admin, vip, &[backend_addr], ""), admin, &[vip]).await;
    let client = UdpSocket::bind("[::1]:0").unwrap();
    let back = round_trip(&client, vip, b"six").expect("an answer over IPv6");
    assert_eq!(back, b"six via ::1");
    assert_eq!(n(&udp_status_once(&lb, "datagrams_out", 1).await["datagrams_out"]), 1);
}

#[tokio::test]
async fn a_wildcard_udp_vip_replies_from_the_address_the_client_sent_to() {
    let echo = Echo::start();
    let port = free_udp_port(Ipv4Addr::UNSPECIFIED);
    let vip = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let admin = addrs().0;
    let _lb = Lb::start(
        &udp_vip(admin, vip, &[echo.addr], "proxy_protocol = \"v2\""),
        admin,
        &[vip],
    )
    .await;
    // Two of the host's addresses: each reply comes from the one asked
    // (IP_PKTINFO), and the PROXY header names it as the destination.
    for to in [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)] {
        let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let target = SocketAddr::from((to, port));
        let back = tokio::task::spawn_blocking(move || round_trip(&client, target, b"where"))
            .await
            .unwrap()
            .expect("an answer from the address asked");
        assert_eq!(&back[back.len() - 5..], b"where");
        assert_eq!(&back[20..24], &to.octets(), "the header's destination is {to}");
    }
}
