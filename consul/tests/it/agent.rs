use std::collections::BTreeMap;
use std::time::Duration;

use halo_consul::{
    CheckKind, CheckRegistration, CheckStatus, Error, HealthQuery, QueryOptions, ServiceRegistration, Weights,
};

use crate::{agent, register_with_ttl};

#[tokio::test]
async fn registers_a_service_with_every_field_and_deregisters_it() {
    let (_agent, client) = agent().await;
    let reg = ServiceRegistration {
        id: "web-1".into(),
        name: "web".into(),
        tags: vec!["v1".into(), "blue".into()],
        address: Some("127.0.0.1".into()),
        port: Some(9001),
        meta: BTreeMap::from([
            ("zone".into(), "zone-a".into()),
            ("region".into(), "region-1".into()),
            ("rack".into(), "r1".into()),
        ]),
        weights: Some(Weights {
            passing: 10,
            warning: 1,
        }),
        checks: vec![
            CheckRegistration {
                deregister_critical_service_after: Some(Duration::from_secs(90)),
                ..CheckRegistration::ttl("web-1:app", "app", Duration::from_secs(30), CheckStatus::Passing)
            },
            CheckRegistration {
                id: "web-1:tcp".into(),
                name: "tcp".into(),
                notes: Some("agent-run".into()),
                status: Some(CheckStatus::Warning),
                kind: CheckKind::Tcp {
                    address: "127.0.0.1:1".into(),
                    interval: Duration::from_secs(30),
                    timeout: Some(Duration::from_millis(200)),
                },
                deregister_critical_service_after: None,
            },
            CheckRegistration {
                id: "web-1:http".into(),
                name: "http".into(),
                notes: None,
                status: Some(CheckStatus::Passing),
                kind: CheckKind::Http {
                    url: "http://127.0.0.1:1/healthz".into(),
                    method: Some("HEAD".into()),
                    headers: BTreeMap::from([("X-Probe".into(), vec!["halo".into()])]),
                    interval: Duration::from_secs(30),
                    timeout: Some(Duration::from_millis(200)),
                },
                deregister_critical_service_after: None,
            },
        ],
    };
    client.register_service(&reg).await.unwrap();

    let got = client.agent_service("web-1").await.unwrap().expect("registered");
    assert_eq!(got.service, "web");
    assert_eq!(got.tags, ["v1", "blue"]);
    assert_eq!((got.address.as_str(), got.port), ("127.0.0.1", 9001));
    assert_eq!(got.meta, reg.meta);
    assert_eq!(
        got.weights,
        Weights {
            passing: 10,
            warning: 1
        }
    );

    let checks = client.agent_checks().await.unwrap();
    for id in ["web-1:app", "web-1:tcp", "web-1:http"] {
        assert_eq!(checks[id].service_id, "web-1", "check {id} belongs to the service");
    }
    assert_eq!(checks["web-1:app"].status, CheckStatus::Passing);

    // The health view carries the same instance.
    let entries = client
        .health_service("web", HealthQuery::all(), QueryOptions::default())
        .await
        .unwrap()
        .value;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].service.id, "web-1");
    assert_eq!(entries[0].address(), "127.0.0.1");
    assert_eq!(entries[0].service.meta["zone"], "zone-a");

    // Re-registering without the agent-run checks drops them.
    let fewer = ServiceRegistration {
        checks: reg.checks[..1].to_vec(),
        ..reg.clone()
    };
    client.register_service(&fewer).await.unwrap();
    let checks = client.agent_checks().await.unwrap();
    assert!(checks.contains_key("web-1:app"));
    assert!(
        !checks.contains_key("web-1:tcp"),
        "replace-existing-checks removes stale checks"
    );

    client.deregister_service("web-1").await.unwrap();
    assert_eq!(client.agent_service("web-1").await.unwrap(), None);
    assert!(!client.agent_checks().await.unwrap().contains_key("web-1:app"));
}

#[tokio::test]
async fn ttl_checks_take_pass_warn_fail_and_update_with_output() {
    let (_agent, client) = agent().await;
    let check = register_with_ttl(&client, "api", "api-1", Duration::from_secs(30)).await;
    let status = |c: &halo_consul::Client| {
        let c = c.clone();
        let check = check.clone();
        async move {
            let checks = c.agent_checks().await.unwrap();
            (checks[&check].status, checks[&check].output.clone())
        }
    };

    client.check_warn(&check, "slow").await.unwrap();
    assert_eq!(status(&client).await, (CheckStatus::Warning, "slow".into()));
    client.check_fail(&check, "down: 500").await.unwrap();
    assert_eq!(status(&client).await, (CheckStatus::Critical, "down: 500".into()));
    client.check_pass(&check, "").await.unwrap();
    assert_eq!(status(&client).await.0, CheckStatus::Passing);
    let long = "x".repeat(2000);
    client.update_check(&check, CheckStatus::Warning, &long).await.unwrap();
    let (s, out) = status(&client).await;
    assert_eq!(s, CheckStatus::Warning);
    assert!(out.starts_with("xxxx"), "output kept: {} bytes", out.len());
}

#[tokio::test]
async fn an_unknown_check_is_not_found_so_callers_register_again() {
    let (_agent, client) = agent().await;
    for result in [
        client.check_pass("nope", "").await,
        client.check_fail("nope", "x").await,
        client.update_check("nope", CheckStatus::Passing, "").await,
    ] {
        match result {
            Err(Error::NotFound { .. }) => {}
            other => panic!("expected NotFound, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn maintenance_hides_an_instance_from_passing_queries() {
    let (_agent, client) = agent().await;
    register_with_ttl(&client, "db", "db-1", Duration::from_secs(30)).await;
    let passing = || async {
        client
            .health_service("db", HealthQuery::passing(), QueryOptions::default())
            .await
            .unwrap()
            .value
            .len()
    };
    assert_eq!(passing().await, 1);
    client
        .set_service_maintenance("db-1", true, Some("draining"))
        .await
        .unwrap();
    assert_eq!(passing().await, 0);
    let all = client
        .health_service("db", HealthQuery::all(), QueryOptions::default())
        .await
        .unwrap()
        .value;
    let maint = all[0]
        .checks
        .iter()
        .find(|c| c.check_id.starts_with("_service_maintenance"))
        .expect("a maintenance check");
    assert_eq!(maint.status, CheckStatus::Critical);
    assert!(maint.output.contains("draining") || maint.name.contains("Maintenance"));
    client.set_service_maintenance("db-1", false, None).await.unwrap();
    assert_eq!(passing().await, 1);

    match client.set_service_maintenance("nope", true, None).await {
        Err(Error::NotFound { .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}
