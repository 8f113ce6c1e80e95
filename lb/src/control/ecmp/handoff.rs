//! The handoff of a draining member's connections.
//!
//! halo-lb terminates TCP. When a draining instance withdraws its routes,
//! the routers send its flows to the other instances, whose kernels know
//! nothing of those connections and reset them. So before it withdraws, a
//! draining instance (B) waits until every announcing peer (A) has set up
//! the handoff: A passes on to B, unchanged, every TCP packet for a VIP
//! that belongs to no connection of A's own, and B keeps the VIP addresses
//! local (not announced) while it finishes its connections. New
//! connections (SYNs) stay with A. This is GLB's "second chance" and
//! Katran's, for the one case where the owner of a flow is known: a
//! draining member, named in Consul.
//!
//! # How A tells its own connections from others'
//!
//! An nftables table `ip halo_ecmp`, one chain at the `prerouting` hook:
//!
//! 1. every packet to a VIP's address and TCP port gets the mark
//!    [`MARK`]; with `net.ipv4.tcp_fwmark_accept = 1` (set at start) a
//!    connection the kernel accepts takes the mark of its handshake, so
//!    every socket of A's own VIP connections carries it, from the moment
//!    the kernel creates it (before halo-lb even accepts it);
//! 2. while a member drains: a packet to a VIP that is not a SYN and whose
//!    socket lookup (`socket mark`) finds only the listener (mark 0: no
//!    connection of A's) is duplicated to B's address (`dup to`: sent to
//!    B's link-layer address with its destination unchanged) and dropped.
//!    A packet that matches no socket at all, or a TIME_WAIT one, is left
//!    to the kernel.
//!
//! It needs the instances on one link (the dup is sent to B as a
//! neighbour), `nft` (Debian's `nftables`), IPv4 VIPs (IPv6 VIPs are
//! withdrawn without a handoff) and, on B, nothing else: the packets
//! arrive with the VIP as their destination, which B keeps local.
//!
//! # What can go wrong
//!
//! - Only one member is handed to at a time (the longest-standing of the
//!   draining ones): of two members draining at once, the second's
//!   connections are reset when its routes go. Drain one at a time.
//! - A draining member never forwards, so packets cannot loop.
//! - A is killed (-9) with the forward rule in place: the table stays
//!   behind, harmless (A's addresses left with its process, so no VIP
//!   traffic reaches A's host), and the next start replaces it.
//! - What the network can do: a forged non-SYN packet to a VIP reaches B
//!   instead of A, and B's kernel resets it as A's would have; one packet
//!   in, one out, no amplification. Who is draining comes from Consul
//!   (ACL-protected writes), never from the network.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The mark of VIP packets, and so of the sockets of this instance's own
/// VIP connections ("HA").
pub(crate) const MARK: u32 = 0x4841;

/// The nftables table this module owns.
const TABLE: &str = "halo_ecmp";

/// The rules in force, and what they were made from.
#[derive(Debug)]
pub(crate) struct Handoff {
    nft: PathBuf,
    vips: Vec<(Ipv4Addr, u16)>,
    target: Option<Ipv4Addr>,
}

impl Handoff {
    /// Finds `nft`, turns on `tcp_fwmark_accept` and installs the marking
    /// rule for `vips`; an error says why the handoff is off.
    pub(crate) fn start(vips: Vec<(Ipv4Addr, u16)>) -> Result<Handoff, String> {
        let nft = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| "nft is not installed (Debian package nftables)".to_owned())?;
        const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
        if let Err(write) = std::fs::write(FWMARK_ACCEPT, "1") {
            // Set already (packaging/systemd/halo-lb.service.d/ecmp.conf
            // does, as root, for a process that may not)?
            match std::fs::read_to_string(FWMARK_ACCEPT) {
                Ok(value) if value.trim() == "1" => {}
                Ok(_) => return Err(format!("net.ipv4.tcp_fwmark_accept is 0 and cannot be set: {write}")),
                Err(read) => {
                    return Err(format!(
                        "cannot set net.ipv4.tcp_fwmark_accept ({write}) nor read it ({read})"
                    ))
                }
            }
        }
        let mut handoff = Handoff {
            nft,
            vips: Vec::new(),
            target: None,
        };
        handoff.apply(&vips, None)?;
        handoff.vips = vips;
        Ok(handoff)
    }

    /// Makes the rules match `vips` and hand over to `target` (none: no
    /// forwarding). Does nothing if neither changed; true if it did.
    pub(crate) fn set(&mut self, vips: &[(Ipv4Addr, u16)], target: Option<Ipv4Addr>) -> Result<bool, String> {
        if vips == self.vips && target == self.target {
            return Ok(false);
        }
        self.apply(vips, target)?;
        self.vips = vips.to_vec();
        self.target = target;
        Ok(true)
    }

    /// The member handed over to now.
    pub(crate) fn target(&self) -> Option<Ipv4Addr> {
        self.target
    }

    /// Replaces the whole table in one transaction (`nft -f`).
    fn apply(&self, vips: &[(Ipv4Addr, u16)], target: Option<Ipv4Addr>) -> Result<(), String> {
        let script = ruleset(vips, target);
        let mut child = Command::new(&self.nft)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.nft.display()))?;
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().ok_or("nft has no stdin")?;
            stdin
                .write_all(script.as_bytes())
                .map_err(|e| format!("cannot write to nft: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("cannot wait for nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nft refused the handoff rules ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Deletes the table (on a clean exit).
    pub(crate) fn remove(&self) {
        let result = Command::new(&self.nft)
            .args(["delete", "table", "ip", TABLE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !result.is_ok_and(|s| s.success()) {
            tracing::debug!("cannot delete the handoff table; the next start replaces it");
        }
    }
}

/// The `nft -f` script: create the table (so that deleting it cannot fail),
/// delete it, and make it anew, all in one transaction.
fn ruleset(vips: &[(Ipv4Addr, u16)], target: Option<Ipv4Addr>) -> String {
    let mut out = format!("table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    out.push_str("    set vips {\n        type ipv4_addr . inet_service\n");
    if !vips.is_empty() {
        let elements: Vec<String> = vips.iter().map(|(ip, port)| format!("{ip} . {port}")).collect();
        out.push_str(&format!("        elements = {{ {} }}\n", elements.join(", ")));
    }
    out.push_str("    }\n");
    out.push_str("    chain prerouting {\n        type filter hook prerouting priority mangle; policy accept;\n");
    out.push_str(&format!("        ip daddr . tcp dport @vips meta mark set {MARK:#x}\n"));
    if let Some(target) = target {
        out.push_str(&format!(
            "        ip daddr . tcp dport @vips tcp flags & syn == 0 socket mark 0 dup to {target} drop\n"
        ));
    }
    out.push_str("    }\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_marks_vip_traffic_and_forwards_only_with_a_target() {
        let vips = [
            (Ipv4Addr::new(198, 19, 0, 200), 80),
            (Ipv4Addr::new(198, 19, 0, 201), 443),
        ];
        let quiet = ruleset(&vips, None);
        assert!(
            quiet.starts_with("table ip halo_ecmp\ndelete table ip halo_ecmp\n"),
            "{quiet}"
        );
        assert!(
            quiet.contains("elements = { 198.19.0.200 . 80, 198.19.0.201 . 443 }"),
            "{quiet}"
        );
        assert!(quiet.contains("meta mark set 0x4841"), "{quiet}");
        assert!(!quiet.contains("dup"), "{quiet}");
        let forwarding = ruleset(&vips, Some(Ipv4Addr::new(198, 18, 0, 12)));
        assert!(
            forwarding.contains("tcp flags & syn == 0 socket mark 0 dup to 198.18.0.12 drop"),
            "{forwarding}"
        );
        let empty = ruleset(&[], None);
        assert!(!empty.contains("elements"), "{empty}");
    }
}
