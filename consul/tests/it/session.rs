use std::time::{Duration, Instant};

use halo_consul::{Consistency, Error, QueryOptions, SessionBehavior, SessionChecks, SessionRequest, Watch};

use crate::{agent, register_with_ttl};

#[tokio::test]
async fn check_lists_are_sent_so_that_an_empty_node_list_drops_serf_health() {
    let (_agent, client) = agent().await;
    let check = register_with_ttl(&client, "lb", "lb-1", Duration::from_secs(30)).await;

    let default = client.session_create(&SessionRequest::default()).await.unwrap();
    let info = client.session_info(&default).await.unwrap().unwrap();
    assert_eq!(info.node_checks, ["serfHealth"]);
    assert_eq!(info.lock_delay, Duration::from_secs(15), "Consul's default lock delay");
    assert_eq!(info.behavior, SessionBehavior::Release);

    let bound = client
        .session_create(&SessionRequest {
            name: Some("halo-test".into()),
            lock_delay: Some(Duration::from_millis(250)),
            behavior: Some(SessionBehavior::Delete),
            checks: SessionChecks::Bound {
                node_checks: vec![],
                service_checks: vec![check.clone()],
            },
            ..SessionRequest::default()
        })
        .await
        .unwrap();
    let info = client.session_info(&bound).await.unwrap().unwrap();
    assert_eq!(info.name, "halo-test");
    assert!(info.node_checks.is_empty(), "serfHealth dropped: {info:?}");
    assert_eq!(info.service_checks.len(), 1);
    assert_eq!(info.service_checks[0].id, check);
    assert_eq!(
        info.lock_delay,
        Duration::from_millis(250),
        "sent as a string, not seconds"
    );
    assert_eq!(info.behavior, SessionBehavior::Delete);

    let legacy = client
        .session_create(&SessionRequest {
            checks: SessionChecks::Legacy(vec![]),
            ..SessionRequest::default()
        })
        .await
        .unwrap();
    let info = client.session_info(&legacy).await.unwrap().unwrap();
    assert!(
        info.node_checks.is_empty(),
        "an explicit empty legacy list drops serfHealth"
    );
    assert!(info.checks.is_empty());

    // Binding to a missing check is refused.
    let err = client
        .session_create(&SessionRequest {
            checks: SessionChecks::Bound {
                node_checks: vec![],
                service_checks: vec!["missing".into()],
            },
            ..SessionRequest::default()
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[tokio::test]
async fn renew_adopts_the_ttl_and_a_gone_session_is_not_found() {
    let (_agent, client) = agent().await;
    let id = client
        .session_create(&SessionRequest {
            ttl: Some(Duration::from_secs(10)),
            ..SessionRequest::default()
        })
        .await
        .unwrap();
    let renewed = client.session_renew(&id).await.unwrap();
    assert_eq!(renewed.id, id);
    assert_eq!(renewed.ttl, Some(Duration::from_secs(10)));

    client.session_destroy(&id).await.unwrap();
    assert_eq!(client.session_info(&id).await.unwrap(), None);
    match client.session_renew(&id).await {
        Err(Error::NotFound { .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    // Destroying again is fine.
    client.session_destroy(&id).await.unwrap();
}

#[tokio::test]
async fn a_session_bound_to_a_ttl_check_is_invalidated_when_the_check_goes_critical() {
    let (_agent, client) = agent().await;
    let check = register_with_ttl(&client, "lb", "lb-1", Duration::from_millis(500)).await;
    client.check_pass(&check, "alive").await.unwrap();
    let session = client
        .session_create(&SessionRequest {
            lock_delay: Some(Duration::ZERO),
            checks: SessionChecks::Bound {
                node_checks: vec![],
                service_checks: vec![check.clone()],
            },
            ..SessionRequest::default()
        })
        .await
        .unwrap();
    assert!(client.kv_acquire("halo/t/leader", "me", &session).await.unwrap());

    // Keep the check alive for a while: the lock stays.
    for _ in 0..4 {
        client.check_pass(&check, "alive").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let held = client
        .kv_get("halo/t/leader", QueryOptions::with_consistency(Consistency::Consistent))
        .await
        .unwrap();
    assert_eq!(held.value.as_ref().unwrap().session.as_deref(), Some(session.as_str()));

    // Stop heartbeating: the check expires, the session is invalidated, and a
    // consistent blocking watch sees the lock released.
    let stopped = Instant::now();
    let mut watch = Watch::new(Duration::from_secs(30)).consistency(Consistency::Consistent);
    watch.observe(&held.meta);
    loop {
        let answer = watch.next(|o| client.kv_get("halo/t/leader", o)).await.unwrap();
        let pair = answer.value.expect("release keeps the key");
        if pair.session.is_none() {
            assert_eq!(pair.value.as_deref(), Some(&b"me"[..]), "value stays");
            break;
        }
        assert!(stopped.elapsed() < Duration::from_secs(20), "lock never released");
    }
    assert_eq!(
        client.session_info(&session).await.unwrap(),
        None,
        "session invalidated"
    );
    let checks = client.agent_checks().await.unwrap();
    assert_eq!(checks[&check].status, halo_consul::CheckStatus::Critical);
}
