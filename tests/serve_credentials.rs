//! The real `walrelay serve` (and `walrelay wal replay`) seen by a client
//! without credentials:
//!
//! - `POST /-/reload` is off unless asked for, never served on the admin
//!   address, asks for the ingest credentials, and comes at most once a
//!   second;
//! - no answer, log line, error or state file shows a secret of the
//!   configuration: a URL's password, query or fragment, a header value, a
//!   token;
//! - a credentials file emptied or deleted accepts nobody (ingest) and sends
//!   nothing (a replica), and says so in the log and in a metric.
//!
//! The binary is `chaos_tests::relay::walrelay_bin()`, so `WALRELAY_BIN`
//! runs these tests against another build (an older one, as a negative
//! control). The reload endpoint is enabled through its environment
//! variable, which a build without the setting ignores.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chaos_tests::encode::{v1_series, write_request_body};
use chaos_tests::relay::{replica_status, walrelay_bin, Relay};
use prom_remote_write::v1::WriteRequest;

/// Every secret these tests put in a configuration contains this.
const SECRET: &str = "s3cret";

fn bin() -> PathBuf {
    walrelay_bin().unwrap()
}

/// The binary behind a script that enables the reload endpoint by its
/// environment variable.
fn with_reload_endpoint(dir: &Path) -> PathBuf {
    let script = dir.join("walrelay-with-reload");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nWALRELAY_ENABLE_RELOAD_ENDPOINT=true exec '{}' \"$@\"\n",
            bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An ingest token file (`tok-1`) and a users file (alice, `right`).
fn ingest_credentials(dir: &Path) -> (PathBuf, PathBuf) {
    let token = dir.join("token");
    std::fs::write(&token, "tok-1\n").unwrap();
    let users = dir.join("users");
    std::fs::write(
        &users,
        format!("alice:{}\n", bcrypt::hash("right", 4).unwrap()),
    )
    .unwrap();
    (token, users)
}

/// Credentials a request carries.
#[derive(Clone, Copy, Debug)]
enum Auth<'a> {
    None,
    Bearer(&'a str),
    Basic(&'a str, &'a str),
}

fn with_auth(rb: reqwest::RequestBuilder, auth: Auth<'_>) -> reqwest::RequestBuilder {
    match auth {
        Auth::None => rb,
        Auth::Bearer(t) => rb.bearer_auth(t),
        Auth::Basic(u, p) => rb.basic_auth(u, Some(p)),
    }
}

/// One small write request (`name`, one sample, now).
fn body(name: &str) -> Vec<u8> {
    write_request_body(&WriteRequest {
        timeseries: vec![v1_series(
            &[("__name__", name), ("job", "credentials")],
            &[(1.0, chaos_tests::now_ms())],
        )],
        ..Default::default()
    })
}

async fn write(c: &reqwest::Client, r: &Relay, name: &str, auth: Auth<'_>) -> u16 {
    let rb = c
        .post(r.write_url())
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "snappy")
        .body(body(name));
    with_auth(rb, auth).send().await.unwrap().status().as_u16()
}

async fn post_reload(c: &reqwest::Client, base: &str, auth: Auth<'_>) -> reqwest::Response {
    with_auth(c.post(format!("{base}/-/reload")), auth)
        .send()
        .await
        .unwrap()
}

/// `POST /-/reload`, again after the `Retry-After` of a 429: the status
/// and the answer's text.
async fn reload_when_allowed(c: &reqwest::Client, r: &Relay, auth: Auth<'_>) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = post_reload(c, &r.url(), auth).await;
        let status = resp.status().as_u16();
        if status != 429 {
            return (status, resp.text().await.unwrap());
        }
        assert!(Instant::now() < deadline, "reloads stay refused with 429");
        let wait: u64 = resp.headers()["Retry-After"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
}

async fn reloads(r: &Relay) -> f64 {
    r.metric_sum("walrelay_config_reloads_total", &[])
        .await
        .unwrap()
}

/// A configuration with one replica behind a closed port.
fn config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("walrelay.toml");
    std::fs::write(
        &path,
        format!("[[replica]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/api/v1/write\"\n{extra}"),
    )
    .unwrap();
    path
}

/// The relay of the reload tests: a configuration file, a bearer token,
/// basic auth and an admin address.
async fn relay_with_credentials(bin: PathBuf, dir: &Path) -> Relay {
    let (token, users) = ingest_credentials(dir);
    let config = config(dir, "");
    Relay::start_with_admin(
        bin,
        dir.join("data"),
        &[],
        &[
            "--config",
            path_str(&config),
            "--bearer-token-file",
            path_str(&token),
            "--basic-auth-users-file",
            path_str(&users),
            "--header-read-timeout",
            "3s",
        ],
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_is_off_unless_enabled_and_never_served_on_the_admin_address() {
    let dir = tempfile::tempdir().unwrap();
    let r = relay_with_credentials(bin(), dir.path()).await;
    let c = reqwest::Client::new();
    for (base, expect) in [(r.url(), 403), (r.admin_url(), 404)] {
        for auth in [Auth::None, Auth::Bearer("tok-1")] {
            let resp = post_reload(&c, &base, auth).await;
            assert_eq!(
                resp.status().as_u16(),
                expect,
                "POST {base}/-/reload with {auth:?}: {}",
                resp.text().await.unwrap()
            );
        }
    }
    assert_eq!(reloads(&r).await, 0.0, "nothing was reloaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enabled_reload_asks_for_the_ingest_credentials_and_comes_at_most_once_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let r = relay_with_credentials(with_reload_endpoint(dir.path()), dir.path()).await;
    let c = reqwest::Client::new();
    for auth in [
        Auth::None,
        Auth::Bearer("tok-2"),
        Auth::Basic("alice", "wrong"),
        Auth::Basic("bob", "right"),
    ] {
        let resp = post_reload(&c, &r.url(), auth).await;
        assert_eq!(resp.status().as_u16(), 401, "{auth:?}");
        let challenges: Vec<_> = resp.headers().get_all("WWW-Authenticate").iter().collect();
        assert_eq!(challenges.len(), 2, "{auth:?}: {challenges:?}");
    }
    // The admin address asks for nothing, so it never reloads.
    let resp = post_reload(&c, &r.admin_url(), Auth::Bearer("tok-1")).await;
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(reloads(&r).await, 0.0, "nothing was reloaded");

    let (status, text) = reload_when_allowed(&c, &r, Auth::Bearer("tok-1")).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(reloads(&r).await, 1.0);

    // A burst: one reload at a time and one a second, the rest 429.
    let burst = reload_burst(&c, &r, 8).await;
    let applied = burst.iter().filter(|(s, _)| *s == 200).count();
    let limited = burst.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!(applied + limited, burst.len(), "{burst:?}");
    assert!(
        limited >= 1,
        "no reload of the burst was refused: {burst:?}"
    );
    assert!(
        burst.iter().all(|(s, retry)| *s != 429 || retry.is_some()),
        "a 429 without Retry-After: {burst:?}"
    );
    assert_eq!(reloads(&r).await, 1.0 + applied as f64);

    let (status, text) = reload_when_allowed(&c, &r, Auth::Basic("alice", "right")).await;
    assert_eq!(status, 200, "{text}");
    let resp = with_auth(c.get(format!("{}/-/reload", r.url())), Auth::None)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
}

/// `n` authenticated reloads at once: each one's status and Retry-After.
/// With the bearer token: basic auth would also meet the bound on bcrypt
/// checks at once (503), which is not what the burst is about.
async fn reload_burst(c: &reqwest::Client, r: &Relay, n: usize) -> Vec<(u16, Option<String>)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (c, url) = (c.clone(), r.url());
            tokio::spawn(async move {
                let resp = post_reload(&c, &url, Auth::Bearer("tok-1")).await;
                let retry = resp
                    .headers()
                    .get("Retry-After")
                    .map(|v| v.to_str().unwrap().to_owned());
                (resp.status().as_u16(), retry)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Where secrets showed: every place is checked before the test fails, so
/// that a failure lists them all.
#[derive(Default)]
struct Leaks(Vec<String>);

impl Leaks {
    fn check(&mut self, where_: &str, text: &str) {
        if [SECRET, "1234567890"].iter().any(|s| text.contains(s)) {
            self.0.push(format!("{where_}:\n{text}"));
        }
    }

    fn assert_none(&self) {
        assert!(
            self.0.is_empty(),
            "secrets shown in {} places:\n\n{}",
            self.0.len(),
            self.0.join("\n\n")
        );
    }
}

/// Two replicas with secrets in their URLs, a header and a token file.
fn secret_replicas(dir: &Path) -> String {
    let token = dir.join("replica-token");
    std::fs::write(&token, "replica-tok-s3cret\n").unwrap();
    format!(
        "[[replica]]\nname = \"a\"\n\
         url = \"http://user:pw-s3cret@127.0.0.1:1/api/v1/write?api_key=key-s3cret#frag-s3cret\"\n\
         [replica.headers]\nX-Secret = \"hdr-s3cret\"\n\
         [[replica]]\nname = \"b\"\nurl = \"http://127.0.0.1:1/api/v1/write?api_key=key2-s3cret\"\n\
         bearer_token_file = \"{}\"\n",
        token.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_error_or_log_line_shows_a_secret_of_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "ingest-tok-s3cret\n").unwrap();
    let config = dir.path().join("walrelay.toml");
    let replicas = secret_replicas(dir.path());
    std::fs::write(&config, &replicas).unwrap();
    let r = Relay::start_with_admin(
        with_reload_endpoint(dir.path()),
        dir.path().join("data"),
        &[],
        &[
            "--config",
            path_str(&config),
            "--bearer-token-file",
            path_str(&token),
            "--retry-max-backoff",
            "500ms",
        ],
    )
    .await
    .unwrap();
    let c = reqwest::Client::new();
    let auth = Auth::Bearer("ingest-tok-s3cret");
    assert_eq!(write(&c, &r, "secrets", auth).await, 204);
    // Both replicas failed at least once: their errors are in the status.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = r.status().await.unwrap();
        if ["a", "b"]
            .iter()
            .all(|n| replica_status(&status, n)["last_error"].is_string())
        {
            break;
        }
        assert!(Instant::now() < deadline, "no send failed: {status:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut leaks = Leaks::default();
    for base in [r.url(), r.admin_url()] {
        let status = c
            .get(format!("{base}/api/v1/status"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            status.contains("http://127.0.0.1:1/api/v1/write"),
            "{status}"
        );
        leaks.check(&format!("{base}/api/v1/status"), &status);
    }
    leaks.check("/metrics", &r.metrics_text().await.unwrap());

    // Refused reloads: a URL that is not http, a file that does not parse
    // on a header's line, a header value of the wrong type. The answer is
    // a summary; the reason, redacted, is in the log.
    let bad_url = replicas.replace("http://user", "ftp://user");
    let unterminated = format!("{replicas}[replica.headers]\nX-Other = \"hdr-s3cret\n");
    let line = unterminated.lines().count();
    let wrong_type = format!("{replicas}[replica.headers]\nX-Other = 1234567890\n");
    for (file, says) in [
        (bad_url, "replica".to_owned()),
        (unterminated, format!("line {line}")),
        (wrong_type, format!("line {line}")),
    ] {
        std::fs::write(&config, &file).unwrap();
        let (status, text) = reload_when_allowed(&c, &r, auth).await;
        assert_eq!(status, 500, "{text}");
        assert!(text.contains(&says), "{text}");
        leaks.check("a refused reload's answer", &text);
    }
    let log = std::fs::read_to_string(r.log_path()).unwrap();
    assert_eq!(log.matches("reload refused").count(), 3, "{log}");
    for line in log.lines() {
        leaks.check("a log line", line);
    }

    // At startup, the same errors go to stderr.
    for args in [
        vec![
            "--replica".to_owned(),
            "a=ftp://user:pw-s3cret@127.0.0.1:1/w?api_key=key-s3cret".to_owned(),
        ],
        vec!["--config".to_owned(), path_str(&config).to_owned()],
    ] {
        let out = std::process::Command::new(bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("never"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} starts");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.is_empty());
        leaks.check("a refused start", &stderr);
    }
    leaks.assert_none();
}

/// `walrelay wal replay ARGS` on `data_dir`: exit code, stdout and stderr.
fn replay(data_dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(bin())
        .args(["wal", "replay", "--data-dir"])
        .arg(data_dir)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn state_files(data_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "state"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_prints_and_stores_its_target_without_secrets_and_still_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut source = Relay::start(&data, &[], &[]).await.unwrap();
    let c = reqwest::Client::new();
    for i in 0..3 {
        assert_eq!(
            write(&c, &source, &format!("replayed_{i}"), Auth::None).await,
            204
        );
    }
    source.stop(Duration::from_secs(30)).await.unwrap();
    let target = Relay::start(dir.path().join("target"), &[], &[])
        .await
        .unwrap();
    let url = |pw: &str| {
        format!(
            "http://user:{pw}@127.0.0.1:{}/api/v1/write?api_key=key-s3cret#frag-s3cret",
            target.port()
        )
    };
    let to = url("pw-s3cret");

    let mut leaks = Leaks::default();
    let (code, out) = replay(&data, &["--to", &to]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("127.0.0.1:{}/api/v1/write", target.port())),
        "{out}"
    );
    leaks.check("the replay's report", &out);
    let files = state_files(&data);
    assert_eq!(files.len(), 1, "{files:?}");
    let state = &files[0];
    let mode = std::fs::metadata(state).unwrap().permissions().mode();
    if mode & 0o077 != 0 {
        leaks.0.push(format!(
            "the state file is readable by others: mode {mode:o}"
        ));
    }
    leaks.check("the state file", &std::fs::read_to_string(state).unwrap());

    // The same replay again: matched to its state, nothing sent twice.
    let (code, out) = replay(&data, &["--to", &to]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("already completed"), "{out}");
    // Another target differing only in what is not shown: another replay.
    let other = url("pw2-s3cret");
    let (code, out) = replay(&data, &["--to", &other, "--state-file", path_str(state)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("belongs to another replay"), "{out}");
    leaks.check("a refused replay", &out);

    // A state file of the previous version holds the whole URL: still
    // matched, and rewritten without it.
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
    let fields = v.as_object_mut().unwrap();
    fields.insert("version".into(), 1.into());
    fields.insert(
        "url".into(),
        reqwest::Url::parse(&to).unwrap().to_string().into(),
    );
    fields.remove("url_sha256");
    std::fs::write(state, v.to_string()).unwrap();
    let (code, out) = replay(&data, &["--to", &to]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("already completed"), "{out}");
    leaks.check(
        "a state file of version 1, resumed",
        &std::fs::read_to_string(state).unwrap(),
    );
    leaks.assert_none();
}

/// Waits until `r` answers `want` to a write with `auth`.
async fn until_write_answers(c: &reqwest::Client, r: &Relay, auth: Auth<'_>, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = write(c, r, "revocation", auth).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "a write with {auth:?} still answers {got}, not {want}\n{}",
            r.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn file_ok(r: &Relay, used_for: &str) -> f64 {
    r.metric_sum(
        "walrelay_auth_credentials_file_ok",
        &[("used_for", used_for)],
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_or_deleted_credentials_file_refuses_every_sender_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (token, users) = ingest_credentials(dir.path());
    let r = Relay::start_with_admin(
        bin(),
        dir.path().join("data"),
        &[],
        &[
            "--bearer-token-file",
            path_str(&token),
            "--basic-auth-users-file",
            path_str(&users),
        ],
    )
    .await
    .unwrap();
    let c = reqwest::Client::new();
    let (tok1, alice) = (Auth::Bearer("tok-1"), Auth::Basic("alice", "right"));
    assert_eq!(write(&c, &r, "revocation", tok1).await, 204);
    assert_eq!(write(&c, &r, "revocation", alice).await, 204);

    std::fs::write(&token, "").unwrap();
    until_write_answers(&c, &r, tok1, 401).await;
    assert_eq!(file_ok(&r, "ingest_bearer_token").await, 0.0);
    assert_eq!(
        write(&c, &r, "revocation", alice).await,
        204,
        "basic auth is unaffected"
    );
    std::fs::remove_file(&users).unwrap();
    until_write_answers(&c, &r, alice, 401).await;
    assert_eq!(file_ok(&r, "ingest_basic_auth_users").await, 0.0);
    let log = r.log_tail(50);
    for used_for in ["ingest_bearer_token", "ingest_basic_auth_users"] {
        assert!(
            log.lines().any(|l| l.contains(used_for)
                && l.contains("a credentials file is missing, empty or bad")),
            "no error logged for {used_for}:\n{log}"
        );
    }

    std::fs::write(&token, "tok-2\n").unwrap();
    until_write_answers(&c, &r, Auth::Bearer("tok-2"), 204).await;
    assert_eq!(write(&c, &r, "revocation", tok1).await, 401);
    assert_eq!(file_ok(&r, "ingest_bearer_token").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_token_file_is_emptied_is_sent_no_stale_token() {
    let dir = tempfile::tempdir().unwrap();
    let receiver_token = dir.path().join("receiver-token");
    std::fs::write(&receiver_token, "rtok\n").unwrap();
    let receiver = Relay::start(
        dir.path().join("receiver"),
        &[],
        &["--bearer-token-file", path_str(&receiver_token)],
    )
    .await
    .unwrap();
    let token = dir.path().join("replica-token");
    std::fs::write(&token, "rtok\n").unwrap();
    let config = dir.path().join("walrelay.toml");
    std::fs::write(
        &config,
        format!(
            "[[replica]]\nname = \"r\"\nurl = \"{}\"\nbearer_token_file = \"{}\"\n",
            receiver.write_url(),
            token.display()
        ),
    )
    .unwrap();
    let sender = Relay::start(
        dir.path().join("sender"),
        &[],
        &[
            "--config",
            path_str(&config),
            "--retry-max-backoff",
            "500ms",
        ],
    )
    .await
    .unwrap();
    let c = reqwest::Client::new();
    // Samples, not records: the sender coalesces records into a request.
    let received = || async {
        receiver
            .metric_sum("walrelay_ingest_samples_total", &[])
            .await
            .unwrap() as u64
    };
    let sender_state = || async { replica_status(&sender.status().await.unwrap(), "r").clone() };
    let mut written = 0u64;
    written += write_one(&c, &sender).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while received().await < 1 {
        assert!(
            Instant::now() < deadline,
            "not delivered: {}",
            sender_state().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Emptied: what is written from then on waits, blocked on 401, instead
    // of going out with the old token.
    std::fs::write(&token, "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        written += write_one(&c, &sender).await;
        let st = sender_state().await;
        if st["state"] == "blocked" {
            assert!(st["last_error"].as_str().unwrap().contains("401"), "{st}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica still takes what is sent: {st}\n{}",
            sender.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = received().await;
    written += write_one(&c, &sender).await;
    let st = sender_state().await;
    assert_eq!(st["state"], "blocked", "{st}");
    assert_eq!(received().await, held, "sent with a stale token");
    assert_eq!(token_file_ok(&sender).await, 0.0);

    // Refilled: everything held back is delivered.
    std::fs::write(&token, "rtok\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while received().await < written {
        assert!(
            Instant::now() < deadline,
            "{} of {written} delivered: {}",
            received().await,
            sender_state().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(token_file_ok(&sender).await, 1.0);

    // Emptied again, then the replica removed (SIGHUP): a file no longer
    // used no longer counts as a problem.
    std::fs::write(&token, "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while token_file_ok(&sender).await != 0.0 {
        write_one(&c, &sender).await;
        assert!(Instant::now() < deadline, "{}", sender.log_tail(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(&config, "").unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &sender.pid().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while sender.status().await.unwrap()["replicas"] != serde_json::json!([]) {
        assert!(Instant::now() < deadline, "{}", sender.log_tail(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The series is reset when the removed replica's client is dropped,
    // which may come a moment after the status stops listing it.
    sender
        .wait_metric(
            "walrelay_auth_credentials_file_ok",
            TOKEN_FILE_LABELS,
            1.0,
            Duration::from_secs(20),
        )
        .await
        .unwrap();
}

/// Writes one sample to `r`, which takes it: 1.
async fn write_one(c: &reqwest::Client, r: &Relay) -> u64 {
    assert_eq!(write(c, r, "replica_token", Auth::None).await, 204);
    1
}

/// `walrelay_auth_credentials_file_ok` of replica r's token file.
async fn token_file_ok(r: &Relay) -> f64 {
    r.metric_sum("walrelay_auth_credentials_file_ok", TOKEN_FILE_LABELS)
        .await
        .unwrap()
}

/// The labels of replica r's token file's series.
const TOKEN_FILE_LABELS: &[(&str, &str)] =
    &[("used_for", "replica_bearer_token"), ("replica", "r")];
