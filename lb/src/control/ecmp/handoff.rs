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
//! An nftables table `ip haloecmp`, one chain at the `prerouting` hook:
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
//! - SYN cookies: while A's listener overflows (a SYN flood), a
//!   handshake's last ACK finds no request socket, only the listener, so
//!   during a drain it is passed to B, which resets it: under a SYN flood,
//!   a drain costs A some new connections.
//! - A reload that adds a VIP port on an announced address: for up to
//!   100 ms (until the next evaluation writes the set), its connections
//!   carry no mark and would be passed to a member draining right then.
//! - `nft flush ruleset` (a reload of nftables.service) deletes the table:
//!   it is written again within 30 s ([`REFRESH`]), and at once whenever
//!   a member starts or stops draining.
//! - A is killed (-9) with the forward rule in place: the table stays
//!   behind, harmless (A's addresses left with its process, so no VIP
//!   traffic reaches A's host), and the next start replaces it.
//! - What the network can do: a forged non-SYN packet to a VIP reaches B
//!   instead of A, and B's kernel resets it as A's would have; one packet
//!   in, one out, no amplification. Who is draining comes from Consul
//!   (ACL-protected writes), never from the network.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::time::Instant;

/// The mark of VIP packets, and so of the sockets of this instance's own
/// VIP connections ("HA").
pub(crate) const MARK: u32 = 0x4841;

/// The nftables table this module owns.
const TABLE: &str = "haloecmp";

/// Longest an `nft` run may take before it is killed (it answers in
/// milliseconds; the membership loop, which times the lease, waits on it).
const NFT_TIMEOUT: Duration = Duration::from_secs(2);

/// The rules are written again this often even when nothing changed: an
/// `nft flush ruleset` (a reload of nftables.service) would otherwise
/// leave this instance's connections unmarked without anyone noticing.
const REFRESH: Duration = Duration::from_secs(30);

/// After a failed `nft` run, the next try waits this long.
const RETRY: Duration = Duration::from_secs(5);

/// The rules in force, and what they were made from.
#[derive(Debug)]
pub(crate) struct Handoff {
    nft: PathBuf,
    vips: Vec<(Ipv4Addr, u16)>,
    target: Option<Ipv4Addr>,
    /// When the rules were last written, or last failed to be.
    applied: Instant,
    failed: bool,
}

impl Handoff {
    /// Finds `nft`, turns on `tcp_fwmark_accept`, checks that the kernel
    /// has what the forwarding rule needs (`nft -c`: the `socket` and `dup`
    /// expressions) and installs the marking rule for `vips`; an error says
    /// why the handoff is off.
    pub(crate) async fn start(vips: Vec<(Ipv4Addr, u16)>) -> Result<Handoff, String> {
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
        // The forwarding rule as it will be, checked but not applied.
        run(&nft, &["-c", "-f", "-"], &ruleset(&vips, Some(Ipv4Addr::LOCALHOST)))
            .await
            .map_err(|e| format!("the kernel or nft cannot run the handoff rules: {e}"))?;
        run(&nft, &["-f", "-"], &ruleset(&vips, None)).await?;
        Ok(Handoff {
            nft,
            vips,
            target: None,
            applied: Instant::now(),
            failed: false,
        })
    }

    /// Makes the rules match `vips` and hand over to `target` (none: no
    /// forwarding); writes them again every [`REFRESH`] too. After a
    /// failure, waits [`RETRY`] before the next try. True if the rules now
    /// hand over to `target`.
    pub(crate) async fn set(&mut self, vips: &[(Ipv4Addr, u16)], target: Option<Ipv4Addr>) -> Result<bool, String> {
        let changed = vips != self.vips || target != self.target;
        let now = Instant::now();
        if self.failed && now.duration_since(self.applied) < RETRY {
            return Ok(false);
        }
        if !changed && !self.failed && now.duration_since(self.applied) < REFRESH {
            return Ok(target == self.target);
        }
        self.applied = now;
        match run(&self.nft, &["-f", "-"], &ruleset(vips, target)).await {
            Ok(()) => {
                self.failed = false;
                self.vips = vips.to_vec();
                self.target = target;
                Ok(true)
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// The member handed over to now.
    pub(crate) fn target(&self) -> Option<Ipv4Addr> {
        self.target
    }

    /// Deletes the table (on a clean exit).
    pub(crate) async fn remove(&self) {
        if let Err(e) = run(&self.nft, &["delete", "table", "ip", TABLE], "").await {
            tracing::debug!(error = %e, "cannot delete the handoff table; the next start replaces it");
        }
    }
}

/// Runs `nft args…` with `input` on its stdin, within [`NFT_TIMEOUT`]
/// (killed past it).
async fn run(nft: &PathBuf, args: &[&str], input: &str) -> Result<(), String> {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new(nft)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", nft.display()))?;
    let mut stdin = child.stdin.take().ok_or("nft has no stdin")?;
    let work = async move {
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(|e| format!("cannot write to nft: {e}"))?;
        drop(stdin);
        child
            .wait_with_output()
            .await
            .map_err(|e| format!("cannot wait for nft: {e}"))
    };
    let out = tokio::time::timeout(NFT_TIMEOUT, work)
        .await
        .map_err(|_| format!("nft did not finish in {NFT_TIMEOUT:?}; killed"))??;
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
            quiet.starts_with("table ip haloecmp\ndelete table ip haloecmp\n"),
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
