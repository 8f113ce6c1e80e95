//! ARP (RFC 826, RFC 5227) and IPv6 neighbour discovery (RFC 4861) frames
//! for the floating address, built and parsed: what halo sends to announce
//! and probe for the address, and what it makes of what other hosts send
//! ([`Heard`]). Plain bytes, no sockets ([`super::neighbours`] sends and
//! reads them). Part of [`super`], the floating address, whose module docs
//! say how a probe, an answer and an announcement are told apart.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::Heard;

/// The neighbour-discovery option type halo's advertisements carry (RFC
/// 4727: "RFC3692-style Experiment 1"), with [`HALO_MARK`] as its payload.
pub(crate) const ND_OPT_HALO: u8 = 253;
const HALO_MARK: [u8; 6] = *b"halo\0\x01";

const ICMPV6: u8 = 58;
const NEIGHBOUR_SOLICITATION: u8 = 135;
const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
/// ND options: source and target link-layer address.
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;
/// The override flag of a neighbour advertisement (first flags byte).
const NA_OVERRIDE: u8 = 0x20;

/// What an ARP packet (RFC 826, Ethernet/IPv4) from another host says about
/// `address`.
pub(super) fn heard_arp(frame: &[u8], address: Ipv4Addr, ours: [u8; 6]) -> Option<Heard> {
    if frame.len() < 28 || frame[0..2] != [0, 1] || frame[2..4] != [8, 0] || frame[4] != 6 || frame[5] != 4 {
        return None;
    }
    let op = u16::from_be_bytes([frame[6], frame[7]]);
    let mut sender = [0u8; 6];
    sender.copy_from_slice(&frame[8..14]);
    if sender == ours {
        return None;
    }
    let (sender_ip, target_ip) = (&frame[14..18], &frame[24..28]);
    let address = address.octets();
    if op == ArpOp::Request as u16 && sender_ip == [0, 0, 0, 0] && target_ip == address {
        Some(Heard::Probe)
    } else if sender_ip == address && target_ip == address {
        Some(Heard::Announce(sender))
    } else if sender_ip == address {
        Some(Heard::Answer(sender))
    } else {
        None
    }
}

/// What an ICMPv6 message (as a raw socket reads it, without the IPv6
/// header) from another host says about `address`.
pub(super) fn heard_nd(message: &[u8], address: Ipv6Addr, ours: [u8; 6]) -> Option<Heard> {
    if message.len() < 24 || message[1] != 0 || message[8..24] != address.octets() {
        return None;
    }
    let options = nd_options(&message[24..]);
    match message[0] {
        // A solicitation without a source link-layer address comes from the
        // unspecified address (RFC 4861 §4.3): duplicate address detection.
        NEIGHBOUR_SOLICITATION => (!options.iter().any(|(kind, _)| *kind == ND_OPT_SOURCE_LL)).then_some(Heard::Probe),
        NEIGHBOUR_ADVERTISEMENT => {
            let mac = options.iter().find_map(|(kind, data)| {
                (*kind == ND_OPT_TARGET_LL)
                    .then(|| <[u8; 6]>::try_from(data.get(..6)?).ok())
                    .flatten()
            })?;
            if mac == ours {
                return None;
            }
            let marked = options
                .iter()
                .any(|(kind, data)| *kind == ND_OPT_HALO && data.starts_with(&HALO_MARK));
            Some(if marked {
                Heard::Announce(mac)
            } else {
                Heard::Answer(mac)
            })
        }
        _ => None,
    }
}

/// The options of a neighbour discovery message (type, data), as far as
/// they are well formed.
fn nd_options(mut bytes: &[u8]) -> Vec<(u8, &[u8])> {
    let mut options = Vec::new();
    // Each option is at least 8 bytes, so this ends within len / 8 rounds.
    while bytes.len() >= 8 {
        let (kind, units) = (bytes[0], usize::from(bytes[1]));
        let length = units * 8;
        if length == 0 || length > bytes.len() {
            break;
        }
        options.push((kind, &bytes[2..length]));
        bytes = &bytes[length..];
    }
    options
}

/// An ARP probe (RFC 5227) for `address` from `mac`: sender IP 0.0.0.0,
/// target MAC zero.
pub(super) fn arp_probe(mac: [u8; 6], address: Ipv4Addr) -> [u8; 28] {
    let mut packet = garp(ArpOp::Request, mac, address);
    packet[14..18].copy_from_slice(&[0, 0, 0, 0]);
    packet
}

#[derive(Debug, Clone, Copy)]
pub(super) enum ArpOp {
    Request = 1,
    Reply = 2,
}

/// An ARP packet (RFC 826) announcing `address` at `mac`: sender and target
/// IP are both the address. Requests leave the target MAC zero (RFC 5227's
/// announcement); replies repeat the sender MAC there, which Linux requires
/// to treat a reply as gratuitous.
pub(super) fn garp(op: ArpOp, mac: [u8; 6], address: Ipv4Addr) -> [u8; 28] {
    let mut packet = [0u8; 28];
    packet[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    packet[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    packet[4] = 6;
    packet[5] = 4;
    packet[6..8].copy_from_slice(&(op as u16).to_be_bytes());
    packet[8..14].copy_from_slice(&mac);
    packet[14..18].copy_from_slice(&address.octets());
    if matches!(op, ArpOp::Reply) {
        packet[18..24].copy_from_slice(&mac);
    }
    packet[24..28].copy_from_slice(&address.octets());
    packet
}

/// An unsolicited neighbour advertisement of `address` at `mac` (RFC 4861
/// §7.2.6): override set, solicited clear, the target link-layer address,
/// and halo's mark.
pub(super) fn unsolicited_na(mac: [u8; 6], address: Ipv6Addr) -> [u8; 40] {
    let mut m = [0u8; 40];
    m[0] = NEIGHBOUR_ADVERTISEMENT;
    m[4] = NA_OVERRIDE;
    m[8..24].copy_from_slice(&address.octets());
    m[24] = ND_OPT_TARGET_LL;
    m[25] = 1;
    m[26..32].copy_from_slice(&mac);
    m[32] = ND_OPT_HALO;
    m[33] = 1;
    m[34..40].copy_from_slice(&HALO_MARK);
    m
}

/// A duplicate-address-detection solicitation for `address` (RFC 4862
/// §5.4.2): sent from the unspecified address, so without a source
/// link-layer address.
pub(super) fn dad_solicitation(address: Ipv6Addr) -> [u8; 24] {
    let mut m = [0u8; 24];
    m[0] = NEIGHBOUR_SOLICITATION;
    m[8..24].copy_from_slice(&address.octets());
    m
}

/// A neighbour solicitation for `address` from a host with an address
/// (RFC 4861 §4.3): with our link-local address, answered by unicast.
pub(super) fn solicitation(mac: [u8; 6], address: Ipv6Addr) -> [u8; 32] {
    let mut m = [0u8; 32];
    m[..24].copy_from_slice(&dad_solicitation(address));
    m[24] = ND_OPT_SOURCE_LL;
    m[25] = 1;
    m[26..32].copy_from_slice(&mac);
    m
}

/// The solicited-node multicast group of `address` (ff02::1:ffXX:XXXX).
pub(super) fn solicited_node(address: Ipv6Addr) -> Ipv6Addr {
    let o = address.octets();
    Ipv6Addr::from([0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15]])
}

/// The Ethernet address of an IPv6 multicast group (RFC 2464 §7).
pub(super) fn multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// An IPv6 packet carrying ICMPv6 `message` (its checksum filled in), hop
/// limit 255 as neighbour discovery requires.
pub(super) fn ipv6_packet(source: Ipv6Addr, destination: Ipv6Addr, message: &[u8]) -> Vec<u8> {
    let length = u16::try_from(message.len()).expect("neighbour discovery messages are small");
    let mut packet = Vec::with_capacity(40 + message.len());
    packet.extend_from_slice(&[0x60, 0, 0, 0]);
    packet.extend_from_slice(&length.to_be_bytes());
    packet.extend_from_slice(&[ICMPV6, 255]);
    packet.extend_from_slice(&source.octets());
    packet.extend_from_slice(&destination.octets());
    let start = packet.len();
    packet.extend_from_slice(message);
    packet[start + 2..start + 4].copy_from_slice(&[0, 0]);
    let checksum = icmpv6_checksum(source, destination, &packet[start..]);
    packet[start + 2..start + 4].copy_from_slice(&checksum.to_be_bytes());
    packet
}

/// The ICMPv6 checksum (RFC 4443 §2.3) over the pseudo-header and
/// `message`, whose checksum field is zero.
fn icmpv6_checksum(source: Ipv6Addr, destination: Ipv6Addr, message: &[u8]) -> u16 {
    fn add(sum: u32, bytes: &[u8]) -> u32 {
        bytes.chunks(2).fold(sum, |sum, pair| {
            sum + u32::from(u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]))
        })
    }
    let length = u32::try_from(message.len()).expect("small");
    let mut sum = add(0, &source.octets());
    sum = add(sum, &destination.octets());
    sum = add(sum, &length.to_be_bytes());
    sum = add(sum, &[0, 0, 0, ICMPV6]);
    sum = add(sum, message);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
    const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 100);
    const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x100);

    #[test]
    fn arp_tells_a_probe_an_answer_and_an_announcement_apart() {
        let p = arp_probe(MAC, VIP);
        assert_eq!(&p[6..8], &1u16.to_be_bytes(), "a request");
        assert_eq!(&p[14..18], &[0, 0, 0, 0], "sender IP 0.0.0.0 (RFC 5227)");
        assert_eq!(&p[24..28], &VIP.octets());
        assert_eq!(heard_arp(&arp_probe(OTHER, VIP), VIP, MAC), Some(Heard::Probe));
        // Our own frames say nothing.
        assert_eq!(heard_arp(&p, VIP, MAC), None);
        assert_eq!(heard_arp(&garp(ArpOp::Reply, MAC, VIP), VIP, MAC), None);
        // A live claimer's gratuitous ARP, of either kind.
        assert_eq!(
            heard_arp(&garp(ArpOp::Reply, OTHER, VIP), VIP, MAC),
            Some(Heard::Announce(OTHER))
        );
        assert_eq!(
            heard_arp(&garp(ArpOp::Request, OTHER, VIP), VIP, MAC),
            Some(Heard::Announce(OTHER))
        );
        // A kernel's reply to a probe: from the address, to the prober
        // (0.0.0.0), so not gratuitous.
        let mut reply = garp(ArpOp::Reply, OTHER, VIP);
        reply[18..24].copy_from_slice(&MAC);
        reply[24..28].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(heard_arp(&reply, VIP, MAC), Some(Heard::Answer(OTHER)));
        // Other addresses, and short frames, say nothing.
        assert_eq!(
            heard_arp(&garp(ArpOp::Reply, OTHER, Ipv4Addr::new(198, 18, 7, 1)), VIP, MAC),
            None
        );
        assert_eq!(heard_arp(&[0u8; 10], VIP, MAC), None);
    }

    #[test]
    fn garp_request_announces_the_address_with_a_zero_target_mac() {
        let p = garp(ArpOp::Request, MAC, VIP);
        assert_eq!(&p[0..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[8..14], &MAC);
        assert_eq!(&p[14..18], &VIP.octets());
        assert_eq!(&p[18..24], &[0; 6]);
        assert_eq!(&p[24..28], &VIP.octets());
    }

    #[test]
    fn garp_reply_repeats_the_sender_mac_as_target() {
        let p = garp(ArpOp::Reply, MAC, VIP);
        assert_eq!(&p[6..8], &[0, 2]);
        assert_eq!(&p[18..24], &MAC);
        assert_eq!(&p[14..18], &p[24..28], "gratuitous: sender IP = target IP");
    }

    #[test]
    fn an_unsolicited_advertisement_overrides_and_carries_the_mac_and_halos_mark() {
        let na = unsolicited_na(MAC, VIP6);
        assert_eq!(na[0], 136);
        assert_eq!(na[4], 0x20, "override, not solicited, not router");
        assert_eq!(&na[8..24], &VIP6.octets());
        let options = nd_options(&na[24..]);
        assert_eq!(options[0], (2, &MAC[..]));
        assert_eq!(options[1], (ND_OPT_HALO, &HALO_MARK[..]));
        let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
        let packet = ipv6_packet(VIP6, all_nodes, &na);
        assert_eq!(packet.len(), 80);
        assert_eq!(&packet[..8], &[0x60, 0, 0, 0, 0, 40, 58, 255], "ICMPv6, hop limit 255");
        // A correct checksum makes the whole sum come out as zero.
        assert_eq!(icmpv6_checksum(VIP6, all_nodes, &packet[40..]), 0);
        assert_eq!(multicast_mac(all_nodes), [0x33, 0x33, 0, 0, 0, 1]);
    }

    #[test]
    fn a_dad_probe_goes_to_the_solicited_node_group_from_nowhere() {
        let ns = dad_solicitation(VIP6);
        assert_eq!(ns[0], 135);
        assert!(nd_options(&ns[24..]).is_empty(), "no source link-layer address from ::");
        let group = solicited_node(VIP6);
        assert_eq!(group, "ff02::1:ff00:100".parse::<Ipv6Addr>().unwrap());
        assert_eq!(multicast_mac(group), [0x33, 0x33, 0xff, 0, 1, 0]);
        let packet = ipv6_packet(Ipv6Addr::UNSPECIFIED, group, &ns);
        assert_eq!(icmpv6_checksum(Ipv6Addr::UNSPECIFIED, group, &packet[40..]), 0);
    }

    #[test]
    fn neighbour_discovery_tells_a_probe_an_answer_and_an_announcement_apart() {
        // Another halo-lb's advertisement: marked.
        assert_eq!(
            heard_nd(&unsolicited_na(OTHER, VIP6), VIP6, MAC),
            Some(Heard::Announce(OTHER))
        );
        // A kernel's answer to a DAD probe: the same, without the mark.
        let kernel = &unsolicited_na(OTHER, VIP6)[..32];
        assert_eq!(heard_nd(kernel, VIP6, MAC), Some(Heard::Answer(OTHER)));
        // Our own, and advertisements of other addresses: nothing.
        assert_eq!(heard_nd(&unsolicited_na(MAC, VIP6), VIP6, MAC), None);
        let elsewhere = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x11);
        assert_eq!(heard_nd(&unsolicited_na(OTHER, elsewhere), VIP6, MAC), None);
        // A DAD probe, and a neighbour resolving the address (with its own
        // link-layer address): only the first is a probe.
        assert_eq!(heard_nd(&dad_solicitation(VIP6), VIP6, MAC), Some(Heard::Probe));
        assert_eq!(heard_nd(&solicitation(OTHER, VIP6), VIP6, MAC), None);
        // Malformed options end the parse, never loop or panic.
        assert!(nd_options(&[2, 0, 1, 2, 3, 4, 5, 6]).is_empty());
        assert!(nd_options(&[2, 9, 1, 2, 3, 4, 5, 6]).is_empty());
        assert_eq!(heard_nd(&[136; 10], VIP6, MAC), None);
    }
}
