//! The standby's fast failure detector: it probes the active directly and
//! tells the election when the active is gone, long before Consul's gossip
//! or the active's check TTL would.
//!
//! Every instance answers probes on its probe address (UDP; see
//! [`super::advertise`] for how it is chosen), in any role, with its
//! instance and role. A standby probes the key's holder every
//! `probe_interval`:
//!
//! - a **refused** probe means no process listens there any more: the
//!   active died and its host lives. The refusal is an ICMP
//!   port-unreachable, which anyone can forge, so it is only a hint; it is
//!   acted on only once **corroborated** by a TCP connection to the same
//!   address being refused too (below);
//! - `probe_misses` probes in a row without an authenticated answer mean
//!   the host, its network or the process is gone or frozen (a frozen
//!   process's kernel still completes TCP handshakes, so the probe is
//!   answered by the program itself, not the kernel);
//! - another instance answering on that address (authenticated) means the
//!   holder's process was replaced;
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
//! invalidation does (see the module docs of [`crate::control::ha`]), so a
//! false alarm costs a needless failover, never two actives. What follows
//! keeps false alarms out of an attacker's reach.
//!
//! # What on the network can change state here
//!
//! - **Probes and answers are authenticated** with the cluster's pair key
//!   ([`super::pair_key`]): a 128-bit HMAC-SHA256 tag over the whole
//!   datagram. The responder drops, unanswered, anything without a valid
//!   tag, so it is no reflector; an answer counts only if its tag is valid
//!   and it echoes the probe's fresh 64-bit nonce, so neither a forged nor
//!   a replayed answer can make a dead active look alive (an impostor on a
//!   dead active's port delays nothing: its answers are silence), nor a
//!   live one look replaced.
//! - **A refusal is corroborated.** Every instance also listens for TCP on
//!   its probe address (or its admin API does, when the two are one) and
//!   accepts and closes whatever connects. On an ICMP refusal the standby
//!   connects there over TCP: only if that connection is refused too is the
//!   process gone. A forged TCP reset or ICMP error cannot refuse that
//!   connection from off the path: the kernel accepts either only if it
//!   quotes the connection's random 32-bit initial sequence number (and
//!   its random source port). A live process's listener completes the
//!   handshake, so a forged ICMP message costs one TCP connection, counted
//!   in `halo_ha_probe_refusals_uncorroborated_total`, and nothing else.
//! - **Floods.** The responder runs on a thread of its own (`halo-probe`,
//!   never the election's, which times the lease), reads with a larger
//!   receive buffer, drops without a tag check whatever one source sends beyond
//!   [`ANSWERS_PER_SECOND`] datagrams a second, spends one tag check on the
//!   rest before anything else, and answers only authentic probes; answers
//!   are smaller than probes, so nothing is amplified.
//!
//! Forced takeovers are damped ([`super::damping`]) so that a broken link
//! between two balancers that both reach Consul cannot make them take the
//! lock from each other in turn.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::pair_key::{KeyRing, TAG_LEN};

/// The probe protocol, advertised in the lock's value: 2 is the
/// authenticated one below (1 was plain text, before the pair key).
pub(super) const PROTOCOL: u32 = 2;
/// The size of a probe. Anything else the responder receives is dropped.
pub(super) const PROBE_LEN: usize = 64;
/// The size of an answer: less than a probe, so the responder amplifies
/// nothing.
pub(super) const ANSWER_LEN: usize = 48;
const PROBE_MAGIC: &[u8; 6] = b"HALO\x02P";
const ANSWER_MAGIC: &[u8; 6] = b"HALO\x02A";
/// Datagrams per second from one source address that the responder looks
/// at, at most; the rest are dropped before the tag check (a standby probes 10 times a
/// second by default, at most 100).
pub(super) const ANSWERS_PER_SECOND: f64 = 200.0;
/// Sources the responder tracks for its rate limit; past this it forgets
/// the idle ones, and if none is idle, answers no new source until one is.
const SOURCES_TRACKED: usize = 4096;
/// Receive buffer asked for the responder's socket: room for a burst of a
/// few thousand datagrams, not so much that a legitimate probe waits long
/// behind a flood.
const RESPONDER_RCVBUF: usize = 1 << 20;
/// Sends of one probe, at most, while pending ICMP errors fail them.
const SEND_ATTEMPTS: usize = 4;
/// Floor of the TCP corroboration's deadline.
const CORROBORATE_MIN: Duration = Duration::from_millis(50);

/// An instance's role as an answer states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AnswerRole {
    Active,
    Suspended,
    Standby,
    Starting,
}

impl AnswerRole {
    fn code(self) -> u8 {
        match self {
            AnswerRole::Active => 1,
            AnswerRole::Suspended => 2,
            AnswerRole::Standby => 3,
            AnswerRole::Starting => 4,
        }
    }

    fn from_code(code: u8) -> Option<AnswerRole> {
        Some(match code {
            1 => AnswerRole::Active,
            2 => AnswerRole::Suspended,
            3 => AnswerRole::Standby,
            4 => AnswerRole::Starting,
            _ => return None,
        })
    }
}

/// What an instance says about itself in an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Answer {
    /// Echo of the probe's nonce.
    pub nonce: u64,
    /// The answering process's instance (16 hex digits).
    pub instance: String,
    /// Its role.
    pub role: AnswerRole,
}

/// An instance as 16 hex digits, as a number for the wire.
fn instance_number(instance: &str) -> u64 {
    u64::from_str_radix(instance, 16).unwrap_or(0)
}

/// A probe carrying `nonce`, tagged with the ring's current key.
pub(super) fn probe(nonce: u64, keys: &KeyRing) -> [u8; PROBE_LEN] {
    let mut buf = [0u8; PROBE_LEN];
    buf[..6].copy_from_slice(PROBE_MAGIC);
    buf[6..14].copy_from_slice(&nonce.to_be_bytes());
    let tag = keys.tag(&buf[..PROBE_LEN - TAG_LEN]);
    buf[PROBE_LEN - TAG_LEN..].copy_from_slice(&tag);
    buf
}

/// The nonce of an authentic probe.
pub(super) fn parse_probe(datagram: &[u8], keys: &KeyRing) -> Option<u64> {
    if datagram.len() != PROBE_LEN || &datagram[..6] != PROBE_MAGIC {
        return None;
    }
    let (body, tag) = datagram.split_at(PROBE_LEN - TAG_LEN);
    keys.verify(body, tag)
        .then(|| u64::from_be_bytes(body[6..14].try_into().expect("8 bytes")))
}

/// The answer to a probe.
pub(super) fn answer(nonce: u64, instance: &str, role: AnswerRole, keys: &KeyRing) -> [u8; ANSWER_LEN] {
    let mut buf = [0u8; ANSWER_LEN];
    buf[..6].copy_from_slice(ANSWER_MAGIC);
    buf[6..14].copy_from_slice(&nonce.to_be_bytes());
    buf[14..22].copy_from_slice(&instance_number(instance).to_be_bytes());
    buf[22] = role.code();
    let tag = keys.tag(&buf[..ANSWER_LEN - TAG_LEN]);
    buf[ANSWER_LEN - TAG_LEN..].copy_from_slice(&tag);
    buf
}

/// Reads an authentic answer.
pub(super) fn parse_answer(datagram: &[u8], keys: &KeyRing) -> Option<Answer> {
    if datagram.len() != ANSWER_LEN || &datagram[..6] != ANSWER_MAGIC {
        return None;
    }
    let (body, tag) = datagram.split_at(ANSWER_LEN - TAG_LEN);
    if !keys.verify(body, tag) {
        return None;
    }
    Some(Answer {
        nonce: u64::from_be_bytes(body[6..14].try_into().expect("8 bytes")),
        instance: format!("{:016x}", u64::from_be_bytes(body[14..22].try_into().expect("8 bytes"))),
        role: AnswerRole::from_code(body[22])?,
    })
}

/// Per-source token buckets for the responder.
struct RateLimit {
    sources: HashMap<IpAddr, (f64, Instant)>,
}

impl RateLimit {
    fn new() -> RateLimit {
        RateLimit {
            sources: HashMap::new(),
        }
    }

    /// Whether `from` may have an answer at `now`.
    fn allow(&mut self, from: IpAddr, now: Instant) -> bool {
        let burst = ANSWERS_PER_SECOND / 4.0;
        if !self.sources.contains_key(&from) && self.sources.len() >= SOURCES_TRACKED {
            // Forget sources idle long enough to have a full bucket again.
            let full_after = Duration::from_secs(1);
            self.sources
                .retain(|_, (_, last)| now.duration_since(*last) < full_after);
            if self.sources.len() >= SOURCES_TRACKED {
                return false;
            }
        }
        let (tokens, last) = self.sources.entry(from).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * ANSWERS_PER_SECOND).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Answers authentic probes on `socket` until `stop`; `me` says who we are
/// and our role at the moment of each answer. With `tcp`, also accepts and
/// closes every connection on it: the listener that makes a refusal of
/// this address corroborable (see the module docs).
pub(super) async fn respond(
    socket: UdpSocket,
    tcp: Option<TcpListener>,
    keys: Arc<ArcSwap<KeyRing>>,
    me: impl Fn() -> (String, AnswerRole),
    stop: CancellationToken,
) {
    if let Err(e) = enlarge_receive_buffer(&socket) {
        tracing::debug!(error = %e, "cannot enlarge the probe socket's receive buffer");
    }
    let accepting = async {
        let Some(tcp) = tcp else {
            return std::future::pending().await;
        };
        loop {
            match tcp.accept().await {
                // Connected is all a corroborating standby needs to see.
                Ok((stream, _)) => drop(stream),
                Err(e) => {
                    // EMFILE and the like: back off rather than spin.
                    tracing::debug!(error = %e, "probe listener accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    };
    let answering = async {
        let mut buf = [0u8; PROBE_LEN + 1];
        let mut limit = RateLimit::new();
        let rate_limited = metrics::counter!("halo_ha_probes_rejected_total", "reason" => "rate_limited");
        let unauthenticated = metrics::counter!("halo_ha_probes_rejected_total", "reason" => "unauthenticated");
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
            // The rate limit first: a flood from one source costs a map
            // lookup per datagram, not a tag check.
            if !limit.allow(from.ip(), Instant::now()) {
                rate_limited.increment(1);
                continue;
            }
            let keys = keys.load();
            let Some(nonce) = parse_probe(&buf[..n], &keys) else {
                unauthenticated.increment(1);
                continue;
            };
            let (instance, role) = me();
            if let Err(e) = socket.send_to(&answer(nonce, &instance, role, &keys), from).await {
                tracing::debug!(error = %e, peer = %from, "cannot answer a probe");
            }
        }
    };
    tokio::select! {
        () = stop.cancelled() => {}
        () = accepting => {}
        () = answering => {}
    }
}

/// Asks for [`RESPONDER_RCVBUF`] bytes of receive buffer, beyond
/// `net.core.rmem_max` when the process has CAP_NET_ADMIN.
fn enlarge_receive_buffer(socket: &UdpSocket) -> nix::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(socket, sockopt::RcvBufForce, &RESPONDER_RCVBUF)
        .or_else(|_| setsockopt(socket, sockopt::RcvBuf, &RESPONDER_RCVBUF))
}

/// Why the detector judged the active gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Evidence {
    /// The probe was refused, and a TCP connection to the same address was
    /// refused too: nothing listens on the active's probe address.
    Refused,
    /// This many probes in a row got no authentic answer.
    Silent(u32),
    /// Another process answers on the active's probe address.
    Replaced(String),
    /// The active answered `suspended` this many times in a row.
    NotServing(u32),
    /// Not evidence: the active's probe address reached this very process
    /// (its probe address is a loopback or otherwise local address as seen
    /// from here). The detector cannot watch that peer.
    SelfAnswered,
}

impl std::fmt::Display for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Evidence::Refused => f.write_str("its probe port refuses, over UDP and TCP: the process is gone"),
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

/// Whether a TCP connection to `peer` is refused within `limit`: the
/// corroboration of an ICMP refusal (see the module docs). A connection
/// that completes, times out or fails otherwise corroborates nothing.
async fn refused_over_tcp(peer: SocketAddr, limit: Duration) -> bool {
    match tokio::time::timeout(limit, TcpStream::connect(peer)).await {
        Ok(Err(e)) => e.kind() == io::ErrorKind::ConnectionRefused,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// What [`watch_peer`] needs besides the peer.
pub(super) struct PeerWatch<'a> {
    /// The instance that should answer at the peer's address.
    pub instance: &'a str,
    /// This process's own instance: an answer from it means the peer's
    /// probe address leads back here, which is no evidence about the peer.
    pub me: &'a str,
    pub interval: Duration,
    pub misses: u32,
    pub keys: &'a ArcSwap<KeyRing>,
}

/// Probes `peer` every `interval` and returns once it is judged gone,
/// calling `heard` on every authentic answer from the expected instance.
/// Returns `Err` only if no socket can be made.
pub(super) async fn watch_peer(peer: SocketAddr, w: PeerWatch<'_>, heard: impl Fn()) -> io::Result<Evidence> {
    let local: SocketAddr = if peer.is_ipv4() {
        "0.0.0.0:0".parse().expect("static address")
    } else {
        "[::]:0".parse().expect("static address")
    };
    let socket = UdpSocket::bind(local).await?;
    // Connected, so that the kernel hands us the ICMP errors for it (a
    // hint, corroborated before use) and drops datagrams from elsewhere.
    socket.connect(peer).await?;
    let corroborate_within = w.interval.max(CORROBORATE_MIN);
    let mut silent = 0u32;
    let mut not_serving = 0u32;
    let mut buf = [0u8; ANSWER_LEN + 1];
    let mut next = Instant::now();
    loop {
        let nonce = fastrand::u64(..);
        next += w.interval;
        // A pending ICMP error fails the send itself (and is consumed by
        // it): send again, or a stream of forged errors would keep every
        // probe from leaving and fake the silence of a dead host.
        let mut refused = false;
        let datagram = probe(nonce, &w.keys.load());
        for _ in 0..SEND_ATTEMPTS {
            match socket.send(&datagram).await {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => refused = true,
                Err(e) => {
                    tracing::debug!(error = %e, %peer, "cannot send a probe");
                    break;
                }
            }
        }
        // One TCP corroboration per probe at most, however many refusals
        // arrive: a flood of forged ICMP costs ten connections a second.
        let mut corroborated = false;
        // Wait for this probe's answer until the next one is due.
        let answered = loop {
            if refused && !corroborated {
                corroborated = true;
                if refused_over_tcp(peer, corroborate_within).await {
                    return Ok(Evidence::Refused);
                }
                metrics::counter!("halo_ha_probe_refusals_uncorroborated_total").increment(1);
                tracing::debug!(%peer, "a probe was refused but a TCP connection was not: ignoring the refusal");
            }
            let received = tokio::select! {
                received = socket.recv(&mut buf) => received,
                () = tokio::time::sleep_until(next) => break None,
            };
            match received {
                Ok(n) => match parse_answer(&buf[..n], &w.keys.load()) {
                    Some(a) if a.nonce == nonce => break Some(a),
                    // A late answer to an earlier probe, or noise.
                    _ => {}
                },
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => refused = true,
                Err(e) => tracing::debug!(error = %e, %peer, "probe receive failed"),
            }
        };
        match answered {
            None => {
                silent += 1;
                metrics::counter!("halo_ha_probe_misses_total").increment(1);
                if silent >= w.misses {
                    return Ok(Evidence::Silent(silent));
                }
            }
            Some(a) if a.instance == w.me && w.me != w.instance => return Ok(Evidence::SelfAnswered),
            Some(a) if a.instance != w.instance => return Ok(Evidence::Replaced(a.instance)),
            Some(a) => {
                heard();
                silent = 0;
                if a.role == AnswerRole::Suspended {
                    not_serving += 1;
                    if not_serving >= w.misses {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn keys(byte: u8) -> Arc<ArcSwap<KeyRing>> {
        Arc::new(ArcSwap::from_pointee(KeyRing::new(&[byte; 32])))
    }

    fn watch<'a>(instance: &'a str, keys: &'a ArcSwap<KeyRing>, interval_ms: u64) -> PeerWatch<'a> {
        PeerWatch {
            instance,
            me: "00000000000000ee",
            interval: Duration::from_millis(interval_ms),
            misses: 3,
            keys,
        }
    }

    /// A UDP socket on a free loopback port whose TCP twin is free too
    /// (a port free for UDP may be taken for TCP, by any socket of any
    /// process, so the pair is bound together, and again on a clash).
    async fn probe_socket() -> (UdpSocket, TcpListener) {
        for _ in 0..100 {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            match TcpListener::bind(udp.local_addr().unwrap()).await {
                Ok(tcp) => return (udp, tcp),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => panic!("bind TCP beside UDP: {e}"),
            }
        }
        panic!("no port free for both UDP and TCP in 100 tries");
    }

    /// A responder on `socket` (and a TCP listener on the same address)
    /// answering as `who` until the returned token is cancelled.
    async fn responder(
        (socket, tcp): (UdpSocket, TcpListener),
        keys: Arc<ArcSwap<KeyRing>>,
        who: impl Fn() -> (String, AnswerRole) + Send + Sync + 'static,
    ) -> CancellationToken {
        let stop = CancellationToken::new();
        tokio::spawn(respond(socket, Some(tcp), keys, who, stop.clone()));
        stop
    }

    #[test]
    fn probes_and_answers_round_trip_and_forgeries_are_ignored() {
        let k = KeyRing::new(&[7; 32]);
        let other = KeyRing::new(&[8; 32]);
        let p = probe(0xdead_beef, &k);
        assert_eq!(parse_probe(&p, &k), Some(0xdead_beef));
        assert_eq!(parse_probe(&p, &other), None, "another key");
        assert_eq!(parse_probe(&p[..PROBE_LEN - 1], &k), None, "short");
        let mut forged = p;
        forged[6] ^= 1;
        assert_eq!(parse_probe(&forged, &k), None, "altered nonce");
        assert_eq!(parse_probe(&[0xff; PROBE_LEN], &k), None);
        let a = answer(7, "0123456789abcdef", AnswerRole::Active, &k);
        assert!(a.len() < p.len(), "no amplification");
        assert_eq!(
            parse_answer(&a, &k),
            Some(Answer {
                nonce: 7,
                instance: "0123456789abcdef".into(),
                role: AnswerRole::Active
            })
        );
        assert_eq!(parse_answer(&a, &other), None, "another key");
        let mut forged = a;
        forged[22] = AnswerRole::Suspended.code();
        assert_eq!(parse_answer(&forged, &k), None, "altered role");
        // The old protocol's text answers are noise.
        assert_eq!(
            parse_answer(b"HALO-ALIVE 1 0000000000000007 0123456789abcdef active", &k),
            None
        );
    }

    #[test]
    fn the_rate_limit_is_per_source_and_refills() {
        let mut limit = RateLimit::new();
        let t0 = Instant::now();
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let allowed = (0..1000).filter(|_| limit.allow(a, t0)).count();
        assert_eq!(allowed as f64, ANSWERS_PER_SECOND / 4.0, "the burst, then nothing");
        assert!(limit.allow(b, t0), "another source is not held back");
        assert!(limit.allow(a, t0 + Duration::from_millis(10)), "refilled");
        // Bounded memory: a spray of sources.
        for i in 0..(SOURCES_TRACKED as u32 * 2) {
            limit.allow(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(limit.sources.len() <= SOURCES_TRACKED);
    }

    #[tokio::test]
    async fn a_dead_peer_is_refused_a_silent_one_missed_a_live_one_kept() {
        let k = keys(1);
        // Refused: a port nobody listens on, UDP or TCP.
        let gone = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        let e = watch_peer(addr, watch("x", &k, 20), || {}).await.unwrap();
        assert_eq!(e, Evidence::Refused);

        // Silent: bound, never answers.
        let mute = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let e = watch_peer(mute.local_addr().unwrap(), watch("x", &k, 20), || {})
            .await
            .unwrap();
        assert_eq!(e, Evidence::Silent(3));

        // A responder with another key: silence, however alive it is.
        let wrong = probe_socket().await;
        let addr = wrong.0.local_addr().unwrap();
        let stop = responder(wrong, keys(2), || ("00000000000000aa".into(), AnswerRole::Active)).await;
        let e = watch_peer(addr, watch("00000000000000aa", &k, 20), || {})
            .await
            .unwrap();
        assert_eq!(e, Evidence::Silent(3));
        stop.cancel();

        // Alive, then replaced by another instance.
        let live = probe_socket().await;
        let addr = live.0.local_addr().unwrap();
        let answers = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&answers);
        let stop = responder(live, Arc::clone(&k), move || {
            let n = counted.fetch_add(1, Ordering::Relaxed);
            let instance = if n < 10 { "00000000000000aa" } else { "00000000000000bb" };
            (instance.to_owned(), AnswerRole::Active)
        })
        .await;
        let heard = AtomicU32::new(0);
        let e = watch_peer(addr, watch("00000000000000aa", &k, 10), || {
            heard.fetch_add(1, Ordering::Relaxed);
        })
        .await
        .unwrap();
        assert_eq!(e, Evidence::Replaced("00000000000000bb".into()));
        assert_eq!(heard.load(Ordering::Relaxed), 10, "kept while alive, heard each time");
        stop.cancel();

        // The peer's advertised address leads back to ourselves (a loopback
        // probe address seen from another host): no evidence, never forced.
        let own = probe_socket().await;
        let addr = own.0.local_addr().unwrap();
        let stop = responder(own, Arc::clone(&k), || ("00000000000000ee".into(), AnswerRole::Standby)).await;
        let e = watch_peer(addr, watch("00000000000000aa", &k, 10), || {})
            .await
            .unwrap();
        assert_eq!(e, Evidence::SelfAnswered);
        stop.cancel();
    }

    /// Defect: one forged ICMP port-unreachable quoting the standby's probe
    /// socket made the detector call a live active gone. Here the "forged"
    /// refusal is real ICMP from the kernel — the UDP port is closed — while
    /// the process is alive and listens for TCP on the address, exactly
    /// what the standby sees when an attacker forges the ICMP message: the
    /// refusal is not corroborated and never becomes evidence.
    #[tokio::test]
    async fn a_refusal_without_a_tcp_refusal_is_no_evidence() {
        let k = keys(1);
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        // The process lives: its TCP listener on the probe address accepts.
        let tcp = TcpListener::bind(addr).await.unwrap();
        let accepted = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&accepted);
        let acceptor = tokio::spawn(async move {
            loop {
                if tcp.accept().await.is_ok() {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        drop(udp); // every probe is now refused by ICMP
        let e = watch_peer(addr, watch("00000000000000aa", &k, 20), || {})
            .await
            .unwrap();
        assert_eq!(e, Evidence::Silent(3), "refusals ignored; only silence counts");
        assert!(
            accepted.load(Ordering::Relaxed) >= 1,
            "each refusal was checked over TCP"
        );
        acceptor.abort();
    }

    /// Weakness: under a flood of 50,000 datagrams the responder dropped a
    /// third of its answers. Unauthenticated datagrams are now dropped
    /// unanswered, cheaply, so a standby probing at the same time misses
    /// none (three misses in a row would be a needless failover). The flood
    /// comes from 250 source addresses (127.0.1.x), each under the
    /// per-source rate limit, so every datagram costs a tag check.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_forged_probes_does_not_silence_the_responder() {
        let k = keys(1);
        let socket = probe_socket().await;
        let addr = socket.0.local_addr().unwrap();
        let stop = responder(socket, Arc::clone(&k), || {
            ("00000000000000aa".into(), AnswerRole::Active)
        })
        .await;
        let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let f = Arc::clone(&flooding);
        let flood = std::thread::spawn(move || {
            let sources: Vec<std::net::UdpSocket> = (1..=250u8)
                .map(|i| std::net::UdpSocket::bind((std::net::Ipv4Addr::new(127, 0, 1, i), 0)).unwrap())
                .collect();
            // Well-formed probes, as anyone could send to the old, open
            // responder; without the pair key they cannot be authentic.
            let junk = probe(7, &KeyRing::new(&[9; 32]));
            let mut sent = 0u32;
            for s in sources.iter().cycle() {
                if !f.load(Ordering::Relaxed) || sent >= 50_000 {
                    break;
                }
                if s.send_to(&junk, addr).is_ok() {
                    sent += 1;
                }
            }
            sent
        });
        // Probe through the flood at the default interval (100 ms) for as
        // long as it lasts (bounded): not three misses in a row.
        let probing = watch_peer(addr, watch("00000000000000aa", &k, 100), || {});
        let outcome = tokio::time::timeout(Duration::from_secs(3), probing).await;
        flooding.store(false, Ordering::Relaxed);
        let sent = flood.join().unwrap();
        assert!(outcome.is_err(), "judged gone during a flood of {sent}: {outcome:?}");
        eprintln!("{sent} forged probes from 250 sources in 3 s; no verdict");
        stop.cancel();
    }
}
