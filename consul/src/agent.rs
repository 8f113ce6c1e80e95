//! The local agent's service and check API: registration, maintenance, and TTL
//! check updates.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use crate::client::{escape_path, Call, Client};
use crate::{duration, Error};

/// A check's state as Consul names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// The check passes.
    Passing,
    /// The check warns: `?passing` queries leave the instance out; Consul's
    /// DNS (and halo-lb's discovery) keep it, at its `Weights.Warning`.
    Warning,
    /// The check fails.
    Critical,
    /// Any other state a newer Consul may report.
    #[serde(other)]
    Unknown,
}

impl CheckStatus {
    /// Consul's name for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Passing => "passing",
            CheckStatus::Warning => "warning",
            CheckStatus::Critical => "critical",
            CheckStatus::Unknown => "unknown",
        }
    }
}

/// A service's DNS/load-balancing weights by check state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    /// Weight while every check passes.
    pub passing: u32,
    /// Weight while some check warns.
    pub warning: u32,
}

impl Default for Weights {
    /// Consul's own default: 1 and 1.
    fn default() -> Self {
        Weights { passing: 1, warning: 1 }
    }
}

/// What a check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// Passes while someone pushes updates more often than `ttl`; halo's
    /// sidecar runs its own probes and pushes results to these.
    Ttl {
        /// Time after the last update at which the check turns critical.
        ttl: Duration,
    },
    /// The agent GETs (or `method`s) `url`; 2xx passes, 429 warns.
    Http {
        /// URL to probe.
        url: String,
        /// HTTP method; unset means GET.
        method: Option<String>,
        /// Extra request headers.
        headers: BTreeMap<String, Vec<String>>,
        /// Probe interval (Consul clamps it to at least 1 s).
        interval: Duration,
        /// Probe timeout; unset means Consul's default (10 s).
        timeout: Option<Duration>,
    },
    /// The agent opens a TCP connection to `address`.
    Tcp {
        /// `host:port` to connect to.
        address: String,
        /// Probe interval (Consul clamps it to at least 1 s).
        interval: Duration,
        /// Probe timeout; unset means Consul's default (10 s).
        timeout: Option<Duration>,
    },
}

/// A check registered with a service (or alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRegistration {
    /// The check's ID. Always explicit: Consul's generated IDs collide when a
    /// service has several checks, and TTL updates address checks by ID.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Free-form notes shown in the UI.
    pub notes: Option<String>,
    /// State right after registration. Unset: Consul's default, critical.
    pub status: Option<CheckStatus>,
    /// What the check does.
    pub kind: CheckKind,
    /// Deregister the whole service once this check has been critical this
    /// long (Consul's minimum is 1 minute, reaped every 30 s). Unset: never.
    pub deregister_critical_service_after: Option<Duration>,
}

impl CheckRegistration {
    /// A TTL check with the given ID, name and TTL, starting in `status`.
    pub fn ttl(id: impl Into<String>, name: impl Into<String>, ttl: Duration, status: CheckStatus) -> Self {
        CheckRegistration {
            id: id.into(),
            name: name.into(),
            notes: None,
            status: Some(status),
            kind: CheckKind::Ttl { ttl },
            deregister_critical_service_after: None,
        }
    }
}

impl Serialize for CheckRegistration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct Wire<'a> {
            #[serde(rename = "CheckID")]
            check_id: &'a str,
            name: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            notes: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            status: Option<CheckStatus>,
            #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
            ttl: Option<String>,
            #[serde(rename = "HTTP", skip_serializing_if = "Option::is_none")]
            http: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            method: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            header: Option<&'a BTreeMap<String, Vec<String>>>,
            #[serde(rename = "TCP", skip_serializing_if = "Option::is_none")]
            tcp: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            interval: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            timeout: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            deregister_critical_service_after: Option<String>,
        }
        let mut wire = Wire {
            check_id: &self.id,
            name: &self.name,
            notes: self.notes.as_deref(),
            status: self.status,
            ttl: None,
            http: None,
            method: None,
            header: None,
            tcp: None,
            interval: None,
            timeout: None,
            deregister_critical_service_after: self.deregister_critical_service_after.map(duration::format),
        };
        match &self.kind {
            CheckKind::Ttl { ttl } => wire.ttl = Some(duration::format(*ttl)),
            CheckKind::Http {
                url,
                method,
                headers,
                interval,
                timeout,
            } => {
                wire.http = Some(url);
                wire.method = method.as_deref();
                wire.header = (!headers.is_empty()).then_some(headers);
                wire.interval = Some(duration::format(*interval));
                wire.timeout = timeout.map(duration::format);
            }
            CheckKind::Tcp {
                address,
                interval,
                timeout,
            } => {
                wire.tcp = Some(address);
                wire.interval = Some(duration::format(*interval));
                wire.timeout = timeout.map(duration::format);
            }
        }
        wire.serialize(s)
    }
}

/// A service instance to register with the local agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceRegistration {
    /// Instance ID, unique on this agent.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name that instances share.
    pub name: String,
    /// Tags; empty means none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Address clients should dial. Unset: the node's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Port clients should dial. Unset: 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Free-form metadata; halo keeps the fault domain here (`zone`,
    /// `region`, `rack`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// Weights by check state. Unset: Consul's default (1/1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<Weights>,
    /// Checks registered with (and owned by) the service.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckRegistration>,
}

/// A service as the local agent knows it (`/v1/agent/service/:id`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentService {
    /// Instance ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name.
    pub service: String,
    /// Tags.
    #[serde(default, deserialize_with = "crate::nullable")]
    pub tags: Vec<String>,
    /// Address; empty means the node's.
    #[serde(default)]
    pub address: String,
    /// Port.
    #[serde(default)]
    pub port: u16,
    /// Metadata.
    #[serde(default, deserialize_with = "crate::nullable")]
    pub meta: BTreeMap<String, String>,
    /// Weights; Consul fills in its defaults.
    #[serde(default)]
    pub weights: Weights,
}

/// A check as the local agent knows it (`/v1/agent/checks`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentCheck {
    /// Check ID.
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// Name.
    pub name: String,
    /// Current state.
    pub status: CheckStatus,
    /// Output of the last run or update.
    #[serde(default)]
    pub output: String,
    /// Owning service's ID; empty for node checks.
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
}

/// What the local agent says about itself (`GET /v1/agent/self`), the
/// parts halo uses. Needs `agent:read` on the agent's node under ACLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSelf {
    /// The node's name (`Config.NodeName`).
    pub node_name: String,
    /// The datacenter (`Config.Datacenter`).
    pub datacenter: String,
    /// The address the agent advertises to the rest of the cluster for this
    /// node (`Member.Addr`, its LAN gossip address): the address other
    /// hosts reach this node at, as far as Consul knows.
    pub address: std::net::IpAddr,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AgentSelfWire {
    config: AgentSelfConfig,
    member: AgentSelfMember,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AgentSelfConfig {
    node_name: String,
    #[serde(default)]
    datacenter: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AgentSelfMember {
    addr: String,
}

impl Client {
    /// What the local agent says about itself: its node and the address it
    /// advertises for it.
    pub async fn agent_self(&self) -> Result<AgentSelf, Error> {
        let wire: AgentSelfWire = self.send(Call::get("agent/self".into())).await?.ok()?.decode()?;
        let address = wire.member.addr.parse().map_err(|_| Error::Decode {
            path: "agent/self".to_owned(),
            reason: format!("Member.Addr {:?} is not an ip address", wire.member.addr),
        })?;
        Ok(AgentSelf {
            node_name: wire.config.node_name,
            datacenter: wire.config.datacenter,
            address,
        })
    }

    /// Registers (or replaces) a service instance and its checks with the
    /// local agent. Checks the new registration no longer lists are removed.
    pub async fn register_service(&self, service: &ServiceRegistration) -> Result<(), Error> {
        self.send(
            Call::put("agent/service/register".into())
                .query("replace-existing-checks", "true")
                .json(service),
        )
        .await?
        .ok()?;
        Ok(())
    }

    /// Removes a service instance and its checks from the local agent.
    pub async fn deregister_service(&self, service_id: &str) -> Result<(), Error> {
        let path = format!("agent/service/deregister/{}", escape_path(service_id));
        self.send(Call::put(path)).await?.ok()?;
        Ok(())
    }

    /// Puts a service instance into maintenance (hidden from health queries
    /// and DNS) or takes it out. [`Error::NotFound`] if it is not registered.
    pub async fn set_service_maintenance(
        &self,
        service_id: &str,
        enable: bool,
        reason: Option<&str>,
    ) -> Result<(), Error> {
        let path = format!("agent/service/maintenance/{}", escape_path(service_id));
        let mut call = Call::put(path).query("enable", enable.to_string());
        if let Some(reason) = reason {
            call = call.query("reason", reason);
        }
        self.send(call).await?.ok()?;
        Ok(())
    }

    /// The service instance `service_id` as the local agent has it, or `None`
    /// if the agent does not know it (e.g. after a restart of a dev agent).
    pub async fn agent_service(&self, service_id: &str) -> Result<Option<AgentService>, Error> {
        let path = format!("agent/service/{}", escape_path(service_id));
        match self.send(Call::get(path)).await?.ok() {
            Ok(answer) => answer.decode().map(Some),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every check registered with the local agent, by check ID.
    pub async fn agent_checks(&self) -> Result<HashMap<String, AgentCheck>, Error> {
        self.send(Call::get("agent/checks".into())).await?.ok()?.decode()
    }

    /// Sets a TTL check to passing, with `note` as its output.
    pub async fn check_pass(&self, check_id: &str, note: &str) -> Result<(), Error> {
        self.check_ttl_verb("pass", check_id, note).await
    }

    /// Sets a TTL check to warning, with `note` as its output.
    pub async fn check_warn(&self, check_id: &str, note: &str) -> Result<(), Error> {
        self.check_ttl_verb("warn", check_id, note).await
    }

    /// Sets a TTL check to critical, with `note` as its output.
    pub async fn check_fail(&self, check_id: &str, note: &str) -> Result<(), Error> {
        self.check_ttl_verb("fail", check_id, note).await
    }

    /// Sets a TTL check's state and output in one call (output may be long;
    /// Consul truncates it to its own limit). Every update restarts the TTL.
    ///
    /// [`Error::NotFound`] if the agent does not know the check, which means
    /// the service must be registered again.
    pub async fn update_check(&self, check_id: &str, status: CheckStatus, output: &str) -> Result<(), Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct Update<'a> {
            status: CheckStatus,
            output: &'a str,
        }
        let path = format!("agent/check/update/{}", escape_path(check_id));
        let answer = self.send(Call::put(path).json(&Update { status, output })).await?;
        unknown_check_is_not_found(answer.ok())
    }

    async fn check_ttl_verb(&self, verb: &str, check_id: &str, note: &str) -> Result<(), Error> {
        let path = format!("agent/check/{verb}/{}", escape_path(check_id));
        let mut call = Call::put(path);
        if !note.is_empty() {
            call = call.query("note", note);
        }
        let answer = self.send(call).await?;
        unknown_check_is_not_found(answer.ok())
    }
}

/// Current Consul answers 404 for a TTL update of an unknown check; older
/// agents (1.8 among them) answer 500 "CheckID ... does not have associated
/// TTL". Both mean the same thing to callers: register again.
fn unknown_check_is_not_found(result: Result<crate::client::Answer, Error>) -> Result<(), Error> {
    match result {
        Ok(_) => Ok(()),
        Err(Error::Status {
            status, path, message, ..
        }) if status == http::StatusCode::INTERNAL_SERVER_ERROR
            && (message.contains("does not have associated TTL") || message.contains("Unknown check")) =>
        {
            Err(Error::NotFound { path, message })
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_serializes_as_consul_expects() {
        let reg = ServiceRegistration {
            id: "web-1".into(),
            name: "web".into(),
            tags: vec!["v1".into()],
            address: Some("127.0.0.1".into()),
            port: Some(9001),
            meta: BTreeMap::from([("zone".into(), "zone-a".into())]),
            weights: Some(Weights {
                passing: 10,
                warning: 1,
            }),
            checks: vec![
                CheckRegistration {
                    deregister_critical_service_after: Some(Duration::from_secs(60)),
                    ..CheckRegistration::ttl("web-1:http", "http", Duration::from_millis(1500), CheckStatus::Critical)
                },
                CheckRegistration {
                    id: "web-1:tcp".into(),
                    name: "tcp".into(),
                    notes: None,
                    status: None,
                    kind: CheckKind::Tcp {
                        address: "127.0.0.1:9001".into(),
                        interval: Duration::from_secs(1),
                        timeout: Some(Duration::from_millis(500)),
                    },
                    deregister_critical_service_after: None,
                },
            ],
        };
        let v = serde_json::to_value(&reg).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "ID": "web-1", "Name": "web", "Tags": ["v1"], "Address": "127.0.0.1", "Port": 9001,
                "Meta": {"zone": "zone-a"}, "Weights": {"Passing": 10, "Warning": 1},
                "Checks": [
                    {"CheckID": "web-1:http", "Name": "http", "Status": "critical", "TTL": "1500ms",
                     "DeregisterCriticalServiceAfter": "60s"},
                    {"CheckID": "web-1:tcp", "Name": "tcp", "TCP": "127.0.0.1:9001", "Interval": "1s",
                     "Timeout": "500ms"}
                ]
            })
        );
    }
}
