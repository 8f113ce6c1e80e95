//! The pair key: a secret every instance of a cluster shares, which
//! authenticates the failure detector's probes and answers (HMAC-SHA256,
//! see [`super::detector`]).
//!
//! It lives in Consul's KV store at `halo/<cluster>/probe-key` as 64 hex
//! digits. The first instance to find it missing creates it with a
//! check-and-set on index 0 (so two instances starting at once cannot
//! overwrite each other: the loser reads the winner's key); a malformed
//! value is replaced the same way, on its own index. Who can read that key
//! can forge probe answers; under ACLs that is whoever holds `key:read` on
//! `halo/`, the same principals that can already write the lock
//! (`packaging/consul/halo-lb.hcl`). Without ACLs, anyone who reaches
//! Consul's HTTP API can also destroy the active's session outright, so
//! the key costs nothing there and still closes the network to everyone
//! who does not.
//!
//! Each instance reads the key at start and again every
//! [`REREAD_EVERY`], keeping the previous key as well: if an operator
//! deletes or replaces it, every instance converges on the new one within
//! that time, and answers made with the previous key still count meanwhile.
//! Until then a probe made with a key the active does not know goes
//! unanswered, which a standby reads as silence: a needless failover, never
//! two actives (see the module docs of [`super`]).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use halo_consul::{Client, Error as ConsulError, QueryOptions};
use ring::hmac;
use ring::rand::{SecureRandom as _, SystemRandom};

/// How often an instance reads the key again.
pub(super) const REREAD_EVERY: Duration = Duration::from_secs(30);
/// Length of the secret, in bytes.
const KEY_BYTES: usize = 32;
/// Length of the tag carried by probes and answers: 128 bits of
/// HMAC-SHA256, as far more than a forger could guess at line rate.
pub(super) const TAG_LEN: usize = 16;

/// The keys an instance authenticates with: the current one, and the one
/// before it while a change settles.
#[derive(Clone)]
pub(crate) struct KeyRing {
    current: hmac::Key,
    /// Fingerprint of `current`, to notice a change.
    current_hex: String,
    previous: Option<hmac::Key>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("KeyRing")
            .field("previous", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

impl KeyRing {
    /// A ring of one key, from its bytes.
    pub(crate) fn new(secret: &[u8]) -> KeyRing {
        KeyRing {
            current: hmac::Key::new(hmac::HMAC_SHA256, secret),
            current_hex: hex(secret),
            previous: None,
        }
    }

    /// The tag of `data` under the current key.
    pub(super) fn tag(&self, data: &[u8]) -> [u8; TAG_LEN] {
        truncate(&hmac::sign(&self.current, data))
    }

    /// Whether `tag` authenticates `data` under the current or the previous
    /// key (constant time per key).
    pub(super) fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .any(|key| equal_in_constant_time(&truncate(&hmac::sign(key, data)), tag))
    }

    /// This ring with `secret` as its current key, the old current one kept
    /// as previous; `None` if `secret` is the current key already.
    fn rotated(&self, secret: &[u8]) -> Option<KeyRing> {
        let hex = hex(secret);
        (hex != self.current_hex).then(|| KeyRing {
            current: hmac::Key::new(hmac::HMAC_SHA256, secret),
            current_hex: hex,
            previous: Some(self.current.clone()),
        })
    }
}

/// Compares without an early exit, so the time taken says nothing about
/// how much of a forged tag was right.
fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

fn truncate(tag: &hmac::Tag) -> [u8; TAG_LEN] {
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&tag.as_ref()[..TAG_LEN]);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if text.len() != KEY_BYTES * 2 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// The KV key that holds a cluster's pair key.
pub(crate) fn kv_key(cluster: &str) -> String {
    format!("halo/{cluster}/probe-key")
}

/// Reads the cluster's key, creating (or repairing) it when missing (or
/// malformed). Errors are Consul's.
pub(super) async fn fetch(client: &Client, cluster: &str) -> Result<Vec<u8>, ConsulError> {
    let key = kv_key(cluster);
    // A few rounds: a create or repair that loses its check-and-set reads
    // the winner's value next time round.
    for _ in 0..4 {
        let found = client.kv_get(&key, QueryOptions::default()).await?.value;
        let modify_index = match &found {
            Some(pair) => match pair
                .value
                .as_deref()
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(unhex)
            {
                Some(secret) => return Ok(secret),
                None => {
                    tracing::warn!(key, "the pair key is malformed (not 64 hex digits); replacing it");
                    pair.modify_index
                }
            },
            None => 0,
        };
        let mut secret = [0u8; KEY_BYTES];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| ConsulError::Config("the system's random source failed".to_owned()))?;
        if client.kv_cas(&key, hex(&secret), modify_index).await? {
            tracing::info!(key, "created the pair key that authenticates probes");
            return Ok(secret.to_vec());
        }
    }
    Err(ConsulError::Config(format!(
        "{key} keeps changing under us; cannot settle on a pair key"
    )))
}

/// Keeps `ring` up to date with the cluster's key: reads it every
/// [`REREAD_EVERY`] until the task is dropped.
pub(super) async fn follow(client: Client, cluster: String, ring: Arc<ArcSwap<KeyRing>>) {
    let mut tick = tokio::time::interval(REREAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    loop {
        tick.tick().await;
        match fetch(&client, &cluster).await {
            Ok(secret) => {
                if let Some(next) = ring.load().rotated(&secret) {
                    tracing::warn!(key = %kv_key(&cluster), "the pair key changed; probes use the new one (the old one is still accepted)");
                    ring.store(Arc::new(next));
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the pair key again; keeping the one we have"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_verify_under_the_current_and_previous_key_only() {
        let a = KeyRing::new(&[1; KEY_BYTES]);
        let t = a.tag(b"hello");
        assert!(a.verify(b"hello", &t));
        assert!(!a.verify(b"hellO", &t), "another message");
        let mut bad = t;
        bad[0] ^= 1;
        assert!(!a.verify(b"hello", &bad), "a flipped bit");
        assert!(!a.verify(b"hello", &t[..8]), "a short tag");
        assert!(a.rotated(&[1; KEY_BYTES]).is_none(), "same key: no change");
        let b = a.rotated(&[2; KEY_BYTES]).expect("a new key");
        assert!(b.verify(b"hello", &t), "the previous key still counts");
        assert_ne!(b.tag(b"hello"), t, "new tags use the new key");
        let c = b.rotated(&[3; KEY_BYTES]).expect("a third key");
        assert!(!c.verify(b"hello", &t), "two keys back: no longer");
        assert!(!format!("{c:?}").contains("0101"), "Debug never shows the secret");
    }

    #[test]
    fn hex_round_trips_and_rejects_anything_else() {
        let secret = [0xab; KEY_BYTES];
        assert_eq!(unhex(&hex(&secret)).as_deref(), Some(&secret[..]));
        assert_eq!(unhex(&format!("{}\n", hex(&secret))).as_deref(), Some(&secret[..]));
        assert_eq!(unhex("abcd"), None);
        assert_eq!(unhex(&"zz".repeat(KEY_BYTES)), None);
        assert_eq!(unhex(&"é".repeat(KEY_BYTES)), None);
    }
}
