//! Credentials: the ones senders present to the relay (a bearer token, basic
//! auth against a users file of bcrypt hashes), and the ones the relay
//! presents to a replica. Every secret lives in a file, is re-read when the
//! file changes (see [`crate::watch`]) and is never logged: [`Secret`]'s
//! `Debug` prints nothing of it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};

use crate::watch::Reloading;

/// How often credential files are checked for a change, at most.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// A secret read from a file.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Errors reading credential files. At startup they stop the relay; on a
/// reload the previous credentials are kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file holds nothing but whitespace.
    #[error("{path} is empty")]
    Empty { path: PathBuf },
    /// A line of a users file is not `user:bcrypt-hash`.
    #[error("{path} line {line}: {message}")]
    UsersLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Reads a secret, trimming the newline editors add.
///
/// # Errors
/// The file cannot be read or is empty.
pub fn read_secret(path: &Path) -> Result<Secret, AuthError> {
    let s = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let s = s.trim();
    if s.is_empty() {
        return Err(AuthError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(Secret(s.to_owned()))
}

fn reloading_secret(what: &'static str, path: &Path) -> Result<Reloading<Secret>, AuthError> {
    Reloading::new(what, vec![path.to_path_buf()], RELOAD_INTERVAL, |p| {
        read_secret(&p[0])
    })
}

/// The users of basic auth: name to bcrypt hash.
#[derive(Clone, PartialEq, Eq)]
pub struct Users(HashMap<String, String>);

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Users {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parses a users file: one `user:bcrypt-hash` a line (what `htpasswd -nbB`
/// prints); blank lines and lines starting with `#` are skipped. The hash is
/// checked to be bcrypt here, so a typo fails at startup rather than at
/// every request.
///
/// # Errors
/// A line is not `user:hash`, a user is empty or repeated, a hash is not
/// bcrypt, or the file holds no user.
pub fn parse_users(path: &Path, text: &str) -> Result<Users, AuthError> {
    let bad = |line: usize, message: String| AuthError::UsersLine {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut users = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            return Err(bad(i + 1, "expected user:bcrypt-hash".into()));
        };
        let (user, hash) = (user.trim(), hash.trim());
        if user.is_empty() {
            return Err(bad(i + 1, "empty user name".into()));
        }
        // The error of the parser is not shown: it could echo the hash.
        if hash.parse::<bcrypt::HashParts>().is_err() {
            return Err(bad(
                i + 1,
                format!("the hash of user {user:?} is not bcrypt ($2a$/$2b$/$2y$, 60 characters)"),
            ));
        }
        if users.insert(user.to_owned(), hash.to_owned()).is_some() {
            return Err(bad(i + 1, format!("user {user:?} appears twice")));
        }
    }
    if users.is_empty() {
        return Err(AuthError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(Users(users))
}

fn read_users(path: &Path) -> Result<Users, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_users(path, &text)
}

/// Successful basic-auth checks remembered, as digests of user, hash and
/// password: bcrypt costs tens of milliseconds by design, and a sender
/// presents the same password with every request. Cleared when full.
const VERIFIED_CACHE_MAX: usize = 1024;

/// Which credentials senders must present. With both a bearer token and
/// users, either one is accepted.
pub struct Authenticator {
    bearer: Option<Reloading<Secret>>,
    users: Option<Reloading<Users>>,
    verified: Mutex<HashSet<[u8; 32]>>,
}

/// Why a request was refused (the message of the 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Wrong,
}

impl Authenticator {
    /// Reads the files once; later they are re-read when they change.
    ///
    /// # Errors
    /// A file cannot be read or does not parse.
    pub fn new(
        bearer_token_file: Option<&Path>,
        users_file: Option<&Path>,
    ) -> Result<Self, AuthError> {
        let bearer = bearer_token_file
            .map(|p| reloading_secret("ingest bearer token", p))
            .transpose()?;
        let users = users_file
            .map(|p| {
                Reloading::new(
                    "basic auth users file",
                    vec![p.to_path_buf()],
                    RELOAD_INTERVAL,
                    |p| read_users(&p[0]),
                )
            })
            .transpose()?;
        Ok(Self {
            bearer,
            users,
            verified: Mutex::new(HashSet::new()),
        })
    }

    /// No credentials required.
    pub fn open() -> Self {
        Self {
            bearer: None,
            users: None,
            verified: Mutex::new(HashSet::new()),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.bearer.is_some() || self.users.is_some()
    }

    /// What a sender must present, for the message of a 401.
    pub fn describe(&self) -> &'static str {
        match (self.bearer.is_some(), self.users.is_some()) {
            (true, true) => "a bearer token or basic auth (user and password)",
            (false, true) => "basic auth (user and password)",
            _ => "a bearer token",
        }
    }

    /// The `WWW-Authenticate` challenges of a 401, one per accepted scheme.
    pub fn challenges(&self) -> Vec<HeaderValue> {
        let mut v = Vec::new();
        if self.users.is_some() {
            v.push(HeaderValue::from_static("Basic realm=\"walrelay\""));
        }
        if self.bearer.is_some() {
            v.push(HeaderValue::from_static("Bearer"));
        }
        v
    }

    /// Checks the request's `Authorization` header.
    ///
    /// # Errors
    /// The credential is missing or wrong.
    pub async fn check(&self, headers: &HeaderMap) -> Result<(), Denied> {
        if !self.is_enabled() {
            return Ok(());
        }
        let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return Err(Denied::Missing);
        };
        let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return match &self.bearer {
                Some(token)
                    if constant_time_eq(rest.as_bytes(), token.get().expose().as_bytes()) =>
                {
                    Ok(())
                }
                _ => Err(Denied::Wrong),
            };
        }
        if scheme.eq_ignore_ascii_case("basic") {
            if let Some(users) = &self.users {
                return self.check_basic(&users.get(), rest).await;
            }
        }
        Err(Denied::Wrong)
    }

    async fn check_basic(&self, users: &Users, encoded: &str) -> Result<(), Denied> {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| Denied::Wrong)?;
        let decoded = String::from_utf8(decoded).map_err(|_| Denied::Wrong)?;
        let (user, password) = decoded.split_once(':').ok_or(Denied::Wrong)?;
        let hash = users.0.get(user).ok_or(Denied::Wrong)?.clone();
        let key = cache_key(user, &hash, password);
        if self.verified_lock().contains(&key) {
            return Ok(());
        }
        let password = password.to_owned();
        // bcrypt is slow on purpose: off the async threads.
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        if !ok {
            return Err(Denied::Wrong);
        }
        let mut cache = self.verified_lock();
        if cache.len() >= VERIFIED_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key);
        Ok(())
    }

    fn verified_lock(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The hash is part of the key, so a password changed in the users file is
/// checked afresh.
fn cache_key(user: &str, hash: &str, password: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [user, hash, password] {
        ctx.update(part.as_bytes());
        ctx.update(&[0]);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// Compares without an early exit, so response timing does not reveal how
/// much of a guessed token was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How the relay authenticates to one replica.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum ReplicaAuthConfig {
    Bearer {
        token_file: PathBuf,
    },
    Basic {
        username: String,
        password_file: PathBuf,
    },
}

/// [`ReplicaAuthConfig`] with its secret loaded and watched.
pub struct ReplicaAuth {
    kind: ReplicaAuthKind,
}

enum ReplicaAuthKind {
    Bearer(Reloading<Secret>),
    Basic {
        username: String,
        password: Reloading<Secret>,
    },
}

impl ReplicaAuth {
    /// # Errors
    /// The secret's file cannot be read or is empty.
    pub fn new(config: &ReplicaAuthConfig) -> Result<Arc<Self>, AuthError> {
        let kind = match config {
            ReplicaAuthConfig::Bearer { token_file } => {
                ReplicaAuthKind::Bearer(reloading_secret("replica bearer token", token_file)?)
            }
            ReplicaAuthConfig::Basic {
                username,
                password_file,
            } => ReplicaAuthKind::Basic {
                username: username.clone(),
                password: reloading_secret("replica basic auth password", password_file)?,
            },
        };
        Ok(Arc::new(Self { kind }))
    }

    /// The `Authorization` header for the next request, marked sensitive
    /// (hyper and reqwest then keep it out of their debug output). None
    /// when the secret is not a valid header value (it was checked at
    /// startup; a bad reloaded file is refused by its reload already, so
    /// this only guards against control characters in a new file).
    pub fn header(&self) -> Option<HeaderValue> {
        let raw = match &self.kind {
            ReplicaAuthKind::Bearer(token) => format!("Bearer {}", token.get().expose()),
            ReplicaAuthKind::Basic { username, password } => {
                let pair = format!("{username}:{}", password.get().expose());
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                )
            }
        };
        let mut v = HeaderValue::from_str(&raw).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    // bcrypt of "pw" at cost 4 (the lowest: fast tests).
    fn hash(pw: &str) -> String {
        bcrypt::hash(pw, 4).unwrap()
    }

    #[test]
    fn users_file_lines_parse_with_comments_and_blank_lines() {
        let text = format!(
            "# senders\n\nalice:{}\n  bob : {}  \n",
            hash("a"),
            hash("b")
        );
        let users = parse_users(Path::new("users"), &text).unwrap();
        assert_eq!(users.len(), 2);
        assert!(users.0.contains_key("alice") && users.0.contains_key("bob"));
    }

    #[test]
    fn bad_users_file_lines_are_named_without_the_hash() {
        let p = Path::new("users");
        let cases = [
            ("alice\n".to_owned(), "line 1", "user:bcrypt-hash"),
            (
                format!("ok:{}\n:{}\n", hash("x"), hash("y")),
                "line 2",
                "empty user",
            ),
            ("alice:plaintext\n".to_owned(), "line 1", "not bcrypt"),
            (
                format!("alice:{}\nalice:{}\n", hash("x"), hash("y")),
                "line 2",
                "twice",
            ),
        ];
        for (text, line, word) in cases {
            let e = parse_users(p, &text).unwrap_err().to_string();
            assert!(e.contains(line) && e.contains(word), "{text:?}: {e}");
            assert!(!e.contains("plaintext"), "{e}");
        }
        let e = parse_users(p, "# nobody\n").unwrap_err();
        assert!(matches!(e, AuthError::Empty { .. }), "{e}");
    }

    fn basic(user: &str, pw: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
        h.insert(AUTHORIZATION, format!("Basic {v}").parse().unwrap());
        h
    }

    #[tokio::test]
    async fn basic_auth_and_bearer_token_are_each_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("users");
        std::fs::write(&users, format!("alice:{}\n", hash("right"))).unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok\n").unwrap();
        let a = Authenticator::new(Some(&token), Some(&users)).unwrap();
        assert_eq!(a.check(&basic("alice", "right")).await, Ok(()));
        // Again, from the cache.
        assert_eq!(a.check(&basic("alice", "right")).await, Ok(()));
        assert_eq!(a.check(&basic("alice", "wrong")).await, Err(Denied::Wrong));
        assert_eq!(a.check(&basic("bob", "right")).await, Err(Denied::Wrong));
        assert_eq!(a.check(&HeaderMap::new()).await, Err(Denied::Missing));
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "Bearer tok".parse().unwrap());
        assert_eq!(a.check(&h).await, Ok(()));
        h.insert(AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert_eq!(a.check(&h).await, Err(Denied::Wrong));
        assert_eq!(a.challenges().len(), 2);
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let s = Secret("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
        let users = Users(HashMap::from([("u".to_owned(), hash("x"))]));
        assert!(!format!("{users:?}").contains("$2"));
    }

    #[test]
    fn replica_basic_auth_header_is_base64_of_user_and_password() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "open sesame\n").unwrap();
        let a = ReplicaAuth::new(&ReplicaAuthConfig::Basic {
            username: "Aladdin".into(),
            password_file: pw,
        })
        .unwrap();
        let h = a.header().unwrap();
        assert_eq!(h.to_str().unwrap(), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert!(h.is_sensitive());
    }
}
