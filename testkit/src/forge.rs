//! Forged packets, for tests that play an attacker on the network: an
//! ICMP port-unreachable that quotes a victim's UDP socket (what tells a
//! connected UDP socket "nothing listens there"), and where to aim it.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;

/// The Internet checksum of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP port-unreachable message (type 3, code 3; without the outer IP
/// header, for a raw ICMP socket) to `victim`, quoting a UDP datagram from
/// `victim:victim_port` to `peer`: "nothing listens at `peer`". The kernel
/// hands it to the victim's socket connected to `peer` whoever sent it.
pub fn icmp_port_unreachable(victim: Ipv4Addr, victim_port: u16, peer: SocketAddrV4) -> Vec<u8> {
    let mut quoted = vec![0x45, 0, 0, 92, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0];
    quoted.extend_from_slice(&victim.octets());
    quoted.extend_from_slice(&peer.ip().octets());
    let sum = checksum(&quoted);
    quoted[10..12].copy_from_slice(&sum.to_be_bytes());
    quoted.extend_from_slice(&victim_port.to_be_bytes());
    quoted.extend_from_slice(&peer.port().to_be_bytes());
    quoted.extend_from_slice(&72u16.to_be_bytes());
    quoted.extend_from_slice(&[0, 0]);
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    icmp
}

/// The local port of `program`'s UDP socket connected to `peer` in network
/// namespace `netns`, from `ss`: what an attacker who watched the wire, or
/// swept the ephemeral range, knows.
pub fn connected_udp_port(netns: &str, program: &str, peer: SocketAddr) -> Option<u16> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-Hunap"])
        .output()
        .ok()?;
    let peer = peer.to_string();
    String::from_utf8_lossy(&out.stdout).lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        let local = words.iter().position(|w| *w == peer)?.checked_sub(1)?;
        line.contains(&format!("\"{program}\"")).then_some(())?;
        words[local].rsplit(':').next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_checks_out() {
        let m = icmp_port_unreachable(
            Ipv4Addr::new(198, 18, 0, 12),
            40000,
            SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 11), 9901),
        );
        assert_eq!((m[0], m[1]), (3, 3));
        assert_eq!(checksum(&m), 0, "ICMP checksum");
        assert_eq!(checksum(&m[8..28]), 0, "quoted IP header checksum");
        assert_eq!(u16::from_be_bytes([m[28], m[29]]), 40000);
        assert_eq!(u16::from_be_bytes([m[30], m[31]]), 9901);
    }
}
