//! The programs the namespaces are made with, iproute2's `ip` and
//! nftables' `nft` (each found once, on PATH or in the sbin directories a
//! non-login PATH may lack), and running them: a failure panics with the
//! program's stderr.

use std::ffi::OsStr;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use super::INTERFACE;

/// iproute2's `ip`: on PATH, or in the sbin directories a non-login PATH
/// may lack.
pub(super) fn ip_binary() -> Result<&'static PathBuf, String> {
    static IP: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    IP.get_or_init(|| {
        let candidates = [
            PathBuf::from("ip"),
            "/usr/sbin/ip".into(),
            "/sbin/ip".into(),
            "/usr/bin/ip".into(),
        ];
        candidates
            .into_iter()
            .find(|ip| {
                Command::new(ip)
                    .arg("-V")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .ok_or_else(|| "iproute2's `ip` is not installed (apt-get install iproute2)".to_owned())
    })
    .as_ref()
    .map_err(Clone::clone)
}

pub(crate) fn ip() -> &'static PathBuf {
    ip_binary().unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `cmd`, panicking with its stderr if it fails; returns its stdout.
pub(super) fn run(cmd: &mut Command) -> String {
    let Output { status, stdout, stderr } = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !status.success() {
        panic!("{cmd:?} failed ({status}): {}", String::from_utf8_lossy(&stderr).trim());
    }
    String::from_utf8_lossy(&stdout).into_owned()
}

/// Runs `cmd` with `input` on its stdin, panicking with its stderr if it
/// fails.
pub(super) fn run_with_input(cmd: &mut Command, input: &str) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin is piped");
    if let Err(e) = stdin.write_all(input.as_bytes()) {
        panic!("cannot write to {cmd:?}: {e}");
    }
    drop(stdin);
    let Output { status, stderr, .. } = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("cannot wait for {cmd:?}: {e}"));
    if !status.success() {
        panic!(
            "{cmd:?} failed ({status}): {}\ninput:\n{input}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
}

/// nftables' `nft`, for [`Topology::cut`](super::Topology::cut); panics
/// naming the package if it is missing.
pub(super) fn nft() -> &'static PathBuf {
    static NFT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    NFT.get_or_init(|| {
        ["nft", "/usr/sbin/nft", "/sbin/nft"]
            .into_iter()
            .map(PathBuf::from)
            .find(|nft| {
                Command::new(nft)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .ok_or_else(|| "nftables' `nft` is not installed (apt-get install nftables)".to_owned())
    })
    .as_ref()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The flags of one `ip -o link show` line: `<BROADCAST,UP,…>`.
pub(super) fn link_flags(line: &str) -> Vec<String> {
    line.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(flags, _)| flags.split(',').map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The MAC of [`INTERFACE`] in `netns`, as `ip` prints it.
pub(super) fn link_mac(netns: &str) -> String {
    let link = ip_run(["-n", netns, "-o", "link", "show", "dev", INTERFACE]);
    let mut words = link.split_whitespace();
    words
        .find(|w| *w == "link/ether")
        .and_then(|_| words.next())
        .unwrap_or_else(|| panic!("no MAC in `ip link show` of {netns}: {link}"))
        .to_owned()
}

/// `ip <args>`, panicking on failure.
pub(super) fn ip_run<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new(ip()).args(args))
}
