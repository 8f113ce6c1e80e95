//! Sessions: the liveness handle that locks hang on.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::client::{decode_json, escape_path, Call, Client};
use crate::{duration, Error};

/// What happens to a session's locks when it is invalidated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionBehavior {
    /// The keys stay, their `Session` is cleared (Consul's default).
    #[default]
    Release,
    /// The keys are deleted.
    Delete,
}

/// Which health checks a session is bound to; any of them going critical
/// invalidates it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SessionChecks {
    /// Send nothing: the agent binds the session to its node's `serfHealth`.
    #[default]
    AgentDefault,
    /// Consul 1.7+ fields. `node_checks` is sent even when empty, which is
    /// how `serfHealth` is dropped. Use this to bind to a TTL check.
    Bound {
        /// Node-level check IDs (e.g. `serfHealth`); may be empty.
        node_checks: Vec<String>,
        /// Service check IDs on the session's node.
        service_checks: Vec<String>,
    },
    /// The legacy `Checks` list, sent as is (an empty list drops
    /// `serfHealth`). For agents older than 1.7.
    Legacy(Vec<String>),
}

/// A session to create. Unset fields take Consul's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionRequest {
    /// Human-readable name.
    pub name: Option<String>,
    /// Node the session belongs to. Unset: the agent's node.
    pub node: Option<String>,
    /// After invalidation, nobody may acquire the session's keys for this
    /// long. Unset: 15 s. Consul caps it at 60 s.
    pub lock_delay: Option<Duration>,
    /// What invalidation does to held keys. Unset: release.
    pub behavior: Option<SessionBehavior>,
    /// Session TTL (10 s to 24 h); it must be renewed within it. Unset: none.
    /// Consul may wait up to twice the TTL before expiring it, so bind a fast
    /// TTL *check* instead when failure must be noticed quickly.
    pub ttl: Option<Duration>,
    /// Health checks the session is bound to.
    pub checks: SessionChecks,
}

impl Serialize for SessionRequest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct CheckRef<'a> {
            #[serde(rename = "ID")]
            id: &'a str,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct Wire<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            name: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            node: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            lock_delay: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            behavior: Option<SessionBehavior>,
            #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
            ttl: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            node_checks: Option<&'a [String]>,
            #[serde(skip_serializing_if = "Option::is_none")]
            service_checks: Option<Vec<CheckRef<'a>>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            checks: Option<&'a [String]>,
        }
        let mut wire = Wire {
            name: self.name.as_deref(),
            node: self.node.as_deref(),
            // Always a string: a bare number below 1000 would be seconds.
            lock_delay: self.lock_delay.map(duration::format),
            behavior: self.behavior,
            ttl: self.ttl.map(duration::format),
            node_checks: None,
            service_checks: None,
            checks: None,
        };
        match &self.checks {
            SessionChecks::AgentDefault => {}
            SessionChecks::Bound {
                node_checks,
                service_checks,
            } => {
                wire.node_checks = Some(node_checks);
                wire.service_checks = Some(service_checks.iter().map(|id| CheckRef { id }).collect());
            }
            SessionChecks::Legacy(checks) => wire.checks = Some(checks),
        }
        wire.serialize(s)
    }
}

/// A session as Consul reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SessionInfo {
    /// Session ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Owning node.
    pub node: String,
    /// Lock delay (Consul reports nanoseconds).
    #[serde(deserialize_with = "nanos")]
    pub lock_delay: Duration,
    /// Invalidation behavior.
    pub behavior: SessionBehavior,
    /// TTL, if the session has one.
    #[serde(rename = "TTL", default, with = "duration::serde_opt_str")]
    pub ttl: Option<Duration>,
    /// Node checks the session is bound to.
    #[serde(default, deserialize_with = "crate::nullable")]
    pub node_checks: Vec<String>,
    /// Service checks the session is bound to.
    #[serde(default, deserialize_with = "crate::nullable")]
    pub service_checks: Vec<ServiceCheckRef>,
    /// The legacy `Checks` list, when the session was created with it.
    #[serde(default, deserialize_with = "crate::nullable")]
    pub checks: Vec<String>,
    /// Raft index of creation.
    pub create_index: u64,
}

/// A service check a session is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ServiceCheckRef {
    /// Check ID.
    #[serde(rename = "ID")]
    pub id: String,
}

/// Decodes the session list that `session/info` and `session/renew` answer
/// with. Only a JSON array is a list: `null` or malformed JSON is an error,
/// never "no such session" (which Consul says with `[]` or a 404).
pub(crate) fn decode_sessions(path: &str, body: &[u8]) -> Result<Vec<SessionInfo>, Error> {
    decode_json(path, body)
}

fn nanos<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    // Go encodes time.Duration as an integer count of nanoseconds; large ones
    // can come out in float notation (1.5e+10). Integers are read exactly.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Nanos {
        Integer(u64),
        Float(f64),
    }
    match Nanos::deserialize(d)? {
        Nanos::Integer(n) => Ok(Duration::from_nanos(n)),
        Nanos::Float(n) if n.is_finite() && n >= 0.0 && n < u64::MAX as f64 => Ok(Duration::from_nanos(n as u64)),
        Nanos::Float(n) => Err(serde::de::Error::custom(format!("bad nanosecond count {n}"))),
    }
}

impl Client {
    /// Creates a session and returns its ID.
    ///
    /// Fails (HTTP 500) if a named check is missing or critical: pass a TTL
    /// check before binding a session to it.
    pub async fn session_create(&self, request: &SessionRequest) -> Result<String, Error> {
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let answer = self
            .send(Call::put("session/create".into()).json(request))
            .await?
            .ok()?;
        Ok(answer.decode::<Created>()?.id)
    }

    /// Renews a TTL session and returns it as Consul now has it; callers
    /// adopt the TTL it carries, which Consul may have changed.
    /// [`Error::NotFound`] means the session is gone: any lock it held is lost.
    pub async fn session_renew(&self, id: &str) -> Result<SessionInfo, Error> {
        let path = format!("session/renew/{}", escape_path(id));
        let answer = self.send(Call::put(path.clone())).await?.ok()?;
        decode_sessions(&answer.path, &answer.body)?
            .into_iter()
            .next()
            .ok_or(Error::NotFound {
                path,
                message: "renew returned no session".into(),
            })
    }

    /// Destroys a session, releasing (or deleting) the keys it holds. This is
    /// an invalidation: the session's lock delay applies to those keys. For a
    /// handover without delay, [`Client::kv_release`] them first. Destroying an
    /// unknown session is not an error.
    pub async fn session_destroy(&self, id: &str) -> Result<(), Error> {
        let path = format!("session/destroy/{}", escape_path(id));
        self.send(Call::put(path)).await?.ok()?;
        Ok(())
    }

    /// The session `id`, or `None` if Consul does not know it (any more).
    pub async fn session_info(&self, id: &str) -> Result<Option<SessionInfo>, Error> {
        let path = format!("session/info/{}", escape_path(id));
        let answer = self.send(Call::get(path)).await?.ok()?;
        Ok(decode_sessions(&answer.path, &answer.body)?.into_iter().next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_checks_send_nothing() {
        let v = serde_json::to_value(SessionRequest::default()).unwrap();
        assert_eq!(v, json!({}));
    }

    #[test]
    fn bound_checks_send_an_explicit_empty_node_list() {
        let v = serde_json::to_value(SessionRequest {
            name: Some("halo".into()),
            lock_delay: Some(Duration::from_millis(500)),
            behavior: Some(SessionBehavior::Release),
            ttl: Some(Duration::from_secs(10)),
            checks: SessionChecks::Bound {
                node_checks: vec![],
                service_checks: vec!["lb-1:ttl".into()],
            },
            ..SessionRequest::default()
        })
        .unwrap();
        assert_eq!(
            v,
            json!({"Name": "halo", "LockDelay": "500ms", "Behavior": "release", "TTL": "10s",
                   "NodeChecks": [], "ServiceChecks": [{"ID": "lb-1:ttl"}]})
        );
        let legacy = serde_json::to_value(SessionRequest {
            checks: SessionChecks::Legacy(vec![]),
            ..SessionRequest::default()
        })
        .unwrap();
        assert_eq!(legacy, json!({"Checks": []}));
    }

    #[test]
    fn info_decodes_consul_1_8_output() {
        let info: SessionInfo = serde_json::from_value(json!({
            "ID": "0c74", "Name": "", "Node": "vm", "LockDelay": 15000000000u64, "Behavior": "release",
            "TTL": "", "NodeChecks": [], "ServiceChecks": [{"ID": "web1-ttl", "Namespace": ""}],
            "CreateIndex": 20, "ModifyIndex": 20
        }))
        .unwrap();
        assert_eq!(info.lock_delay, Duration::from_secs(15));
        assert_eq!(info.ttl, None);
        assert_eq!(info.service_checks[0].id, "web1-ttl");
        assert!(info.checks.is_empty());
    }
}
