use std::process::Command;

fn check(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_halo-lb"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_accepts_the_shipped_examples() {
    for name in [
        "lb.toml",
        "lb-consul.toml",
        "lb-dns.toml",
        "lb-ha-1.toml",
        "lb-ha-2.toml",
    ] {
        let example = halo_testkit::workspace_root().join("packaging/examples").join(name);
        let (ok, text) = check(&std::fs::read_to_string(example).unwrap());
        assert!(ok, "{name}: {text}");
        assert!(text.contains("is valid (1 vip)"), "{text}");
    }
}

#[test]
fn check_refuses_bad_files_naming_the_key_and_reason() {
    let (ok, text) = check("[[vip]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nbackends = [\"127.0.0.1:1\"]\nconnect_timeout = \"soon\"\n");
    assert!(!ok);
    assert!(
        text.contains("connect_timeout") && text.contains("invalid duration"),
        "{text}"
    );

    let (ok, text) = check("[[vip]]\nname = \"web\"\nlisten = \"127.0.0.1:99999\"\nbackends = [\"127.0.0.1:1\"]\n");
    assert!(!ok);
    assert!(
        text.contains("vip[0].listen") && text.contains("not an ip:port"),
        "{text}"
    );

    let (ok, text) = check(
        "[[vip]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nbackends = [\"127.0.0.1:1\"]\nalgorithm = \"fastest\"\n",
    );
    assert!(!ok);
    assert!(text.contains("fastest") && text.contains("round_robin"), "{text}");

    let (ok, text) = check("[admin]\nlisten = \"127.0.0.1:1\"\n");
    assert!(!ok);
    assert!(text.contains("at least one [[vip]]"), "{text}");

    let missing = Command::new(env!("CARGO_BIN_EXE_halo-lb"))
        .args(["check", "--config", "/nonexistent/halo.toml"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read the file"));
}

/// `halo-lb check` on an instance of a pair says which probe address its
/// peers will be told, and why: with the admin API on loopback, the
/// address the local agent advertises (a dev agent's is loopback, which
/// only suits a pair on one host); with no agent to ask, that it is chosen
/// at start; with `probe_listen`, that.
#[tokio::test]
async fn check_says_which_probe_address_it_advertises_and_why() {
    let consul = halo_testkit::ConsulAgent::start().await;
    let pair = |consul: &str, extra: &str| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:9901\"\n[consul]\naddress = \"{consul}\"\n[ha]\ncluster = \"c\"\nid = \"a\"\n{extra}\
             [[vip]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nbackends = [\"127.0.0.1:1\"]\n"
        )
    };
    let (ok, text) = check(&pair(&consul.http_url(), ""));
    assert!(ok, "{text}");
    assert!(
        text.contains("probe address: 127.0.0.1:9901") && text.contains("the local Consul agent advertises node"),
        "{text}"
    );

    let nowhere = format!("http://127.0.0.1:{}", crate::support::port());
    let (ok, text) = check(&pair(&nowhere, ""));
    assert!(ok, "an agent that is not up yet fails nothing: {text}");
    assert!(text.contains("chosen at start"), "{text}");

    let (ok, text) = check(&pair(&nowhere, "probe_listen = \"198.18.0.11:9902\"\n"));
    assert!(ok, "{text}");
    assert!(
        text.contains("probe address: 198.18.0.11:9902") && text.contains("ha.probe_listen"),
        "{text}"
    );
}
