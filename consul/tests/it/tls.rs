//! HTTPS to a real Consul 1.8.7 dev agent with certificates made by
//! `consul tls` at test time: plain server TLS, a required client
//! certificate, and the failures an operator must be able to read (wrong CA,
//! wrong server name, missing client certificate). And the agent's unix
//! socket.

use std::net::SocketAddr;
use std::path::PathBuf;

use halo_consul::{Client, Config, Error, QueryOptions, TlsConfig};
use halo_testkit::tls::Certs;
use halo_testkit::{AgentOptions, ConsulAgent};

fn https(addr: SocketAddr, tls: TlsConfig) -> Result<Client, Error> {
    Client::with_env(
        Config {
            address: Some(format!("https://{addr}")),
            tls,
            ..Config::default()
        },
        |_| None,
    )
}

fn ca(certs: &Certs) -> TlsConfig {
    TlsConfig {
        ca_file: Some(certs.ca_file()),
        ..TlsConfig::default()
    }
}

async fn round_trip(client: &Client) -> Result<(), Error> {
    assert!(client.kv_put("halo/tls", "over https").await?);
    let got = client.kv_get_raw("halo/tls", QueryOptions::default()).await?;
    assert_eq!(got.value.as_deref(), Some(&b"over https"[..]));
    Ok(())
}

#[tokio::test]
async fn https_with_the_agents_ca_works_and_the_wrong_ca_or_name_says_why() {
    let certs = Certs::create();
    let (_agent, addr) = ConsulAgent::start_with_tls(&certs, false, AgentOptions::default()).await;

    round_trip(&https(addr, ca(&certs)).unwrap()).await.unwrap();

    // The CA as a directory (CONSUL_CAPATH), through the environment.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(certs.ca_file(), dir.path().join("ca.pem")).unwrap();
    let dir_s = dir.path().to_str().unwrap().to_owned();
    let url = format!("https://{addr}");
    let from_env = Client::with_env(Config::default(), |name| match name {
        "CONSUL_HTTP_ADDR" => Some(url.clone()),
        "CONSUL_CAPATH" => Some(dir_s.clone()),
        _ => None,
    })
    .unwrap();
    round_trip(&from_env).await.unwrap();

    // Another CA did not sign the agent's certificate.
    let other = Certs::create();
    let e = round_trip(&https(addr, ca(&other)).unwrap()).await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::Transport { .. }), "{e:?}");
    eprintln!("wrong CA: {text}");
    assert!(
        text.contains("certificate verify failed: UnknownIssuer") && text.contains(&addr.to_string()),
        "{text}"
    );
    let other_ca = other.ca_file().display().to_string();
    assert!(
        text.contains(&format!("not signed by a CA in ca_file {other_ca}")),
        "{text}"
    );

    // Issue 17: with no CA configured the roots are the system's, and the
    // error used to blame "ca_file/ca_path" all the same. (Only where the
    // system has a trust store; without one the client is refused earlier.)
    if let Ok(system) = https(addr, TlsConfig::default()) {
        let text = round_trip(&system).await.unwrap_err().to_string();
        eprintln!("system store: {text}");
        assert!(
            text.contains("UnknownIssuer (not signed by a CA in the system trust store")
                && !text.contains("ca_file/ca_path"),
            "{text}"
        );
    }

    // A name the certificate does not carry.
    let wrong_name = TlsConfig {
        server_name: Some("consul.example.invalid".into()),
        ..ca(&certs)
    };
    let text = round_trip(&https(addr, wrong_name).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("not valid for the server name") && text.contains("consul.example.invalid"),
        "{text}"
    );
    eprintln!("wrong name: {text}");
    // One it does carry: Consul's server certificate names server.dc1.consul.
    let right_name = TlsConfig {
        server_name: Some("server.dc1.consul".into()),
        ..ca(&certs)
    };
    round_trip(&https(addr, right_name).unwrap()).await.unwrap();

    // Verification off: the wrong CA no longer matters.
    let skip = TlsConfig {
        skip_verify: Some(true),
        ..ca(&other)
    };
    round_trip(&https(addr, skip).unwrap()).await.unwrap();

    // A TLS client at the plain HTTP port.
    let text = round_trip(&https(_agent.http_addr(), ca(&certs)).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(text.contains("did not answer with TLS"), "{text}");
    eprintln!("plain port: {text}");
}

#[tokio::test]
async fn an_agent_that_requires_a_client_certificate() {
    let certs = Certs::create();
    let (_agent, addr) = ConsulAgent::start_with_tls(&certs, true, AgentOptions::default()).await;

    let e = round_trip(&https(addr, ca(&certs)).unwrap()).await.unwrap_err();
    let text = e.to_string();
    eprintln!("no client certificate: {text}");
    assert!(
        text.contains("client certificate") && text.contains(&addr.to_string()),
        "{text}"
    );

    let with_cert = TlsConfig {
        cert_file: Some(certs.client_cert()),
        key_file: Some(certs.client_key()),
        ..ca(&certs)
    };
    round_trip(&https(addr, with_cert).unwrap()).await.unwrap();

    // The same through Consul's environment variables.
    let (ca_s, cert_s, key_s) = (
        certs.ca_file().to_str().unwrap().to_owned(),
        certs.client_cert().to_str().unwrap().to_owned(),
        certs.client_key().to_str().unwrap().to_owned(),
    );
    let (addr_s, ssl) = (addr.to_string(), "true".to_owned());
    let from_env = Client::with_env(Config::default(), |name| match name {
        "CONSUL_HTTP_ADDR" => Some(addr_s.clone()),
        "CONSUL_HTTP_SSL" => Some(ssl.clone()),
        "CONSUL_CACERT" => Some(ca_s.clone()),
        "CONSUL_CLIENT_CERT" => Some(cert_s.clone()),
        "CONSUL_CLIENT_KEY" => Some(key_s.clone()),
        _ => None,
    })
    .unwrap();
    round_trip(&from_env).await.unwrap();

    // A client certificate from another CA is refused too.
    let other = Certs::create();
    let foreign = TlsConfig {
        cert_file: Some(other.client_cert()),
        key_file: Some(other.client_key()),
        ..ca(&certs)
    };
    let text = round_trip(&https(addr, foreign).unwrap())
        .await
        .unwrap_err()
        .to_string();
    eprintln!("foreign client certificate: {text}");
    assert!(text.contains("TLS handshake refused by the agent"), "{text}");
}

#[tokio::test]
async fn the_agents_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket: PathBuf = dir.path().join("consul-http.sock");
    let agent = ConsulAgent::start_with(AgentOptions {
        // The TCP address stays (the testkit polls it); the socket is added.
        extra_hcl: vec![format!(
            "addresses {{ http = \"127.0.0.1 unix://{}\" }}",
            socket.display()
        )],
        token: None,
    })
    .await;
    let client = Client::with_env(Config::with_address(format!("unix://{}", socket.display())), |_| None).unwrap();
    assert_eq!(client.address(), format!("unix://{}", socket.display()));
    round_trip(&client).await.unwrap();
    drop(agent);

    let gone = Client::with_env(Config::with_address(format!("unix://{}", socket.display())), |_| None).unwrap();
    let text = gone.kv_put("halo/x", "y").await.unwrap_err().to_string();
    assert!(text.contains(&socket.display().to_string()), "{text}");
}
