use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use halo_consul::{CheckRegistration, CheckStatus, Client, ServiceRegistration, Weights};
use halo_testkit::{eventually, ConsulAgent};

use crate::support::*;

pub async fn register(client: &Client, id: &str, backend: &TestBackend, zone: &str) {
    client
        .register_service(&ServiceRegistration {
            id: id.into(),
            name: "web".into(),
            address: Some("127.0.0.1".into()),
            port: Some(backend.addr.port()),
            meta: BTreeMap::from([
                ("zone".into(), zone.into()),
                ("region".into(), "eu".into()),
                ("rack".into(), format!("rack-{id}")),
            ]),
            weights: Some(Weights { passing: 3, warning: 1 }),
            checks: vec![CheckRegistration::ttl(
                format!("{id}:ttl"),
                "ttl",
                Duration::from_secs(300),
                CheckStatus::Passing,
            )],
            ..ServiceRegistration::default()
        })
        .await
        .unwrap();
}

fn config(consul: &ConsulAgent, admin: std::net::SocketAddr, vip: std::net::SocketAddr) -> String {
    format!(
        "[admin]\nlisten = \"{admin}\"\n[consul]\naddress = \"{}\"\nwait = \"30s\"\n[[vip]]\nname = \"web\"\nlisten = \"{vip}\"\nservice = \"web\"\n",
        consul.http_url()
    )
}

#[tokio::test]
async fn passing_instances_become_backends_and_failing_ones_leave() {
    let consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let b = TestBackend::start("b", Behavior::GreetEcho).await;
    register(&client, "web-a", &a, "zone-a").await;
    register(&client, "web-b", &b, "zone-b").await;

    let (admin, vip) = addrs();
    let lb = Lb::start(&config(&consul, admin, vip), admin, &[vip]).await;
    let mut both = vec![a.addr.to_string(), b.addr.to_string()];
    both.sort();
    eventually(DEADLINE, "both instances in the table", || async {
        (table_addrs(&lb).await == both).then_some(())
    })
    .await;
    let status = lb.status().await;
    let entry = &status["vips"][0]["backends"][0];
    assert_eq!(entry["weight"], 3, "weight from Consul's Weights.Passing");
    assert!(
        entry["zone"].as_str().unwrap().starts_with("zone-"),
        "zone from the service meta"
    );
    assert_eq!(entry["region"], "eu", "region from the service meta");
    assert!(
        entry["rack"].as_str().unwrap().starts_with("rack-web-"),
        "rack from the service meta"
    );
    let spread = &status["vips"][0]["spread"];
    assert_eq!(
        (&spread["zones"], &spread["regions"], &spread["racks"]),
        (&2.into(), &1.into(), &2.into()),
        "{spread}"
    );
    assert_eq!(status["vips"][0]["discovery"]["up"], true);
    assert_eq!(
        served_by(vip, 12).await,
        HashSet::from(["a".to_owned(), "b".to_owned()])
    );

    client.check_fail("web-a:ttl", "down").await.unwrap();
    eventually(DEADLINE, "the failing instance to leave the table", || async {
        (table_addrs(&lb).await == [b.addr.to_string()]).then_some(())
    })
    .await;
    assert_eq!(served_by(vip, 6).await, HashSet::from(["b".to_owned()]));
}

/// Consul's check states give weights as Consul's DNS does: passing →
/// `Weights.Passing`, warning → `Weights.Warning`, critical (the instance's
/// own check, or maintenance mode) → out of the table.
#[tokio::test]
async fn warning_instances_serve_at_their_warning_weight_and_critical_ones_leave() {
    use halo_lb::status::{BackendHealth, Watched};

    let consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let b = TestBackend::start("b", Behavior::GreetEcho).await;
    register(&client, "web-a", &a, "zone-a").await;
    register(&client, "web-b", &b, "zone-b").await;
    client.check_warn("web-b:ttl", "slow").await.unwrap();

    let (admin, vip) = addrs();
    let lb = Lb::start(&config(&consul, admin, vip), admin, &[vip]).await;
    let weights = |status: &halo_lb::status::Status| -> BTreeMap<String, u32> {
        status.vips[0]
            .backends
            .iter()
            .map(|b| (b.address.clone(), b.weight))
            .collect()
    };
    let warned = BTreeMap::from([(a.addr.to_string(), 3), (b.addr.to_string(), 1)]);
    let status = eventually(DEADLINE, "a at its passing weight, b at its warning weight", || async {
        let status = lb.typed_status().await;
        (weights(&status) == warned).then_some(status)
    })
    .await;
    let vip_status = &status.vips[0];
    assert!(vip_status.backends.iter().all(|b| b.state == BackendHealth::Healthy));
    let discovery = vip_status.discovery.as_ref().expect("consul discovery in /status");
    assert_eq!(
        discovery.watched,
        Watched::Consul {
            service: "web".into(),
            tag: None
        }
    );
    assert!(discovery.up && discovery.index.is_some(), "{discovery:?}");
    assert_eq!(discovery.instances, 2);
    assert_eq!(
        served_by(vip, 16).await,
        HashSet::from(["a".to_owned(), "b".to_owned()]),
        "a warning instance still serves"
    );

    // Back to passing: its passing weight.
    client.check_pass("web-b:ttl", "fine").await.unwrap();
    let passing = BTreeMap::from([(a.addr.to_string(), 3), (b.addr.to_string(), 3)]);
    eventually(DEADLINE, "b back at its passing weight", || async {
        (weights(&lb.typed_status().await) == passing).then_some(())
    })
    .await;

    // Maintenance mode is a critical check: out.
    client
        .set_service_maintenance("web-b", true, Some("deploy"))
        .await
        .unwrap();
    let only_a = BTreeMap::from([(a.addr.to_string(), 3)]);
    eventually(DEADLINE, "b in maintenance to leave the table", || async {
        (weights(&lb.typed_status().await) == only_a).then_some(())
    })
    .await;
    assert_eq!(served_by(vip, 6).await, HashSet::from(["a".to_owned()]));
}

#[tokio::test]
async fn a_consul_outage_keeps_the_last_good_table_serving() {
    let mut consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    register(&client, "web-a", &a, "zone-a").await;
    let (admin, vip) = addrs();
    let lb = Lb::start(&config(&consul, admin, vip), admin, &[vip]).await;
    eventually(DEADLINE, "the instance in the table", || async {
        (table_addrs(&lb).await == [a.addr.to_string()]).then_some(())
    })
    .await;
    let version = lb.status().await["vips"][0]["table_version"].clone();

    consul.stop();
    eventually(DEADLINE, "discovery to report the outage", || async {
        let status = lb.status().await;
        (status["vips"][0]["discovery"]["up"] == false).then_some(())
    })
    .await;
    let status = lb.status().await;
    assert!(status["vips"][0]["discovery"]["last_error"]
        .as_str()
        .unwrap()
        .contains("Consul"));
    assert_eq!(
        table_addrs(&lb).await,
        [a.addr.to_string()],
        "never emptied by an error"
    );
    assert_eq!(status["vips"][0]["table_version"], version, "no swap during the outage");
    assert_eq!(served_by(vip, 4).await, HashSet::from(["a".to_owned()]));
    let (_, metrics) = halo_testkit::http::get(admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("halo_discovery_up{vip=\"web\",source=\"consul\"} 0"),
        "{metrics}"
    );

    // Back, with the registration restored: discovery resumes.
    consul.restart().await;
    register(&client, "web-a", &a, "zone-a").await;
    eventually(DEADLINE, "discovery to recover", || async {
        (lb.status().await["vips"][0]["discovery"]["up"] == true).then_some(())
    })
    .await;
    // The restarted agent may first answer with no instance (the
    // registration not yet in): a real answer, so wait for the next one.
    eventually(DEADLINE, "the re-registered instance in the table", || async {
        (table_addrs(&lb).await == [a.addr.to_string()]).then_some(())
    })
    .await;
}

#[test]
fn static_and_consul_backends_are_exclusive() {
    let e = halo_lb::Config::parse(
        "[[vip]]\nname = \"w\"\nlisten = \"127.0.0.1:1\"\nbackends = [\"127.0.0.1:2\"]\nservice = \"web\"\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("vip[0].service: set exactly one of"), "{e}");
}

#[tokio::test]
async fn a_backend_killed_under_load_costs_no_client_errors_and_leaves_the_table_within_a_second() {
    let consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let mut a = TestBackend::start("a", Behavior::GreetEcho).await;
    let b = TestBackend::start("b", Behavior::GreetEcho).await;
    let c = TestBackend::start("c", Behavior::GreetEcho).await;
    for (id, backend) in [("web-a", &a), ("web-b", &b), ("web-c", &c)] {
        register(&client, id, backend, "zone-a").await;
    }
    let (admin, vip) = addrs();
    let lb = Lb::start(&config(&consul, admin, vip), admin, &[vip]).await;
    eventually(DEADLINE, "three instances in the table", || async {
        (table_addrs(&lb).await.len() == 3).then_some(())
    })
    .await;
    // Four clients opening connections back to back.
    let probers: Vec<Prober> = (0..4).map(|_| Prober::start(vip)).collect();
    for p in &probers {
        served_after(&p.log, std::time::Instant::now()).await;
    }

    // The backend dies between requests; its sidecar's check flips to
    // critical (pushed here as the sidecar would after `fall` probes).
    a.close_listener().await;
    let killed = std::time::Instant::now();
    let flipped = std::time::Instant::now();
    client.check_fail("web-a:ttl", "connection refused").await.unwrap();
    let gone = eventually(DEADLINE, "the dead instance to leave the table", || async {
        (!table_addrs(&lb).await.contains(&a.addr.to_string())).then(std::time::Instant::now)
    })
    .await;
    let swap = gone - flipped;
    // Keep the load on for a while after the swap.
    for p in &probers {
        eventually(DEADLINE, "more connections after the swap", || async {
            (p.log.lock().unwrap().iter().filter(|(at, _)| *at > gone).count() >= 50).then_some(())
        })
        .await;
    }
    let mut log = Vec::new();
    for p in probers {
        log.extend(p.stop().await);
    }

    // A connection the dying backend's kernel had already completed (in its
    // accept queue at the kill) is reset, as with any crash; no balancer can
    // retry it. Every connection opened after the kill must succeed.
    let in_flight = log.iter().filter(|(at, ok)| *at < killed && !ok).count();
    let failures = log.iter().filter(|(at, ok)| *at >= killed && !ok).count();
    eprintln!(
        "backend killed: table swap {swap:?} after the check flip; {} connections, {failures} failed after the kill, {in_flight} caught in flight",
        log.len()
    );
    assert_eq!(failures, 0, "the data plane retries refused connects on other backends");
    assert!(swap <= Duration::from_secs(1), "table swap took {swap:?}");
    let status = lb.status().await;
    assert!(
        status["vips"][0]["discovery"]["up"] == true,
        "discovery is up: {status}"
    );
}

/// PUTs `body` to the ACL-enabled agent with the master token; the JSON
/// answer.
async fn acl_put(consul: &ConsulAgent, path: &str, body: &str) -> serde_json::Value {
    let (code, answer) = halo_testkit::http::request_with_token(consul.http_addr(), "PUT", path, MASTER, body)
        .await
        .expect("the agent answers");
    assert_eq!(code, 200, "PUT {path}: {answer}");
    serde_json::from_str(&answer).unwrap()
}

const MASTER: &str = "8f2c1bb6-6c33-4b6a-9d0c-2d6a0f6d1e01";

#[tokio::test]
async fn an_empty_answer_that_may_be_an_acl_filter_keeps_the_table() {
    // Consul 1.8 answers 200 [] to a token that lost service:read: exactly
    // what "no instance" looks like. That must not empty the table.
    let consul = ConsulAgent::start_with_acl(MASTER).await;
    let admin_client = Client::new(halo_consul::Config {
        address: Some(consul.http_url()),
        token: Some(MASTER.to_owned()),
        ..halo_consul::Config::default()
    })
    .unwrap();
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let b = TestBackend::start("b", Behavior::GreetEcho).await;
    register(&admin_client, "web-a", &a, "zone-a").await;
    register(&admin_client, "web-b", &b, "zone-b").await;
    let rules = r#"service_prefix \"\" { policy = \"read\" } node_prefix \"\" { policy = \"read\" }"#;
    let policy = acl_put(
        &consul,
        "/v1/acl/policy",
        &format!(r#"{{"Name":"web-read","Rules":"{rules}"}}"#),
    )
    .await;
    let policy_id = policy["ID"].as_str().unwrap().to_owned();
    let token = acl_put(
        &consul,
        "/v1/acl/token",
        &format!(r#"{{"Policies":[{{"ID":"{policy_id}"}}]}}"#),
    )
    .await;
    let secret = token["SecretID"].as_str().unwrap().to_owned();

    let (admin, vip) = addrs();
    let config = config(&consul, admin, vip).replace("[consul]\n", &format!("[consul]\ntoken = \"{secret}\"\n"));
    let lb = Lb::start(&config, admin, &[vip]).await;
    let mut both = vec![a.addr.to_string(), b.addr.to_string()];
    both.sort();
    eventually(DEADLINE, "both instances in the table", || async {
        (table_addrs(&lb).await == both).then_some(())
    })
    .await;

    // The policy loses its rules; a third registration moves the index, so
    // halo-lb's blocking query returns, filtered to nothing.
    acl_put(
        &consul,
        &format!("/v1/acl/policy/{policy_id}"),
        r#"{"Name":"web-read","Rules":""}"#,
    )
    .await;
    let c = TestBackend::start("c", Behavior::GreetEcho).await;
    register(&admin_client, "web-c", &c, "zone-a").await;
    let status = eventually(DEADLINE, "the suspected ACL filter to show", || async {
        let s = lb.status().await;
        (s["vips"][0]["discovery"]["acl_filter_suspected"] == true).then_some(s)
    })
    .await;
    let discovery = &status["vips"][0]["discovery"];
    assert_eq!(discovery["up"], false, "{discovery}");
    let error = discovery["last_error"].as_str().unwrap();
    assert!(error.contains("service:read"), "{error}");
    assert!(!error.contains(&secret), "the token never shows: {error}");
    assert_eq!(table_addrs(&lb).await, both, "the last table keeps serving");
    assert!(served_by(vip, 6)
        .await
        .is_subset(&HashSet::from(["a".to_owned(), "b".to_owned()])));
    assert!(!lb.log().contains(&secret), "the token never appears in the log");

    // The rules come back: the next answer is whole again.
    acl_put(
        &consul,
        &format!("/v1/acl/policy/{policy_id}"),
        &format!(r#"{{"Name":"web-read","Rules":"{rules}"}}"#),
    )
    .await;
    admin_client.deregister_service("web-c").await.unwrap();
    eventually(DEADLINE, "discovery to be up again with both", || async {
        let s = lb.status().await;
        (s["vips"][0]["discovery"]["up"] == true && table_addrs(&lb).await == both).then_some(())
    })
    .await;
}

#[tokio::test]
async fn without_acls_an_empty_answer_empties_the_table() {
    let consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    register(&client, "web-a", &a, "zone-a").await;
    let (admin, vip) = addrs();
    let lb = Lb::start(&config(&consul, admin, vip), admin, &[vip]).await;
    eventually(DEADLINE, "the instance in the table", || async {
        (table_addrs(&lb).await == vec![a.addr.to_string()]).then_some(())
    })
    .await;
    client.deregister_service("web-a").await.unwrap();
    eventually(DEADLINE, "the table to empty", || async {
        table_addrs(&lb).await.is_empty().then_some(())
    })
    .await;
    let status = lb.status().await;
    assert_eq!(status["vips"][0]["discovery"]["up"], true);
    assert_eq!(status["vips"][0]["discovery"]["acl_filter_suspected"], false);
}
