//! The ACL token check: what Consul makes of the token this client sends.
//!
//! Consul filters what a token may not read out of list answers instead of
//! refusing them, so an ACL problem looks like "no instances". Seen on Consul
//! 1.8.7 with `acl { enabled = true, default_policy = "deny" }`, for
//! `GET /v1/health/service/web?passing` with `web` registered and passing:
//! - no token (the anonymous token applies): `200 []`, with the same
//!   `X-Consul-Index` as the full answer;
//! - a token without `service:read` (or with it but without `node:read`):
//!   `200 []`, the same;
//! - an unknown token: `403 ACL not found`;
//! - no answer carries `X-Consul-Results-Filtered-By-ACLs` (later Consul
//!   versions send it, and then only for tokens other than the anonymous
//!   one), nor `X-Consul-Default-ACL-Policy`.
//!
//! A single-key KV read without `key:read` is `403 Permission denied`, not
//! an empty answer; a session create without `session:write` is the same.
//!
//! So an empty health answer cannot be told from a filtered one by the
//! answer alone on 1.8; [`Client::acl_token_self`] at start says whether
//! filtering is possible at all ([`TokenStatus::empty_may_be_acl_filter`]),
//! and [`crate::QueryMeta::results_filtered_by_acls`] says so for certain
//! where the agent sends the header.

use std::fmt;

use http::StatusCode;
use serde::Deserialize;

use crate::client::{decode_json, Call, Client};
use crate::Error;

/// What `GET /v1/acl/token/self` says about the client's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenStatus {
    /// ACLs are off on the agent (`401 ACL support disabled`): every read
    /// sees everything, nothing is filtered.
    AclsDisabled,
    /// The client sent no token and the agent has no default token: Consul
    /// answers `403 ACL not found`, and reads get the anonymous token's
    /// rights, so lists may silently come back empty.
    Anonymous,
    /// The client sent a token Consul does not know (`403 ACL not found`):
    /// every read that needs a token fails with 403.
    NotFound {
        /// Consul's message.
        message: String,
    },
    /// A known token. What it may read is up to its policies; lists are
    /// silently filtered to what it may see.
    Valid(TokenInfo),
}

/// The public parts of an ACL token. The secret is never read into it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenInfo {
    /// The token's accessor ID (public, unlike the secret).
    pub accessor_id: String,
    /// Its description.
    pub description: String,
    /// Names of the policies linked to it.
    pub policies: Vec<String>,
    /// Names of the roles linked to it.
    pub roles: Vec<String>,
    /// Service names of its service identities.
    pub service_identities: Vec<String>,
    /// Whether the token is local to this datacenter.
    pub local: bool,
}

impl TokenStatus {
    /// Whether an empty list may be Consul hiding what the token may not
    /// read: true with ACLs on and a token that reads succeed with (known or
    /// anonymous). False with ACLs off (empty means empty) and for an unknown
    /// token (reads fail with 403 rather than come back empty).
    pub fn empty_may_be_acl_filter(&self) -> bool {
        matches!(self, TokenStatus::Anonymous | TokenStatus::Valid(_))
    }

    /// Whether the agent enforces ACLs.
    pub fn acls_enabled(&self) -> bool {
        !matches!(self, TokenStatus::AclsDisabled)
    }
}

impl fmt::Display for TokenStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenStatus::AclsDisabled => f.write_str("ACLs disabled"),
            TokenStatus::Anonymous => f.write_str("no token: the anonymous token's rights apply"),
            TokenStatus::NotFound { message } => write!(f, "token not known to Consul ({message})"),
            TokenStatus::Valid(info) => {
                write!(f, "token {}", info.accessor_id)?;
                if !info.description.is_empty() {
                    write!(f, " ({:?})", info.description)?;
                }
                write!(f, ", policies [{}]", info.policies.join(", "))?;
                if !info.roles.is_empty() {
                    write!(f, ", roles [{}]", info.roles.join(", "))?;
                }
                if !info.service_identities.is_empty() {
                    write!(f, ", service identities [{}]", info.service_identities.join(", "))?;
                }
                Ok(())
            }
        }
    }
}

/// The fields of Consul's token we keep. `SecretID` is deliberately absent,
/// so it is never held, logged or shown.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WireToken {
    #[serde(rename = "AccessorID")]
    accessor_id: String,
    #[serde(default)]
    description: String,
    #[serde(default, deserialize_with = "crate::nullable")]
    policies: Vec<Named>,
    #[serde(default, deserialize_with = "crate::nullable")]
    roles: Vec<Named>,
    #[serde(default, deserialize_with = "crate::nullable")]
    service_identities: Vec<ServiceIdentity>,
    #[serde(default)]
    local: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Named {
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceIdentity {
    service_name: String,
}

impl Client {
    /// Asks Consul about the client's own token (`GET /v1/acl/token/self`,
    /// which any token may read). Call it at start: with ACLs on, an empty
    /// list later may be a filter rather than the truth
    /// ([`TokenStatus::empty_may_be_acl_filter`]).
    ///
    /// Errors are those of any call: transport, timeouts, other statuses
    /// (e.g. a 500 when the servers have no leader).
    pub async fn acl_token_self(&self) -> Result<TokenStatus, Error> {
        let answer = self.send(Call::get("acl/token/self".into())).await?;
        let message = answer.message();
        match answer.status {
            StatusCode::UNAUTHORIZED if message.contains("ACL support disabled") => Ok(TokenStatus::AclsDisabled),
            StatusCode::FORBIDDEN if message.contains("ACL not found") => Ok(if self.has_token() {
                TokenStatus::NotFound { message }
            } else {
                TokenStatus::Anonymous
            }),
            _ => {
                let answer = answer.ok()?;
                let token: WireToken = decode_json(&answer.path, &answer.body)?;
                Ok(TokenStatus::Valid(TokenInfo {
                    accessor_id: token.accessor_id,
                    description: token.description,
                    policies: token.policies.into_iter().map(|p| p.name).collect(),
                    roles: token.roles.into_iter().map(|r| r.name).collect(),
                    service_identities: token.service_identities.into_iter().map(|s| s.service_name).collect(),
                    local: token.local,
                }))
            }
        }
    }
}
