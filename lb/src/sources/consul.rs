//! Consul discovery: a service's instances, from the agent's health view,
//! become a VIP's backends.
//!
//! Each answer is one blocking query on `/v1/health/service/<service>`
//! (optionally `?tag=`) through [`halo_consul::Watch`] (index rules, rate
//! limit, back-off). Without `?passing`, so that an instance's check state
//! gives its weight as Consul's own DNS interface does: every check passing
//! → `Weights.Passing`; one in warning (none critical) →
//! `Weights.Warning`; one critical (the instance's, or its node's, such as
//! `serfHealth` or maintenance mode) → left out. The address is the
//! service's, else the node's; the fault domain is the service meta `zone`, `region` and `rack`.
//!
//! Consul 1.8 answers `200 []` to a token without `service:read` and
//! `node:read`, exactly like "no instance". So the source asks who its
//! token is (`/v1/acl/token/self`, logged) before its first query, and an
//! empty answer while ACLs are on (or their state is unknown) is reported
//! as failed with `acl_filter_suspected`: the table before it keeps
//! serving. An empty answer with ACLs known to be off is a real "none".

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use halo_consul::{CheckStatus, Client, HealthQuery, QueryMeta, ServiceEntry, TokenStatus, Watch};

use super::{Answer, Source};
use crate::settings::{Backend, ConsulTarget};

/// A VIP's Consul discovery.
#[derive(Debug)]
pub(crate) struct ConsulSource {
    client: Client,
    target: ConsulTarget,
    watch: Watch,
    /// The VIP, for logs.
    vip: String,
    /// Who our token is: `None` before the first look, `Some(None)` when
    /// Consul could not say.
    token: Option<Option<TokenStatus>>,
}

impl ConsulSource {
    /// Watches `target` through `client`, each query waiting at most `wait`.
    pub(crate) fn new(client: Client, target: ConsulTarget, wait: Duration, vip: &str) -> ConsulSource {
        ConsulSource {
            client,
            target,
            watch: Watch::new(wait),
            vip: vip.to_owned(),
            token: None,
        }
    }
}

impl Source for ConsulSource {
    async fn next(&mut self) -> Answer {
        if self.token.is_none() {
            self.token = Some(token_status(&self.client, &self.vip).await);
        }
        let query = HealthQuery {
            passing: false,
            tag: self.target.tag.as_deref(),
            filter: None,
        };
        let (client, service) = (&self.client, &self.target.service);
        let answer = match self.watch.next(|o| client.health_service(service, query, o)).await {
            Ok(answer) => answer,
            Err(e) => {
                return Answer::Failed {
                    error: e.to_string(),
                    acl_filter_suspected: false,
                }
            }
        };
        let index = Some(answer.meta.index);
        if answer.value.is_empty() && may_be_acl_filter(&answer.meta, self.token.as_ref().and_then(Option::as_ref)) {
            // Ask again: the token may have changed, or ACLs been turned
            // off, since the last look.
            let token = token_status(&self.client, &self.vip).await;
            let suspected = may_be_acl_filter(&answer.meta, token.as_ref());
            self.token = Some(token.clone());
            if suspected {
                let token = token.as_ref().map_or_else(|| "unknown".to_owned(), ToString::to_string);
                return Answer::Failed {
                    error: format!(
                        "Consul listed no instance of {:?}; with ACLs on (token: {token}) that is also what a token without service:read and node:read sees, so the last table keeps serving",
                        self.target.service
                    ),
                    acl_filter_suspected: true,
                };
            }
        }
        let (backends, skipped) = backends_of(&answer.value);
        Answer::Backends {
            backends,
            skipped,
            index,
        }
    }
}

/// Who the client's token is, logged; `None` if Consul could not say.
async fn token_status(client: &Client, vip: &str) -> Option<TokenStatus> {
    match client.acl_token_self().await {
        Ok(status @ TokenStatus::NotFound { .. }) => {
            tracing::error!(vip, token = %status, "Consul does not know our token: every read is filtered as for an anonymous client");
            Some(status)
        }
        Ok(status) => {
            tracing::debug!(vip, token = %status, "consul token");
            Some(status)
        }
        Err(e) => {
            tracing::debug!(vip, error = %e, "cannot ask Consul about our token");
            None
        }
    }
}

/// Whether an empty answer may be ACL filtering rather than no instance:
/// Consul said it filtered, or ACLs are on (or we could not learn whether).
fn may_be_acl_filter(meta: &QueryMeta, token: Option<&TokenStatus>) -> bool {
    meta.results_filtered_by_acls || token.is_none_or(TokenStatus::acls_enabled)
}

/// The backends an answer describes, and how many instances were skipped
/// (an address that is not an IP: this path does not resolve names).
/// Instances with a critical check (their own or their node's) are left
/// out; those in warning get their `Weights.Warning`.
pub(crate) fn backends_of(entries: &[ServiceEntry]) -> (Vec<Backend>, usize) {
    let mut skipped = 0;
    let backends = entries
        .iter()
        .filter_map(|e| {
            let weights = e.service.weights;
            let weight = match e.aggregate_status() {
                CheckStatus::Passing => weights.passing,
                CheckStatus::Warning => weights.warning,
                _ => return None,
            };
            let Ok(ip) = e.address().parse::<IpAddr>() else {
                skipped += 1;
                tracing::debug!(instance = %e.service.id, address = e.address(), "instance address is not an IP; skipped");
                return None;
            };
            Some(Backend {
                addr: SocketAddr::new(ip, e.service.port),
                // Weights are 1..=1000 everywhere in halo; a warning weight
                // of 0 still leaves the instance pickable, at the least share.
                weight: weight.clamp(1, 1000),
                zone: e.service.meta.get("zone").cloned(),
                region: e.service.meta.get("region").cloned(),
                rack: e.service.meta.get("rack").cloned(),
            })
        })
        .collect();
    (backends, skipped)
}
