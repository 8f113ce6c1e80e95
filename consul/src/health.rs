//! The health view: instances of a service with their node and checks.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::agent::{CheckStatus, Weights};
use crate::client::{decode_json, escape_path, Call, Client};
use crate::query::{QueryOptions, Response};
use crate::Error;

/// Filters of a `/v1/health/service/:name` read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthQuery<'a> {
    /// Only instances whose checks (node checks included) all pass.
    pub passing: bool,
    /// Only instances with this tag.
    pub tag: Option<&'a str>,
    /// A Consul filter expression, e.g. `Service.Meta.zone == "zone-a"`.
    pub filter: Option<&'a str>,
}

impl HealthQuery<'static> {
    /// Every instance, whatever its checks say.
    pub fn all() -> Self {
        HealthQuery::default()
    }

    /// Only passing instances: what balancers route to.
    pub fn passing() -> Self {
        HealthQuery {
            passing: true,
            ..HealthQuery::default()
        }
    }
}

/// One instance of a service with its node and checks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceEntry {
    /// The node the instance runs on.
    pub node: Node,
    /// The instance.
    pub service: CatalogService,
    /// The node's and the instance's checks.
    #[serde(default, deserialize_with = "crate::nullable")]
    pub checks: Vec<HealthCheck>,
}

impl ServiceEntry {
    /// The address to dial: the service address, or the node's if empty.
    pub fn address(&self) -> &str {
        if self.service.address.is_empty() {
            &self.node.address
        } else {
            &self.service.address
        }
    }

    /// The worst state among the entry's checks (passing if it has none).
    pub fn aggregate_status(&self) -> CheckStatus {
        self.checks
            .iter()
            .map(|c| c.status)
            .max_by_key(|s| match s {
                CheckStatus::Passing => 0,
                CheckStatus::Warning => 1,
                CheckStatus::Critical | CheckStatus::Unknown => 2,
            })
            .unwrap_or(CheckStatus::Passing)
    }
}

/// A catalog node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    /// Node name.
    pub node: String,
    /// Node address.
    pub address: String,
    /// Datacenter.
    #[serde(default)]
    pub datacenter: String,
    /// Node metadata.
    #[serde(default, deserialize_with = "crate::nullable")]
    pub meta: BTreeMap<String, String>,
}

/// A service instance in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CatalogService {
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
    /// Metadata (halo's fault domain: `zone`, `region`, `rack`).
    #[serde(default, deserialize_with = "crate::nullable")]
    pub meta: BTreeMap<String, String>,
    /// Weights by check state.
    #[serde(default)]
    pub weights: Weights,
}

/// A check in the health view.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    /// Node the check runs on.
    pub node: String,
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

impl Client {
    /// Instances of service `name` with their nodes and checks, filtered by
    /// `query`; blocking if `options` carries an index.
    pub async fn health_service(
        &self,
        name: &str,
        query: HealthQuery<'_>,
        options: QueryOptions,
    ) -> Result<Response<Vec<ServiceEntry>>, Error> {
        let mut call = Call::get(format!("health/service/{}", escape_path(name))).options(options);
        if query.passing {
            call = call.flag("passing");
        }
        if let Some(tag) = query.tag {
            call = call.query("tag", tag);
        }
        if let Some(filter) = query.filter {
            call = call.query("filter", filter);
        }
        let answer = self.send(call).await?.ok()?;
        Ok(Response {
            value: decode_entries(&answer.path, &answer.body)?,
            meta: answer.meta(),
        })
    }
}

/// Decodes a `/v1/health/service/:name` body. Only a JSON array is a list:
/// `null`, an object or malformed JSON is an error, never "no instances"
/// (an empty table must come from Consul saying `[]`).
pub(crate) fn decode_entries(path: &str, body: &[u8]) -> Result<Vec<ServiceEntry>, Error> {
    decode_json(path, body)
}
