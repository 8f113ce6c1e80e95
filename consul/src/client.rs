//! The client handle, its configuration, and the one place requests are sent.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde::de::DeserializeOwned;

use crate::connect::Connector;
pub use crate::error::MAX_ERROR_TEXT_BYTES;
use crate::error::{clip_text, BodyLength};
use crate::query::{QueryMeta, QueryOptions};
use crate::tls::{TlsConfig, TlsSettings};
use crate::token::Token;
use crate::Error;

/// Address used when neither the config nor `CONSUL_HTTP_ADDR` names one: the
/// local agent, as every Consul tool defaults to.
pub const DEFAULT_ADDRESS: &str = "http://127.0.0.1:8500";

/// Deadline for one non-blocking call when the config sets none. Blocking
/// queries get `wait + wait/16 +` this much.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `wait` Consul applies to a blocking query that names none.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);

/// Largest response body accepted when the config sets none: 64 MiB, far
/// above any real answer (a health list of 10,000 instances is a few MiB),
/// low enough that a broken server streaming a body cannot take the process
/// down.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 << 20;

/// At most this much of an error answer's body (a non-2xx status) is read:
/// it only becomes error text, and Consul's messages are one line.
const ERROR_BODY_READ_LIMIT: usize = 64 << 10;

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
    /// The agent's address: `host:port`, `http://host:port`,
    /// `https://host:port` (TLS, see [`Config::tls`]) or `unix:///path` (the
    /// agent's unix socket; plain HTTP). Unset: the `CONSUL_HTTP_ADDR`
    /// environment variable, else [`DEFAULT_ADDRESS`].
    pub address: Option<String>,
    /// ACL token sent as `X-Consul-Token`. Unset: see `token_file`.
    pub token: Option<String>,
    /// File holding the ACL token (surrounding whitespace ignored; it must
    /// exist and hold a token; at most [`MAX_TOKEN_FILE_BYTES`](crate::MAX_TOKEN_FILE_BYTES);
    /// a regular file, or a symlink to one, readable by its owner only:
    /// see [`file::read_secret`](crate::file::read_secret)).
    /// Read when the client is made and again by [`Client::reload_token`] (the
    /// programs call it on SIGHUP). The token is chosen from the first of:
    /// this field, `token`, `CONSUL_HTTP_TOKEN_FILE`, `CONSUL_HTTP_TOKEN`:
    /// the config wins over the environment, and within each a file wins
    /// over a literal token, as with Consul's own tools. All unset: no token.
    pub token_file: Option<PathBuf>,
    /// TLS to the agent: CA, client certificate, server name, verification.
    /// Unset fields come from `CONSUL_HTTP_SSL`, `CONSUL_CACERT`, … (see
    /// [`TlsConfig`]).
    pub tls: TlsConfig,
    /// Datacenter sent as `?dc=` on every call. Unset: the agent's own.
    pub datacenter: Option<String>,
    /// Deadline of a non-blocking call, and the margin added to blocking ones.
    /// Unset: [`DEFAULT_TIMEOUT`].
    pub timeout: Option<Duration>,
    /// Largest response body accepted, in bytes; a longer answer fails with
    /// [`Error::TooLarge`] as soon as it passes the limit (the body is read
    /// piece by piece, so memory stays bounded whatever the server sends).
    /// Unset: [`DEFAULT_MAX_RESPONSE_BYTES`]; no environment variable sets it.
    pub max_response_bytes: Option<usize>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("address", &self.address.as_deref().map(redact_address))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("tls", &self.tls)
            .field("datacenter", &self.datacenter)
            .field("timeout", &self.timeout)
            .field("max_response_bytes", &self.max_response_bytes)
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
    http: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
    /// `http://host:port` or `https://host:port`, no trailing slash
    /// (`http://localhost` for a unix socket: the host is not dialled).
    base: String,
    /// `host:port` or `unix:///path`, as errors name it.
    authority: String,
    /// Where the agent's certificate must chain to, for TLS errors
    /// ([`TlsSettings::trust_source`]).
    trust: String,
    max_body: usize,
    /// Swapped by [`Token::reload`] and friends; every clone (and
    /// [`Client::with_timeout`] copy) shares it, and so does every client
    /// made with [`Client::sharing_token`].
    token: Token,
    datacenter: Option<String>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.inner.base)
            .field("token", &self.inner.token)
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

/// A 2xx..5xx answer. A 2xx body is read in full (within the client's
/// limit); of any other only the first [`ERROR_BODY_READ_LIMIT`] bytes.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body was cut at [`ERROR_BODY_READ_LIMIT`] (error answers only).
    pub cut: bool,
    pub method: Method,
    pub path: String,
}

impl Answer {
    pub fn meta(&self) -> QueryMeta {
        QueryMeta::from_headers(&self.headers)
    }

    /// Consul's error message: the body as text, trimmed, and cut to
    /// [`MAX_ERROR_TEXT_BYTES`] with a marker giving the whole length.
    pub fn message(&self) -> String {
        let total = if self.cut {
            // What the server announced, if anything; at least what we read.
            BodyLength::AtLeast(content_length(&self.headers).unwrap_or(0).max(self.body.len() as u64))
        } else {
            BodyLength::Exactly(self.body.len() as u64)
        };
        clip_text(String::from_utf8_lossy(self.body.trim_ascii()).as_ref(), total)
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
        decode_json(&self.path, &self.body)
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
    ///
    /// A true `CONSUL_HTTP_SSL` (or [`TlsConfig::enabled`]) selects HTTPS
    /// whatever the address's scheme says, as with Consul's own tools. TLS
    /// over a unix socket is refused. With verification skipped, every call
    /// of this function logs a warning.
    pub fn with_env(config: Config, env: impl Fn(&str) -> Option<String>) -> Result<Client, Error> {
        let token = Token::resolve(&config, &env)?;
        Client::build(config, env, token)
    }

    /// [`Client::new`] reading its token from `token` (a cell already
    /// resolved, e.g. by a reload on a thread of its own) instead of from
    /// `config`'s token settings, which are ignored: no token file is read.
    /// The same as `Client::new(config)?.sharing_token(token)` without the
    /// file read.
    pub fn with_token(config: Config, token: &Token) -> Result<Client, Error> {
        Client::build(config, |name| std::env::var(name).ok(), token.clone())
    }

    fn build(config: Config, env: impl Fn(&str) -> Option<String>, token: Token) -> Result<Client, Error> {
        let tls = TlsSettings::resolve(&config.tls, &env)?;
        let (address, origin) = match config.address.filter(|a| !a.trim().is_empty()) {
            Some(address) => (address, "address"),
            None => match env("CONSUL_HTTP_ADDR").filter(|a| !a.trim().is_empty()) {
                Some(address) => (address, "CONSUL_HTTP_ADDR"),
                None => (DEFAULT_ADDRESS.to_owned(), "address"),
            },
        };
        let target = parse_address(&address).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        let timeout = config.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(Error::Config("timeout must be above zero".into()));
        }
        let max_body = config.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
        if max_body == 0 {
            return Err(Error::Config("max_response_bytes must be above zero".into()));
        }

        let (connector, base, authority) = match target {
            Target::Unix(path) => {
                if tls.enabled {
                    return Err(Error::Config(format!(
                        "{origin}: TLS over a unix socket is not supported (CONSUL_HTTP_SSL or https asked \
                         for it with unix://{})",
                        path.display()
                    )));
                }
                let authority = format!("unix://{}", path.display());
                (
                    Connector::Unix(Arc::new(path)),
                    "http://localhost".to_owned(),
                    authority,
                )
            }
            Target::Net { https, authority } => {
                let https = https || tls.enabled;
                let mut http = HttpConnector::new();
                http.set_nodelay(true);
                http.set_connect_timeout(Some(timeout));
                // hyper-rustls refuses http:// URIs unless told otherwise.
                http.enforce_http(false);
                let builder = hyper_rustls::HttpsConnectorBuilder::new();
                let builder = if https {
                    if tls.skip_verify {
                        tracing::warn!(
                            address = %authority,
                            "TLS certificate verification of the Consul agent is OFF (tls_skip_verify or \
                             CONSUL_HTTP_SSL_VERIFY=false): anyone on the path can read the ACL token and \
                             answer for the agent"
                        );
                    }
                    builder.with_tls_config(tls.client_config()?)
                } else {
                    // Never used for http://, but the builder wants one.
                    builder.with_tls_config(
                        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                            .with_safe_default_protocol_versions()
                            .map_err(|e| Error::Config(format!("TLS: {e}")))?
                            .with_root_certificates(rustls::RootCertStore::empty())
                            .with_no_client_auth(),
                    )
                };
                let builder = if https {
                    builder.https_only()
                } else {
                    builder.https_or_http()
                };
                let builder = match &tls.server_name {
                    Some(name) if https => {
                        let name = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|e| {
                            Error::Config(format!("tls_server_name (CONSUL_TLS_SERVER_NAME) {name:?}: {e}"))
                        })?;
                        builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
                    }
                    _ => builder,
                };
                let connector = builder.enable_http1().wrap_connector(http);
                let scheme = if https { "https" } else { "http" };
                (Connector::Net(connector), format!("{scheme}://{authority}"), authority)
            }
        };
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                authority,
                trust: tls.trust_source(),
                max_body,
                token,
                datacenter: config.datacenter.filter(|dc| !dc.is_empty()),
            }),
            timeout,
        })
    }

    /// Reads the token file again (SIGHUP); see [`Token::reload`]. Every
    /// client sharing this one's token sees the result.
    pub fn reload_token(&self) -> Result<bool, Error> {
        self.inner.token.reload()
    }

    /// Replaces the token every client sharing this one's sends (`None`:
    /// none).
    pub fn set_token(&self, token: Option<&str>) -> Result<(), Error> {
        self.inner.token.set(token)
    }

    /// The token cell this client reads, to share with clients made later
    /// (on other runtimes) or to reload.
    pub fn token(&self) -> &Token {
        &self.inner.token
    }

    /// The same client (settings and connection pool) reading its token from
    /// `token` instead: so clients made separately (one per runtime) follow
    /// one token that SIGHUP reloads.
    pub fn sharing_token(&self, token: &Token) -> Client {
        Client {
            inner: Arc::new(Inner {
                http: self.inner.http.clone(),
                base: self.inner.base.clone(),
                authority: self.inner.authority.clone(),
                trust: self.inner.trust.clone(),
                max_body: self.inner.max_body,
                token: token.clone(),
                datacenter: self.inner.datacenter.clone(),
            }),
            timeout: self.timeout,
        }
    }

    /// The file the token is read from, if it comes from one.
    pub fn token_file(&self) -> Option<PathBuf> {
        self.inner.token.file()
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

    /// The agent's base URL, e.g. `http://127.0.0.1:8500` or
    /// `https://127.0.0.1:8501`; `unix:///path` for a unix socket.
    pub fn address(&self) -> &str {
        if self.inner.authority.starts_with("unix://") {
            &self.inner.authority
        } else {
            &self.inner.base
        }
    }

    /// Whether calls carry an ACL token (from the config, a token file or
    /// the environment).
    pub fn has_token(&self) -> bool {
        self.inner.token.is_set()
    }

    /// The largest response body this client accepts, in bytes.
    pub fn max_response_bytes(&self) -> usize {
        self.inner.max_body
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
        if let Some(token) = self.inner.token.header() {
            request = request.header("X-Consul-Token", token);
        }
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| Error::Config(format!("cannot build request for {uri}: {e}")))?;

        let transport = |source: Box<dyn std::error::Error + Send + Sync>| Error::Transport {
            address: self.inner.authority.clone(),
            method: method.clone(),
            path: path.clone(),
            cause: describe_transport(source.as_ref(), &self.inner.trust),
            source,
        };
        let exchange = async {
            let response = self
                .inner
                .http
                .request(request)
                .await
                .map_err(|e| transport(Box::new(e)))?;
            let (parts, mut body) = response.into_parts();
            let success = parts.status.is_success();
            let limit = if success {
                self.inner.max_body
            } else {
                ERROR_BODY_READ_LIMIT.min(self.inner.max_body)
            };
            let too_large = || Error::TooLarge {
                address: self.inner.authority.clone(),
                method: method.clone(),
                path: path.clone(),
                limit,
            };
            // An announced length over the limit fails before reading.
            if success && content_length(&parts.headers).is_some_and(|n| n > limit as u64) {
                return Err(too_large());
            }
            // Read frame by frame so that no more than `limit` bytes (plus one
            // frame) are ever held, whatever the server streams.
            let mut buf = BytesMut::new();
            let mut cut = false;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| transport(Box::new(e)))?;
                let Ok(data) = frame.into_data() else { continue };
                if buf.len() + data.len() > limit {
                    if success {
                        return Err(too_large());
                    }
                    // Error text: keep what fits and stop reading. Dropping
                    // the body closes the connection instead of draining it.
                    buf.extend_from_slice(&data[..limit - buf.len()]);
                    cut = true;
                    break;
                }
                buf.extend_from_slice(&data);
            }
            Ok::<_, Error>((parts, buf.freeze(), cut))
        };
        let (parts, body, cut) = match tokio::time::timeout(deadline, exchange).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(Error::Timeout {
                    address: self.inner.authority.clone(),
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
            cut,
            method,
            path,
        })
    }
}

/// Decodes a JSON body, naming the path and (briefly) what did not fit.
pub(crate) fn decode_json<T: DeserializeOwned>(path: &str, body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| {
        // serde's message may quote a whole string from the body.
        let reason = e.to_string();
        Error::Decode {
            path: path.to_owned(),
            reason: clip_text(&reason, BodyLength::Exactly(reason.len() as u64)),
        }
    })
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Says in a few words what went wrong below HTTP, walking the error's
/// source chain ("client error (Connect)" alone says nothing): connection
/// refused, timed out, DNS lookup failed, reset, cut short, or not HTTP at
/// all (e.g. a TLS port). The chain's own texts follow in parentheses.
pub(crate) fn describe_transport(error: &(dyn std::error::Error + 'static), trust: &str) -> String {
    let mut io_kind = None;
    let mut hyper_kind = None;
    let mut tls = None;
    let mut dns = false;
    let mut texts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            io_kind = io_kind.or_else(|| describe_io(io.kind()));
            // io::Error's source() skips the error it wraps, and hyper-rustls
            // wraps tokio-rustls' io::Error in another: look inside each.
            let mut inner = io.get_ref().map(|i| i as &(dyn std::error::Error + 'static));
            for _ in 0..8 {
                let Some(i) = inner else { break };
                if let Some(t) = i.downcast_ref::<rustls::Error>() {
                    tls = tls.or_else(|| Some(crate::tls::explain(t, trust)));
                    break;
                }
                inner = i
                    .downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .map(|i| i as &(dyn std::error::Error + 'static));
            }
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            hyper_kind = hyper_kind.or_else(|| describe_hyper(h));
        }
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            tls = tls.or_else(|| Some(crate::tls::explain(t, trust)));
        }
        let text = e.to_string();
        dns |= text == "dns error";
        // The legacy client's own wrapper says nothing the rest does not.
        if !text.starts_with("client error (") && texts.last() != Some(&text) {
            texts.push(text);
        }
        next = e.source();
    }
    // A TLS failure reaches us as an io::Error of kind InvalidData wrapping
    // the rustls error: say what the TLS stack refused, not "malformed HTTP".
    if let Some(tls) = tls {
        return clip_text(&tls, BodyLength::Exactly(tls.len() as u64));
    }
    let what = if dns {
        "DNS lookup failed"
    } else {
        io_kind.or(hyper_kind).unwrap_or("transport error")
    };
    if texts.is_empty() {
        what.to_owned()
    } else {
        let detail = texts.join(": ");
        clip_text(
            &format!("{what} ({detail})"),
            BodyLength::Exactly((what.len() + detail.len() + 3) as u64),
        )
    }
}

fn describe_io(kind: std::io::ErrorKind) -> Option<&'static str> {
    use std::io::ErrorKind::*;
    Some(match kind {
        ConnectionRefused => "connection refused",
        ConnectionReset | ConnectionAborted | BrokenPipe => "connection reset",
        TimedOut => "connection timed out",
        UnexpectedEof => "connection closed before the answer was complete",
        AddrNotAvailable => "no local address or port available",
        NetworkUnreachable => "network unreachable",
        HostUnreachable => "host unreachable",
        PermissionDenied => "permission denied",
        InvalidData | InvalidInput => "malformed HTTP answer",
        _ => return None,
    })
}

fn describe_hyper(e: &hyper::Error) -> Option<&'static str> {
    Some(if e.is_incomplete_message() {
        "connection closed before the answer was complete"
    } else if e.is_parse() || e.is_parse_status() {
        // What a plain-HTTP client sees from a TLS port.
        "the answer is not HTTP/1 (a TLS port? use an https:// address)"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_closed() || e.is_canceled() {
        "connection closed"
    } else {
        return None;
    })
}

/// Escapes a user-supplied string (KV key, ID) for use in a URL path. `/` is
/// kept, so nested KV keys stay nested.
pub(crate) fn escape_path(s: &str) -> String {
    utf8_percent_encode(s, PATH).to_string()
}

/// Where the agent is.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// TCP to `authority` (`host:port`), with TLS if `https`.
    Net { https: bool, authority: String },
    /// The agent's unix socket.
    Unix(PathBuf),
}

/// `host:port`, `http[s]://host:port[/]` or `unix:///path`; the error says
/// what is wrong, for the caller to prefix with where the address came from.
/// `address` as it may be shown (logs, errors, `/status`, `Debug`): any
/// `user:password@` before the host replaced by `<redacted>@`. halo never
/// sends userinfo to the agent (Consul's clients take HTTP basic auth from
/// `CONSUL_HTTP_AUTH`, which halo does not use), so it only ever leaks.
pub fn redact_address(address: &str) -> std::borrow::Cow<'_, str> {
    let (scheme, rest) = match address.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, address),
    };
    // Only the authority may hold userinfo: up to the first '/'.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return std::borrow::Cow::Borrowed(address);
    };
    let scheme = scheme.map(|s| format!("{s}://")).unwrap_or_default();
    std::borrow::Cow::Owned(format!("{scheme}<redacted>@{}", &rest[at + 1..]))
}

fn parse_address(address: &str) -> Result<Target, String> {
    let shown = redact_address(address.trim()).into_owned();
    parse_address_shown(address, &shown)
}

/// [`parse_address`], with `shown` (the address, redacted) in its errors.
fn parse_address_shown(address: &str, shown: &str) -> Result<Target, String> {
    let address = address.trim();
    if let Some((scheme, path)) = address.split_once("://") {
        if scheme.eq_ignore_ascii_case("unix") {
            if !path.starts_with('/') || path.len() < 2 {
                return Err(format!("{shown:?}: a unix socket address is unix:///absolute/path"));
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
    }
    let address = address.trim_end_matches('/');
    let (https, rest) = match address.split_once("://") {
        None => (false, address),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (false, rest),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (true, rest),
        Some((scheme, _)) => {
            return Err(format!(
                "{shown:?}: scheme {scheme:?} is not supported (use http://, https:// or unix://)"
            ))
        }
    };
    if rest.is_empty() || rest.contains('/') {
        return Err(format!(
            "{shown:?} is not host:port, http(s)://host:port or unix:///path"
        ));
    }
    let uri = format!("http://{rest}")
        .parse::<http::Uri>()
        .map_err(|e| format!("{shown:?}: {e}"))?;
    if uri.port().is_none() && rest.ends_with(':') {
        return Err(format!("{shown:?}: empty port"));
    }
    // Userinfo is never sent (see `redact_address`): drop it, so that no
    // error, log line or `/status` built from the authority shows it.
    let authority = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    if authority.is_empty() {
        return Err(format!("{shown:?}: no host"));
    }
    Ok(Target::Net {
        https,
        authority: authority.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    fn refused(config: Config, env: &[(&str, &str)]) -> String {
        let err = Client::with_env(config, env_of(env)).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        err.to_string()
    }

    /// Issue 17: `user:pw@` in the address was echoed in errors (and so in
    /// halo-lb's `/status` and the logs).
    #[tokio::test]
    async fn userinfo_in_the_address_is_never_shown() {
        assert_eq!(
            redact_address("http://user:pw@127.0.0.1:8500"),
            "http://<redacted>@127.0.0.1:8500"
        );
        assert_eq!(redact_address("user:pw@127.0.0.1:8500"), "<redacted>@127.0.0.1:8500");
        assert_eq!(redact_address("https://a@b@h:1/x@y"), "https://<redacted>@h:1/x@y");
        assert_eq!(redact_address("http://127.0.0.1:8500"), "http://127.0.0.1:8500");
        assert_eq!(redact_address("unix:///run/consul.sock"), "unix:///run/consul.sock");
        assert_eq!(
            parse_address("http://user:pw@127.0.0.1:8500").unwrap(),
            Target::Net {
                https: false,
                authority: "127.0.0.1:8500".into()
            }
        );
        let e = parse_address("http://user:pw@127.0.0.1:8500/x").unwrap_err();
        assert!(e.contains("<redacted>@127.0.0.1") && !e.contains("pw"), "{e}");
        // A call that fails names the agent without the userinfo.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let c = Client::with_env(Config::with_address(format!("http://user:pw@127.0.0.1:{port}")), |_| {
            None
        })
        .unwrap();
        assert_eq!(c.address(), format!("http://127.0.0.1:{port}"));
        let e = c.agent_service("x").await.unwrap_err().to_string();
        assert!(
            e.contains(&format!("127.0.0.1:{port}")) && !e.contains("pw") && !e.contains("user"),
            "{e}"
        );
        assert!(!format!("{c:?}").contains("pw"));
    }

    #[test]
    fn addresses_are_parsed() {
        let net = |https: bool, a: &str| Target::Net {
            https,
            authority: a.to_owned(),
        };
        assert_eq!(parse_address("127.0.0.1:8500").unwrap(), net(false, "127.0.0.1:8500"));
        assert_eq!(
            parse_address("http://localhost:8500/").unwrap(),
            net(false, "localhost:8500")
        );
        assert_eq!(
            parse_address("HTTPS://10.0.0.1:8501").unwrap(),
            net(true, "10.0.0.1:8501")
        );
        assert_eq!(
            parse_address("unix:///run/consul/http.sock").unwrap(),
            Target::Unix(PathBuf::from("/run/consul/http.sock"))
        );
        assert!(parse_address("http://a:1/v1").is_err());
        assert!(parse_address("unix://relative.sock").is_err());
        assert!(parse_address("grpc://127.0.0.1:8502")
            .unwrap_err()
            .contains("\"grpc\" is not supported"));
    }

    /// Consul's rules: an https:// address or a true CONSUL_HTTP_SSL selects
    /// TLS (even over an explicit http://); never a silent plain HTTP.
    #[test]
    fn the_scheme_or_consul_http_ssl_selects_tls() {
        let certs = halo_testkit::tls::Certs::create();
        let ca = certs.ca_file();
        let ca = ca.to_str().unwrap();
        for ssl in ["true", "1", "TRUE", "t"] {
            let c = Client::with_env(
                Config::with_address("http://127.0.0.1:8501"),
                env_of(&[("CONSUL_HTTP_SSL", ssl), ("CONSUL_CACERT", ca)]),
            )
            .unwrap();
            assert_eq!(c.address(), "https://127.0.0.1:8501");
        }
        let c = Client::with_env(
            Config::default(),
            env_of(&[("CONSUL_HTTP_ADDR", "HTTPS://127.0.0.1:8501"), ("CONSUL_CACERT", ca)]),
        )
        .unwrap();
        assert_eq!(c.address(), "https://127.0.0.1:8501");
        // False and empty leave the scheme alone, as with Consul's own tools.
        for ssl in ["false", "0", "F", ""] {
            let c = Client::with_env(Config::default(), env_of(&[("CONSUL_HTTP_SSL", ssl)])).unwrap();
            assert_eq!(c.address(), DEFAULT_ADDRESS);
        }
        let e = refused(Config::default(), &[("CONSUL_HTTP_SSL", "yes please")]);
        assert!(e.contains("CONSUL_HTTP_SSL") && e.contains("not a boolean"), "{e}");
        let e = refused(Config::default(), &[("CONSUL_HTTP_SSL_VERIFY", "nope")]);
        assert!(
            e.contains("CONSUL_HTTP_SSL_VERIFY") && e.contains("not a boolean"),
            "{e}"
        );
        let e = refused(
            Config::with_address("unix:///run/consul.sock"),
            &[("CONSUL_HTTP_SSL", "true")],
        );
        assert!(e.contains("TLS over a unix socket"), "{e}");
        let c = Client::with_env(Config::with_address("unix:///run/consul.sock"), |_| None).unwrap();
        assert_eq!(c.address(), "unix:///run/consul.sock");
    }

    #[test]
    fn tls_files_are_checked_when_the_client_is_made() {
        let certs = halo_testkit::tls::Certs::create();
        let https = || Config::with_address("https://127.0.0.1:8501");
        let e = refused(https(), &[("CONSUL_CACERT", "/nonexistent/ca.pem")]);
        assert!(
            e.contains("CONSUL_CACERT /nonexistent/ca.pem") && e.contains("No such file"),
            "{e}"
        );
        let e = refused(https(), &[("CONSUL_CACERT", "/etc/hostname")]);
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = refused(https(), &[("CONSUL_CLIENT_CERT", "/x.pem")]);
        assert!(
            e.contains("key_file (CONSUL_CLIENT_KEY) is set") || e.contains("CONSUL_CLIENT_KEY"),
            "{e}"
        );
        let e = refused(https(), &[("CONSUL_CLIENT_KEY", "/x.pem")]);
        assert!(e.contains("cert_file (CONSUL_CLIENT_CERT) is not"), "{e}");
        let e = refused(
            Config {
                tls: TlsConfig {
                    server_name: Some("not a name!".into()),
                    ..TlsConfig::default()
                },
                ..https()
            },
            &[("CONSUL_CACERT", certs.ca_file().to_str().unwrap())],
        );
        assert!(e.contains("tls_server_name"), "{e}");
        // Plain HTTP never reads the TLS files.
        assert!(Client::with_env(Config::default(), env_of(&[("CONSUL_CACERT", "/nonexistent")])).is_ok());
    }

    #[test]
    fn the_token_file_wins_is_bounded_and_reloads() {
        let dir = std::env::temp_dir().join(format!("halo-consul-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "  file-secret-1\n").unwrap();
        // Owner-only, as a secret must be (writes below keep the mode).
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let file_s = file.to_str().unwrap();

        // Config file > config token > env file > env token.
        let c = Client::with_env(
            Config {
                token: Some("literal-secret".into()),
                ..Config::default()
            },
            env_of(&[("CONSUL_HTTP_TOKEN_FILE", file_s), ("CONSUL_HTTP_TOKEN", "env-secret")]),
        )
        .unwrap();
        assert_eq!(c.inner.token.header().unwrap(), "literal-secret");
        assert_eq!(c.token_file(), None);
        let c = Client::with_env(
            Config::default(),
            env_of(&[("CONSUL_HTTP_TOKEN_FILE", file_s), ("CONSUL_HTTP_TOKEN", "env-secret")]),
        )
        .unwrap();
        assert_eq!(c.inner.token.header().unwrap(), "file-secret-1");
        let c = Client::with_env(
            Config {
                token: Some("literal-secret".into()),
                token_file: Some(file.clone()),
                ..Config::default()
            },
            |_| None,
        )
        .unwrap();
        assert_eq!(c.inner.token.header().unwrap(), "file-secret-1");

        // Reload: a changed file reaches every clone; a bad one keeps the old.
        let clone = c.with_timeout(Duration::from_secs(1));
        assert!(!c.reload_token().unwrap());
        std::fs::write(&file, "file-secret-2").unwrap();
        assert!(c.reload_token().unwrap());
        assert_eq!(clone.inner.token.header().unwrap(), "file-secret-2");
        std::fs::write(&file, " \n").unwrap();
        let e = c.reload_token().unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        std::fs::write(&file, "x".repeat(crate::MAX_TOKEN_FILE_BYTES as usize + 1)).unwrap();
        let e = c.reload_token().unwrap_err().to_string();
        assert!(e.contains("larger than 4096 bytes"), "{e}");
        std::fs::write(&file, "bad\u{7f}secret-3").unwrap();
        let e = c.reload_token().unwrap_err().to_string();
        assert!(e.contains("not allowed") && !e.contains("secret-3"), "{e}");
        // Readable by others, or not a regular file (a FIFO would have
        // blocked the reload until a writer came): refused, by name.
        std::fs::write(&file, "file-secret-4").unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        let e = c.reload_token().unwrap_err().to_string();
        assert!(e.contains("mode 640") && e.contains(file_s), "{e}");
        std::fs::remove_file(&file).unwrap();
        assert!(std::process::Command::new("mkfifo")
            .arg(&file)
            .status()
            .unwrap()
            .success());
        let e = c.reload_token().unwrap_err().to_string();
        assert!(e.contains(file_s) && e.contains("not a regular file"), "{e}");
        std::fs::remove_file(&file).unwrap();
        let e = c.reload_token().unwrap_err().to_string();
        assert!(e.contains("No such file"), "{e}");
        assert_eq!(clone.inner.token.header().unwrap(), "file-secret-2");
        assert!(!format!("{c:?}").contains("secret"));

        // At start a missing or empty file is an error, not "no token".
        let e = refused(Config::default(), &[("CONSUL_HTTP_TOKEN_FILE", file_s)]);
        assert!(
            e.contains("CONSUL_HTTP_TOKEN_FILE") && e.contains("No such file"),
            "{e}"
        );
        std::fs::write(&file, "").unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let e = refused(Config::default(), &[("CONSUL_HTTP_TOKEN_FILE", file_s)]);
        assert!(e.contains("empty"), "{e}");

        // A client made separately (another runtime's pool) follows the
        // same cell once it shares it; adopt() moves a fresh token in.
        let separate = Client::with_env(Config::default(), |_| None)
            .unwrap()
            .sharing_token(c.token());
        assert_eq!(separate.token().header().unwrap(), "file-secret-2");
        let fresh = Token::resolve(
            &Config {
                token: Some("adopted-secret".into()),
                ..Config::default()
            },
            |_| None,
        )
        .unwrap();
        assert!(c.token().adopt(&fresh));
        assert_eq!(separate.token().header().unwrap(), "adopted-secret");
        assert!(!c.token().adopt(&fresh));
        assert!(!format!("{:?}", c.token()).contains("secret"));

        c.set_token(None).unwrap();
        assert!(!clone.has_token() && !separate.has_token());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_body_limit_is_configurable_and_not_zero() {
        let default = Client::with_env(Config::default(), |_| None).unwrap();
        assert_eq!(default.max_response_bytes(), DEFAULT_MAX_RESPONSE_BYTES);
        let small = Client::with_env(
            Config {
                max_response_bytes: Some(4096),
                ..Config::default()
            },
            |_| None,
        )
        .unwrap();
        assert_eq!(small.max_response_bytes(), 4096);
        let zero = Config {
            max_response_bytes: Some(0),
            ..Config::default()
        };
        assert!(Client::with_env(zero, |_| None).is_err());
    }

    #[test]
    fn clipped_text_keeps_whole_characters_and_says_how_long() {
        let text = "é".repeat(1000); // 2000 bytes
        let clipped = clip_text(&text, BodyLength::Exactly(2000));
        assert!(clipped.ends_with("… (2000 bytes)"), "{clipped}");
        assert!(clipped.len() < MAX_ERROR_TEXT_BYTES + 20);
        assert_eq!(clip_text("short", BodyLength::Exactly(5)), "short");
        assert_eq!(
            clip_text("cut", BodyLength::AtLeast(70000)),
            "cut… (at least 70000 bytes)"
        );
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
        assert!(from_env.has_token());

        let from_config = Client::with_env(Config::with_address("http://127.0.0.9:1"), env).unwrap();
        assert_eq!(from_config.address(), "http://127.0.0.9:1");

        let default = Client::with_env(Config::default(), |_| None).unwrap();
        assert_eq!(default.address(), DEFAULT_ADDRESS);
        assert!(!default.has_token());
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
