//! The client handle, its configuration, and the one place requests are sent.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde::de::DeserializeOwned;

use crate::query::{QueryMeta, QueryOptions};
use crate::Error;

/// Address used when neither the config nor `CONSUL_HTTP_ADDR` names one: the
/// local agent, as every Consul tool defaults to.
pub const DEFAULT_ADDRESS: &str = "http://127.0.0.1:8500";

/// Deadline for one non-blocking call when the config sets none. Blocking
/// queries get `wait + wait/16 +` this much.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `wait` Consul applies to a blocking query that names none.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);

/// Characters escaped in a path segment that may itself contain `/` (KV keys,
/// IDs): controls, space and the characters that would end or restructure a
/// path.
const PATH: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// Characters escaped in a query value.
const QUERY: &AsciiSet = &PATH.add(b'&').add(b'=').add(b'+').add(b'/').add(b';');

/// How to reach Consul. Every field may be left unset.
#[derive(Clone, Default)]
pub struct Config {
    /// The agent's HTTP address, `host:port` or `http://host:port`. Unset: the
    /// `CONSUL_HTTP_ADDR` environment variable, else [`DEFAULT_ADDRESS`].
    /// HTTPS and unix sockets are not supported: halo talks to its local agent.
    pub address: Option<String>,
    /// ACL token sent as `X-Consul-Token`. Unset: `CONSUL_HTTP_TOKEN`, else none.
    pub token: Option<String>,
    /// Datacenter sent as `?dc=` on every call. Unset: the agent's own.
    pub datacenter: Option<String>,
    /// Deadline of a non-blocking call, and the margin added to blocking ones.
    /// Unset: [`DEFAULT_TIMEOUT`].
    pub timeout: Option<Duration>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Config {
    /// A config for the agent at `address`, everything else unset.
    pub fn with_address(address: impl Into<String>) -> Self {
        Config {
            address: Some(address.into()),
            ..Config::default()
        }
    }
}

/// A cheap-to-clone handle on one Consul agent's HTTP API.
///
/// Clones share one connection pool. Every call is async and has a deadline;
/// nothing blocks a thread, and dropping a call's future cancels it.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    timeout: Duration,
}

struct Inner {
    http: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    /// `http://host:port`, no trailing slash.
    base: String,
    token: Option<HeaderValue>,
    datacenter: Option<String>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.inner.base)
            .field("token", &self.inner.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.inner.datacenter)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// One API call, before it is sent.
pub(crate) struct Call {
    pub method: Method,
    /// Path below `/v1`, already escaped where it embeds user strings.
    pub path: String,
    pub query: Vec<(&'static str, String)>,
    pub body: Option<Bytes>,
    pub options: Option<QueryOptions>,
}

impl Call {
    pub fn new(method: Method, path: String) -> Self {
        Call {
            method,
            path,
            query: Vec::new(),
            body: None,
            options: None,
        }
    }

    pub fn get(path: String) -> Self {
        Call::new(Method::GET, path)
    }

    pub fn put(path: String) -> Self {
        Call::new(Method::PUT, path)
    }

    pub fn query(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.query.push((key, value.into()));
        self
    }

    /// A bare flag such as `?passing` or `?raw`.
    pub fn flag(self, key: &'static str) -> Self {
        self.query(key, String::new())
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }

    pub fn json(self, value: &impl serde::Serialize) -> Self {
        // Serializing our own plain structs into a Vec cannot fail.
        let body = serde_json::to_vec(value).expect("request bodies serialize");
        self.body(body)
    }

    pub fn options(mut self, options: QueryOptions) -> Self {
        self.options = Some(options);
        self
    }
}

/// A 2xx..5xx answer, body read in full.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub method: Method,
    pub path: String,
}

impl Answer {
    pub fn meta(&self) -> QueryMeta {
        QueryMeta::from_headers(&self.headers)
    }

    /// Consul's error message: the body as text, trimmed.
    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_owned()
    }

    /// Turns any non-2xx answer into the matching error.
    pub fn ok(self) -> Result<Answer, Error> {
        if self.status.is_success() {
            return Ok(self);
        }
        let message = self.message();
        Err(if self.status == StatusCode::NOT_FOUND {
            Error::NotFound {
                path: self.path,
                message,
            }
        } else {
            Error::Status {
                method: self.method,
                path: self.path,
                status: self.status,
                message,
            }
        })
    }

    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(|e| Error::Decode {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }

    /// Decodes the `true`/`false` that KV writes answer with.
    pub fn decode_bool(&self) -> Result<bool, Error> {
        match self.body.trim_ascii() {
            b"true" => Ok(true),
            b"false" => Ok(false),
            _ => Err(Error::Decode {
                path: self.path.clone(),
                reason: format!("expected true or false, got {:?}", self.message()),
            }),
        }
    }
}

impl Client {
    /// A client for the agent named by `config`, falling back to
    /// `CONSUL_HTTP_ADDR` and `CONSUL_HTTP_TOKEN` for unset fields.
    pub fn new(config: Config) -> Result<Client, Error> {
        Client::with_env(config, |name| std::env::var(name).ok())
    }

    /// A client for the agent at `address` with default settings (the token
    /// still comes from `CONSUL_HTTP_TOKEN` if set).
    pub fn from_address(address: impl Into<String>) -> Result<Client, Error> {
        Client::new(Config::with_address(address))
    }

    /// [`Client::new`] with the environment read through `env`, so tests can
    /// supply one without touching the process environment.
    pub fn with_env(config: Config, env: impl Fn(&str) -> Option<String>) -> Result<Client, Error> {
        let address = config
            .address
            .filter(|a| !a.trim().is_empty())
            .or_else(|| env("CONSUL_HTTP_ADDR").filter(|a| !a.trim().is_empty()))
            .unwrap_or_else(|| DEFAULT_ADDRESS.to_owned());
        let base = normalize_address(&address)?;
        let token = config
            .token
            .or_else(|| env("CONSUL_HTTP_TOKEN"))
            .filter(|t| !t.is_empty())
            .map(|t| {
                let mut v = HeaderValue::from_str(&t)
                    .map_err(|_| Error::Config("ACL token contains characters not allowed in a header".into()))?;
                v.set_sensitive(true);
                Ok::<_, Error>(v)
            })
            .transpose()?;
        let timeout = config.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(Error::Config("timeout must be above zero".into()));
        }

        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                token,
                datacenter: config.datacenter.filter(|dc| !dc.is_empty()),
            }),
            timeout,
        })
    }

    /// The same client with another per-call deadline (sharing the pool).
    /// Leadership code uses a short one so a hung agent is noticed within a
    /// lease.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            inner: Arc::clone(&self.inner),
            timeout,
        }
    }

    /// The deadline of a non-blocking call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The agent's base URL, e.g. `http://127.0.0.1:8500`.
    pub fn address(&self) -> &str {
        &self.inner.base
    }

    /// Sends `call` and reads the whole answer, within the call's deadline.
    /// Any HTTP status comes back as an [`Answer`]; only transport failures
    /// and timeouts are errors here.
    pub(crate) async fn send(&self, call: Call) -> Result<Answer, Error> {
        let Call {
            method,
            path,
            mut query,
            body,
            options,
        } = call;
        let mut deadline = self.timeout;
        if let Some(options) = options {
            options.apply(&mut query);
            if let Some(wait) = options.blocking_wait() {
                // Consul adds up to wait/16 of jitter to a blocking query's
                // wait; our deadline must outlast that.
                deadline = wait + wait / 16 + self.timeout;
            }
        }
        if let Some(dc) = &self.inner.datacenter {
            query.push(("dc", dc.clone()));
        }

        let mut uri = format!("{}/v1/{}", self.inner.base, path);
        for (i, (key, value)) in query.iter().enumerate() {
            uri.push(if i == 0 { '?' } else { '&' });
            uri.push_str(key);
            if !value.is_empty() {
                uri.push('=');
                uri.extend(utf8_percent_encode(value, QUERY));
            }
        }

        let mut request = Request::builder().method(method.clone()).uri(&uri);
        if let Some(token) = &self.inner.token {
            request = request.header("X-Consul-Token", token.clone());
        }
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| Error::Config(format!("cannot build request for {uri}: {e}")))?;

        let transport = |source: Box<dyn std::error::Error + Send + Sync>| Error::Transport {
            method: method.clone(),
            path: path.clone(),
            source,
        };
        let exchange = async {
            let response = self
                .inner
                .http
                .request(request)
                .await
                .map_err(|e| transport(Box::new(e)))?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| transport(Box::new(e)))?.to_bytes();
            Ok::<_, Error>((parts, body))
        };
        let (parts, body) = match tokio::time::timeout(deadline, exchange).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(Error::Timeout {
                    method,
                    path,
                    after: deadline,
                })
            }
        };
        tracing::trace!(%method, %path, status = %parts.status, "consul call");
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
            method,
            path,
        })
    }
}

/// Escapes a user-supplied string (KV key, ID) for use in a URL path. `/` is
/// kept, so nested KV keys stay nested.
pub(crate) fn escape_path(s: &str) -> String {
    utf8_percent_encode(s, PATH).to_string()
}

/// `host:port` or `http://host:port[/]` to `http://host:port`.
fn normalize_address(address: &str) -> Result<String, Error> {
    let address = address.trim().trim_end_matches('/');
    let rest = match address.split_once("://") {
        None => address,
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(Error::Config(format!(
                "address {address:?}: scheme {scheme:?} is not supported (use http://host:port of the local agent)"
            )))
        }
    };
    if rest.is_empty() || rest.contains('/') {
        return Err(Error::Config(format!(
            "address {address:?} is not host:port or http://host:port"
        )));
    }
    let base = format!("http://{rest}");
    base.parse::<http::Uri>()
        .map_err(|e| Error::Config(format!("address {address:?}: {e}")))?;
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_normalized() {
        assert_eq!(normalize_address("127.0.0.1:8500").unwrap(), "http://127.0.0.1:8500");
        assert_eq!(
            normalize_address("http://localhost:8500/").unwrap(),
            "http://localhost:8500"
        );
        let e = normalize_address("https://c:8501").unwrap_err().to_string();
        assert!(e.contains("https"), "{e}");
        assert!(normalize_address("unix:///tmp/consul.sock").is_err());
        assert!(normalize_address("http://a:1/v1").is_err());
    }

    #[test]
    fn config_beats_environment_beats_default() {
        let env = |name: &str| match name {
            "CONSUL_HTTP_ADDR" => Some("10.1.2.3:8500".to_owned()),
            "CONSUL_HTTP_TOKEN" => Some("secret".to_owned()),
            _ => None,
        };
        let from_env = Client::with_env(Config::default(), env).unwrap();
        assert_eq!(from_env.address(), "http://10.1.2.3:8500");
        assert!(from_env.inner.token.is_some());

        let from_config = Client::with_env(Config::with_address("http://127.0.0.9:1"), env).unwrap();
        assert_eq!(from_config.address(), "http://127.0.0.9:1");

        let default = Client::with_env(Config::default(), |_| None).unwrap();
        assert_eq!(default.address(), DEFAULT_ADDRESS);
        assert!(default.inner.token.is_none());
        // The token never shows in debug output.
        assert!(!format!("{from_env:?}").contains("secret"));
    }

    #[test]
    fn paths_and_queries_are_escaped() {
        assert_eq!(escape_path("halo/a b/c?d"), "halo/a%20b/c%3Fd");
        let q: String = utf8_percent_encode("Service.Meta.zone == \"a\"", QUERY).to_string();
        assert_eq!(q, "Service.Meta.zone%20%3D%3D%20%22a%22");
    }
}
