//! halo-consul against a real Consul agent (testkit's dev agent or cluster).

mod acl;
mod agent;
mod broken;
mod errors;
mod health;
mod kv;
mod session;
mod tls;

use halo_consul::{CheckRegistration, CheckStatus, Client, ServiceRegistration};
use halo_testkit::ConsulAgent;

/// A dev agent and a client for it.
pub async fn agent() -> (ConsulAgent, Client) {
    let agent = ConsulAgent::start().await;
    let client = Client::from_address(agent.http_url()).expect("client for the test agent");
    (agent, client)
}

/// Registers service `id` of `name` with one passing TTL check `<id>:ttl`.
pub async fn register_with_ttl(client: &Client, name: &str, id: &str, ttl: std::time::Duration) -> String {
    let check_id = format!("{id}:ttl");
    client
        .register_service(&ServiceRegistration {
            id: id.into(),
            name: name.into(),
            address: Some("127.0.0.1".into()),
            port: Some(9000),
            checks: vec![CheckRegistration::ttl(&check_id, "ttl", ttl, CheckStatus::Passing)],
            ..ServiceRegistration::default()
        })
        .await
        .expect("register service");
    check_id
}
