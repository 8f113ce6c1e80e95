//! Registers a service instance with a TTL check on the local agent, flips its
//! health a few times, and prints what a blocking health watch sees: the same
//! path halo-lb's discovery takes. Run it against
//! any agent: `CONSUL_HTTP_ADDR=127.0.0.1:8500 cargo run -p halo-consul --example watch`.

use std::time::Duration;

use halo_consul::{CheckRegistration, CheckStatus, Client, Config, HealthQuery, ServiceRegistration, Watch};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::new(Config::default())?;
    println!("consul agent: {}", client.address());
    let service = ServiceRegistration {
        id: "demo-1".into(),
        name: "demo".into(),
        address: Some("127.0.0.1".into()),
        port: Some(9001),
        meta: [("zone".to_owned(), "zone-a".to_owned())].into(),
        checks: vec![CheckRegistration::ttl(
            "demo-1:ttl",
            "app",
            Duration::from_secs(30),
            CheckStatus::Passing,
        )],
        ..ServiceRegistration::default()
    };
    client.register_service(&service).await?;

    // Flip the check in the background while the watch below reports.
    let flipper = {
        let client = client.clone();
        tokio::spawn(async move {
            for (i, status) in [
                CheckStatus::Critical,
                CheckStatus::Passing,
                CheckStatus::Critical,
                CheckStatus::Passing,
            ]
            .into_iter()
            .enumerate()
            {
                tokio::time::sleep(Duration::from_secs(1)).await;
                println!("-> setting the check {}", status.as_str());
                client.update_check("demo-1:ttl", status, &format!("flip {i}")).await?;
            }
            Ok::<_, halo_consul::Error>(())
        })
    };

    let mut watch = Watch::new(Duration::from_secs(10));
    let mut last = None;
    let mut changes = 0;
    while changes < 5 {
        let answer = watch
            .next(|o| client.health_service("demo", HealthQuery::passing(), o))
            .await?;
        if last.as_ref() == Some(&answer.value) {
            continue; // an index move alone is not a change
        }
        let up: Vec<String> = answer
            .value
            .iter()
            .map(|e| format!("{}:{} ({})", e.address(), e.service.port, e.service.id))
            .collect();
        println!("passing instances at index {}: {:?}", answer.meta.index, up);
        last = Some(answer.value);
        changes += 1;
    }
    flipper.await??;
    client.deregister_service("demo-1").await?;
    println!("deregistered demo-1");
    Ok(())
}
