use std::time::{Duration, Instant};

use halo_consul::{Consistency, Error, QueryOptions, SessionChecks, SessionRequest, Watch};

use crate::agent;

#[tokio::test]
async fn put_get_cas_and_delete() {
    let (_agent, client) = agent().await;
    let now = QueryOptions::default();
    assert_eq!(client.kv_get("a/b", now).await.unwrap().value, None);
    assert_eq!(client.kv_get_raw("a/b", now).await.unwrap().value, None);

    assert!(client.kv_put("a/b", "one").await.unwrap());
    let pair = client.kv_get("a/b", now).await.unwrap().value.unwrap();
    assert_eq!(pair.key, "a/b");
    assert_eq!(pair.value.as_deref(), Some(&b"one"[..]));
    assert_eq!(pair.session, None);
    assert_eq!(pair.lock_index, 0);
    assert_eq!(
        client.kv_get_raw("a/b", now).await.unwrap().value.as_deref(),
        Some(&b"one"[..])
    );

    // cas=0 only creates; a stale index loses; the current one wins.
    assert!(!client.kv_cas("a/b", "two", 0).await.unwrap());
    assert!(!client.kv_cas("a/b", "two", pair.modify_index + 100).await.unwrap());
    assert!(client.kv_cas("a/b", "two", pair.modify_index).await.unwrap());
    assert!(client.kv_cas("a/new", "x", 0).await.unwrap());

    // Keys with spaces and query characters survive the round trip.
    assert!(client.kv_put("odd key/with?chars&=", "v").await.unwrap());
    let odd = client.kv_get("odd key/with?chars&=", now).await.unwrap().value.unwrap();
    assert_eq!(odd.key, "odd key/with?chars&=");

    // Binary values are decoded from base64.
    let bytes: Vec<u8> = (0u8..=255).collect();
    assert!(client.kv_put("bin", bytes.clone()).await.unwrap());
    let pair = client.kv_get("bin", now).await.unwrap().value.unwrap();
    assert_eq!(pair.value.as_deref(), Some(&bytes[..]));

    assert!(client.kv_delete("a/b").await.unwrap());
    assert_eq!(client.kv_get("a/b", now).await.unwrap().value, None);
    assert!(
        client.kv_delete("a/b").await.unwrap(),
        "deleting a missing key succeeds"
    );
}

async fn session(client: &halo_consul::Client, lock_delay: Duration) -> String {
    client
        .session_create(&SessionRequest {
            lock_delay: Some(lock_delay),
            ..SessionRequest::default()
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn a_second_session_cannot_acquire_a_held_lock_until_it_is_released() {
    let (_agent, client) = agent().await;
    let key = "halo/pair/leader";
    let s1 = session(&client, Duration::from_secs(15)).await;
    let s2 = session(&client, Duration::from_secs(15)).await;
    let now = QueryOptions::with_consistency(Consistency::Consistent);

    assert!(client.kv_acquire(key, "s1", &s1).await.unwrap());
    let first = client.kv_get(key, now).await.unwrap().value.unwrap();
    assert_eq!(first.session.as_deref(), Some(s1.as_str()));
    assert_eq!(first.lock_index, 1);

    assert!(!client.kv_acquire(key, "s2", &s2).await.unwrap(), "held by s1");
    assert!(
        !client.kv_release(key, "s2", &s2).await.unwrap(),
        "s2 cannot release s1's lock"
    );

    // Re-acquiring by the holder updates the value and keeps the LockIndex.
    assert!(client.kv_acquire(key, "s1-again", &s1).await.unwrap());
    let again = client.kv_get(key, now).await.unwrap().value.unwrap();
    assert_eq!(again.lock_index, 1);
    assert_eq!(again.value.as_deref(), Some(&b"s1-again"[..]));

    // A voluntary release starts no lock delay: s2 gets it at once, and the
    // LockIndex (the fencing epoch) rises.
    assert!(client.kv_release(key, "released", &s1).await.unwrap());
    assert!(client.kv_acquire(key, "s2", &s2).await.unwrap());
    let second = client.kv_get(key, now).await.unwrap().value.unwrap();
    assert_eq!(second.session.as_deref(), Some(s2.as_str()));
    assert_eq!(second.lock_index, 2);
}

#[tokio::test]
async fn an_invalidated_session_leaves_a_lock_delay_and_cannot_acquire() {
    let (_agent, client) = agent().await;
    let key = "halo/pair/leader";
    let delay = Duration::from_secs(2);
    let s1 = session(&client, delay).await;
    let s2 = session(&client, delay).await;
    assert!(client.kv_acquire(key, "s1", &s1).await.unwrap());

    // Destroying the holder is an invalidation: for the lock delay nobody
    // acquires (false, not an error).
    client.session_destroy(&s1).await.unwrap();
    let destroyed = Instant::now();
    assert!(!client.kv_acquire(key, "s2", &s2).await.unwrap(), "lock delay holds");
    let mut acquired_after = None;
    while destroyed.elapsed() < Duration::from_secs(20) {
        if client.kv_acquire(key, "s2", &s2).await.unwrap() {
            acquired_after = Some(destroyed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = acquired_after.expect("acquired once the lock delay ran out");
    assert!(after >= delay - Duration::from_millis(100), "acquired after {after:?}");

    // The destroyed session itself is rejected as invalid, not as "false".
    match client.kv_acquire(key, "s1", &s1).await {
        Err(Error::InvalidSession { session, .. }) => assert_eq!(session, s1),
        other => panic!("expected InvalidSession, got {other:?}"),
    }
}

#[tokio::test]
async fn a_blocking_get_returns_on_change_and_waits_otherwise() {
    let (_agent, client) = agent().await;
    let key = "halo/watch/me";
    client.kv_put(key, "v1").await.unwrap();
    let mut watch = Watch::new(Duration::from_millis(1000)).consistency(Consistency::Consistent);
    let first = watch.next(|o| client.kv_get(key, o)).await.unwrap();
    assert_eq!(first.value.unwrap().value.as_deref(), Some(&b"v1"[..]));

    let start = Instant::now();
    let same = watch.next(|o| client.kv_get(key, o)).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "blocked {:?}",
        start.elapsed()
    );
    assert_eq!(same.meta.index, first.meta.index);

    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            client.kv_put(key, "v2").await.unwrap();
        })
    };
    let mut watch = Watch::new(Duration::from_secs(60)).consistency(Consistency::Consistent);
    watch.observe(&same.meta);
    let start = Instant::now();
    let changed = watch.next(|o| client.kv_get(key, o)).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(20));
    assert_eq!(changed.value.unwrap().value.as_deref(), Some(&b"v2"[..]));
    assert!(changed.meta.index > same.meta.index);
    writer.await.unwrap();

    // A missing key can be watched too: its creation wakes the watcher.
    let missing = client
        .kv_get("halo/watch/later", QueryOptions::default())
        .await
        .unwrap();
    assert_eq!(missing.value, None);
    assert!(missing.meta.index > 0);
    let creator = {
        let client = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            client.kv_put("halo/watch/later", "here").await.unwrap();
        })
    };
    let mut watch = Watch::new(Duration::from_secs(60));
    watch.observe(&missing.meta);
    let created = watch.next(|o| client.kv_get("halo/watch/later", o)).await.unwrap();
    assert!(created.value.is_some());
    creator.await.unwrap();
}

#[tokio::test]
async fn raw_blocking_get_and_legacy_sessions_work_together() {
    let (_agent, client) = agent().await;
    let s = client
        .session_create(&SessionRequest {
            checks: SessionChecks::Legacy(vec!["serfHealth".into()]),
            ..SessionRequest::default()
        })
        .await
        .unwrap();
    assert!(client.kv_acquire("k", "held", &s).await.unwrap());
    let raw = client.kv_get_raw("k", QueryOptions::default()).await.unwrap();
    assert_eq!(raw.value.as_deref(), Some(&b"held"[..]));
    let blocked = client
        .kv_get_raw("k", QueryOptions::blocking(raw.meta.index, Duration::from_millis(300)))
        .await
        .unwrap();
    assert_eq!(blocked.value, raw.value);
}
