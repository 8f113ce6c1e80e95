//! Stable hashes: of backend addresses (Maglev's permutations and
//! tie-breaks) and of client addresses (Maglev's slot). Stable across
//! builds and processes, so every instance maps clients the same way.

use std::net::{IpAddr, SocketAddr};

/// The hash of a backend address (IP octets, then the port, big-endian).
pub(crate) fn addr_hash(addr: SocketAddr, seed: u64) -> u64 {
    let mut key = [0u8; 18];
    let len = match addr.ip() {
        IpAddr::V4(ip) => {
            key[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            key[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    key[len..len + 2].copy_from_slice(&addr.port().to_be_bytes());
    hash64(&key[..len + 2], seed)
}

/// The hash of a client's IP (not its port: one client, one backend).
pub(crate) fn client_hash(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(ip) => hash64(&ip.octets(), 0x5851_f42d_4c95_7f2d),
        IpAddr::V6(ip) => hash64(&ip.octets(), 0x5851_f42d_4c95_7f2d),
    }
}

/// A UDP flow's hash: the client's address and port.
pub(crate) fn flow_hash(client: SocketAddr) -> u64 {
    let port = client.port().to_be_bytes();
    let mut bytes = [0u8; 18];
    let n = match client.ip() {
        IpAddr::V4(ip) => {
            bytes[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            bytes[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    bytes[n..n + 2].copy_from_slice(&port);
    hash64(&bytes[..n + 2], 0x5851_f42d_4c95_7f2d)
}

/// FNV-1a with a seed, then splitmix64's finalizer. Stable across builds and
/// processes, so both instances of a pair map clients the same way.
pub(crate) fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
