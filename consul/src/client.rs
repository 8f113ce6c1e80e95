//! The client handle, its configuration, and the one place requests are sent.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
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

/// Largest response body accepted when the config sets none: 64 MiB, far
/// above any real answer (a health list of 10,000 instances is a few MiB),
/// low enough that a broken server streaming a body cannot take the process
/// down.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 << 20;

/// At most this much of an error answer's body (a non-2xx status) is read:
/// it only becomes error text, and Consul's messages are one line.
const ERROR_BODY_READ_LIMIT: usize = 64 << 10;

/// Error text taken from an answer (Consul's message, a decoder's complaint)
/// is cut to this many bytes, so errors stay short in logs and `/status`.
pub const MAX_ERROR_TEXT_BYTES: usize = 256;

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
    /// HTTPS (an `https://` address or `CONSUL_HTTP_SSL=true`) and unix
    /// sockets are not supported yet and are refused with
    /// [`Error::Config`] rather than tried as plain HTTP.
    pub address: Option<String>,
    /// ACL token sent as `X-Consul-Token`. Unset: `CONSUL_HTTP_TOKEN`, else none.
    pub token: Option<String>,
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
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
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
    http: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    /// `http://host:port`, no trailing slash.
    base: String,
    /// `host:port`, as errors name it.
    authority: String,
    max_body: usize,
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
    /// TLS is not supported yet: an `https://` address or a true
    /// `CONSUL_HTTP_SSL` (which Consul's own tools obey whatever the address
    /// says) is a configuration error here, never a silent fall-back to plain
    /// HTTP. So are unix sockets and any scheme but `http`.
    pub fn with_env(config: Config, env: impl Fn(&str) -> Option<String>) -> Result<Client, Error> {
        if let Some(ssl) = env("CONSUL_HTTP_SSL").filter(|v| !v.trim().is_empty()) {
            match parse_go_bool(ssl.trim()) {
                Some(false) => {}
                Some(true) => {
                    return Err(Error::Config(format!(
                        "TLS to Consul is not supported yet: CONSUL_HTTP_SSL={ssl} asks for HTTPS; \
                         unset it (or set it to false) and use the agent's plain HTTP port"
                    )))
                }
                None => {
                    return Err(Error::Config(format!(
                        "CONSUL_HTTP_SSL={:?} is not a boolean (true or false)",
                        clip_text(&ssl, BodyLength::Exactly(ssl.len() as u64))
                    )))
                }
            }
        }
        let (address, origin) = match config.address.filter(|a| !a.trim().is_empty()) {
            Some(address) => (address, "address"),
            None => match env("CONSUL_HTTP_ADDR").filter(|a| !a.trim().is_empty()) {
                Some(address) => (address, "CONSUL_HTTP_ADDR"),
                None => (DEFAULT_ADDRESS.to_owned(), "address"),
            },
        };
        let base = normalize_address(&address).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        let authority = base.trim_start_matches("http://").to_owned();
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
        let max_body = config.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
        if max_body == 0 {
            return Err(Error::Config("max_response_bytes must be above zero".into()));
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
                authority,
                max_body,
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

    /// Whether calls carry an ACL token (from the config or
    /// `CONSUL_HTTP_TOKEN`).
    pub fn has_token(&self) -> bool {
        self.inner.token.is_some()
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
            address: self.inner.authority.clone(),
            method: method.clone(),
            path: path.clone(),
            cause: describe_transport(source.as_ref()),
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

/// The whole length of a text being clipped, when it is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLength {
    /// The text is whole and this long.
    Exactly(u64),
    /// Only a prefix was read; the whole is at least this long.
    AtLeast(u64),
}

/// Cuts `text` to [`MAX_ERROR_TEXT_BYTES`] on a character boundary, marking
/// the cut with the whole length: `"…text… (20971520 bytes)"`.
pub(crate) fn clip_text(text: &str, total: BodyLength) -> String {
    let whole = matches!(total, BodyLength::Exactly(_));
    if whole && text.len() <= MAX_ERROR_TEXT_BYTES {
        return text.to_owned();
    }
    let mut end = text.len().min(MAX_ERROR_TEXT_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let marker = match total {
        BodyLength::Exactly(n) => format!("… ({n} bytes)"),
        BodyLength::AtLeast(n) => format!("… (at least {n} bytes)"),
    };
    format!("{}{marker}", &text[..end])
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Go's `strconv.ParseBool`, which Consul's tools use for `CONSUL_HTTP_SSL`.
fn parse_go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Says in a few words what went wrong below HTTP, walking the error's
/// source chain ("client error (Connect)" alone says nothing): connection
/// refused, timed out, DNS lookup failed, reset, cut short, or not HTTP at
/// all (e.g. a TLS port). The chain's own texts follow in parentheses.
pub(crate) fn describe_transport(error: &(dyn std::error::Error + 'static)) -> String {
    let mut io_kind = None;
    let mut hyper_kind = None;
    let mut dns = false;
    let mut texts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            io_kind = io_kind.or_else(|| describe_io(io.kind()));
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            hyper_kind = hyper_kind.or_else(|| describe_hyper(h));
        }
        let text = e.to_string();
        dns |= text == "dns error";
        // The legacy client's own wrapper says nothing the rest does not.
        if !text.starts_with("client error (") && texts.last() != Some(&text) {
            texts.push(text);
        }
        next = e.source();
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
        "the answer is not HTTP/1 (a TLS port? TLS to Consul is not supported yet)"
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

/// `host:port` or `http://host:port[/]` to `http://host:port`; the error
/// says what is wrong, for the caller to prefix with where the address came
/// from.
fn normalize_address(address: &str) -> Result<String, String> {
    let address = address.trim().trim_end_matches('/');
    let rest = match address.split_once("://") {
        None => address,
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
            return Err(format!(
                "TLS to Consul is not supported yet: {address:?} asks for HTTPS; \
                 use http://host:port of the agent's plain HTTP port"
            ))
        }
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("unix") => {
            return Err(format!(
                "{address:?}: unix sockets are not supported yet; use http://host:port of the local agent"
            ))
        }
        Some((scheme, _)) => {
            return Err(format!(
                "{address:?}: scheme {scheme:?} is not supported (use http://host:port of the local agent)"
            ))
        }
    };
    if rest.is_empty() || rest.contains('/') {
        return Err(format!("{address:?} is not host:port or http://host:port"));
    }
    let base = format!("http://{rest}");
    base.parse::<http::Uri>().map_err(|e| format!("{address:?}: {e}"))?;
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
        assert!(normalize_address("http://a:1/v1").is_err());
    }

    /// Before this check, `CONSUL_HTTP_SSL=true` was ignored and calls went
    /// out as plain HTTP; `https://` and `unix://` were refused with a bare
    /// "scheme not supported".
    #[test]
    fn tls_and_unix_sockets_are_config_errors_not_plain_http() {
        let refused = |config: Config, env: &[(&str, &str)]| {
            let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let err = Client::with_env(config, |name| {
                env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            })
            .unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err:?}");
            err.to_string()
        };
        for ssl in ["true", "1", "TRUE", "t"] {
            let e = refused(Config::default(), &[("CONSUL_HTTP_SSL", ssl)]);
            assert!(
                e.contains("TLS to Consul is not supported yet") && e.contains("CONSUL_HTTP_SSL"),
                "{e}"
            );
            // An http:// address in the config does not make it plain HTTP.
            let e = refused(
                Config::with_address("http://127.0.0.1:8500"),
                &[("CONSUL_HTTP_SSL", ssl)],
            );
            assert!(e.contains("TLS to Consul is not supported yet"), "{e}");
        }
        let e = refused(Config::default(), &[("CONSUL_HTTP_SSL", "yes please")]);
        assert!(e.contains("CONSUL_HTTP_SSL") && e.contains("not a boolean"), "{e}");

        let e = refused(Config::with_address("https://127.0.0.1:8501"), &[]);
        assert!(
            e.contains("TLS to Consul is not supported yet") && e.contains("address"),
            "{e}"
        );
        let e = refused(Config::default(), &[("CONSUL_HTTP_ADDR", "HTTPS://127.0.0.1:8501")]);
        assert!(
            e.contains("TLS to Consul is not supported yet") && e.contains("CONSUL_HTTP_ADDR"),
            "{e}"
        );
        let e = refused(Config::with_address("unix:///run/consul.sock"), &[]);
        assert!(e.contains("unix sockets are not supported"), "{e}");
        let e = refused(Config::with_address("grpc://127.0.0.1:8502"), &[]);
        assert!(e.contains("\"grpc\" is not supported"), "{e}");

        // False and empty are plain HTTP, as with Consul's own tools.
        for ssl in ["false", "0", "F", ""] {
            let env = |name: &str| (name == "CONSUL_HTTP_SSL").then(|| ssl.to_owned());
            assert_eq!(
                Client::with_env(Config::default(), env).unwrap().address(),
                DEFAULT_ADDRESS
            );
        }
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
