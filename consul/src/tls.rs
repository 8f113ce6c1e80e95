//! TLS to the agent: the settings, Consul's environment variables for them,
//! and the rustls client configuration built from them.
//!
//! Roots of trust: the CA file, else the CA directory, as Consul's own tools
//! choose (`CONSUL_CACERT` wins over `CONSUL_CAPATH`); with neither, the
//! system store (`rustls-native-certs`: `SSL_CERT_FILE`/`SSL_CERT_DIR`, else
//! OpenSSL's locations such as `/etc/ssl/certs`), which is what Consul's Go
//! client falls back to as well. Agents almost always use a private CA
//! (`consul tls ca create`), so production configs name one; the system
//! store is for agents behind a publicly signed certificate.
//!
//! rustls runs on the `ring` provider: `aws-lc-rs`, rustls' default, needs
//! cmake and a C toolchain to build.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::Error;

/// Largest PEM file read (a CA bundle, a certificate, a key): a system
/// bundle is a few hundred KiB.
const MAX_PEM_BYTES: u64 = 4 << 20;

/// Most files read from a CA directory.
const MAX_CA_DIR_FILES: usize = 4096;

/// TLS settings for the agent's HTTPS API. Every field may be left unset;
/// unset fields come from Consul's environment variables (named on each
/// field), so a value in the config file wins over the environment, as a
/// command-line flag does with Consul's own CLI.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// Use HTTPS whatever the address's scheme says. Unset:
    /// `CONSUL_HTTP_SSL` (a Go boolean); an `https://` address selects TLS
    /// on its own.
    pub enabled: Option<bool>,
    /// PEM file of the CA certificates that may sign the agent's
    /// certificate. Unset: `CONSUL_CACERT`. Wins over `ca_path`.
    pub ca_file: Option<PathBuf>,
    /// Directory of PEM files, each holding CA certificates (not searched
    /// recursively; every regular file must parse). Unset: `CONSUL_CAPATH`.
    /// With neither a CA file nor a directory: the system store.
    pub ca_path: Option<PathBuf>,
    /// PEM client certificate (chain) shown to agents that set
    /// `verify_incoming`. Unset: `CONSUL_CLIENT_CERT`. Needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1). Unset:
    /// `CONSUL_CLIENT_KEY`.
    pub key_file: Option<PathBuf>,
    /// Name the agent's certificate must carry, and the SNI sent. Unset:
    /// `CONSUL_TLS_SERVER_NAME`, else the address's host (an IP address is
    /// checked against the certificate's IP SANs).
    pub server_name: Option<String>,
    /// Skip verification of the agent's certificate altogether: anyone on
    /// the path can then read the token and answer for the agent. Logged at
    /// warn every time a client is made. Unset: `CONSUL_HTTP_SSL_VERIFY=false`
    /// skips, else verify.
    pub skip_verify: Option<bool>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("enabled", &self.enabled)
            .field("ca_file", &self.ca_file)
            .field("ca_path", &self.ca_path)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("server_name", &self.server_name)
            .field("skip_verify", &self.skip_verify)
            .finish()
    }
}

/// [`TlsConfig`] with the environment filled in.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsSettings {
    pub enabled: bool,
    /// Each path with the setting or variable it came from, for errors.
    pub ca_file: Option<(PathBuf, &'static str)>,
    pub ca_path: Option<(PathBuf, &'static str)>,
    pub cert_file: Option<(PathBuf, &'static str)>,
    pub key_file: Option<(PathBuf, &'static str)>,
    pub server_name: Option<String>,
    pub skip_verify: bool,
}

impl TlsSettings {
    pub fn resolve(config: &TlsConfig, env: &impl Fn(&str) -> Option<String>) -> Result<TlsSettings, Error> {
        let env = |name: &str| env(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let path = |own: &Option<PathBuf>, field: &'static str, var: &'static str| {
            own.clone()
                .filter(|p| !p.as_os_str().is_empty())
                .map(|p| (p, field))
                .or_else(|| env(var).map(|p| (PathBuf::from(p), var)))
        };
        let boolean = |own: Option<bool>, var: &str| -> Result<Option<bool>, Error> {
            match own {
                Some(b) => Ok(Some(b)),
                None => match env(var) {
                    None => Ok(None),
                    Some(v) => parse_go_bool(&v).map(Some).ok_or_else(|| {
                        Error::Config(format!(
                            "{var}={:?} is not a boolean (true or false)",
                            crate::error::clip_text(&v, crate::error::BodyLength::Exactly(v.len() as u64))
                        ))
                    }),
                },
            }
        };
        let settings = TlsSettings {
            enabled: boolean(config.enabled, "CONSUL_HTTP_SSL")?.unwrap_or(false),
            ca_file: path(&config.ca_file, "ca_file", "CONSUL_CACERT"),
            ca_path: path(&config.ca_path, "ca_path", "CONSUL_CAPATH"),
            cert_file: path(&config.cert_file, "cert_file", "CONSUL_CLIENT_CERT"),
            key_file: path(&config.key_file, "key_file", "CONSUL_CLIENT_KEY"),
            server_name: config
                .server_name
                .clone()
                .filter(|s| !s.is_empty())
                .or_else(|| env("CONSUL_TLS_SERVER_NAME")),
            skip_verify: match config.skip_verify {
                Some(skip) => skip,
                None => !boolean(None, "CONSUL_HTTP_SSL_VERIFY")?.unwrap_or(true),
            },
        };
        match (&settings.cert_file, &settings.key_file) {
            (Some(_), None) => Err(Error::Config(
                "cert_file (CONSUL_CLIENT_CERT) is set but key_file (CONSUL_CLIENT_KEY) is not".into(),
            )),
            (None, Some(_)) => Err(Error::Config(
                "key_file (CONSUL_CLIENT_KEY) is set but cert_file (CONSUL_CLIENT_CERT) is not".into(),
            )),
            _ => Ok(settings),
        }
    }

    /// Where the agent's certificate was looked for, for an "unknown
    /// issuer" error: the CA file or directory in use (with the setting or
    /// variable that named it), else the system trust store.
    pub fn trust_source(&self) -> String {
        if let Some((file, from)) = &self.ca_file {
            format!("not signed by a CA in {from} {}", file.display())
        } else if let Some((dir, from)) = &self.ca_path {
            format!("not signed by a CA in {from} {}", dir.display())
        } else {
            "not signed by a CA in the system trust store; no ca_file or ca_path is set: set ca_file or \
             CONSUL_CACERT to the agent's CA"
                .to_owned()
        }
    }

    /// The rustls configuration: roots, client certificate, verification.
    pub fn client_config(&self) -> Result<ClientConfig, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS: {e}")))?;
        let builder = if self.skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
        } else {
            builder.with_root_certificates(self.roots()?)
        };
        match (&self.cert_file, &self.key_file) {
            (Some((cert_file, cert_from)), Some((key_file, key_from))) => {
                let certs = read_certs(cert_file, cert_from)?;
                let key = PrivateKeyDer::from_pem_slice(&read_bounded(key_file, key_from)?)
                    .map_err(|e| Error::Config(format!("{key_from} {}: no private key ({e})", key_file.display())))?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    Error::Config(format!(
                        "{cert_from} {} and {key_from} {}: {e}",
                        cert_file.display(),
                        key_file.display()
                    ))
                })
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }

    fn roots(&self) -> Result<RootCertStore, Error> {
        let mut roots = RootCertStore::empty();
        let (certs, from) = if let Some((file, from)) = &self.ca_file {
            (read_certs(file, from)?, format!("{from} {}", file.display()))
        } else if let Some((dir, from)) = &self.ca_path {
            (read_cert_dir(dir, from)?, format!("{from} {}", dir.display()))
        } else {
            let found = rustls_native_certs::load_native_certs();
            if let Some(e) = found.errors.first() {
                tracing::warn!(error = %e, "reading the system's CA certificates for TLS to Consul");
            }
            (found.certs, "the system certificate store".to_owned())
        };
        let (added, ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(Error::Config(format!(
                "TLS to Consul: no usable CA certificate in {from} ({ignored} unusable); \
                 set ca_file (CONSUL_CACERT) to the agent's CA"
            )));
        }
        Ok(roots)
    }
}

/// Reads at most [`MAX_PEM_BYTES`] of the regular file `path`; `field`
/// names the setting in errors.
fn read_bounded(path: &Path, field: &str) -> Result<Vec<u8>, Error> {
    // Opened without blocking and regular files only: a FIFO here would
    // otherwise hold up whatever makes the client (a reload, a discovery).
    crate::file::read_regular(path, MAX_PEM_BYTES).map_err(|e| Error::Config(format!("{field} {}", e.naming(path))))
}

fn read_certs(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = read_bounded(path, field)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("{field} {}: bad PEM ({e})", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{field} {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// Every regular file directly in `dir` (symlinks followed, as in
/// `/etc/ssl/certs`), each of which must hold PEM certificates, as Consul's
/// `CONSUL_CAPATH` demands.
fn read_cert_dir(dir: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let err = |e: std::io::Error| Error::Config(format!("{field} {}: {e}", dir.display()));
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let path = entry.map_err(err)?.path();
        if path.is_file() {
            paths.push(path);
        }
        if paths.len() > MAX_CA_DIR_FILES {
            return Err(Error::Config(format!(
                "{field} {}: more than {MAX_CA_DIR_FILES} files",
                dir.display()
            )));
        }
    }
    paths.sort();
    let mut certs = Vec::new();
    for path in paths {
        certs.extend(read_certs(&path, field)?);
    }
    Ok(certs)
}

/// Go's `strconv.ParseBool`, which Consul's tools use for boolean
/// environment variables.
pub(crate) fn parse_go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `tls_skip_verify`: any certificate, any name. Handshake signatures are
/// still checked (that costs nothing and proves the peer holds the key of the
/// certificate it showed, whoever that is).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Says what a TLS failure means for the operator: which check failed and
/// which setting fixes it. `trust` says where an issuer was looked for
/// ([`TlsSettings::trust_source`]).
pub(crate) fn explain(e: &rustls::Error, trust: &str) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(cert) => {
            let what = match cert {
                C::UnknownIssuer => format!("certificate verify failed: UnknownIssuer ({trust})"),
                C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                    "certificate verify failed: the agent's certificate is not valid for the server name \
                     (set tls_server_name / CONSUL_TLS_SERVER_NAME to a name it carries): {e}"
                ),
                C::Expired | C::ExpiredContext { .. } => format!("certificate verify failed: expired: {e}"),
                _ => format!("certificate verify failed: {e}"),
            };
            format!("TLS handshake failed: {what}")
        }
        E::AlertReceived(A::CertificateRequired | A::BadCertificate | A::HandshakeFailure | A::UnknownCA) => format!(
            "TLS handshake refused by the agent ({e}): it may require a client certificate signed by its CA \
             (verify_incoming; set cert_file/key_file or CONSUL_CLIENT_CERT/CONSUL_CLIENT_KEY)"
        ),
        E::InvalidMessage(_) => {
            format!("TLS handshake failed: the agent did not answer with TLS (a plain HTTP port?): {e}")
        }
        _ => format!("TLS failed: {e}"),
    }
}
