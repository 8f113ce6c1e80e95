//! The ACL token: where it comes from (config, file, environment), and the
//! shared, swappable cell every client reads it from, so a token file read
//! again on SIGHUP reaches every client at once, on every thread.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use http::HeaderValue;

use crate::{Config, Error};

/// Largest token file read. An ACL token is a 36-character UUID; the bound
/// only keeps a wrong path (a log, a device) from being read whole.
pub const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// The ACL token calls carry, shared by every [`Client`](crate::Client)
/// made with or sharing it ([`Client::sharing_token`](crate::Client::sharing_token)).
/// Cheap to clone; clones are the same cell. Its `Debug` never shows the
/// token.
#[derive(Clone, Default)]
pub struct Token {
    cell: Arc<RwLock<TokenState>>,
}

#[derive(Clone, Default)]
struct TokenState {
    value: Option<HeaderValue>,
    /// Where `value` was read from, for [`Token::reload`].
    file: Option<PathBuf>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("Token")
            .field("value", &state.value.as_ref().map(|_| "<redacted>"))
            .field("file", &state.file)
            .finish()
    }
}

impl Token {
    /// The token `config` names, the environment (read through `env`)
    /// filling in: the first of `config.token_file`, `config.token`,
    /// `CONSUL_HTTP_TOKEN_FILE`, `CONSUL_HTTP_TOKEN`. A named file must
    /// exist and hold a token. All unset: no token.
    pub fn resolve(config: &Config, env: impl Fn(&str) -> Option<String>) -> Result<Token, Error> {
        let literal = config.token.as_deref().filter(|t| !t.is_empty());
        let file = match config.token_file.as_ref().filter(|p| !p.as_os_str().is_empty()) {
            Some(file) => Some((file.clone(), "token_file")),
            None if literal.is_some() => None,
            None => env("CONSUL_HTTP_TOKEN_FILE")
                .filter(|p| !p.trim().is_empty())
                .map(|p| (PathBuf::from(p.trim()), "CONSUL_HTTP_TOKEN_FILE")),
        };
        let state = match file {
            Some((path, origin)) => TokenState {
                value: Some(read_token_file(&path).map_err(|e| Error::Config(format!("{origin}: {e}")))?),
                file: Some(path),
            },
            None => {
                let (literal, origin) = match literal {
                    Some(t) => (Some(t.to_owned()), "token"),
                    None => (env("CONSUL_HTTP_TOKEN").filter(|t| !t.is_empty()), "CONSUL_HTTP_TOKEN"),
                };
                TokenState {
                    value: literal
                        .map(|t| token_header(&t).map_err(|e| Error::Config(format!("{origin}: {e}"))))
                        .transpose()?,
                    file: None,
                }
            }
        };
        Ok(Token {
            cell: Arc::new(RwLock::new(state)),
        })
    }

    fn state(&self) -> TokenState {
        // A poisoned lock still holds a whole value: every write is one store.
        self.cell.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn store(&self, state: TokenState) {
        *self.cell.write().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// The header value to send, if any.
    pub(crate) fn header(&self) -> Option<HeaderValue> {
        self.cell.read().unwrap_or_else(|e| e.into_inner()).value.clone()
    }

    /// Whether calls carry a token.
    pub fn is_set(&self) -> bool {
        self.cell.read().unwrap_or_else(|e| e.into_inner()).value.is_some()
    }

    /// The file the token is read from, if it comes from one.
    pub fn file(&self) -> Option<PathBuf> {
        self.state().file
    }

    /// Reads the token file again (SIGHUP): from the next call on, every
    /// client sharing this cell sends what it now holds. Answers whether the
    /// token changed; `Ok(false)` too when the token comes from no file. On
    /// error (the file is gone, empty, too long, not a header value) the old
    /// token stays in use; the error names the file, never its content.
    pub fn reload(&self) -> Result<bool, Error> {
        let Some(path) = self.file() else {
            return Ok(false);
        };
        let fresh = read_token_file(&path).map_err(|e| Error::Config(format!("token file: {e}")))?;
        let mut state = self.cell.write().unwrap_or_else(|e| e.into_inner());
        let changed = state.value.as_ref().map(HeaderValue::as_bytes) != Some(fresh.as_bytes());
        state.value = Some(fresh);
        Ok(changed)
    }

    /// Replaces the token (`None`: send none) and forgets any file.
    pub fn set(&self, token: Option<&str>) -> Result<(), Error> {
        let value = token
            .filter(|t| !t.is_empty())
            .map(|t| token_header(t).map_err(|e| Error::Config(format!("token: {e}"))))
            .transpose()?;
        self.store(TokenState { value, file: None });
        Ok(())
    }

    /// Takes `other`'s token and file into this cell (a reloaded config's
    /// token reaching clients made before). Answers whether the token sent
    /// changed.
    pub fn adopt(&self, other: &Token) -> bool {
        if Arc::ptr_eq(&self.cell, &other.cell) {
            return false;
        }
        let fresh = other.state();
        let mut state = self.cell.write().unwrap_or_else(|e| e.into_inner());
        let changed =
            state.value.as_ref().map(HeaderValue::as_bytes) != fresh.value.as_ref().map(HeaderValue::as_bytes);
        *state = fresh;
        changed
    }
}

/// The token as a header value, marked sensitive (hyper keeps it out of
/// its own debug output). The error never quotes it.
fn token_header(token: &str) -> Result<HeaderValue, String> {
    let mut v = HeaderValue::from_str(token.trim())
        .map_err(|_| "the ACL token contains characters not allowed in an HTTP header".to_owned())?;
    if v.is_empty() {
        return Err("the ACL token is empty".to_owned());
    }
    v.set_sensitive(true);
    Ok(v)
}

/// Reads a token file: a regular file (symlinks followed; a FIFO or a
/// device is refused at once, never waited on), readable by its owner only
/// (mode `& 0o077 == 0`, the rule `admin.token_file` follows too), at most
/// [`MAX_TOKEN_FILE_BYTES`], whitespace around the token ignored, empty
/// refused. Errors name the file, never its content.
fn read_token_file(path: &Path) -> Result<HeaderValue, String> {
    let bytes = crate::file::read_secret(path, MAX_TOKEN_FILE_BYTES).map_err(|e| e.naming(path))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
    if text.trim().is_empty() {
        return Err(format!("{}: empty, no ACL token in it", path.display()));
    }
    token_header(text).map_err(|e| format!("{}: {e}", path.display()))
}
