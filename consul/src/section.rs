//! `[consul]`: how a halo program's config file names the agent it talks to.
//!
//! Both programs read the same table with the same keys, so it is one type,
//! [`Section`]. The one difference is `wait`, the longest blocking-query
//! wait: halo-lb makes blocking queries and accepts it
//! (`Section<true>`); halo-sidecar makes none, so its file refuses the key
//! as unknown (`Section<false>`) rather than accepting a setting that would
//! do nothing.
//!
//! The deserializer is written by hand because the two variants differ in
//! one key: a derived one would need `#[serde(flatten)]`, and flattening
//! loses `deny_unknown_fields`. This one names an unknown key and lists the
//! keys its program accepts, as serde's derive does (`unknown field
//! \`adress\`, expected one of \`address\`, …`).
//!
//! Every field left unset falls back to Consul's own environment variable
//! (named on the field), so a host configured for the `consul` CLI needs no
//! `[consul]` table at all; a value here wins over the environment, as a
//! flag does with Consul's CLI.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

use crate::client::{redact_address, Config};
use crate::error::Error;
use crate::tls::TlsConfig;

/// halo-lb's keys, in the order the reference lists them: every key both
/// programs accept, then `wait`.
const KEYS_WITH_WAIT: &[&str] = &[
    "address",
    "token",
    "token_file",
    "ca_file",
    "ca_path",
    "cert_file",
    "key_file",
    "tls_server_name",
    "tls_skip_verify",
    "wait",
];

/// The keys both programs accept: all but the last, `wait`.
const KEYS: &[&str] = KEYS_WITH_WAIT.split_at(KEYS_WITH_WAIT.len() - 1).0;

/// Shortest and longest `wait`.
const WAIT_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(600));

/// `[consul]`, as written. `WAIT`: whether the program makes blocking
/// queries and so accepts `wait` (see the module docs).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Section<const WAIT: bool> {
    /// Agent address: `host:port`, `http://host:port`, `https://host:port`
    /// (TLS) or `unix:///path`. Unset: `CONSUL_HTTP_ADDR`, else
    /// 127.0.0.1:8500.
    pub address: Option<String>,
    /// ACL token. Unset: `CONSUL_HTTP_TOKEN`, else none. Prefer
    /// `token_file`: a literal token sits in a file many can read.
    pub token: Option<String>,
    /// File holding the ACL token (owner-only); wins over `token`. Read at
    /// start and again on SIGHUP: a new token is used at once, and a bad
    /// file keeps the old token (logged). Unset: `CONSUL_HTTP_TOKEN_FILE`.
    pub token_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) the agent's certificate must chain to. Unset:
    /// `CONSUL_CACERT`; with no CA file or directory, the system store.
    pub ca_file: Option<PathBuf>,
    /// Directory of CA certificates (PEM). Unset: `CONSUL_CAPATH`.
    pub ca_path: Option<PathBuf>,
    /// Client certificate (PEM) for agents with `verify_incoming`. Unset:
    /// `CONSUL_CLIENT_CERT`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's key (PEM). Unset: `CONSUL_CLIENT_KEY`.
    pub key_file: Option<PathBuf>,
    /// Name the agent's certificate must carry. Unset:
    /// `CONSUL_TLS_SERVER_NAME`, else the address's host.
    pub tls_server_name: Option<String>,
    /// `true` turns off verification of the agent's certificate (logged at
    /// warn on every start and reload). Unset: `CONSUL_HTTP_SSL_VERIFY=false`
    /// turns it off, else verify.
    pub tls_skip_verify: Option<bool>,
    /// Longest wait of one blocking query, 1s to 10m (halo-lb only; always
    /// `None` when `WAIT` is false). Unset: the program's default.
    pub wait: Option<Duration>,
}

impl<const WAIT: bool> Section<WAIT> {
    /// The keys this program's `[consul]` accepts.
    pub fn keys() -> &'static [&'static str] {
        if WAIT {
            KEYS_WITH_WAIT
        } else {
            KEYS
        }
    }

    /// The TLS settings this section gives (the environment fills in what
    /// is unset when a client is made).
    pub fn tls(&self) -> TlsConfig {
        TlsConfig {
            enabled: None,
            ca_file: self.ca_file.clone(),
            ca_path: self.ca_path.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            server_name: self.tls_server_name.clone(),
            skip_verify: self.tls_skip_verify,
        }
    }

    /// The client configuration this section gives, each call bounded by
    /// `timeout` (`None`: the client's default).
    pub fn client_config(&self, timeout: Option<Duration>) -> Config {
        Config {
            address: self.address.clone(),
            token: self.token.clone(),
            token_file: self.token_file.clone(),
            tls: self.tls(),
            timeout,
            ..Config::default()
        }
    }

    /// What is wrong with this section, as a config error names it, with
    /// Consul's variables read through `env`: [`Section::wait_problem`] and
    /// [`Section::client_problem`].
    pub fn problems(&self, env: impl Fn(&str) -> Option<String>) -> Vec<String> {
        self.wait_problem()
            .into_iter()
            .chain(self.client_problem(env))
            .collect()
    }

    /// `wait` out of its range (1s to 10m: Consul caps a blocking query at
    /// 10 minutes).
    pub fn wait_problem(&self) -> Option<String> {
        let wait = self.wait?;
        (wait < WAIT_RANGE.0 || wait > WAIT_RANGE.1).then(|| "consul.wait: must be between 1s and 10m".to_owned())
    }

    /// Why no client can be made from this section, with Consul's variables
    /// read through `env`. The client is made exactly as it will be at run
    /// time (files opened, addresses parsed), so `check` and `run` agree. A
    /// fault in a key reads `consul.<key>…`, one in a variable `CONSUL_…`.
    pub fn client_problem(&self, env: impl Fn(&str) -> Option<String>) -> Option<String> {
        let e = crate::Client::with_env(self.client_config(None), env).err()?;
        let reason = match e {
            Error::Config(reason) => reason,
            other => other.to_string(),
        };
        // halo-consul's configuration errors start with the key or the
        // variable at fault.
        Some(if KEYS.iter().any(|key| reason.starts_with(key)) {
            format!("consul.{reason}")
        } else if reason.starts_with("CONSUL_") {
            reason
        } else {
            format!("consul: {reason}")
        })
    }
}

impl<const WAIT: bool> fmt::Debug for Section<WAIT> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Section");
        s.field("address", &self.address.as_deref().map(redact_address))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("ca_file", &self.ca_file)
            .field("ca_path", &self.ca_path)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("tls_server_name", &self.tls_server_name)
            .field("tls_skip_verify", &self.tls_skip_verify);
        if WAIT {
            s.field("wait", &self.wait);
        }
        s.finish()
    }
}

impl<'de, const WAIT: bool> Deserialize<'de> for Section<WAIT> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(SectionVisitor::<WAIT>)
    }
}

struct SectionVisitor<const WAIT: bool>;

/// A Go duration string (`"30s"`); `""` is `None`.
struct GoDuration(Option<Duration>);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        crate::duration::serde_opt_str::deserialize(deserializer).map(GoDuration)
    }
}

/// Stores `value` in `slot`, refusing a key given twice.
fn once<T, E: de::Error>(slot: &mut Option<T>, key: &'static str, value: T) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::duplicate_field(key));
    }
    *slot = Some(value);
    Ok(())
}

impl<'de, const WAIT: bool> Visitor<'de> for SectionVisitor<WAIT> {
    type Value = Section<WAIT>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a [consul] table")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Section<WAIT>, A::Error> {
        let mut s = Section::<WAIT>::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "address" => once(&mut s.address, "address", map.next_value()?)?,
                "token" => once(&mut s.token, "token", map.next_value()?)?,
                "token_file" => once(&mut s.token_file, "token_file", map.next_value()?)?,
                "ca_file" => once(&mut s.ca_file, "ca_file", map.next_value()?)?,
                "ca_path" => once(&mut s.ca_path, "ca_path", map.next_value()?)?,
                "cert_file" => once(&mut s.cert_file, "cert_file", map.next_value()?)?,
                "key_file" => once(&mut s.key_file, "key_file", map.next_value()?)?,
                "tls_server_name" => once(&mut s.tls_server_name, "tls_server_name", map.next_value()?)?,
                "tls_skip_verify" => once(&mut s.tls_skip_verify, "tls_skip_verify", map.next_value()?)?,
                "wait" if WAIT => {
                    // Parsed as the value itself is read, so an error points
                    // at the value's line; "" means unset.
                    let GoDuration(wait) = map.next_value()?;
                    if let Some(wait) = wait {
                        once(&mut s.wait, "wait", wait)?;
                    }
                }
                other => return Err(de::Error::unknown_field(other, Section::<WAIT>::keys())),
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File<const WAIT: bool> {
        #[serde(default)]
        consul: Section<WAIT>,
    }

    fn parse<const WAIT: bool>(text: &str) -> Result<Section<WAIT>, String> {
        toml::from_str::<File<WAIT>>(text)
            .map(|f| f.consul)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn every_key_is_read() {
        let s = parse::<true>(
            "[consul]\naddress = \"https://127.0.0.1:8501\"\ntoken = \"t\"\ntoken_file = \"/run/t\"\n\
             ca_file = \"/ca.pem\"\nca_path = \"/cas\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n\
             tls_server_name = \"server.dc1.consul\"\ntls_skip_verify = false\nwait = \"30s\"\n",
        )
        .unwrap();
        assert_eq!(s.address.as_deref(), Some("https://127.0.0.1:8501"));
        assert_eq!(s.token.as_deref(), Some("t"));
        assert_eq!(s.token_file, Some(PathBuf::from("/run/t")));
        assert_eq!(s.ca_file, Some(PathBuf::from("/ca.pem")));
        assert_eq!(s.ca_path, Some(PathBuf::from("/cas")));
        assert_eq!(s.cert_file, Some(PathBuf::from("/c.pem")));
        assert_eq!(s.key_file, Some(PathBuf::from("/k.pem")));
        assert_eq!(s.tls_server_name.as_deref(), Some("server.dc1.consul"));
        assert_eq!(s.tls_skip_verify, Some(false));
        assert_eq!(s.wait, Some(Duration::from_secs(30)));
        assert_eq!(parse::<true>("").unwrap(), Section::default());
        assert_eq!(parse::<true>("[consul]\nwait = \"\"").unwrap().wait, None);
    }

    #[test]
    fn an_unknown_key_is_named_with_the_keys_this_program_takes() {
        let e = parse::<true>("[consul]\nadress = \"x\"").unwrap_err();
        assert!(e.contains("unknown field `adress`"), "{e}");
        assert!(e.contains("`address`") && e.contains("`wait`"), "{e}");
        // The sidecar makes no blocking queries: `wait` is not its key.
        let e = parse::<false>("[consul]\nwait = \"30s\"").unwrap_err();
        assert!(e.contains("unknown field `wait`"), "{e}");
        let expected = e.split("expected one of").nth(1).unwrap();
        assert!(expected.contains("`address`") && !expected.contains("wait"), "{e}");
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let e = parse::<true>("[consul]\ntls_skip_verify = \"no\"").unwrap_err();
        assert!(e.contains("tls_skip_verify"), "{e}");
        let e = parse::<true>("[consul]\nwait = \"soon\"").unwrap_err();
        assert!(e.contains("wait"), "{e}");
    }

    #[test]
    fn problems_name_the_key_or_the_variable() {
        let no_env = |_: &str| None;
        let s = parse::<true>("[consul]\nwait = \"0s\"\ntoken_file = \"/nonexistent/halo-token\"").unwrap();
        let p = s.problems(no_env);
        assert!(
            p.iter().any(|p| p == "consul.wait: must be between 1s and 10m"),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|p| p.starts_with("consul.token_file: /nonexistent/halo-token")),
            "{p:?}"
        );
        // A fault in Consul's own variable is named as the variable.
        let env = |name: &str| match name {
            "CONSUL_HTTP_ADDR" => Some("https://127.0.0.1:8501".to_owned()),
            "CONSUL_CACERT" => Some("/nonexistent/ca.pem".to_owned()),
            _ => None,
        };
        let p = parse::<true>("").unwrap().problems(env);
        assert!(matches!(&p[..], [one] if one.starts_with("CONSUL_CACERT")), "{p:?}");
        assert!(parse::<true>("").unwrap().problems(no_env).is_empty());
    }

    #[test]
    fn debug_hides_the_token() {
        let s = parse::<false>("[consul]\ntoken = \"s3cret\"").unwrap();
        assert!(!format!("{s:?}").contains("s3cret"));
    }
}
