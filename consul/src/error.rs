//! The client's one error type.

use std::time::Duration;

use http::StatusCode;

/// Everything a Consul call can fail with.
///
/// The variants keep apart the cases callers act on differently: a transport
/// failure or a timeout means "Consul may be fine, we could not reach it" (serve
/// the last good state, retry with back-off); [`Error::NotFound`] means the
/// thing is gone (a session expired, a check was forgotten by a restarted
/// agent: re-create it); [`Error::InvalidSession`] means a lock call named a
/// session Consul no longer knows (make a new session). An `acquire` that loses
/// the race is *not* an error: it returns `Ok(false)`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client's configuration cannot be used (bad address, bad token).
    #[error("invalid Consul client configuration: {0}")]
    Config(String),

    /// The request never got an HTTP answer: connection refused or reset,
    /// DNS failure, a body cut short. The text says which, e.g. "cannot reach
    /// Consul at 127.0.0.1:1 for GET kv/k: connection refused (…)".
    #[error("cannot reach Consul at {address} for {method} {path}: {cause}")]
    Transport {
        /// The agent's `host:port`.
        address: String,
        /// The HTTP method of the failed call.
        method: http::Method,
        /// The API path of the failed call, without the query string.
        path: String,
        /// What happened, in a few words, found by walking `source`'s chain:
        /// "connection refused", "connection timed out", "DNS lookup
        /// failed", "connection reset", … followed by the chain's texts.
        cause: String,
        /// What the HTTP stack reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// No complete answer arrived within the call's deadline.
    #[error("Consul at {address} did not answer {method} {path} within {after:?} (timed out)")]
    Timeout {
        /// The agent's `host:port`.
        address: String,
        /// The HTTP method of the failed call.
        method: http::Method,
        /// The API path of the failed call, without the query string.
        path: String,
        /// The deadline that passed.
        after: Duration,
    },

    /// HTTP 404, or the equivalent answer of older agents: the session,
    /// service or check named in the call does not exist (any more).
    #[error("Consul has no such object for {path}: {message}")]
    NotFound {
        /// The API path of the failed call, without the query string.
        path: String,
        /// Consul's message, possibly empty.
        message: String,
    },

    /// HTTP 500 "invalid session" from a lock call: the session named in
    /// `?acquire=` or `?release=` is gone. Create a new session.
    #[error("Consul rejected session {session} for {path}: {message}")]
    InvalidSession {
        /// The API path of the failed call, without the query string.
        path: String,
        /// The session ID the call named.
        session: String,
        /// Consul's message.
        message: String,
    },

    /// Any other non-2xx answer, with Consul's message (cut short, like
    /// every text taken from an answer).
    #[error("Consul answered {status} to {method} {path}: {message}")]
    Status {
        /// The HTTP method of the failed call.
        method: http::Method,
        /// The API path of the failed call, without the query string.
        path: String,
        /// The HTTP status.
        status: StatusCode,
        /// Consul's message (the response body), trimmed and cut to
        /// [`crate::MAX_ERROR_TEXT_BYTES`] with a marker of the whole length.
        message: String,
    },

    /// A 2xx answer whose body passed [`crate::Config::max_response_bytes`]
    /// (or announced a length above it). Nothing past the limit was read.
    #[error(
        "Consul at {address} answered {method} {path} with a body over the limit of {limit} bytes \
         (max_response_bytes)"
    )]
    TooLarge {
        /// The agent's `host:port`.
        address: String,
        /// The HTTP method of the call.
        method: http::Method,
        /// The API path of the call, without the query string.
        path: String,
        /// The limit that was passed, in bytes.
        limit: usize,
    },

    /// A 2xx answer whose body is not what the API documents: malformed
    /// JSON, a `null` where a list belongs, a missing field.
    #[error("cannot decode Consul's answer to {path}: {reason}")]
    Decode {
        /// The API path of the call, without the query string.
        path: String,
        /// What did not fit, at most a few hundred bytes.
        reason: String,
    },
}

impl Error {
    /// True for errors that say nothing about Consul's state, only about our
    /// ability to reach it: transport failures, timeouts and 5xx answers other
    /// than an invalid session. Watchers keep their last good state on these
    /// (and on every other error: a [`Error::Decode`] or [`Error::TooLarge`]
    /// answer says nothing about Consul's state either).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Transport { .. } | Error::Timeout { .. } => true,
            Error::Status { status, .. } => status.is_server_error(),
            _ => false,
        }
    }

    /// True when the object the call named does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
}

/// Error text taken from an answer (Consul's message, a decoder's complaint)
/// is cut to this many bytes, so errors stay short in logs and `/status`.
pub const MAX_ERROR_TEXT_BYTES: usize = 256;

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
