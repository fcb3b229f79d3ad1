//! TLS and authentication of the real `walrelay serve` process, with
//! certificates made at test time (rcgen): client certificates refused and
//! accepted at the handshake, basic auth, a replica behind TLS with its own
//! CA (another walrelay), and a certificate replaced while the relay runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod tls_common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chaos_tests::encode::v1_series;
use chaos_tests::relay::Relay;
use prom_remote_write::encode::snappy_compress;
use prom_remote_write::v1::WriteRequest;
use prost::Message;
use rcgen::ExtendedKeyUsagePurpose;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tls_common::*;

const BIN: &str = env!("CARGO_BIN_EXE_walrelay");

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        Some((cert, key)) => b
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    }
}

fn https_client(ca: &Path, identity: Option<(&Path, &Path)>) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .tls_backend_preconfigured(client_tls(ca, identity))
        .build()
        .unwrap()
}

fn body(name: &str, samples: usize) -> Vec<u8> {
    let now = chaos_tests::now_ms();
    let req = WriteRequest {
        timeseries: vec![v1_series(
            &[("__name__", name), ("job", "tls-test")],
            &(0..samples)
                .map(|i| (i as f64, now - (samples - i) as i64))
                .collect::<Vec<_>>(),
        )],
        ..Default::default()
    };
    snappy_compress(&req.encode_to_vec())
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    auth: Option<(&str, &str)>,
) -> reqwest::Result<reqwest::Response> {
    let mut rb = client
        .post(url)
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "snappy")
        .body(body);
    if let Some((u, p)) = auth {
        rb = rb.basic_auth(u, Some(p));
    }
    rb.send().await
}

async fn head_seq(r: &Relay) -> u64 {
    r.status().await.unwrap()["wal"]["head_seq"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_requiring_client_certificates_refuses_a_client_without_one() {
    chaos_tests::install_tls_provider();
    let dir = tempfile::tempdir().unwrap();
    let (p, _ca) = pki(dir.path(), "a");
    let mut args = tls_args(&p);
    args.extend(["--tls-client-ca-file".into(), p.ca.display().to_string()]);
    let r = Relay::start_with_admin(BIN, dir.path().join("data"), &[], &strs(&args))
        .await
        .unwrap();
    let url = https_write_url(&r);

    let anonymous = https_client(&p.ca, None);
    let refused = post(&anonymous, &url, body("mtls_refused", 3), None).await;
    assert!(
        refused.is_err(),
        "a client without a certificate got an answer: {refused:?}"
    );

    // A certificate from another CA is refused as well.
    let (other, _other_ca) = pki(dir.path(), "other");
    let stranger = https_client(&p.ca, Some((&other.client_cert, &other.client_key)));
    assert!(post(&stranger, &url, body("mtls_stranger", 3), None)
        .await
        .is_err());
    assert_eq!(head_seq(&r).await, 0, "nothing refused is stored");

    let trusted = https_client(&p.ca, Some((&p.client_cert, &p.client_key)));
    let resp = post(&trusted, &url, body("mtls_ok", 3), None)
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert_eq!(head_seq(&r).await, 1);
    // The main listener serves status too, to a client with a certificate.
    let status = trusted
        .get(format!("https://127.0.0.1:{}/api/v1/status", r.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(status.status().as_u16(), 200);
    // The admin address serves no writes.
    let admin_write = reqwest::Client::new()
        .post(format!("{}/api/v1/write", r.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(admin_write.status().as_u16(), 404);
    assert!(
        r.metric_sum("walrelay_tls_handshake_failures_total", &[])
            .await
            .unwrap()
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_refuses_a_wrong_password_and_accepts_the_right_one() {
    chaos_tests::install_tls_provider();
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!(
            "# senders\nalice:{}\n",
            bcrypt::hash("correct horse", 6).unwrap()
        ),
    )
    .unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "tok3n\n").unwrap();
    let r = Relay::start_with_bin(
        BIN,
        dir.path().join("data"),
        &[],
        &[
            "--basic-auth-users-file",
            users.to_str().unwrap(),
            "--bearer-token-file",
            token.to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    let c = reqwest::Client::new();
    let url = r.write_url();
    for (what, auth) in [
        ("no credentials", None),
        ("wrong password", Some(("alice", "battery staple"))),
        ("unknown user", Some(("bob", "correct horse"))),
    ] {
        let resp = post(&c, &url, body("basic", 2), auth).await.unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{what}");
        let challenges: Vec<_> = resp
            .headers()
            .get_all("WWW-Authenticate")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert!(
            challenges.iter().any(|c| c.starts_with("Basic")),
            "{what}: {challenges:?}"
        );
    }
    assert_eq!(head_seq(&r).await, 0);
    let resp = post(&c, &url, body("basic", 2), Some(("alice", "correct horse")))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    // With both configured, the bearer token passes too.
    let resp = c
        .post(&url)
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "snappy")
        .bearer_auth("tok3n")
        .body(body("bearer", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert_eq!(head_seq(&r).await, 2);
}

/// The first relay's status of its only replica.
async fn replica_status(r: &Relay) -> serde_json::Value {
    r.status().await.unwrap()["replicas"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_tls_with_its_own_ca_receives_everything_and_a_wrong_ca_delivers_nothing()
{
    chaos_tests::install_tls_provider();
    let dir = tempfile::tempdir().unwrap();
    let (rp, _rca) = pki(dir.path(), "replica");
    let (wrong, _wca) = pki(dir.path(), "wrong");
    // The replica: a second walrelay serving TLS and requiring basic auth.
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!("relay:{}\n", bcrypt::hash("s3cret-pw", 4).unwrap()),
    )
    .unwrap();
    let mut args = tls_args(&rp);
    args.extend([
        "--basic-auth-users-file".into(),
        users.display().to_string(),
    ]);
    let replica = Relay::start_with_admin(BIN, dir.path().join("replica"), &[], &strs(&args))
        .await
        .unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret-pw\n").unwrap();

    let config = |name: &str, ca: &Path| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[[replica]]\nname = \"tls\"\nurl = \"{}\"\ntls_ca_file = \"{}\"\n\
                 basic_auth_username = \"relay\"\nbasic_auth_password_file = \"{}\"\n\
                 timeout = \"5s\"\n[replica.headers]\nX-Test = \"yes\"\n",
                https_write_url(&replica),
                ca.display(),
                password.display()
            ),
        )
        .unwrap();
        path
    };
    let good_cfg = config("good", &rp.ca);
    let fast_retry = ["--retry-max-backoff", "500ms"];
    let mut args = vec!["--config", good_cfg.to_str().unwrap()];
    args.extend(fast_retry);
    let relay = Relay::start_with_bin(BIN, dir.path().join("relay"), &[], &args)
        .await
        .unwrap();
    let c = reqwest::Client::new();
    let (requests, per_request) = (20u64, 5usize);
    for i in 0..requests {
        let resp = post(
            &c,
            &relay.write_url(),
            body(&format!("tls_{i}"), per_request),
            None,
        )
        .await
        .unwrap();
        assert_eq!(resp.status().as_u16(), 204);
    }
    let total = requests as f64 * per_request as f64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = replica
            .metric_sum("walrelay_ingest_samples_total", &[])
            .await
            .unwrap();
        let st = replica_status(&relay).await;
        if got >= total && st["cursor"].as_u64() == Some(requests) {
            assert_eq!(got, total, "every sample exactly once");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica holds {got} of {total} samples; relay status: {st}\n{}",
            relay.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = relay.status().await.unwrap().to_string();
    assert!(!status.contains("s3cret-pw"), "a secret in the status");

    // The same replica trusted through the wrong CA: nothing is delivered,
    // and the status says why.
    let wrong_cfg = config("wrong", &wrong.ca);
    let mut args = vec![
        "--config",
        wrong_cfg.to_str().unwrap(),
        "--enable-reload-endpoint",
    ];
    args.extend(fast_retry);
    let misconfigured = Relay::start_with_bin(BIN, dir.path().join("wrong-relay"), &[], &args)
        .await
        .unwrap();
    let resp = post(&c, &misconfigured.write_url(), body("tls_wrong", 5), None)
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    let deadline = Instant::now() + Duration::from_secs(20);
    let error = loop {
        let st = replica_status(&misconfigured).await;
        if let Some(e) = st["last_error"].as_str() {
            assert_eq!(st["cursor"].as_u64(), Some(0), "{st}");
            break e.to_owned();
        }
        assert!(Instant::now() < deadline, "no error reported: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        error.to_lowercase().contains("certificate"),
        "the error names the certificate problem: {error}"
    );
    // A certificate refused is a setting, not a path that comes back by
    // itself: the replica is blocked (and WalrelayReplicaBlocked fires).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = replica_status(&misconfigured).await;
        if st["state"] == "blocked" {
            break;
        }
        assert!(Instant::now() < deadline, "not blocked: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        replica
            .metric_sum("walrelay_ingest_samples_total", &[])
            .await
            .unwrap(),
        total,
        "nothing arrived through the wrong CA"
    );

    // The CA file replaced in place (a rotation), the configuration
    // unchanged: a reload rebuilds the replica's client, and the record
    // waiting for it is delivered.
    std::fs::copy(&rp.ca, &wrong.ca).unwrap();
    let resp = c
        .post(format!("{}/-/reload", misconfigured.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let changes: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(changes["replicas"]["changed"], serde_json::json!(["tls"]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while replica
        .metric_sum("walrelay_ingest_samples_total", &[])
        .await
        .unwrap()
        < total + 5.0
    {
        assert!(
            Instant::now() < deadline,
            "not delivered after the CA file was replaced: {}\n{}",
            replica_status(&misconfigured).await,
            misconfigured.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let log = std::fs::read_to_string(misconfigured.log_path()).unwrap()
        + &std::fs::read_to_string(relay.log_path()).unwrap();
    assert!(!log.contains("s3cret-pw"), "a secret in the log");
}

/// The certificate a new TLS connection to `port` is served.
async fn served_certificate(port: u16, ca: &Path) -> Vec<u8> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(ca, None)));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Replaces `path` at once, the way Kubernetes and cert-manager do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_for_certificate(port: u16, ca: &Path, want: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while served_certificate(port, ca).await != want {
        assert!(
            Instant::now() < deadline,
            "the new certificate is not served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_served_to_new_connections_and_a_bad_one_is_ignored() {
    chaos_tests::install_tls_provider();
    let dir = tempfile::tempdir().unwrap();
    let (p, issuer) = pki(dir.path(), "a");
    let r = Relay::start_with_admin(BIN, dir.path().join("data"), &[], &strs(&tls_args(&p)))
        .await
        .unwrap();
    let first = der(&std::fs::read_to_string(&p.server_cert).unwrap());
    assert_eq!(served_certificate(r.port(), &p.ca).await, first);

    let (cert2, key2) = leaf(&issuer, "walrelay-2", ExtendedKeyUsagePurpose::ServerAuth);
    replace(&p.server_key, &key2);
    replace(&p.server_cert, &cert2);
    wait_for_certificate(r.port(), &p.ca, &der(&cert2)).await;

    // A broken certificate file is logged; the last good one stays.
    replace(&p.server_cert, "-----BEGIN CERTIFICATE-----\nbroken\n");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(served_certificate(r.port(), &p.ca).await, der(&cert2));
    assert!(r.log_tail(50).contains("keeping the previous version"));

    let (cert3, key3) = leaf(&issuer, "walrelay-3", ExtendedKeyUsagePurpose::ServerAuth);
    replace(&p.server_key, &key3);
    replace(&p.server_cert, &cert3);
    wait_for_certificate(r.port(), &p.ca, &der(&cert3)).await;
    let resp = post(
        &https_client(&p.ca, None),
        &https_write_url(&r),
        body("after_reload", 1),
        None,
    )
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
}
