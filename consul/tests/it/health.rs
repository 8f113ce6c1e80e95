use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use halo_consul::{CheckRegistration, CheckStatus, Consistency, HealthQuery, QueryOptions, ServiceRegistration, Watch};

use crate::agent;

async fn register(client: &halo_consul::Client, id: &str, zone: &str, tag: &str, port: u16) {
    client
        .register_service(&ServiceRegistration {
            id: id.into(),
            name: "web".into(),
            tags: vec![tag.into()],
            address: Some("127.0.0.1".into()),
            port: Some(port),
            meta: BTreeMap::from([("zone".into(), zone.into())]),
            checks: vec![CheckRegistration::ttl(
                format!("{id}:ttl"),
                "ttl",
                Duration::from_secs(60),
                CheckStatus::Passing,
            )],
            ..ServiceRegistration::default()
        })
        .await
        .unwrap();
}

fn ids(entries: &[halo_consul::ServiceEntry]) -> Vec<String> {
    let mut ids: Vec<String> = entries.iter().map(|e| e.service.id.clone()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn passing_tag_and_filter_select_instances() {
    let (_agent, client) = agent().await;
    register(&client, "web-a", "zone-a", "v1", 9001).await;
    register(&client, "web-b", "zone-b", "v2", 9002).await;
    register(&client, "web-c", "zone-a", "v2", 9003).await;
    client.check_fail("web-c:ttl", "down").await.unwrap();
    let read = |q: HealthQuery<'static>| {
        let client = client.clone();
        async move {
            ids(&client
                .health_service("web", q, QueryOptions::default())
                .await
                .unwrap()
                .value)
        }
    };

    assert_eq!(read(HealthQuery::all()).await, ["web-a", "web-b", "web-c"]);
    assert_eq!(read(HealthQuery::passing()).await, ["web-a", "web-b"]);
    assert_eq!(
        read(HealthQuery {
            tag: Some("v2"),
            ..HealthQuery::all()
        })
        .await,
        ["web-b", "web-c"]
    );
    assert_eq!(
        read(HealthQuery {
            passing: true,
            filter: Some("Service.Meta.zone == \"zone-a\""),
            tag: None,
        })
        .await,
        ["web-a"]
    );
    // An unknown service is an empty list, not an error.
    let none = client
        .health_service("nope", HealthQuery::all(), QueryOptions::default())
        .await
        .unwrap();
    assert!(none.value.is_empty());
    // A bad filter is Consul's error, with its message.
    let err = client
        .health_service(
            "web",
            HealthQuery {
                filter: Some("bad filter"),
                ..HealthQuery::all()
            },
            QueryOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, halo_consul::Error::Status { .. }), "{err:?}");
    assert!(
        err.to_string().contains("filter") || err.to_string().contains("expression"),
        "{err}"
    );
}

#[tokio::test]
async fn consistency_modes_are_answered_with_leader_headers() {
    let (_agent, client) = agent().await;
    register(&client, "web-a", "zone-a", "v1", 9001).await;
    for mode in [Consistency::Default, Consistency::Stale, Consistency::Consistent] {
        let answer = client
            .health_service("web", HealthQuery::all(), QueryOptions::with_consistency(mode))
            .await
            .unwrap();
        assert_eq!(answer.value.len(), 1, "{mode:?}");
        assert!(answer.meta.index > 0, "{mode:?} carries an index");
        assert!(answer.meta.known_leader, "{mode:?} knows the leader");
    }
}

#[tokio::test]
async fn a_blocking_health_query_waits_without_change_and_returns_on_a_flip() {
    let (_agent, client) = agent().await;
    register(&client, "web-a", "zone-a", "v1", 9001).await;
    let mut watch = Watch::new(Duration::from_millis(1500));
    let first = watch
        .next(|o| client.health_service("web", HealthQuery::passing(), o))
        .await
        .unwrap();
    assert_eq!(first.value.len(), 1);

    // Nothing changes: the call blocks for about the wait and returns the same body.
    let start = Instant::now();
    let same = watch
        .next(|o| client.health_service("web", HealthQuery::passing(), o))
        .await
        .unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(1400),
        "blocked {:?}",
        start.elapsed()
    );
    assert_eq!(same.value, first.value);

    // A check flip during a long wait wakes the query promptly.
    let mut watch = Watch::new(Duration::from_secs(60));
    watch.observe(&same.meta);
    let flipper = {
        let client = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            client.check_fail("web-a:ttl", "down").await.unwrap();
        })
    };
    let start = Instant::now();
    let changed = watch
        .next(|o| client.health_service("web", HealthQuery::passing(), o))
        .await
        .unwrap();
    assert!(changed.value.is_empty(), "the failing instance left ?passing");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "woke after {:?}",
        start.elapsed()
    );
    flipper.await.unwrap();
}
