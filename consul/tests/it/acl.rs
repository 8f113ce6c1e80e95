//! The ACL token check and what Consul 1.8.7 answers to reads a token may
//! not make, against real dev agents (one plain, one with ACLs on and
//! `default_policy = "deny"`).

use std::time::Duration;

use halo_consul::{Client, Config, Error, HealthQuery, QueryOptions, TokenStatus};
use halo_testkit::ConsulAgent;

use crate::register_with_ttl;

const MASTER: &str = "6f1c2a3b-0000-4000-8000-00000000a001";
const KV_ONLY: &str = "6f1c2a3b-0000-4000-8000-00000000a002";
const UNKNOWN: &str = "6f1c2a3b-0000-4000-8000-00000000dead";

fn client_with(agent: &ConsulAgent, token: Option<&str>) -> Client {
    Client::with_env(
        Config {
            address: Some(agent.http_url()),
            token: token.map(str::to_owned),
            ..Config::default()
        },
        // No CONSUL_HTTP_TOKEN from the environment of whoever runs this.
        |_| None,
    )
    .unwrap()
}

/// Creates a policy `name` with `rules` and a token with secret `secret`
/// linked to it, through the master token.
async fn token_with_policy(agent: &ConsulAgent, name: &str, rules: &str, secret: &str) {
    let policy = serde_json::json!({ "Name": name, "Rules": rules }).to_string();
    let (status, body) =
        halo_testkit::http::request_with_token(agent.http_addr(), "PUT", "/v1/acl/policy", MASTER, &policy)
            .await
            .expect("create the policy");
    assert_eq!(status, 200, "{body}");
    let token = serde_json::json!({
        "Description": format!("{name} token"),
        "SecretID": secret,
        "Policies": [{ "Name": name }],
    })
    .to_string();
    let (status, body) =
        halo_testkit::http::request_with_token(agent.http_addr(), "PUT", "/v1/acl/token", MASTER, &token)
            .await
            .expect("create the token");
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn without_acls_the_token_check_says_disabled() {
    let agent = ConsulAgent::start().await;
    for token in [None, Some(UNKNOWN)] {
        let status = client_with(&agent, token).acl_token_self().await.unwrap();
        assert_eq!(status, TokenStatus::AclsDisabled);
        assert!(!status.empty_may_be_acl_filter());
        assert!(!status.acls_enabled());
    }
}

#[tokio::test]
async fn with_acls_the_token_check_tells_the_cases_apart_and_empty_answers_may_be_filters() {
    let agent = ConsulAgent::start_with_acl(MASTER).await;
    let master = client_with(&agent, Some(MASTER));
    register_with_ttl(&master, "web", "web-1", Duration::from_secs(60)).await;
    token_with_policy(&agent, "kv-only", "key_prefix \"\" { policy = \"read\" }", KV_ONLY).await;

    // The master token: known, its policy named, its secret nowhere.
    let status = master.acl_token_self().await.unwrap();
    let TokenStatus::Valid(info) = &status else {
        panic!("master token: {status:?}")
    };
    assert_eq!(info.policies, ["global-management"]);
    assert!(!info.accessor_id.is_empty() && info.accessor_id != MASTER);
    assert!(!format!("{status:?}").contains(MASTER) && !status.to_string().contains(MASTER));
    assert!(status.to_string().contains("global-management"), "{status}");
    let seen = master
        .health_service("web", HealthQuery::passing(), QueryOptions::default())
        .await
        .unwrap();
    assert_eq!(seen.value.len(), 1);

    // No token: Consul 1.8.7 answers 200 [] (filtered, with the same index
    // as the full answer and no header saying so).
    let anonymous = client_with(&agent, None);
    let status = anonymous.acl_token_self().await.unwrap();
    assert_eq!(status, TokenStatus::Anonymous);
    assert!(status.empty_may_be_acl_filter());
    let hidden = anonymous
        .health_service("web", HealthQuery::passing(), QueryOptions::default())
        .await
        .unwrap();
    assert!(hidden.value.is_empty());
    assert!(!hidden.meta.results_filtered_by_acls, "1.8.7 does not send the header");
    assert_eq!(hidden.meta.default_acl_policy, None);
    assert_eq!(hidden.meta.index, seen.meta.index);
    assert!(hidden.meta.known_leader);

    // A token without service:read: the same empty answer.
    let kv_only = client_with(&agent, Some(KV_ONLY));
    let status = kv_only.acl_token_self().await.unwrap();
    match &status {
        TokenStatus::Valid(info) => {
            assert_eq!(info.policies, ["kv-only"]);
            assert_eq!(info.description, "kv-only token");
        }
        other => panic!("kv-only token: {other:?}"),
    }
    assert!(status.empty_may_be_acl_filter());
    let hidden = kv_only
        .health_service("web", HealthQuery::passing(), QueryOptions::default())
        .await
        .unwrap();
    assert!(hidden.value.is_empty());
    assert!(!hidden.meta.results_filtered_by_acls);

    // An unknown token: reads fail loudly with 403 instead.
    let unknown = client_with(&agent, Some(UNKNOWN));
    let status = unknown.acl_token_self().await.unwrap();
    assert!(
        matches!(&status, TokenStatus::NotFound { message } if message.contains("ACL not found")),
        "{status:?}"
    );
    assert!(!status.empty_may_be_acl_filter());
    let err = unknown
        .health_service("web", HealthQuery::passing(), QueryOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Status { status, .. } if status.as_u16() == 403),
        "{err:?}"
    );
}

/// What packaging/consul/halo-sidecar.hcl says of Consul 1.8.7: `service
/// "<name>" { policy = "write" }` alone lets the agent API register, push
/// TTL checks, set maintenance, read back and deregister (node read is not
/// needed); and any token, the anonymous one included, may read
/// `/v1/acl/token/self` (halo-lb's policy needs no `acl` rule).
#[tokio::test]
async fn service_write_alone_runs_a_sidecar_and_any_token_reads_itself() {
    use halo_consul::{CheckRegistration, CheckStatus, ServiceRegistration};

    let agent = ConsulAgent::start_with_acl(MASTER).await;
    let only = agent
        .create_token(MASTER, "svc-only", "service \"web\" { policy = \"write\" }")
        .await;
    let c = client_with(&agent, Some(&only));
    c.register_service(&ServiceRegistration {
        id: "web-1".into(),
        name: "web".into(),
        port: Some(1),
        checks: vec![CheckRegistration::ttl(
            "web-1:ttl",
            "ttl",
            Duration::from_secs(30),
            CheckStatus::Critical,
        )],
        ..ServiceRegistration::default()
    })
    .await
    .unwrap();
    c.check_pass("web-1:ttl", "ok").await.unwrap();
    c.set_service_maintenance("web-1", true, Some("drain")).await.unwrap();
    assert!(c.agent_service("web-1").await.unwrap().is_some());
    c.deregister_service("web-1").await.unwrap();
    // Another service's registration is refused, naming the permission.
    let e = c
        .register_service(&ServiceRegistration {
            id: "db-1".into(),
            name: "db".into(),
            ..ServiceRegistration::default()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("403") && e.contains("Permission denied"), "{e}");

    assert!(matches!(c.acl_token_self().await.unwrap(), TokenStatus::Valid(_)));
    assert!(matches!(
        client_with(&agent, None).acl_token_self().await.unwrap(),
        TokenStatus::Anonymous
    ));
}
