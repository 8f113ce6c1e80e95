//! A request the real agent refuses outright is reported with Consul's
//! reason, counted, and retried slowly, not hot.

use std::time::Duration;

use halo_consul::Client;
use halo_sidecar::sync::{self, SyncStatus, REFUSED_BACKOFF};
use halo_testkit::{eventually, ConsulAgent};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::DEADLINE;

#[tokio::test]
async fn a_refused_registration_is_reported_and_retried_slowly() {
    let consul = ConsulAgent::start().await;
    let text = format!(
        "[consul]\naddress = \"{}\"\n[service]\nname = \"web\"\nid = \"web-9\"\nport = 9\ncheck_ttl = \"1s\"\n",
        consul.http_url()
    );
    let mut settings = halo_sidecar::config::load_str("test", Some(&text), Vec::new()).unwrap();
    // `check` refuses this key; set it behind validation's back to stand in
    // for what only the agent knows (an ACL denial, a newer Consul's rule).
    settings
        .config
        .service
        .meta
        .insert("consul-reserved".into(), "x".into());
    let client = Client::from_address(consul.http_url()).unwrap();
    let (_draining_tx, draining) = watch::channel(false);
    let (status_tx, status) = watch::channel(SyncStatus::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(sync::run(
        client.clone(),
        settings,
        Vec::new(),
        draining,
        stop.clone(),
        status_tx,
        std::sync::Arc::new(tokio::sync::Notify::new()),
    ));

    let refused = eventually(DEADLINE, "a refusal", || async {
        let s = status.borrow().clone();
        (s.refusals >= 1).then_some(s)
    })
    .await;
    let error = refused.last_error.clone().unwrap();
    assert!(
        error.contains("400") && error.contains("reserved"),
        "Consul's reason: {error}"
    );
    assert_eq!(refused.retry_in_ms, Some(REFUSED_BACKOFF.as_millis() as u64));
    assert!(!refused.registered);

    // Not hot: within 3 s the old back-off (100 ms doubling) would have
    // asked four more times. This window is the observation itself, not a
    // wait for a condition.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = status.borrow().clone();
    assert_eq!(
        later.attempts, refused.attempts,
        "retried within the refusal back-off: {later:?}"
    );
    assert_eq!(client.agent_service("web-9").await.unwrap(), None);
    stop.cancel();
    task.await.unwrap();
}
