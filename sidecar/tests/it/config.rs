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
