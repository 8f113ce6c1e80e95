//! Who may use the admin APIs' write endpoints (halo-lb's
//! `POST /vips/<vip>/backends/<addr>/disable|enable`, halo-sidecar's
//! `POST /drain` and `POST /undrain`). Reads stay open.
//!
//! A write passes [`authorize`] when all of these hold, checked in this
//! order:
//!
//! 1. `Origin`, if sent, is the request's own origin (`http://<Host>`). A
//!    browser sends `Origin` with every cross-origin POST; curl and halo's
//!    own clients send none.
//! 2. `Host`, if sent, is an IP literal or `localhost` (with or without a
//!    port); so is the authority of an absolute-form request target
//!    (`POST http://host/drain`), which must also agree with `Host`. A DNS-rebinding page reaches the admin port under the
//!    attacker's host name, so its requests carry that name; an IP literal
//!    can only name the server the browser actually connected to. The
//!    admin address itself is always an IP literal (`admin.listen` is
//!    `ip:port`), so it is always accepted.
//! 3. With a token configured ([`Token`], from `admin.token_file`): an
//!    `Authorization: Bearer <token>` header that matches it, compared in
//!    constant time, from any peer. A browser never attaches such a header
//!    by itself, and a cross-origin script can only send it after a CORS
//!    preflight the admin API never answers, so the token also makes the
//!    request non-simple.
//! 4. Without a token: the peer is a loopback address (127.0.0.0/8, `::1`,
//!    or an IPv4-mapped loopback), and the request carries the
//!    [`REQUEST_HEADER`] (`X-Halo-Request`, any non-empty value). A custom
//!    header rather than `Content-Type: application/json`: no HTML form can
//!    set it, and no browser sends it cross-origin without a preflight,
//!    whereas content types have had preflight bypasses (`sendBeacon`,
//!    plug-ins) and the write endpoints take no body.
//!
//! More than one `Authorization` header is refused (400) whatever else
//! holds.
//!
//! Failures are 400 (two `Authorization` headers), 401 (no or wrong token;
//! with `WWW-Authenticate: Bearer`) or 403 (everything else), each with a short `{"error": "..."}`. Neither
//! the token nor the presented credential ever appears in an answer or a
//! log line.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};

use http::{header, HeaderMap, Request, StatusCode};
use serde_json::json;

use crate::server::{json_response, peer, HttpResponse};

/// The header a client without a token must send with a write (any
/// non-empty value; halo's clients send `1`).
pub const REQUEST_HEADER: &str = "x-halo-request";
/// The environment variable both programs read a token file's path from
/// when `admin.token_file` is not in the file (halo-lb), or as an override
/// of it (halo-sidecar, through its `HALO_*` mapping).
pub const TOKEN_FILE_ENV: &str = "HALO_ADMIN_TOKEN_FILE";
/// Largest token file read; anything longer is a mistake (a wrong path),
/// not a token.
pub const MAX_TOKEN_FILE: u64 = 4096;

/// The admin token. Its `Debug` never shows it; equality is constant-time.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl Token {
    /// A token from its text, which must be 1 to [`MAX_TOKEN_FILE`]
    /// visible ASCII characters (what an HTTP header can carry).
    pub fn new(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("the token is empty".to_owned());
        }
        if text.len() as u64 > MAX_TOKEN_FILE {
            return Err(format!("the token is longer than {MAX_TOKEN_FILE} bytes"));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be visible ASCII characters without spaces".to_owned());
        }
        Ok(Token(text.into()))
    }

    /// The token, to send it (halo-lb's standby forwarding a write, the
    /// sidecar's `drain` subcommand). Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time that depends only on
    /// `presented`'s length.
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(self.0.as_bytes(), presented)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other.0.as_bytes())
    }
}

impl Eq for Token {}

/// Whether `secret == presented`, without an early exit: the loop runs over
/// every byte of `presented` (the attacker's input, whose length it knows)
/// and reads `secret` cyclically, so neither where the first difference is
/// nor `secret`'s length shows in the time taken.
pub fn constant_time_eq(secret: &[u8], presented: &[u8]) -> bool {
    if secret.is_empty() {
        return false;
    }
    let mut diff = u8::from(secret.len() != presented.len());
    for (i, &b) in presented.iter().enumerate() {
        diff |= std::hint::black_box(secret[i % secret.len()] ^ b);
    }
    std::hint::black_box(diff) == 0
}

/// Reads a token file: a regular file (symlinks followed, as Kubernetes
/// mounts secrets; a FIFO, device or directory is refused at once, never
/// waited on), readable by its owner only (mode `& 0o077 == 0`), at most
/// [`MAX_TOKEN_FILE`] bytes, holding the token (surrounding whitespace,
/// such as the newline `echo` leaves, is dropped). The error is the reason,
/// naming the file, for the caller to prefix with the field; it never
/// contains the file's contents. See [`halo_consul::file`], which the
/// Consul token file shares, rule for rule.
///
/// A file others can read is refused, not warned about: whoever can read
/// it can drive the writes, and a warning in a start-up log is easy to
/// miss (ssh refuses loose private keys for the same reason).
pub fn read_token_file(path: &Path) -> Result<Token, String> {
    use halo_consul::file::{read_secret, FileError};
    let bytes = read_secret(path, MAX_TOKEN_FILE).map_err(|e| match e {
        FileError::Open(e) => format!("cannot read {}: {e}", path.display()),
        e => e.naming(path),
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|_| format!("{} is not text", path.display()))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Token::new(text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Whether `ip` is a loopback address: 127.0.0.0/8, `::1`, or an
/// IPv4-mapped 127.0.0.0/8 (a dual-stack listener's view of an IPv4
/// loopback client).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// The token in force, shared between the admin API and whatever reloads
/// it (halo-lb's SIGHUP).
#[derive(Debug, Default)]
pub struct AdminAuth {
    token: RwLock<Option<Token>>,
}

impl AdminAuth {
    /// With `token` in force (`None`: writes from loopback only).
    pub fn new(token: Option<Token>) -> Self {
        AdminAuth {
            token: RwLock::new(token),
        }
    }

    /// The token in force.
    pub fn token(&self) -> Option<Token> {
        self.token
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `token` in force; whether that changed anything.
    pub fn set(&self, token: Option<Token>) -> bool {
        let mut current = self.token.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = *current != token;
        *current = token;
        changed
    }
}

/// How a write was let through, for the write's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// It carried the configured token.
    Token,
    /// No token is configured and it came from a loopback peer.
    Loopback,
}

impl Grant {
    /// `"token"` or `"loopback"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::Token => "token",
            Grant::Loopback => "loopback",
        }
    }
}

/// A refused write: the status and a short reason (never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// 400, 401 or 403.
    pub status: StatusCode,
    /// Why, for the client and the log.
    pub reason: &'static str,
}

impl Denied {
    fn unauthorized(reason: &'static str) -> Self {
        Denied {
            status: StatusCode::UNAUTHORIZED,
            reason,
        }
    }

    fn bad_request(reason: &'static str) -> Self {
        Denied {
            status: StatusCode::BAD_REQUEST,
            reason,
        }
    }

    fn forbidden(reason: &'static str) -> Self {
        Denied {
            status: StatusCode::FORBIDDEN,
            reason,
        }
    }

    /// `{"error": reason}` with the status; a 401 names the scheme.
    pub fn response(&self) -> HttpResponse {
        let mut response = json_response(self.status, &json!({"error": self.reason}));
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"halo-admin\""),
            );
        }
        response
    }
}

/// Whether the write request `req` may proceed with `token` in force (see
/// the module's documentation for the rules). Logs nothing; the caller
/// logs the write or the refusal with the client's address.
pub fn authorize<B>(req: &Request<B>, token: Option<&Token>) -> Result<Grant, Denied> {
    let headers = req.headers();
    let host_header = single(headers, header::HOST).map_err(|()| Denied::forbidden("bad Host header"))?;
    // An absolute-form target (`POST http://name/drain HTTP/1.1`) names the
    // host the request is for, and a server must prefer it to `Host` (RFC
    // 9112 3.2.2): it gets the same rules, and must agree with `Host`.
    let host = match req.uri().authority() {
        Some(authority) => {
            let authority = authority.as_str();
            if host_header.is_some_and(|h| !h.eq_ignore_ascii_case(authority)) {
                return Err(Denied::forbidden(
                    "the request target's host and the Host header differ",
                ));
            }
            Some(authority)
        }
        None => host_header,
    };
    if let Some(origin) = single(headers, header::ORIGIN).map_err(|()| Denied::forbidden("bad Origin header"))? {
        let same = host.is_some_and(|h| {
            origin
                .strip_prefix("http://")
                .is_some_and(|rest| rest.eq_ignore_ascii_case(h))
        });
        if !same {
            return Err(Denied::forbidden("cross-origin request refused"));
        }
    }
    if let Some(host) = host {
        if !host_is_literal(host) {
            return Err(Denied::forbidden(
                "Host must be an IP address or localhost (DNS names are refused against DNS rebinding)",
            ));
        }
    }
    // Two credentials are one too many: which one a proxy in front, a
    // logger or this check would read is anyone's guess.
    if headers.get_all(header::AUTHORIZATION).iter().nth(1).is_some() {
        return Err(Denied::bad_request("more than one Authorization header"));
    }
    match token {
        Some(token) => {
            let Some(value) = headers.get(header::AUTHORIZATION) else {
                return Err(Denied::unauthorized("a bearer token is required"));
            };
            let presented = value
                .as_bytes()
                .split_at_checked(7)
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer "))
                .map(|(_, rest)| rest.trim_ascii());
            match presented {
                Some(p) if token.matches(p) => Ok(Grant::Token),
                Some(_) => Err(Denied::unauthorized("wrong bearer token")),
                None => Err(Denied::unauthorized("expected Authorization: Bearer <token>")),
            }
        }
        None => {
            if !peer(req).is_some_and(|p| is_loopback(p.ip())) {
                return Err(Denied::forbidden(
                    "writes without a configured admin token are accepted only from loopback",
                ));
            }
            if headers.get(REQUEST_HEADER).is_none_or(|v| v.is_empty()) {
                return Err(Denied::forbidden(
                    "writes need the X-Halo-Request header (or a bearer token)",
                ));
            }
            Ok(Grant::Loopback)
        }
    }
}

/// The one value of header `name`: `Ok(None)` if absent, `Err` if repeated
/// or not text.
fn single(headers: &HeaderMap, name: header::HeaderName) -> Result<Option<&str>, ()> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(());
    }
    first.to_str().map(Some).map_err(|_| ())
}

/// Whether a `Host` value is an IP literal or `localhost`, with an optional
/// port.
fn host_is_literal(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6] or [v6]:port
        let Some((inside, after)) = rest.split_once(']') else {
            return false;
        };
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return false;
        }
        return inside.parse::<std::net::Ipv6Addr>().is_ok();
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::server::Peer;

    fn request(peer_addr: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::post("/drain");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let mut req = builder.body(()).unwrap();
        req.extensions_mut()
            .insert(Peer(peer_addr.parse::<SocketAddr>().unwrap()));
        req
    }

    #[test]
    fn loopback_covers_v4_v6_and_mapped() {
        for ip in ["127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.0.0.1", "0.0.0.0", "::", "::ffff:10.0.0.1", "fe80::1", "198.18.0.1"] {
            assert!(!is_loopback(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn equality_checks_every_byte_and_the_length() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"Secret"));
        assert!(
            !constant_time_eq(b"secret", b"secretsecret"),
            "a repeat is not the token"
        );
        assert!(!constant_time_eq(b"secret", b"secre"));
        assert!(!constant_time_eq(b"secret", b""));
        assert!(!constant_time_eq(b"", b""), "an empty secret matches nothing");
    }

    #[test]
    fn hosts_must_be_literals_or_localhost() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9901",
            "10.1.2.3:9901",
            "localhost",
            "LOCALHOST:9902",
            "[::1]",
            "[::1]:9901",
        ] {
            assert!(host_is_literal(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9901",
            "127.0.0.1.nip.io:9901",
            "localhost.evil.example",
            "[::1",
            "[::1]x",
            "[evil]:1",
            "127.0.0.1:",
            "127.0.0.1:99999999",
            "",
        ] {
            assert!(!host_is_literal(bad), "{bad}");
        }
    }

    #[test]
    fn without_a_token_only_loopback_with_the_header_passes() {
        let ok = request("127.0.0.1:5000", &[("host", "127.0.0.1:9902"), (REQUEST_HEADER, "1")]);
        assert_eq!(authorize(&ok, None), Ok(Grant::Loopback));
        let v6 = request("[::1]:5000", &[(REQUEST_HEADER, "1")]);
        assert_eq!(authorize(&v6, None), Ok(Grant::Loopback));

        let remote = request("10.0.0.5:5000", &[("host", "10.0.0.1:9902"), (REQUEST_HEADER, "1")]);
        assert_eq!(authorize(&remote, None).unwrap_err().status, StatusCode::FORBIDDEN);
        let simple = request("127.0.0.1:5000", &[("host", "127.0.0.1:9902")]);
        assert_eq!(authorize(&simple, None).unwrap_err().status, StatusCode::FORBIDDEN);
        let empty = request("127.0.0.1:5000", &[(REQUEST_HEADER, "")]);
        assert_eq!(authorize(&empty, None).unwrap_err().status, StatusCode::FORBIDDEN);
        let no_peer = Request::post("/drain").header(REQUEST_HEADER, "1").body(()).unwrap();
        assert_eq!(authorize(&no_peer, None).unwrap_err().status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn browsers_are_refused() {
        let form = request(
            "127.0.0.1:5000",
            &[
                ("host", "127.0.0.1:9902"),
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", "http://evil.example"),
            ],
        );
        assert_eq!(authorize(&form, None).unwrap_err().status, StatusCode::FORBIDDEN);
        let rebinding = request(
            "127.0.0.1:5000",
            &[("host", "evil.example:9902"), (REQUEST_HEADER, "1")],
        );
        let denied = authorize(&rebinding, None).unwrap_err();
        assert_eq!(denied.status, StatusCode::FORBIDDEN);
        assert!(denied.reason.contains("Host"), "{denied:?}");
        let null_origin = request(
            "127.0.0.1:5000",
            &[("host", "127.0.0.1:9902"), ("origin", "null"), (REQUEST_HEADER, "1")],
        );
        assert_eq!(authorize(&null_origin, None).unwrap_err().status, StatusCode::FORBIDDEN);
        let same_origin = request(
            "127.0.0.1:5000",
            &[
                ("host", "127.0.0.1:9902"),
                ("origin", "http://127.0.0.1:9902"),
                (REQUEST_HEADER, "1"),
            ],
        );
        assert_eq!(authorize(&same_origin, None), Ok(Grant::Loopback));
        let two_hosts = request(
            "127.0.0.1:5000",
            &[
                ("host", "127.0.0.1:9902"),
                ("host", "evil.example"),
                (REQUEST_HEADER, "1"),
            ],
        );
        assert_eq!(authorize(&two_hosts, None).unwrap_err().status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn with_a_token_it_is_required_from_everyone() {
        let token = Token::new("s3cret-token").unwrap();
        let right = request("10.0.0.5:5000", &[("authorization", "Bearer s3cret-token")]);
        assert_eq!(authorize(&right, Some(&token)), Ok(Grant::Token));
        let lower = request("10.0.0.5:5000", &[("authorization", "bearer s3cret-token")]);
        assert_eq!(authorize(&lower, Some(&token)), Ok(Grant::Token));
        for (headers, why) in [
            (vec![(REQUEST_HEADER, "1")], "loopback and the header are not enough"),
            (vec![("authorization", "Bearer wrong")], "wrong token"),
            (vec![("authorization", "Bearer s3cret-token2")], "longer"),
            (vec![("authorization", "Basic czNjcmV0")], "another scheme"),
            (vec![("authorization", "Bearer")], "no token"),
        ] {
            let req = request("127.0.0.1:5000", &headers);
            let denied = authorize(&req, Some(&token)).unwrap_err();
            assert_eq!(denied.status, StatusCode::UNAUTHORIZED, "{why}");
            assert!(!denied.reason.contains("s3cret"), "{why}");
            let response = denied.response();
            assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
        }
        let cross = request(
            "127.0.0.1:5000",
            &[
                ("authorization", "Bearer s3cret-token"),
                ("origin", "http://evil.example"),
            ],
        );
        assert_eq!(
            authorize(&cross, Some(&token)).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
    }

    /// Issue 17: an absolute-form target's authority was ignored, so
    /// `POST http://evil.example/drain` passed as long as `Host` (or its
    /// absence) did.
    #[test]
    fn an_absolute_form_target_is_held_to_the_host_rules() {
        let absolute = |uri: &str, headers: &[(&str, &str)]| {
            let mut req = request("127.0.0.1:5000", headers);
            *req.uri_mut() = uri.parse().unwrap();
            req
        };
        let token = Token::new("s3cret-token").unwrap();
        for (uri, headers) in [
            ("http://evil.example/drain", vec![(REQUEST_HEADER, "1")]),
            (
                "http://evil.example:9902/drain",
                vec![("host", "127.0.0.1:9902"), (REQUEST_HEADER, "1")],
            ),
            (
                "http://127.0.0.1:9902/drain",
                vec![("host", "evil.example"), (REQUEST_HEADER, "1")],
            ),
            (
                "http://127.0.0.1:9902/drain",
                vec![("host", "127.0.0.1:9903"), (REQUEST_HEADER, "1")],
            ),
            ("http://user@127.0.0.1:9902/drain", vec![(REQUEST_HEADER, "1")]),
        ] {
            let denied = authorize(&absolute(uri, &headers), None).unwrap_err();
            assert_eq!(denied.status, StatusCode::FORBIDDEN, "{uri} {headers:?}");
        }
        let with_token = absolute("http://evil.example/drain", &[("authorization", "Bearer s3cret-token")]);
        assert_eq!(
            authorize(&with_token, Some(&token)).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        // A cross-origin page cannot pass by naming the target's origin.
        let cross = absolute(
            "http://evil.example/drain",
            &[("origin", "http://evil.example"), (REQUEST_HEADER, "1")],
        );
        assert_eq!(authorize(&cross, None).unwrap_err().status, StatusCode::FORBIDDEN);
        // The loopback address itself, with or without a matching Host.
        for headers in [
            vec![(REQUEST_HEADER, "1")],
            vec![("host", "127.0.0.1:9902"), (REQUEST_HEADER, "1")],
        ] {
            let ok = absolute("http://127.0.0.1:9902/drain", &headers);
            assert_eq!(authorize(&ok, None), Ok(Grant::Loopback), "{headers:?}");
        }
    }

    /// Issue 17: the first of two `Authorization` headers was taken.
    #[test]
    fn two_authorization_headers_are_refused() {
        let token = Token::new("s3cret-token").unwrap();
        for pair in [
            ["Bearer s3cret-token", "Bearer wrong"],
            ["Bearer wrong", "Bearer s3cret-token"],
            ["Bearer s3cret-token", "Bearer s3cret-token"],
        ] {
            let req = request(
                "127.0.0.1:5000",
                &[("authorization", pair[0]), ("authorization", pair[1])],
            );
            let denied = authorize(&req, Some(&token)).unwrap_err();
            assert_eq!(denied.status, StatusCode::BAD_REQUEST, "{pair:?}");
            assert!(!denied.reason.contains("s3cret"));
            let mut loopback = request(
                "127.0.0.1:5000",
                &[("authorization", pair[0]), ("authorization", pair[1])],
            );
            loopback.headers_mut().insert(REQUEST_HEADER, "1".parse().unwrap());
            assert_eq!(authorize(&loopback, None).unwrap_err().status, StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn token_files_are_checked() {
        use std::fs::Permissions;
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &[u8], mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, Permissions::from_mode(mode)).unwrap();
            path
        };
        let good = write("good", b"abc123\n", 0o600);
        assert!(read_token_file(&good).unwrap().matches(b"abc123"));
        assert_eq!(format!("{:?}", read_token_file(&good).unwrap()), "Token(<redacted>)");
        assert!(read_token_file(&write("ro", b"abc123", 0o400)).is_ok());

        let e = read_token_file(&dir.path().join("missing")).unwrap_err();
        assert!(e.contains("cannot read") && e.contains("missing"), "{e}");
        let e = read_token_file(&write("empty", b" \n", 0o600)).unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = read_token_file(&write("open", b"abc123", 0o644)).unwrap_err();
        assert!(e.contains("mode 644") && !e.contains("abc123"), "{e}");
        let e = read_token_file(&write("group", b"abc123", 0o640)).unwrap_err();
        assert!(e.contains("mode 640"), "{e}");
        let big = vec![b'a'; MAX_TOKEN_FILE as usize + 1];
        let e = read_token_file(&write("big", &big, 0o600)).unwrap_err();
        assert!(e.contains("larger than"), "{e}");
        let e = read_token_file(&write("spaces", b"two words", 0o600)).unwrap_err();
        assert!(e.contains("visible ASCII") && !e.contains("two words"), "{e}");
        let e = read_token_file(dir.path()).unwrap_err();
        assert!(e.contains("is a directory, not a regular file"), "{e}");
        // A FIFO used to block the open until a writer came (a SIGHUP
        // reload, and SIGTERM behind it, wedged): refused at once, by name.
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let started = std::time::Instant::now();
        let e = read_token_file(&fifo).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(
            e,
            format!("{} is a FIFO (named pipe), not a regular file", fifo.display())
        );
        // A symlink to a regular file (a Kubernetes secret) is fine.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert!(read_token_file(&link).unwrap().matches(b"abc123"));
    }

    #[test]
    fn the_shared_token_can_be_swapped() {
        let auth = AdminAuth::new(None);
        assert!(auth.token().is_none());
        assert!(auth.set(Some(Token::new("a").unwrap())));
        assert!(!auth.set(Some(Token::new("a").unwrap())));
        assert!(auth.set(Some(Token::new("b").unwrap())));
        assert!(auth.token().unwrap().matches(b"b"));
        assert!(auth.set(None));
    }
}
