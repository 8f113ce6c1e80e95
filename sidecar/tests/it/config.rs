use crate::sidecar_command;

#[test]
fn a_bad_config_is_refused_with_the_field_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[service]\nname = \"web\"\nport = 9001\n[[check]]\nname = \"x\"\ntype = \"http\"\nurl = \"http://127.0.0.1:1/\"\ninterval = \"often\"\n",
    )
    .unwrap();
    let out = sidecar_command()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interval") && err.contains("invalid duration"), "{err}");

    let out = sidecar_command()
        .args(["check"])
        .env("HALO_SERVICE_NAME", "web")
        .env("HALO_SERVICE_PORT", "9001")
        .env("HALO_CHECK_0_NAME", "t")
        .env("HALO_CHECK_0_TYPE", "tcp")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("check[0].address: required"), "{err}");
}

#[test]
fn the_shipped_examples_are_valid() {
    for name in [
        "sidecar.toml",
        "demo/sidecar-1.toml",
        "demo/sidecar-2.toml",
        "demo/sidecar-3.toml",
    ] {
        let example = halo_testkit::workspace_root().join("packaging/examples").join(name);
        let out = sidecar_command()
            .args(["check", "--config"])
            .arg(&example)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn check_refuses_what_consul_would_refuse_and_warns_on_foreign_variables() {
    let out = sidecar_command()
        .args(["check"])
        .env("HALO_SERVICE_NAME", "web")
        .env("HALO_SERVICE_PORT", "9001")
        .env("HALO_SERVICE_META_CONSUL-ZONE", "a")
        .env("HALO_SERVICE_WEIGHTS_PASSING", "0")
        .env("HALO_SERVICE_WEIGHTS_WARNING", "1")
        .env("HALO_CONSUL_ADDRESS", "ftp://127.0.0.1:8500")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "service.meta.consul-zone: the prefix \"consul-\" is reserved by Consul",
        "service.weights.passing: 0 must be 1..65535",
        "consul.address: ",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in {err}");
    }

    let out = sidecar_command()
        .args(["check"])
        .env("HALO_SERVICE_NAME", "web")
        .env("HALO_SERVICE_PORT", "9001")
        .env("HALO_SERVIC_ID", "web-1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HALO_SERVIC_ID: not a halo-sidecar variable; did you mean HALO_SERVICE_ID?"),
        "{err}"
    );

    let out = sidecar_command()
        .args(["check"])
        .env("HALO_SERVICE_NAME", "web")
        .env("HALO_SERVICE_PORT", "9001")
        .env("HALO_NETNS_TESTS", "1")
        .env("HALO_SOMETHING_ELSE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("warning: HALO_SOMETHING_ELSE: ignored"), "{err}");
    assert!(
        !err.contains("HALO_NETNS_TESTS"),
        "a known switch is not warned about: {err}"
    );
}
