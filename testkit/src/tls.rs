//! Certificates for TLS tests, made at test time by Consul's own
//! `consul tls ca create` / `consul tls cert create`, and a dev agent that
//! serves its HTTP API over HTTPS with them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::consul_binary;

/// A CA and the certificates it signed, in a temporary directory removed on
/// drop. Consul 1.8's server certificate carries `server.<dc>.consul`,
/// `localhost` and `127.0.0.1`.
#[derive(Debug)]
pub struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    /// A fresh CA (`consul-agent-ca.pem`), a server certificate for `dc1`
    /// and a client certificate, all signed by it.
    pub fn create() -> Certs {
        let dir = tempfile::Builder::new()
            .prefix("halo-tls-")
            .tempdir()
            .expect("temp dir for certificates");
        let consul = |args: &[&str]| {
            let out = Command::new(consul_binary())
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap_or_else(|e| panic!("cannot run consul {args:?}: {e}"));
            assert!(
                out.status.success(),
                "consul {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        consul(&["tls", "ca", "create"]);
        consul(&["tls", "cert", "create", "-server", "-dc", "dc1"]);
        consul(&["tls", "cert", "create", "-client", "-dc", "dc1"]);
        let certs = Certs { dir };
        for path in [
            certs.ca_file(),
            certs.server_cert(),
            certs.server_key(),
            certs.client_cert(),
            certs.client_key(),
        ] {
            assert!(path.is_file(), "consul tls did not write {}", path.display());
        }
        certs
    }

    /// The directory holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("consul-agent-ca.pem")
    }

    /// The CA's private key.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.path().join("consul-agent-ca-key.pem")
    }

    /// The agent's certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("dc1-server-consul-0.pem")
    }

    /// The agent's key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("dc1-server-consul-0-key.pem")
    }

    /// A client certificate signed by the CA.
    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("dc1-client-consul-0.pem")
    }

    /// The client certificate's key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("dc1-client-consul-0-key.pem")
    }

    /// The HCL that makes an agent serve HTTPS on `https_port` with these
    /// certificates; with `require_client_cert`, HTTPS callers must show a
    /// certificate signed by the CA (`verify_incoming_https`).
    pub fn agent_hcl(&self, https_port: u16, require_client_cert: bool) -> Vec<String> {
        vec![
            format!("ports {{ https = {https_port} }}"),
            format!(
                "ca_file = \"{}\" cert_file = \"{}\" key_file = \"{}\"",
                self.ca_file().display(),
                self.server_cert().display(),
                self.server_key().display()
            ),
            format!("verify_incoming_https = {require_client_cert}"),
        ]
    }
}
