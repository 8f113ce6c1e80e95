//! Free ports and loopback addresses for test processes.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::{Mutex, PoisonError};

/// A free TCP port on `ip` that is also free for UDP (Consul's DNS and serf
/// ports use both). Another process can still take it before ours binds it;
/// `crate::process` retries a start that loses that race.
pub fn free_port(ip: Ipv4Addr) -> u16 {
    // The kernel may hand the port it just gave (and we released) to the
    // next bind: an agent once got the same port for HTTP and Serf WAN.
    // Never give out one port twice in a process.
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..1000 {
        let tcp = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("cannot bind {ip}:0: {e}"));
        let port = tcp.local_addr().expect("bound socket has an address").port();
        if UdpSocket::bind(SocketAddr::from((ip, port))).is_ok()
            && GIVEN.lock().unwrap_or_else(PoisonError::into_inner).insert(port)
        {
            return port;
        }
    }
    panic!("no port on {ip} is free for both TCP and UDP");
}

/// A run of consecutive 127.0.0.x addresses, starting at a random x so that
/// clusters of parallel tests rarely share an address (ports are free-checked
/// anyway).
#[derive(Debug, Clone, Copy)]
pub struct LoopbackBlock {
    first: u8,
}

impl LoopbackBlock {
    /// The `i`th address of the block.
    pub fn nth(&self, i: usize) -> Ipv4Addr {
        let i = u8::try_from(i).expect("block index fits the block");
        Ipv4Addr::new(127, 0, 0, self.first + i)
    }
}

/// A block of `len` addresses in 127.0.0.2..=127.0.0.254.
pub fn random_loopback_block(len: usize) -> LoopbackBlock {
    let len = u8::try_from(len)
        .ok()
        .filter(|&l| l > 0 && l < 200)
        .expect("block of 1..200 addresses");
    LoopbackBlock {
        first: fastrand::u8(2..=(254 - len)),
    }
}
