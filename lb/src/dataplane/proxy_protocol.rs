//! PROXY protocol headers (HAProxy's spec, versions 1 and 2) sent to backends
//! ahead of the client's bytes, so they see the real client address.

use std::net::SocketAddr;

use crate::settings::ProxyProtocol;

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header for a connection from `client` to `local` (the VIP address it
/// arrived on); empty when the protocol is off.
pub(crate) fn header(version: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = normalise(client, local);
    match version {
        ProxyProtocol::Off => Vec::new(),
        ProxyProtocol::V1 => v1(client, local),
        ProxyProtocol::V2 => v2(client, local, STREAM),
    }
}

/// The version 2 header of a UDP flow (its DGRAM form: `0x12` UDP over
/// IPv4, `0x22` over IPv6), sent in front of every datagram of the flow,
/// since a datagram may be lost and each must stand alone.
pub(crate) fn header_dgram(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = normalise(client, local);
    v2(client, local, DGRAM)
}

/// The low nibble of the address-family byte: the transport.
const STREAM: u8 = 0x1;
const DGRAM: u8 = 0x2;

fn normalise(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    // Mixed families (an IPv4 client on a dual-stack IPv6 listener) are
    // reported with the mapped address normalised to the client's family.
    match (client, local) {
        (SocketAddr::V4(_), SocketAddr::V6(l)) => match l.ip().to_ipv4_mapped() {
            Some(ip) => (client, SocketAddr::from((ip, l.port()))),
            None => (client, local),
        },
        (SocketAddr::V6(c), SocketAddr::V4(_)) => match c.ip().to_ipv4_mapped() {
            Some(ip) => (SocketAddr::from((ip, c.port())), local),
            None => (client, local),
        },
        _ => (client, local),
    }
}

fn v1(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            format!("PROXY TCP4 {} {} {} {}\r\n", c.ip(), l.ip(), c.port(), l.port()).into_bytes()
        }
        (SocketAddr::V6(c), SocketAddr::V6(l)) => {
            format!("PROXY TCP6 {} {} {} {}\r\n", c.ip(), l.ip(), c.port(), l.port()).into_bytes()
        }
        _ => b"PROXY UNKNOWN\r\n".to_vec(),
    }
}

fn v2(client: SocketAddr, local: SocketAddr, transport: u8) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x21); // version 2, PROXY command
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            h.push(0x10 | transport); // IPv4: TCP 0x11, UDP 0x12
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&c.ip().octets());
            h.extend_from_slice(&l.ip().octets());
            h.extend_from_slice(&c.port().to_be_bytes());
            h.extend_from_slice(&l.port().to_be_bytes());
        }
        (SocketAddr::V6(c), SocketAddr::V6(l)) => {
            h.push(0x20 | transport); // IPv6: TCP 0x21, UDP 0x22
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&c.ip().octets());
            h.extend_from_slice(&l.ip().octets());
            h.extend_from_slice(&c.port().to_be_bytes());
            h.extend_from_slice(&l.port().to_be_bytes());
        }
        _ => {
            h.push(0x00); // UNSPEC
            h.extend_from_slice(&0u16.to_be_bytes());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_is_the_text_line_of_the_spec() {
        let h = header(
            ProxyProtocol::V1,
            "192.0.2.1:56324".parse().unwrap(),
            "198.18.0.10:443".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.1 198.18.0.10 56324 443\r\n");
        let h = header(
            ProxyProtocol::V1,
            "[2001:db8::1]:1000".parse().unwrap(),
            "[2001:db8::2]:80".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP6 2001:db8::1 2001:db8::2 1000 80\r\n");
        assert!(header(
            ProxyProtocol::Off,
            "1.2.3.4:1".parse().unwrap(),
            "1.2.3.4:2".parse().unwrap()
        )
        .is_empty());
    }

    #[test]
    fn v2_is_the_binary_layout_of_the_spec() {
        let h = header(
            ProxyProtocol::V2,
            "192.0.2.1:56324".parse().unwrap(),
            "198.18.0.10:443".parse().unwrap(),
        );
        let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 18, 0, 10]);
        want.extend_from_slice(&56324u16.to_be_bytes());
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(h, want);
        let h6 = header(
            ProxyProtocol::V2,
            "[2001:db8::1]:1".parse().unwrap(),
            "[2001:db8::2]:2".parse().unwrap(),
        );
        assert_eq!(h6.len(), 16 + 36);
        assert_eq!(&h6[12..16], &[0x21, 0x21, 0, 36]);
    }

    #[test]
    fn the_dgram_form_differs_only_in_its_transport() {
        let (c, l) = ("192.0.2.1:56324".parse().unwrap(), "198.18.0.10:53".parse().unwrap());
        let stream = header(ProxyProtocol::V2, c, l);
        let dgram = header_dgram(c, l);
        assert_eq!(dgram[13], 0x12, "UDP over IPv4");
        assert_eq!(dgram[..13], stream[..13]);
        assert_eq!(dgram[14..], stream[14..]);
        let h6 = header_dgram("[2001:db8::1]:1".parse().unwrap(), "[2001:db8::2]:53".parse().unwrap());
        assert_eq!(&h6[12..16], &[0x21, 0x22, 0, 36], "UDP over IPv6");
    }
}

/// Our headers checked by an independent parser (the `ppp` crate) for
/// random addresses of both families, including mixed ones.
#[cfg(test)]
mod against_ppp {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    use proptest::prelude::*;

    use super::header;
    use crate::settings::ProxyProtocol;

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<u32>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((Ipv4Addr::from(ip), port))),
            (any::<u128>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((Ipv6Addr::from(ip), port))),
            // IPv4-mapped IPv6: what a dual-stack listener reports.
            (any::<u32>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::from((Ipv4Addr::from(ip).to_ipv6_mapped(), port))),
        ]
    }

    /// The pair as both ends should be reported: mapped addresses become
    /// IPv4 when the other side is IPv4.
    fn normalised(client: SocketAddr, local: SocketAddr) -> Option<(SocketAddr, SocketAddr)> {
        let v4 = |a: SocketAddr| match a.ip() {
            IpAddr::V6(ip) => ip.to_ipv4_mapped().map(|ip| SocketAddr::from((ip, a.port()))),
            IpAddr::V4(_) => Some(a),
        };
        match (client.is_ipv4(), local.is_ipv4()) {
            (true, true) | (false, false) => Some((client, local)),
            (true, false) => v4(local).map(|l| (client, l)),
            (false, true) => v4(client).map(|c| (c, local)),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
        ))]

        #[test]
        fn v1_headers_parse_back_to_the_same_addresses(client in addr(), local in addr()) {
            let bytes = header(ProxyProtocol::V1, client, local);
            prop_assert!(bytes.len() <= 107, "v1 headers are at most 107 bytes");
            let text = std::str::from_utf8(&bytes).unwrap();
            let parsed = ppp::v1::Header::try_from(text).map_err(|e| TestCaseError::fail(format!("{e:?}: {text:?}")))?;
            match (normalised(client, local), parsed.addresses) {
                (Some((c, l)), ppp::v1::Addresses::Tcp4(a)) => {
                    prop_assert_eq!(SocketAddr::from((a.source_address, a.source_port)), c);
                    prop_assert_eq!(SocketAddr::from((a.destination_address, a.destination_port)), l);
                }
                (Some((c, l)), ppp::v1::Addresses::Tcp6(a)) => {
                    prop_assert_eq!(SocketAddr::from((a.source_address, a.source_port)), c);
                    prop_assert_eq!(SocketAddr::from((a.destination_address, a.destination_port)), l);
                }
                (None, ppp::v1::Addresses::Unknown) => {}
                (want, got) => prop_assert!(false, "{:?} parsed as {:?}", want, got),
            }
        }

        #[test]
        fn v2_headers_parse_back_to_the_same_addresses(client in addr(), local in addr()) {
            let bytes = header(ProxyProtocol::V2, client, local);
            let parsed = ppp::v2::Header::try_from(bytes.as_slice()).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            prop_assert_eq!(parsed.command, ppp::v2::Command::Proxy);
            prop_assert_eq!(parsed.len(), bytes.len(), "the length field covers exactly what we sent");
            match (normalised(client, local), parsed.addresses) {
                (Some((c, l)), ppp::v2::Addresses::IPv4(a)) => {
                    prop_assert_eq!(parsed.protocol, ppp::v2::Protocol::Stream);
                    prop_assert_eq!(SocketAddr::from((a.source_address, a.source_port)), c);
                    prop_assert_eq!(SocketAddr::from((a.destination_address, a.destination_port)), l);
                }
                (Some((c, l)), ppp::v2::Addresses::IPv6(a)) => {
                    prop_assert_eq!(parsed.protocol, ppp::v2::Protocol::Stream);
                    prop_assert_eq!(SocketAddr::from((a.source_address, a.source_port)), c);
                    prop_assert_eq!(SocketAddr::from((a.destination_address, a.destination_port)), l);
                }
                (None, ppp::v2::Addresses::Unspecified) => {}
                (want, got) => prop_assert!(false, "{:?} parsed as {:?}", want, got),
            }
        }
    }
}
