//! Aggregate throughput of `ha.mode = "ecmp"` with 1, 2 and 3 balancers,
//! in the ECMP testbed (`halo_testkit::ecmp`): BIRD 2 on a router and on
//! every balancer host, halo-lb with `packaging/examples/lb-ecmp.toml`
//! (only the VIP address changed), three backends registered in Consul,
//! clients behind the router. Run by `benches/ecmp.sh` as root.
//!
//! A request is one new TCP connection through the VIP: connect, read the
//! backend's hello line, close. `threads` client threads on the outside
//! host each make requests back to back for `seconds`. The load
//! generator's own limit is the same load straight to the backends
//! through the router (no balancer). Everything shares one machine: the
//! router's forwarding, every balancer, the backends and the clients run on
//! the same cores, so the rows show what the topology costs, not what N
//! machines would add.
//!
//! Usage: `ecmp-dc <halo-lb binary> [seconds] [threads]`; prints a
//! Markdown table.

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halo_testkit::ecmp::Fabric;
use halo_testkit::eventually;

const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const EXAMPLE_VIP: &str = "198.19.0.200";
const ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9901);

fn request(target: SocketAddr, source: Ipv4Addr) -> bool {
    let Ok(socket) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) else {
        return false;
    };
    if socket.bind(&SocketAddr::from((source, 0)).into()).is_err()
        || socket.connect_timeout(&target.into(), Duration::from_secs(2)).is_err()
    {
        return false;
    }
    let mut stream: std::net::TcpStream = socket.into();
    if stream.set_read_timeout(Some(Duration::from_secs(2))).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => return true,
            Ok(1) => {}
            _ => return false,
        }
    }
}

/// Requests per second (and failures) to `targets` (round robin) from
/// `threads` threads in `netns`, for `seconds`.
fn load(
    netns: &str,
    targets: Vec<SocketAddr>,
    sources: Vec<Ipv4Addr>,
    threads: usize,
    seconds: u64,
) -> (f64, u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, slow) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let handles: Vec<_> = (0..threads)
        .map(|n| {
            let (stop, ok, failed, slow) = (
                Arc::clone(&stop),
                Arc::clone(&ok),
                Arc::clone(&failed),
                Arc::clone(&slow),
            );
            let (targets, sources, path) = (targets.clone(), sources.clone(), format!("/var/run/netns/{netns}"));
            std::thread::spawn(move || {
                let ns = std::fs::File::open(&path).expect("open the namespace");
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the namespace");
                let mut k = n;
                while !stop.load(Ordering::Relaxed) {
                    let target = targets[k % targets.len()];
                    let began = Instant::now();
                    let answered = request(target, sources[k % sources.len()]);
                    if began.elapsed() > Duration::from_millis(200) {
                        slow.fetch_add(1, Ordering::Relaxed);
                    }
                    if answered {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    k += threads;
                }
            })
        })
        .collect();
    let began = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        handle.join().expect("a client thread panicked");
    }
    let took = began.elapsed().as_secs_f64();
    (
        ok.load(Ordering::Relaxed) as f64 / took,
        failed.load(Ordering::Relaxed),
        slow.load(Ordering::Relaxed),
    )
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let halo = args
        .get(1)
        .expect("usage: ecmp-dc <halo-lb binary> [seconds] [threads]")
        .clone();
    let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
    assert!(
        halo_testkit::netns::required("ecmp-dc"),
        "set HALO_NETNS_TESTS=1 and run as root"
    );
    let fabric = Fabric::start(3, 3).await;
    let _backends = fabric.start_backends(BACKEND_PORT, BACKEND_PORT + 1).await;
    let dc = fabric.dc();
    let vip = SocketAddr::from((fabric.vip(), VIP_PORT));
    let sources = fabric.client_ips(20);
    // The backends answer the outside through the router.
    for i in 1..=3 {
        dc.backend(i).run(
            "ip",
            [
                "route",
                "add",
                &format!("{}/25", dc.net().outside_addr(0)),
                "via",
                &fabric.router().ip().to_string(),
            ],
        );
    }
    let example = std::fs::read_to_string(halo_testkit::workspace_root().join("packaging/examples/lb-ecmp.toml"))
        .expect("read packaging/examples/lb-ecmp.toml");
    let config = example.replace(EXAMPLE_VIP, &fabric.vip().to_string());
    let direct: Vec<SocketAddr> = (1..=3)
        .map(|i| SocketAddr::from((dc.backend(i).ip(), BACKEND_PORT)))
        .collect();
    let outside = fabric.outside().netns().to_owned();
    let mut rows = Vec::new();
    let (rps, failed, slow) = load(&outside, direct.clone(), sources.clone(), threads, seconds);
    rows.push((
        "no balancer (the generator's limit: straight to the 3 backends through the router)".to_owned(),
        rps,
        failed,
        slow,
    ));
    let mut lbs = Vec::new();
    for n in 1..=3usize {
        let path = dc.log_dir().join(format!("lb{n}.toml"));
        std::fs::write(&path, &config).expect("write a config");
        let mut cmd = dc.lb(n).command(&halo);
        cmd.arg("--config").arg(&path).env("NO_COLOR", "1");
        lbs.push(dc.spawn(&format!("lb{n}"), cmd, "halo-lb"));
        eventually(Duration::from_secs(60), &format!("lb{n} announcing"), || async {
            let stream = dc.lb(n).connect(ADMIN).await.ok()?;
            let (_, body) = halo_testkit::http::request_over(stream, ADMIN, "GET", "/status").await?;
            let status: serde_json::Value = serde_json::from_str(&body).ok()?;
            let full = status["vips"]
                .as_array()?
                .iter()
                .all(|v| v["backends"].as_array().is_some_and(|b| b.len() == 3));
            (status["ecmp"]["state"] == "announcing" && full).then_some(())
        })
        .await;
        let want: Vec<Ipv4Addr> = (1..=n).map(|i| dc.lb(i).ip()).collect();
        fabric
            .wait_paths(fabric.vip(), &want, Duration::from_secs(60))
            .await
            .expect("the router's paths");
        let (rps, failed, slow) = load(&outside, vec![vip], sources.clone(), threads, seconds);
        rows.push((
            format!("{n} balancer{}", if n == 1 { "" } else { "s" }),
            rps,
            failed,
            slow,
        ));
    }
    println!("| through | requests/s | failed | over 200 ms |");
    println!("|---|---:|---:|---:|");
    for (what, rps, failed, slow) in rows {
        println!("| {what} | {rps:.0} | {failed} | {slow} |");
    }
    println!();
    println!(
        "{threads} client threads on the outside host, {seconds} s per row, 20 client addresses; a request is a new TCP connection, the backend's hello line read, closed. \
         Router: Linux with BIRD 2 (packaging/bird/bird-router.conf), fib_multipath_hash_policy 1. Balancers: halo-lb with packaging/examples/lb-ecmp.toml. \
         Every process shares this machine's {} cores.",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    drop(lbs);
}
