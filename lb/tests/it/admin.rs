use crate::support::*;

#[tokio::test]
async fn status_and_metrics_describe_vips_backends_and_tables() {
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let b = TestBackend::start("b", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let lb = Lb::start(
        &one_vip(admin, vip, &[a.addr, b.addr], "algorithm = \"least_conn\""),
        admin,
        &[vip],
    )
    .await;
    let (_, _held) = greeting(vip).await.unwrap();

    let status = lb.status().await;
    let v = &status["vips"][0];
    assert_eq!(v["name"], "web");
    assert_eq!(v["algorithm"], "least_conn");
    assert_eq!(v["listen"], vip.to_string());
    assert!(v["table_version"].as_u64().unwrap() >= 1);
    let backends = v["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    assert!(backends.iter().all(|b| b["state"] == "healthy"));
    let live: u64 = backends.iter().map(|b| b["active_connections"].as_u64().unwrap()).sum();
    assert_eq!(live, 1);

    let (code, text) = halo_testkit::http::get(admin, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    for name in [
        "halo_vip_connections_total{vip=\"web\"}",
        "halo_vip_active_connections{vip=\"web\"}",
        "halo_vip_bytes_total{vip=\"web\",direction=\"out\"}",
        "halo_table_version{vip=\"web\"}",
        "halo_table_swaps_total{vip=\"web\"}",
        "halo_backend_up{vip=\"web\",backend=",
        "halo_table_build_seconds",
    ] {
        assert!(text.contains(name), "missing {name}:\n{text}");
    }
}

#[tokio::test]
async fn operators_can_disable_and_enable_a_backend() {
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let b = TestBackend::start("b", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let lb = Lb::start(&one_vip(admin, vip, &[a.addr, b.addr], ""), admin, &[vip]).await;

    let (code, body) = halo_testkit::http::admin_post(admin, &format!("/vips/web/backends/{}/disable", a.addr))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let log = lb.log();
    let line = log
        .lines()
        .find(|l| l.contains("backend state set by operator"))
        .expect("the write is logged");
    assert!(line.contains("client=127.0.0.1:"), "the log names who asked: {line}");
    for _ in 0..10 {
        assert_eq!(greeting(vip).await.unwrap().0, "b");
    }
    let status = lb.status().await;
    let states: Vec<_> = status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["state"].clone())
        .collect();
    assert!(states.contains(&serde_json::json!("disabled")));

    let (code, _) = halo_testkit::http::admin_post(admin, &format!("/vips/web/backends/{}/enable", a.addr))
        .await
        .unwrap();
    assert_eq!(code, 200);
    let mut names = std::collections::HashSet::new();
    for _ in 0..10 {
        names.insert(greeting(vip).await.unwrap().0);
    }
    assert_eq!(names.len(), 2);

    // Unknown vip, unknown backend, bad address.
    for (path, want) in [
        ("/vips/nope/backends/127.0.0.1:1/disable".to_owned(), 404),
        ("/vips/web/backends/127.0.0.1:1/disable".to_owned(), 404),
        ("/vips/web/backends/banana/disable".to_owned(), 400),
    ] {
        let (code, _) = halo_testkit::http::admin_post(admin, &path).await.unwrap();
        assert_eq!(code, want, "{path}");
    }
    let (code, _) = halo_testkit::http::request(admin, "DELETE", "/status").await.unwrap();
    assert_eq!(code, 405);
}
