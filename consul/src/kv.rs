//! The KV store: reads, writes, check-and-set, and session locks.

use base64::Engine as _;
use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;

use crate::client::{decode_json, escape_path, Answer, Call, Client};
use crate::query::{QueryOptions, Response};
use crate::Error;

/// A key with its value and indexes.
///
/// `(lock_index, session)` is the fencing token of a lock: `lock_index` rises
/// by one on every acquisition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPair {
    /// The key.
    pub key: String,
    /// Raft index at which the key was created.
    pub create_index: u64,
    /// Raft index of the last write; the `cas` argument.
    pub modify_index: u64,
    /// How many times the key has been acquired.
    pub lock_index: u64,
    /// Opaque flags set by writers.
    pub flags: u64,
    /// The value, decoded from Consul's base64; `None` if the key has none.
    pub value: Option<Bytes>,
    /// The session holding the lock, if any.
    pub session: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WirePair {
    key: String,
    create_index: u64,
    modify_index: u64,
    lock_index: u64,
    #[serde(default)]
    flags: u64,
    value: Option<String>,
    #[serde(default)]
    session: Option<String>,
}

impl Client {
    /// Reads `key` with its metadata; `None` if absent. Blocking if `options`
    /// carries an index (a missing key still yields an index to block on).
    pub async fn kv_get(&self, key: &str, options: QueryOptions) -> Result<Response<Option<KvPair>>, Error> {
        let answer = self.send(Call::get(kv_path(key)).options(options)).await?;
        let meta = answer.meta();
        let Some(answer) = present(answer)? else {
            return Ok(Response { value: None, meta });
        };
        Ok(Response {
            value: Some(decode_pair(&answer.path, &answer.body)?),
            meta,
        })
    }

    /// Reads every key under `prefix` (`?recurse`), in key order; empty if
    /// there are none (Consul answers 404). Blocking if `options` carries an
    /// index.
    pub async fn kv_list(&self, prefix: &str, options: QueryOptions) -> Result<Response<Vec<KvPair>>, Error> {
        let answer = self
            .send(Call::get(kv_path(prefix)).flag("recurse").options(options))
            .await?;
        let meta = answer.meta();
        let Some(answer) = present(answer)? else {
            return Ok(Response {
                value: Vec::new(),
                meta,
            });
        };
        let pairs: Vec<WirePair> = decode_json(&answer.path, &answer.body)?;
        let pairs = pairs
            .into_iter()
            .map(|wire| from_wire(&answer.path, wire))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response { value: pairs, meta })
    }

    /// Reads `key`'s raw value (`?raw`); `None` if absent.
    pub async fn kv_get_raw(&self, key: &str, options: QueryOptions) -> Result<Response<Option<Bytes>>, Error> {
        let answer = self.send(Call::get(kv_path(key)).flag("raw").options(options)).await?;
        let meta = answer.meta();
        Ok(Response {
            value: present(answer)?.map(|a| a.body),
            meta,
        })
    }

    /// Writes `value` to `key` unconditionally.
    pub async fn kv_put(&self, key: &str, value: impl Into<Bytes>) -> Result<bool, Error> {
        self.kv_write(Call::put(kv_path(key)), value.into()).await
    }

    /// Writes `value` only if the key's ModifyIndex is still `modify_index`
    /// (0: only if the key does not exist). `Ok(false)` if it was not.
    pub async fn kv_cas(&self, key: &str, value: impl Into<Bytes>, modify_index: u64) -> Result<bool, Error> {
        let call = Call::put(kv_path(key)).query("cas", modify_index.to_string());
        self.kv_write(call, value.into()).await
    }

    /// Takes the lock on `key` for `session`, writing `value`. `Ok(false)` if
    /// another session holds it or the lock delay of a lost session is still
    /// running; [`Error::InvalidSession`] if `session` is gone. Acquiring a
    /// key one already holds updates the value and keeps the LockIndex.
    pub async fn kv_acquire(&self, key: &str, value: impl Into<Bytes>, session: &str) -> Result<bool, Error> {
        let call = Call::put(kv_path(key)).query("acquire", session);
        self.kv_lock_write(call, value.into(), session).await
    }

    /// Releases `key` if `session` holds it, writing `value` (the key stays).
    /// No lock delay follows a release. `Ok(false)` if `session` did not hold it.
    pub async fn kv_release(&self, key: &str, value: impl Into<Bytes>, session: &str) -> Result<bool, Error> {
        let call = Call::put(kv_path(key)).query("release", session);
        self.kv_lock_write(call, value.into(), session).await
    }

    /// Deletes `key`. Deleting a missing key succeeds.
    pub async fn kv_delete(&self, key: &str) -> Result<bool, Error> {
        let answer = self.send(Call::new(http::Method::DELETE, kv_path(key))).await?.ok()?;
        answer.decode_bool()
    }

    async fn kv_write(&self, call: Call, value: Bytes) -> Result<bool, Error> {
        self.send(call.body(value)).await?.ok()?.decode_bool()
    }

    async fn kv_lock_write(&self, call: Call, value: Bytes, session: &str) -> Result<bool, Error> {
        let answer = self.send(call.body(value)).await?;
        if answer.status == StatusCode::INTERNAL_SERVER_ERROR
            && answer.message().to_ascii_lowercase().contains("invalid session")
        {
            return Err(Error::InvalidSession {
                message: answer.message(),
                path: answer.path,
                session: session.to_owned(),
            });
        }
        answer.ok()?.decode_bool()
    }
}

/// Decodes the answer to a single-key read: a JSON array of exactly one
/// entry with a base64 value. A missing key is a 404 (handled before this);
/// `null`, `[]`, several entries or malformed JSON are errors, never "no
/// such key": a lock watcher must not mistake garbage for a free lock.
pub(crate) fn decode_pair(path: &str, body: &[u8]) -> Result<KvPair, Error> {
    let pairs: Vec<WirePair> = decode_json(path, body)?;
    let count = pairs.len();
    let mut pairs = pairs.into_iter();
    let (Some(wire), None) = (pairs.next(), pairs.next()) else {
        return Err(Error::Decode {
            path: path.to_owned(),
            reason: format!("expected one entry for a single key, got {count}"),
        });
    };
    from_wire(path, wire)
}

fn from_wire(path: &str, wire: WirePair) -> Result<KvPair, Error> {
    let value = wire
        .value
        .map(|v| base64::engine::general_purpose::STANDARD.decode(v))
        .transpose()
        .map_err(|e| Error::Decode {
            path: path.to_owned(),
            reason: format!("Value is not base64: {e}"),
        })?
        .map(Bytes::from);
    Ok(KvPair {
        key: wire.key,
        create_index: wire.create_index,
        modify_index: wire.modify_index,
        lock_index: wire.lock_index,
        flags: wire.flags,
        value,
        session: wire.session.filter(|s| !s.is_empty()),
    })
}

fn kv_path(key: &str) -> String {
    format!("kv/{}", escape_path(key.trim_start_matches('/')))
}

/// A 404 on a KV read means "no such key", not an error.
fn present(answer: Answer) -> Result<Option<Answer>, Error> {
    if answer.status == StatusCode::NOT_FOUND {
        Ok(None)
    } else {
        answer.ok().map(Some)
    }
}
