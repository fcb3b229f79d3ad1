//! Credentials: the ones senders present to the relay (a bearer token, basic
//! auth against a users file of bcrypt hashes), and the ones the relay
//! presents to a replica. Every secret lives in a file, is re-read when the
//! file changes (see [`crate::watch`]) and is never logged: [`Secret`]'s
//! `Debug` prints nothing of it. A file that becomes missing, empty or bad
//! holds no credential (nothing accepted, nothing sent) until it loads
//! again; see `CredentialFile`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use tokio::sync::Semaphore;

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

/// Which credential a file holds, for logs and the
/// `walrelay_auth_credentials_file_ok` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    IngestBearerToken,
    IngestUsers,
    ReplicaBearerToken,
    ReplicaPassword,
}

impl Purpose {
    /// The `used_for` label, and what the logs call it.
    fn as_str(self) -> &'static str {
        match self {
            Purpose::IngestBearerToken => "ingest_bearer_token",
            Purpose::IngestUsers => "ingest_basic_auth_users",
            Purpose::ReplicaBearerToken => "replica_bearer_token",
            Purpose::ReplicaPassword => "replica_basic_auth_password",
        }
    }

    /// What a file that holds no credential means for the traffic.
    fn consequence(self) -> &'static str {
        match self {
            Purpose::IngestBearerToken => {
                "every request presenting a bearer token is refused (401) until the file holds one"
            }
            Purpose::IngestUsers => {
                "every request presenting basic auth is refused (401) until the file holds users"
            }
            Purpose::ReplicaBearerToken | Purpose::ReplicaPassword => {
                "no credentials are sent to the replica until the file holds them \
                 (it answers 401 and is shown blocked; nothing is skipped)"
            }
        }
    }
}

/// `walrelay_auth_credentials_file_ok`: 1 while a credentials file loads,
/// 0 while it is missing, empty or bad. Which watcher last set a series:
/// when a replica is removed or its shipper replaced, its watcher is
/// dropped, and only the last one to set the series may reset it to 1 (a
/// file no longer used is no longer a problem), not an older one dropped
/// after its replacement started.
static GAUGE_OWNERS: Mutex<BTreeMap<Labels, u64>> = Mutex::new(BTreeMap::new());
static NEXT_GAUGE_OWNER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The labels of one series.
type Labels = Vec<(&'static str, String)>;

/// One credentials file's series of `walrelay_auth_credentials_file_ok`.
struct FileGauge {
    labels: Labels,
    owner: u64,
}

impl FileGauge {
    fn new(purpose: Purpose, path: &Path, replica: Option<&str>) -> Self {
        let mut labels = vec![
            ("file", path.display().to_string()),
            ("used_for", purpose.as_str().to_owned()),
        ];
        labels.extend(replica.map(|r| ("replica", r.to_owned())));
        Self {
            labels,
            owner: NEXT_GAUGE_OWNER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn set(&self, ok: bool) {
        let mut owners = GAUGE_OWNERS.lock().unwrap_or_else(|p| p.into_inner());
        owners.insert(self.labels.clone(), self.owner);
        metrics::gauge!("walrelay_auth_credentials_file_ok", &self.labels).set(if ok {
            1.0
        } else {
            0.0
        });
    }
}

impl Drop for FileGauge {
    fn drop(&mut self) {
        let mut owners = GAUGE_OWNERS.lock().unwrap_or_else(|p| p.into_inner());
        if owners.get(&self.labels) == Some(&self.owner) {
            owners.remove(&self.labels);
            metrics::gauge!("walrelay_auth_credentials_file_ok", &self.labels).set(1.0);
        }
    }
}

/// A credentials file, re-read when it changes (see [`crate::watch`]).
///
/// Unlike a certificate, whose previous version is kept while a new file
/// does not load, a credentials file that becomes missing, empty or bad
/// holds *no* credential: emptying or deleting the file is how an operator
/// revokes what it held, so the previous content must not stay in force.
/// That is logged as an error and shown by
/// `walrelay_auth_credentials_file_ok` = 0 (the `WalrelayConfigReloadFailed`
/// alert). At startup (and at a reload that builds a new one) a file that
/// does not load is an error instead.
struct CredentialFile<T> {
    value: Reloading<Option<T>>,
}

impl<T: Send + Sync + 'static> CredentialFile<T> {
    /// # Errors
    /// The file does not load now (the error of `read`).
    fn new(
        purpose: Purpose,
        path: &Path,
        replica: Option<&str>,
        read: fn(&Path) -> Result<T, AuthError>,
    ) -> Result<Self, AuthError> {
        // Strictly once: a file that is bad from the start stops the start.
        read(path)?;
        let gauge = FileGauge::new(purpose, path, replica);
        gauge.set(true);
        let replica = replica.map(str::to_owned);
        let value = Reloading::new(
            purpose.as_str(),
            vec![path.to_path_buf()],
            RELOAD_INTERVAL,
            move |p| {
                let loaded = match read(&p[0]) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        tracing::error!(used_for = purpose.as_str(), replica = replica.as_deref(),
                            error = %e, "a credentials file is missing, empty or bad: {}",
                            purpose.consequence());
                        None
                    }
                };
                gauge.set(loaded.is_some());
                Ok::<_, std::convert::Infallible>(loaded)
            },
        );
        match value {
            Ok(value) => Ok(Self { value }),
            Err(never) => match never {},
        }
    }

    /// The credential now, `None` while the file holds none.
    fn get(&self) -> Arc<Option<T>> {
        self.value.get()
    }
}

/// The users of basic auth: name to bcrypt hash.
#[derive(Clone, Default, PartialEq, Eq)]
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

/// Reads and parses a users file ([`parse_users`]).
///
/// # Errors
/// The file cannot be read or does not parse.
pub fn read_users(path: &Path) -> Result<Users, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_users(path, &text)
}

/// Successful basic-auth checks remembered, as digests of user, hash and
/// password: bcrypt costs tens of milliseconds by design, and a sender
/// presents the same password with every request. Only a right password
/// adds an entry, so no client without credentials can grow it; when full,
/// expired entries go, and if none has, all of them.
const VERIFIED_CACHE_MAX: usize = 1024;

/// How long a successful check is remembered. Long enough that a sender
/// pays bcrypt once every few minutes rather than per request, short
/// enough that a password stops being known in memory soon after its last
/// use. A changed hash in the users file is checked afresh at once (the
/// hash is part of the key).
const VERIFIED_TTL: Duration = Duration::from_secs(300);

/// The cost of the dummy hash an unknown user is checked against when the
/// users file holds no hash to copy the cost from.
const DUMMY_COST: u32 = 10;

/// Salt and digest (bcrypt's base64, 22 + 31 characters) of the dummy hash:
/// any valid pair does, since no password is expected to match it (and a
/// match is refused anyway).
const DUMMY_SALT_AND_DIGEST: &str = "R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW";

/// Which credentials senders must present. With both a bearer token and
/// users, either one is accepted.
pub struct Authenticator {
    bearer: Option<CredentialFile<Secret>>,
    users: Option<CredentialFile<Users>>,
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    verified_ttl: Duration,
    /// bcrypt checks running at once (`--max-concurrent-password-checks`):
    /// a flood of wrong passwords must not take every core.
    password_checks: Arc<Semaphore>,
    /// bcrypt checks run, for tests (the metric is process-wide).
    checks_run: Arc<AtomicU64>,
}

/// Why a request was refused (the message of the 401, or 503 for `Busy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Wrong,
    /// A password had to be checked and every slot for bcrypt is taken:
    /// retryable, not an answer about the credential.
    Busy,
}

/// Default `--max-concurrent-password-checks`: one bcrypt check per core.
pub fn default_password_check_limit() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
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
            .map(|p| CredentialFile::new(Purpose::IngestBearerToken, p, None, read_secret))
            .transpose()?;
        let users = users_file
            .map(|p| CredentialFile::new(Purpose::IngestUsers, p, None, read_users))
            .transpose()?;
        Ok(Self::with(bearer, users))
    }

    /// No credentials required.
    pub fn open() -> Self {
        Self::with(None, None)
    }

    fn with(bearer: Option<CredentialFile<Secret>>, users: Option<CredentialFile<Users>>) -> Self {
        Self {
            bearer,
            users,
            verified: Mutex::new(HashMap::new()),
            verified_ttl: VERIFIED_TTL,
            password_checks: Arc::new(Semaphore::new(default_password_check_limit())),
            checks_run: Arc::new(AtomicU64::new(0)),
        }
    }

    /// At most `limit` bcrypt checks at once (at least one); a request
    /// needing one more is refused with [`Denied::Busy`].
    #[must_use]
    pub fn with_password_check_limit(mut self, limit: usize) -> Self {
        self.password_checks = Arc::new(Semaphore::new(limit.max(1)));
        self
    }

    /// bcrypt checks run so far (unknown users' included).
    pub fn password_checks_run(&self) -> u64 {
        self.checks_run.load(Ordering::Relaxed)
    }

    pub fn is_enabled(&self) -> bool {
        self.bearer.is_some() || self.users.is_some()
    }

    /// Checks the files for a change now (at most once a second, as a
    /// request does): after a reload, so a file emptied since the last
    /// request is reported without waiting for one.
    pub fn refresh(&self) {
        if let Some(b) = &self.bearer {
            b.get();
        }
        if let Some(u) = &self.users {
            u.get();
        }
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
    /// The credential is missing or wrong, or checking a password would
    /// take one bcrypt check more than allowed at once.
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
            // A file that holds no token (emptied, deleted) accepts none.
            let token = self.bearer.as_ref().map(CredentialFile::get);
            return match token.as_deref() {
                Some(Some(token))
                    if constant_time_eq(rest.as_bytes(), token.expose().as_bytes()) =>
                {
                    Ok(())
                }
                _ => Err(Denied::Wrong),
            };
        }
        if scheme.eq_ignore_ascii_case("basic") {
            if let Some(users) = &self.users {
                // A file that holds no users (emptied, deleted) knows no one.
                let users = users.get();
                let none = Users::default();
                return self
                    .check_basic(users.as_ref().as_ref().unwrap_or(&none), rest)
                    .await;
            }
        }
        Err(Denied::Wrong)
    }

    /// A known user's password is checked against its hash, an unknown
    /// user's against a dummy hash of the same cost: both cost one bcrypt
    /// check, so the time of a refusal does not tell which names exist.
    async fn check_basic(&self, users: &Users, encoded: &str) -> Result<(), Denied> {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| Denied::Wrong)?;
        let decoded = String::from_utf8(decoded).map_err(|_| Denied::Wrong)?;
        let (user, password) = decoded.split_once(':').ok_or(Denied::Wrong)?;
        let (hash, known) = match users.0.get(user) {
            Some(hash) => (hash.clone(), true),
            None => (dummy_hash(users.dummy_cost()), false),
        };
        let key = cache_key(user, &hash, password);
        if known && self.remembered(&key) {
            return Ok(());
        }
        let matched = self.bcrypt_verify(password.to_owned(), hash).await?;
        if !(known && matched) {
            return Err(Denied::Wrong);
        }
        self.remember(key);
        Ok(())
    }

    /// One bcrypt check, on the blocking pool and within the limit of
    /// checks at once. The permit goes into the blocking task: a client
    /// that hangs up does not stop its check, and must not free its slot
    /// before the check is done.
    async fn bcrypt_verify(&self, password: String, hash: String) -> Result<bool, Denied> {
        let Ok(permit) = Arc::clone(&self.password_checks).try_acquire_owned() else {
            return Err(Denied::Busy);
        };
        let checks_run = Arc::clone(&self.checks_run);
        let matched = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _running = RunningCheck::new();
            checks_run.fetch_add(1, Ordering::Relaxed);
            bcrypt::verify(password, &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        let result = if matched { "accepted" } else { "refused" };
        metrics::counter!("walrelay_auth_password_checks_total", "result" => result).increment(1);
        Ok(matched)
    }

    fn remembered(&self, key: &[u8; 32]) -> bool {
        let ttl = self.verified_ttl;
        self.verified_lock()
            .get(key)
            .is_some_and(|at| at.elapsed() < ttl)
    }

    fn remember(&self, key: [u8; 32]) {
        let ttl = self.verified_ttl;
        let mut cache = self.verified_lock();
        if cache.len() >= VERIFIED_CACHE_MAX {
            cache.retain(|_, at| at.elapsed() < ttl);
        }
        if cache.len() >= VERIFIED_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, Instant::now());
    }

    fn verified_lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Instant>> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `walrelay_auth_password_checks_in_flight` up while a bcrypt check runs.
struct RunningCheck;

impl RunningCheck {
    fn new() -> Self {
        metrics::gauge!("walrelay_auth_password_checks_in_flight").increment(1.0);
        RunningCheck
    }
}

impl Drop for RunningCheck {
    fn drop(&mut self) {
        metrics::gauge!("walrelay_auth_password_checks_in_flight").decrement(1.0);
    }
}

impl Users {
    /// The highest bcrypt cost among the users' hashes: checking an
    /// unknown user at that cost takes as long as the slowest known one.
    fn dummy_cost(&self) -> u32 {
        self.0
            .values()
            .filter_map(|h| h.parse::<bcrypt::HashParts>().ok())
            .map(|p| p.get_cost())
            .max()
            .unwrap_or(DUMMY_COST)
    }
}

/// A bcrypt hash of cost `cost` that no password is known to match.
fn dummy_hash(cost: u32) -> String {
    format!("$2b${cost:02}${DUMMY_SALT_AND_DIGEST}")
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

/// SHA-256 of `bytes`.
fn digest(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// Compares the SHA-256 digests of `a` and `b`, every byte of them: the
/// work is the same whatever the lengths and contents, so response timing
/// tells neither how long the token is nor how much of a guess was right
/// (the digests of a guess say nothing of the token).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    digests_eq(&digest(a), &digest(b))
}

/// Fixed-size arrays: there is no length to differ, and no early exit.
fn digests_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
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
    Bearer(CredentialFile<Secret>),
    Basic {
        username: String,
        password: CredentialFile<Secret>,
    },
}

impl ReplicaAuth {
    /// The credentials of replica `replica` (its name labels the metric).
    ///
    /// # Errors
    /// The secret's file cannot be read or is empty.
    pub fn new(replica: &str, config: &ReplicaAuthConfig) -> Result<Arc<Self>, AuthError> {
        let kind = match config {
            ReplicaAuthConfig::Bearer { token_file } => {
                ReplicaAuthKind::Bearer(CredentialFile::new(
                    Purpose::ReplicaBearerToken,
                    token_file,
                    Some(replica),
                    read_secret,
                )?)
            }
            ReplicaAuthConfig::Basic {
                username,
                password_file,
            } => ReplicaAuthKind::Basic {
                username: username.clone(),
                password: CredentialFile::new(
                    Purpose::ReplicaPassword,
                    password_file,
                    Some(replica),
                    read_secret,
                )?,
            },
        };
        Ok(Arc::new(Self { kind }))
    }

    /// The `Authorization` header for the next request, marked sensitive
    /// (hyper and reqwest then keep it out of their debug output). None
    /// while the file holds no secret (emptied or deleted: the previous
    /// one is not sent, the replica answers 401 and is shown blocked), or
    /// when the secret is not a valid header value (control characters).
    pub fn header(&self) -> Option<HeaderValue> {
        let raw = match &self.kind {
            ReplicaAuthKind::Bearer(token) => {
                format!("Bearer {}", token.get().as_ref().as_ref()?.expose())
            }
            ReplicaAuthKind::Basic { username, password } => {
                let password = password.get();
                let pair = format!("{username}:{}", password.as_ref().as_ref()?.expose());
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

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        h
    }

    /// Waits (files are checked at most once a [`RELOAD_INTERVAL`]) until
    /// `cond` holds.
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + 10 * RELOAD_INTERVAL;
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `a` answers `want` to `headers`.
    async fn until_answer(a: &Authenticator, headers: &HeaderMap, want: Result<(), Denied>) {
        let deadline = std::time::Instant::now() + 10 * RELOAD_INTERVAL;
        while a.check(headers).await != want {
            assert!(
                std::time::Instant::now() < deadline,
                "{headers:?}: not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn an_emptied_or_deleted_credentials_file_accepts_nobody_until_it_holds_some_again() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok\n").unwrap();
        let users = dir.path().join("users");
        std::fs::write(&users, format!("alice:{}\n", hash("right"))).unwrap();
        let a = Authenticator::new(Some(&token), Some(&users)).unwrap();
        assert_eq!(a.check(&bearer("tok")).await, Ok(()));
        let alice = basic("alice", "right");
        assert_eq!(a.check(&alice).await, Ok(()));

        std::fs::write(&token, "\n").unwrap();
        until_answer(&a, &bearer("tok"), Err(Denied::Wrong)).await;
        // An empty token is no token either.
        assert_eq!(a.check(&bearer("")).await, Err(Denied::Wrong));
        // The other scheme's file is fine: it still passes.
        assert_eq!(a.check(&alice).await, Ok(()));
        std::fs::write(&token, "tok\n").unwrap();
        until_answer(&a, &bearer("tok"), Ok(())).await;
        std::fs::remove_file(&token).unwrap();
        until_answer(&a, &bearer("tok"), Err(Denied::Wrong)).await;

        // A users file emptied: basic auth knows no one, even a password
        // verified (and remembered) before.
        std::fs::write(&users, "# nobody\n").unwrap();
        until_answer(&a, &alice, Err(Denied::Wrong)).await;
        std::fs::write(&users, format!("alice:{}\n", hash("right"))).unwrap();
        until_answer(&a, &alice, Ok(())).await;
    }

    #[tokio::test]
    async fn a_replica_whose_token_file_is_emptied_is_sent_no_stale_token() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "replica-tok\n").unwrap();
        let a = ReplicaAuth::new(
            "r",
            &ReplicaAuthConfig::Bearer {
                token_file: token.clone(),
            },
        )
        .unwrap();
        assert_eq!(a.header().unwrap().to_str().unwrap(), "Bearer replica-tok");
        std::fs::write(&token, "").unwrap();
        eventually("the emptied token is still sent", || a.header().is_none()).await;
        std::fs::write(&token, "new-tok\n").unwrap();
        eventually("the new token is not sent", || {
            a.header()
                .is_some_and(|h| h.to_str().unwrap() == "Bearer new-tok")
        })
        .await;
        std::fs::remove_file(&token).unwrap();
        eventually("the deleted token is still sent", || a.header().is_none()).await;
        // At a start (or a reload building it) an empty file is an error.
        std::fs::write(&token, "").unwrap();
        let e = ReplicaAuth::new("r", &ReplicaAuthConfig::Bearer { token_file: token })
            .err()
            .unwrap();
        assert!(matches!(e, AuthError::Empty { .. }), "{e}");
    }

    fn alice(dir: &Path, cost: u32) -> Authenticator {
        let users = dir.join("users");
        let hash = bcrypt::hash("right", cost).unwrap();
        std::fs::write(&users, format!("alice:{hash}\n")).unwrap();
        Authenticator::new(None, Some(&users)).unwrap()
    }

    #[tokio::test]
    async fn an_unknown_user_costs_one_bcrypt_check_like_a_known_one() {
        let dir = tempfile::tempdir().unwrap();
        let a = alice(dir.path(), 4);
        assert_eq!(a.check(&basic("alice", "wrong")).await, Err(Denied::Wrong));
        assert_eq!(a.password_checks_run(), 1);
        assert_eq!(a.check(&basic("mallory", "x")).await, Err(Denied::Wrong));
        assert_eq!(a.password_checks_run(), 2, "an unknown user skipped bcrypt");
    }

    #[test]
    fn the_dummy_hash_is_bcrypt_at_the_users_highest_cost() {
        let users = Users(HashMap::from([
            ("a".to_owned(), hash("x")),
            ("b".to_owned(), bcrypt::hash("y", 6).unwrap()),
        ]));
        let dummy = dummy_hash(users.dummy_cost());
        let parts: bcrypt::HashParts = dummy.parse().unwrap();
        assert_eq!(parts.get_cost(), 6);
        assert_eq!(dummy.len(), 60);
        assert!(!bcrypt::verify("", &dummy).unwrap());
    }

    #[tokio::test]
    async fn a_remembered_password_is_checked_again_only_after_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = alice(dir.path(), 4);
        for _ in 0..5 {
            assert_eq!(a.check(&basic("alice", "right")).await, Ok(()));
        }
        assert_eq!(
            a.password_checks_run(),
            1,
            "a known sender paid bcrypt again"
        );
        a.verified_ttl = Duration::ZERO;
        assert_eq!(a.check(&basic("alice", "right")).await, Ok(()));
        assert_eq!(
            a.password_checks_run(),
            2,
            "an expired entry was still trusted"
        );
    }

    #[tokio::test]
    async fn a_password_check_beyond_the_limit_is_refused_as_busy_without_bcrypt() {
        let dir = tempfile::tempdir().unwrap();
        let a = alice(dir.path(), 4).with_password_check_limit(1);
        let held = Arc::clone(&a.password_checks).try_acquire_owned().unwrap();
        assert_eq!(a.check(&basic("alice", "right")).await, Err(Denied::Busy));
        assert_eq!(a.check(&basic("nobody", "x")).await, Err(Denied::Busy));
        assert_eq!(a.password_checks_run(), 0);
        drop(held);
        assert_eq!(a.check(&basic("alice", "right")).await, Ok(()));
        // Remembered now: no slot needed.
        let _held = Arc::clone(&a.password_checks).try_acquire_owned().unwrap();
        assert_eq!(a.check(&basic("alice", "right")).await, Ok(()));
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_keeps_its_slot_until_its_check_is_done() {
        let dir = tempfile::tempdir().unwrap();
        // Cost 13: the check (half a second or more) outlasts the abort
        // and the look at the slot below.
        let a = Arc::new(alice(dir.path(), 13).with_password_check_limit(1));
        let task = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.check(&basic("alice", "wrong")).await }
        });
        let started = async {
            while a.password_checks_run() == 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), started)
            .await
            .expect("the check never started");
        task.abort();
        let _ = task.await;
        assert_eq!(
            a.password_checks.available_permits(),
            0,
            "the slot was freed while bcrypt still ran"
        );
        assert_eq!(a.check(&basic("alice", "x")).await, Err(Denied::Busy));
    }

    #[test]
    fn tokens_are_compared_by_digest_whatever_their_lengths() {
        assert!(constant_time_eq(b"token", b"token"));
        assert!(!constant_time_eq(b"token", b"tokeN"));
        assert!(!constant_time_eq(b"tok", b"token"), "a prefix");
        assert!(!constant_time_eq(b"", b"token"));
        assert!(constant_time_eq(b"", b""));
        // What is compared has one length whatever the inputs'.
        let (short, long) = (digest(b"t"), digest(&[b't'; 4096]));
        assert_eq!(short.len(), long.len());
        assert!(!digests_eq(&short, &long));
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
        let a = ReplicaAuth::new(
            "r",
            &ReplicaAuthConfig::Basic {
                username: "Aladdin".into(),
                password_file: pw,
            },
        )
        .unwrap();
        let h = a.header().unwrap();
        assert_eq!(h.to_str().unwrap(), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert!(h.is_sensitive());
    }
}
