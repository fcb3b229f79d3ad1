//! Small HTTP helpers shared by the modules.

use std::time::Duration;

use anyhow::Result;

/// Makes `ring` rustls' process-wide crypto provider. Built together with
/// walrelay, reqwest has TLS without a provider of its own and panics when
/// a client is built before one is installed; call this before building a
/// `reqwest::Client` directly (the helpers here call it).
pub fn install_tls_provider() {
    // An error means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A plain HTTP/1 client that never goes through an environment proxy
/// (with the TLS provider installed): what the suite's tests talk to the
/// relays and replicas with.
pub fn client(timeout: Duration) -> Result<reqwest::Client> {
    install_tls_provider();
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        .build()?)
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub(crate) fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

pub(crate) fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Milliseconds since the epoch as Prometheus' decimal seconds ("1700000000.123").
pub(crate) fn ms_to_secs_str(ms: i64) -> String {
    format!("{}.{:03}", ms.div_euclid(1000), ms.rem_euclid(1000))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
