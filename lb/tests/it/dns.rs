//! DNS discovery against a real Consul agent's DNS interface.

use std::collections::HashSet;
use std::net::SocketAddr;

use halo_consul::Client;
use halo_testkit::{eventually, ConsulAgent};

use crate::discovery::register;
use crate::support::*;

fn config(dns: SocketAddr, admin: SocketAddr, vip: SocketAddr) -> String {
    format!(
        "[admin]\nlisten = \"{admin}\"\n[[vip]]\nname = \"web\"\nlisten = \"{vip}\"\n\
         dns = {{ name = \"web.service.consul\", server = \"{dns}\", interval = \"200ms\", timeout = \"2s\" }}\n"
    )
}

#[tokio::test]
async fn srv_records_become_backends_and_a_dns_outage_keeps_the_last_good_table() {
    let mut consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let b = TestBackend::start("b", Behavior::GreetEcho).await;
    register(&client, "web-a", &a, "zone-a").await;
    register(&client, "web-b", &b, "zone-b").await;

    let (admin, vip) = addrs();
    let lb = Lb::start(&config(consul.dns_addr(), admin, vip), admin, &[vip]).await;
    let mut both = vec![a.addr.to_string(), b.addr.to_string()];
    both.sort();
    eventually(DEADLINE, "both instances in the table", || async {
        (table_addrs(&lb).await == both).then_some(())
    })
    .await;
    let status = lb.status().await;
    let discovery = &status["vips"][0]["discovery"];
    assert_eq!(discovery["source"], "dns");
    assert_eq!(discovery["name"], "web.service.consul.");
    assert_eq!(discovery["up"], true);
    assert_eq!(discovery["instances"], 2);
    assert!(discovery["last_update"].as_u64().is_some(), "{discovery}");
    assert_eq!(
        status["vips"][0]["backends"][0]["weight"], 3,
        "weight from the SRV record (Consul's Weights.Passing)"
    );
    assert_eq!(
        served_by(vip, 12).await,
        HashSet::from(["a".to_owned(), "b".to_owned()])
    );

    // Deregistered: it leaves at the next refresh.
    client.deregister_service("web-a").await.unwrap();
    eventually(DEADLINE, "the deregistered instance to leave the table", || async {
        (table_addrs(&lb).await == [b.addr.to_string()]).then_some(())
    })
    .await;
    assert_eq!(served_by(vip, 6).await, HashSet::from(["b".to_owned()]));

    // No instance at all is an answer (NXDOMAIN from Consul), not an error:
    // the table empties and discovery stays up, as with Consul's ?passing.
    client.deregister_service("web-b").await.unwrap();
    eventually(DEADLINE, "the table to empty", || async {
        table_addrs(&lb).await.is_empty().then_some(())
    })
    .await;
    assert_eq!(lb.status().await["vips"][0]["discovery"]["up"], true);
    register(&client, "web-b", &b, "zone-b").await;
    eventually(DEADLINE, "the instance to come back", || async {
        (table_addrs(&lb).await == [b.addr.to_string()]).then_some(())
    })
    .await;
    let version = lb.status().await["vips"][0]["table_version"].clone();

    // The DNS server goes away: the last good table keeps serving.
    consul.stop();
    eventually(DEADLINE, "discovery to report the outage", || async {
        (lb.status().await["vips"][0]["discovery"]["up"] == false).then_some(())
    })
    .await;
    let status = lb.status().await;
    let error = status["vips"][0]["discovery"]["last_error"].as_str().unwrap();
    assert!(error.contains(&consul.dns_addr().to_string()), "{error}");
    assert_eq!(
        table_addrs(&lb).await,
        [b.addr.to_string()],
        "never emptied by an error"
    );
    assert_eq!(status["vips"][0]["table_version"], version, "no swap during the outage");
    assert_eq!(served_by(vip, 4).await, HashSet::from(["b".to_owned()]));
    let (_, metrics) = halo_testkit::http::get(admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("halo_discovery_up{vip=\"web\",source=\"dns\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("halo_discovery_errors_total{vip=\"web\",source=\"dns\"}"));
}

#[test]
fn dns_excludes_the_other_backend_sources_naming_the_field() {
    let e = halo_lb::Config::parse(
        "[[vip]]\nname = \"w\"\nlisten = \"127.0.0.1:1\"\nservice = \"web\"\ndns = { name = \"web.service.consul\" }\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("vip[0].dns: set exactly one of"), "{e}");
    let e = halo_lb::Config::parse(
        "[[vip]]\nname = \"w\"\nlisten = \"127.0.0.1:1\"\ndns = { name = \"web service\", server = \"nowhere\" }\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("vip[0].dns.name") && e.contains("vip[0].dns.server"), "{e}");
}
