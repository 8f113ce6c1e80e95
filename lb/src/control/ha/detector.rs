//! The standby's fast failure detector: it probes the active directly and
//! tells the election when the active is gone, long before Consul's gossip
//! or the active's check TTL would.
//!
//! Every instance answers probes on its `probe` address (UDP; by default
//! the admin address and port), in any role, with its instance and role.
//! A standby probes the key's holder every `probe_interval`:
//!
//! - an ICMP port-unreachable (the socket reports `ECONNREFUSED`) means no
//!   process listens there any more: the active died and its host lives;
//! - `probe_misses` probes in a row without an answer mean the host, its
//!   network or the process is gone or frozen (a frozen process's kernel
//!   still completes TCP handshakes, so the probe is answered by the
//!   program itself, not the kernel);
//! - another instance answering on that address means the holder's
//!   process was replaced;
//! - the holder answering `suspended` `probe_misses` times in a row means it
//!   holds the lock but cannot confirm it with the Consul servers, so it
//!   serves nothing. The election acts on this only if the servers answer
//!   the standby itself and the active is still suspended after another
//!   `probe_misses` probes: when nobody reaches the servers (a leader
//!   election), the active resumes on its own once they are back, and a
//!   forced takeover would only race it.
//!
//! The election then destroys the holder's session ("forced takeover"),
//! which starts the lock delay, and acquires. This is safe whatever the
//! detector gets wrong: the active serves only under a lease confirmed by
//! the Consul servers, which ends before the lock delay after any
//! invalidation does (see the module docs of [`crate::control::ha`]), so a false
//! alarm costs a needless failover, never two actives.
//!
//! Forced takeovers are damped ([`Damping`]) so that a broken link between
//! two balancers that both reach Consul cannot make them take the lock from
//! each other in turn.
//!
//! Probes are 96 bytes and answers at most that, so the responder cannot be
//! used to amplify traffic; anything else it receives is dropped unread
//! beyond 96 bytes.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

/// The size of a probe, and the most an answer may be.
pub(super) const PROBE_LEN: usize = 96;
const PROBE_MAGIC: &str = "HALO-PROBE 1";
const ANSWER_MAGIC: &str = "HALO-ALIVE 1";

/// The first damping window after a forced takeover or a lost lock.
pub(super) const DAMP_BASE: Duration = Duration::from_secs(30);
/// The longest damping window.
pub(super) const DAMP_MAX: Duration = Duration::from_secs(600);
/// Without incident for this long after a window ends, the next window
/// starts at [`DAMP_BASE`] again.
pub(super) const DAMP_RESET: Duration = Duration::from_secs(600);

/// What an instance says about itself in an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Answer {
    /// Echo of the probe's nonce.
    pub nonce: u64,
    /// The answering process's instance.
    pub instance: String,
    /// Its role (`active`, `suspended`, `standby`, `starting`).
    pub role: String,
}

/// A probe carrying `nonce`, padded to [`PROBE_LEN`].
pub(super) fn probe(nonce: u64) -> [u8; PROBE_LEN] {
    let mut buf = [b' '; PROBE_LEN];
    let text = format!("{PROBE_MAGIC} {nonce:016x}");
    buf[..text.len()].copy_from_slice(text.as_bytes());
    buf
}

/// The nonce of a well-formed probe.
pub(super) fn parse_probe(datagram: &[u8]) -> Option<u64> {
    if datagram.len() != PROBE_LEN {
        return None;
    }
    let text = std::str::from_utf8(datagram).ok()?;
    let mut words = text.split_ascii_whitespace();
    let magic = format!("{} {}", words.next()?, words.next()?);
    if magic != PROBE_MAGIC {
        return None;
    }
    u64::from_str_radix(words.next()?, 16).ok()
}

/// The answer to a probe, at most [`PROBE_LEN`] bytes (the instance is cut
/// to fit; ours are 16 characters).
pub(super) fn answer(nonce: u64, instance: &str, role: &str) -> Vec<u8> {
    let instance: String = instance.chars().filter(char::is_ascii_alphanumeric).take(32).collect();
    let role: String = role.chars().filter(char::is_ascii_alphabetic).take(16).collect();
    let mut text = format!("{ANSWER_MAGIC} {nonce:016x} {instance} {role}").into_bytes();
    text.truncate(PROBE_LEN);
    text
}

/// Reads an answer.
pub(super) fn parse_answer(datagram: &[u8]) -> Option<Answer> {
    let text = std::str::from_utf8(datagram).ok()?;
    let mut words = text.split_ascii_whitespace();
    let magic = format!("{} {}", words.next()?, words.next()?);
    if magic != ANSWER_MAGIC {
        return None;
    }
    Some(Answer {
        nonce: u64::from_str_radix(words.next()?, 16).ok()?,
        instance: words.next()?.to_owned(),
        role: words.next()?.to_owned(),
    })
}

/// Answers probes on `socket` until the task is dropped; `me` says who we
/// are and our role at the moment of each answer.
pub(super) async fn respond(socket: UdpSocket, me: impl Fn() -> (String, String)) {
    let mut buf = [0u8; PROBE_LEN + 1];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors from earlier answers surface here on some
                // kernels; nothing to do but go on.
                tracing::debug!(error = %e, "probe socket error");
                continue;
            }
        };
        let Some(nonce) = parse_probe(&buf[..n]) else {
            continue;
        };
        let (instance, role) = me();
        if let Err(e) = socket.send_to(&answer(nonce, &instance, &role), from).await {
            tracing::debug!(error = %e, peer = %from, "cannot answer a probe");
        }
    }
}

/// Why the detector judged the active gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Evidence {
    /// The probe was refused: nothing listens on the active's probe address.
    Refused,
    /// This many probes in a row got no answer.
    Silent(u32),
    /// Another process answers on the active's probe address.
    Replaced(String),
    /// The active answered `suspended` this many times in a row.
    NotServing(u32),
    /// Not evidence: the active's probe address reached this very process
    /// (its `probe_listen` is a loopback or otherwise local address as seen
    /// from here). The detector cannot watch that peer.
    SelfAnswered,
}

impl std::fmt::Display for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Evidence::Refused => f.write_str("its probe port refuses: the process is gone"),
            Evidence::Silent(n) => write!(f, "{n} probes in a row went unanswered"),
            Evidence::Replaced(other) => write!(f, "instance {other} answers on its probe address instead"),
            Evidence::SelfAnswered => f.write_str(
                "its probe address reaches this instance itself: set ha.probe_listen to an address the other balancers reach",
            ),
            Evidence::NotServing(n) => {
                write!(
                    f,
                    "it answered 'suspended' {n} times in a row: it cannot confirm its lease"
                )
            }
        }
    }
}

impl Evidence {
    /// For the metric label.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Evidence::Refused => "refused",
            Evidence::Silent(_) => "silent",
            Evidence::Replaced(_) => "replaced",
            Evidence::NotServing(_) => "not_serving",
            Evidence::SelfAnswered => "self_answered",
        }
    }
}

/// Probes `peer` (which must be `instance`) every `interval` and returns
/// once it is judged gone. Returns `Err` only if no socket can be made.
/// `me` is this process's own instance: an answer from it means the peer's
/// probe address leads back here (a loopback `probe_listen` on another
/// host), which is no evidence about the peer at all.
pub(super) async fn watch_peer(
    peer: SocketAddr,
    instance: &str,
    me: &str,
    interval: Duration,
    misses: u32,
) -> io::Result<Evidence> {
    let local: SocketAddr = if peer.is_ipv4() {
        "0.0.0.0:0".parse().expect("static address")
    } else {
        "[::]:0".parse().expect("static address")
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(peer).await?;
    let mut silent = 0u32;
    let mut not_serving = 0u32;
    let mut buf = [0u8; PROBE_LEN + 1];
    let mut next = Instant::now();
    loop {
        let nonce = fastrand::u64(..);
        next += interval;
        if let Err(e) = socket.send(&probe(nonce)).await {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                return Ok(Evidence::Refused);
            }
            tracing::debug!(error = %e, %peer, "cannot send a probe");
        }
        // Wait for this probe's answer until the next one is due.
        let answered = loop {
            let received = tokio::select! {
                received = socket.recv(&mut buf) => received,
                () = tokio::time::sleep_until(next) => break None,
            };
            match received {
                Ok(n) => match parse_answer(&buf[..n]) {
                    Some(a) if a.nonce == nonce => break Some(a),
                    // A late answer to an earlier probe, or noise.
                    _ => {}
                },
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(Evidence::Refused),
                Err(e) => tracing::debug!(error = %e, %peer, "probe receive failed"),
            }
        };
        match answered {
            None => {
                silent += 1;
                metrics::counter!("halo_ha_probe_misses_total").increment(1);
                if silent >= misses {
                    return Ok(Evidence::Silent(silent));
                }
            }
            Some(a) if a.instance == me && me != instance => return Ok(Evidence::SelfAnswered),
            Some(a) if a.instance != instance => return Ok(Evidence::Replaced(a.instance)),
            Some(a) => {
                silent = 0;
                if a.role == "suspended" {
                    not_serving += 1;
                    if not_serving >= misses {
                        return Ok(Evidence::NotServing(not_serving));
                    }
                } else {
                    not_serving = 0;
                }
            }
        }
        tokio::time::sleep_until(next).await;
    }
}

/// Damping of forced takeovers: after this instance lost the lock *while it
/// was serving under a valid lease* (a takeover it did not deserve, as far
/// as it can tell), it forces no takeover for a window that doubles with
/// every such incident (from [`DAMP_BASE`] to [`DAMP_MAX`]) and starts over
/// after [`DAMP_RESET`] without one. Consul's own detection (the active's
/// check TTL, its node's serfHealth) still works meanwhile; only the
/// shortcut is held back.
///
/// Two balancers cut apart from each other (both reaching Consul): the
/// standby forces once and becomes active; the old active lost its lock
/// while serving, so it is damped, and does not force it back while the
/// link stays broken. An active that lost its lock after its lease had run
/// out (cut off from Consul, frozen, its cable pulled) deserved the
/// takeover and is not damped: the next real failure of the other side is
/// handled as fast as the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Damping {
    until: Option<Instant>,
    window: Duration,
}

impl Default for Damping {
    fn default() -> Self {
        Damping {
            until: None,
            window: DAMP_BASE,
        }
    }
}

impl Damping {
    /// Records an incident (a forced takeover, or losing the lock) at `now`.
    pub(super) fn incident(&mut self, now: Instant) {
        if let Some(until) = self.until {
            if now >= until + DAMP_RESET {
                self.window = DAMP_BASE;
            } else if now < until + self.window {
                self.window = (self.window * 2).min(DAMP_MAX);
            }
        }
        self.until = Some(now + self.window);
    }

    /// Whether a forced takeover is allowed at `now`.
    pub(super) fn allows(&self, now: Instant) -> bool {
        self.until.is_none_or(|until| now >= until)
    }

    /// When the current window ends, if one runs at `now`.
    pub(super) fn until(&self, now: Instant) -> Option<Instant> {
        self.until.filter(|&u| u > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_and_answers_round_trip_and_garbage_is_ignored() {
        let p = probe(0xdead_beef);
        assert_eq!(p.len(), PROBE_LEN);
        assert_eq!(parse_probe(&p), Some(0xdead_beef));
        assert_eq!(parse_probe(b"HALO-PROBE 1 00000000deadbeef"), None, "unpadded");
        assert_eq!(parse_probe(&[0xff; PROBE_LEN]), None);
        let a = answer(7, "0123456789abcdef", "active");
        assert!(a.len() <= PROBE_LEN, "no amplification");
        assert_eq!(
            parse_answer(&a),
            Some(Answer {
                nonce: 7,
                instance: "0123456789abcdef".into(),
                role: "active".into()
            })
        );
        let long = answer(u64::MAX, &"x".repeat(500), &"y".repeat(500));
        assert!(long.len() <= PROBE_LEN);
        assert_eq!(parse_answer(b"HALO-ALIVE 1 zz a b"), None);
    }

    #[test]
    fn damping_doubles_with_incidents_and_resets_after_a_quiet_spell() {
        let t0 = Instant::now();
        let mut d = Damping::default();
        assert!(d.allows(t0));
        d.incident(t0);
        assert!(!d.allows(t0 + DAMP_BASE - Duration::from_millis(1)));
        assert!(d.allows(t0 + DAMP_BASE));
        // A second incident soon after: twice the window.
        let t1 = t0 + DAMP_BASE + Duration::from_secs(1);
        d.incident(t1);
        assert!(!d.allows(t1 + DAMP_BASE));
        assert!(d.allows(t1 + DAMP_BASE * 2));
        // Capped.
        let mut t = t1;
        for _ in 0..10 {
            t += Duration::from_secs(1);
            d.incident(t);
        }
        assert_eq!(d.until(t), Some(t + DAMP_MAX));
        // Quiet for DAMP_RESET past the window: back to the base.
        let later = t + DAMP_MAX + DAMP_RESET;
        d.incident(later);
        assert_eq!(d.until(later), Some(later + DAMP_BASE));
    }

    #[tokio::test]
    async fn a_dead_peer_is_refused_a_silent_one_missed_a_live_one_kept() {
        // Refused: a port nobody listens on (loopback answers ICMP).
        let gone = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        let e = watch_peer(addr, "x", "me", Duration::from_millis(20), 3).await.unwrap();
        assert_eq!(e, Evidence::Refused);

        // Silent: bound, never answers.
        let mute = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let e = watch_peer(mute.local_addr().unwrap(), "x", "me", Duration::from_millis(20), 3)
            .await
            .unwrap();
        assert_eq!(e, Evidence::Silent(3));

        // Alive, then replaced by another instance.
        let live = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = live.local_addr().unwrap();
        let answers = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = std::sync::Arc::clone(&answers);
        let responder = tokio::spawn(respond(live, move || {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let instance = if n < 10 { "aaaa" } else { "bbbb" };
            (instance.to_owned(), "active".to_owned())
        }));
        let e = watch_peer(addr, "aaaa", "me", Duration::from_millis(10), 3)
            .await
            .unwrap();
        assert_eq!(e, Evidence::Replaced("bbbb".into()));
        assert!(
            answers.load(std::sync::atomic::Ordering::Relaxed) >= 10,
            "kept while alive"
        );
        responder.abort();

        // The peer's advertised address leads back to ourselves (a loopback
        // probe_listen seen from another host): no evidence, never forced.
        let own = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = own.local_addr().unwrap();
        let responder = tokio::spawn(respond(own, || ("me".to_owned(), "standby".to_owned())));
        let e = watch_peer(addr, "peer", "me", Duration::from_millis(10), 3)
            .await
            .unwrap();
        assert_eq!(e, Evidence::SelfAnswered);
        responder.abort();
    }
}
