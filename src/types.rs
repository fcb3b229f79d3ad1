//! The relay's shared vocabulary: the values of settings that several parts
//! of the relay read (the flag parser sets them, ingest, the commit thread,
//! the shippers and the CLI act on them), and two small helpers every part
//! uses.
//!
//! It imports nothing else from the relay, so that any module may use it
//! without making a loop: the flag parser ([`crate::config`]) and the
//! shippers ([`crate::ship`]) both stand on it, and neither on the other.
//! What the values mean in action is documented where they act: the status
//! policy's table in [`crate::ship::policy`], catching up in
//! [`crate::ship::backfill`].

use std::time::Duration;

use serde::Deserialize;

/// What to do when the disk budget is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// Refuse new writes (429 with Retry-After) until replicas catch up:
    /// lossless end to end while senders retry.
    Block,
    /// Delete the oldest segments, move lagging replicas past them, and
    /// count the samples each replica lost.
    DropOldest,
}

/// Where a replica with no stored position starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartAt {
    /// At the head: only records written from now on.
    Head,
    /// At the oldest record still on disk.
    Oldest,
}

impl StartAt {
    /// The position this start gives in a log holding `first_seq..end_seq`.
    pub fn position(self, first_seq: u64, end_seq: u64) -> u64 {
        match self {
            StartAt::Head => end_seq,
            StartAt::Oldest => first_seq,
        }
    }
}

/// Which remote-write protocol a replica is sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub enum ReplicaProtocol {
    /// Remote-write 1.0 only: 2.0 records are translated, and what 1.0
    /// cannot carry is dropped and counted.
    #[default]
    #[serde(rename = "1.0")]
    V1,
    /// Remote-write 2.0: 2.0 records go as they are, 1.0 records as 1.0
    /// requests.
    #[serde(rename = "2.0")]
    V2,
}

impl ReplicaProtocol {
    /// `"1.0"` or `"2.0"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaProtocol::V1 => "1.0",
            ReplicaProtocol::V2 => "2.0",
        }
    }

    /// Parses `"1.0"` or `"2.0"` (`"1"` and `"2"` too).
    ///
    /// # Errors
    /// A message naming the bad value and what is expected.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "1.0" | "1" => Ok(ReplicaProtocol::V1),
            "2.0" | "2" => Ok(ReplicaProtocol::V2),
            other => Err(format!(
                "protocol {other:?} is not supported (expected \"1.0\" or \"2.0\")"
            )),
        }
    }
}

/// How many shards deliver a replica's live stream, each with one request
/// in flight and the series that hash to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shards {
    /// Always this many.
    Fixed(u32),
    /// As many as the replica's round trip and the backlog need, between
    /// `min` and `max`, re-evaluated every `--shard-update-interval`.
    Adaptive { min: u32, max: u32 },
}

/// Most shards per replica: a shard holds a request's buffers and one
/// connection.
pub const MAX_SHARDS: u32 = 256;

/// The adaptive default's bounds: one shard for a replica next door; up to
/// 16 requests in flight, 320,000 samples at the default request size, for
/// one far away.
pub const DEFAULT_SHARDS: Shards = Shards::Adaptive { min: 1, max: 16 };

impl Default for Shards {
    fn default() -> Self {
        DEFAULT_SHARDS
    }
}

impl Shards {
    /// The fewest and the most shards.
    pub fn bounds(self) -> (u32, u32) {
        match self {
            Shards::Fixed(n) => (n, n),
            Shards::Adaptive { min, max } => (min, max),
        }
    }

    /// `n` kept within the bounds.
    pub fn clamp(self, n: u32) -> u32 {
        let (min, max) = self.bounds();
        n.clamp(min, max)
    }

    /// Checked bounds: 1 <= min <= max <= [`MAX_SHARDS`].
    ///
    /// # Errors
    /// Bounds out of order or range, named.
    pub fn adaptive(min: u32, max: u32) -> Result<Self, String> {
        if min == 0 || max > MAX_SHARDS || min > max {
            return Err(format!(
                "shards must satisfy 1 <= min ({min}) <= max ({max}) <= {MAX_SHARDS}"
            ));
        }
        Ok(if min == max {
            Shards::Fixed(min)
        } else {
            Shards::Adaptive { min, max }
        })
    }
}

/// How a replica that fell behind catches up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub enum CatchUp {
    /// Strict log order, one stream: what a replica that refuses older
    /// samples (Prometheus without an out-of-order window) needs.
    #[default]
    #[serde(rename = "in-order")]
    InOrder,
    /// Once the replica lags more than `after` (the age of the oldest record
    /// it has not received, as `lag_seconds`), new records go to it at once
    /// on a live stream while a second stream backfills the gap. Only for
    /// replicas that accept out-of-order samples.
    #[serde(rename = "live-first")]
    LiveFirst { after: Duration },
}

/// `live_first_after` when unset: well above the lag of a healthy replica
/// and of a short blip (a restart, a few failed requests), which in-order
/// delivery clears faster than a split would.
pub const DEFAULT_LIVE_FIRST_AFTER: Duration = Duration::from_secs(60);

impl CatchUp {
    /// `"in-order"` or `"live-first"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::InOrder => "in-order",
            CatchUp::LiveFirst { .. } => "live-first",
        }
    }

    /// From a `[[replica]]` table's `catch_up` and `live_first_after`.
    ///
    /// # Errors
    /// An unknown mode, a bad or too short duration, or `live_first_after`
    /// without live-first.
    pub fn parse(mode: Option<&str>, after: Option<&str>) -> Result<Self, String> {
        match (mode.map(str::trim), after) {
            (None | Some("in-order"), None) => Ok(CatchUp::InOrder),
            (None | Some("in-order"), Some(_)) => {
                Err("live_first_after is only meaningful with catch_up = \"live-first\"".to_owned())
            }
            (Some("live-first"), after) => {
                let after = match after {
                    None => DEFAULT_LIVE_FIRST_AFTER,
                    Some(a) => humantime::parse_duration(a.trim()).map_err(|e| {
                        format!("live_first_after {a:?} is not a duration (e.g. 30s, 5m): {e}")
                    })?,
                };
                if after < Duration::from_secs(1) {
                    return Err(format!(
                        "live_first_after {after:?} is too short (at least 1s): every \
                         ordinary delay would split the stream"
                    ));
                }
                Ok(CatchUp::LiveFirst { after })
            }
            (Some(other), _) => Err(format!(
                "catch_up {other:?} is not supported (expected \"in-order\" or \"live-first\")"
            )),
        }
    }
}

/// Statuses that refuse the data on their own (see
/// [`crate::ship::policy`]).
pub const DATA_REFUSALS: [u16; 3] = [400, 409, 422];

/// One replica's status policy: which answers skip a record. What every
/// answer means is [`crate::ship::policy`]'s table; this holds what an
/// operator may add to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatusPolicy {
    /// Statuses the operator declared data refusals for this replica, on
    /// top of [`DATA_REFUSALS`]; sorted, without duplicates.
    drop_on: Vec<u16>,
}

impl StatusPolicy {
    /// A policy that also treats `statuses` as data refusals.
    ///
    /// # Errors
    /// A status that is not a 4xx or 5xx, or one whose meaning is fixed
    /// (413 is split, 429 is backpressure).
    pub fn with_drop_on(statuses: &[u16]) -> Result<Self, String> {
        let mut drop_on = Vec::with_capacity(statuses.len());
        for &s in statuses {
            match s {
                413 => {
                    return Err(
                        "413 cannot be a drop status: a request refused as too large is split \
                         down to single records, and only a single record refused with 413 is \
                         dropped"
                            .to_owned(),
                    )
                }
                429 => {
                    return Err(
                        "429 cannot be a drop status: it asks the sender to slow down, it says \
                         nothing about the data"
                            .to_owned(),
                    )
                }
                400..=599 => drop_on.push(s),
                other => {
                    return Err(format!(
                        "{other} cannot be a drop status: only 4xx and 5xx answers refuse data"
                    ))
                }
            }
        }
        drop_on.sort_unstable();
        drop_on.dedup();
        Ok(Self { drop_on })
    }

    /// The statuses the operator added.
    pub fn drop_on(&self) -> &[u16] {
        &self.drop_on
    }

    /// Whether `status` refuses the data: one of [`DATA_REFUSALS`], or a
    /// status the operator added.
    pub fn refuses_data(&self, status: u16) -> bool {
        DATA_REFUSALS.contains(&status) || self.drop_on.binary_search(&status).is_ok()
    }
}

/// Parses a list of statuses: `"404"`, `"404,410"`.
///
/// # Errors
/// A message naming the value that is not a status.
pub fn parse_statuses(s: &str) -> Result<Vec<u16>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u16>()
                .map_err(|_| format!("{t:?} is not an HTTP status"))
        })
        .collect()
}

/// `url` as it may be shown: without a user name or password, a query
/// (`?api_key=...`) or a fragment, any of which can hold a secret. A URL
/// that does not parse is cut the same way by its text.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        // Without a host ("user:pw@host" parses with "user" as the scheme)
        // the userinfo is not recognised as such.
        Ok(mut u) if u.has_host() => {
            // Only fails for URLs that cannot have userinfo at all.
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        _ => redact_url_text(url),
    }
}

/// [`redact_url`] for a string that is not a URL: everything from the first
/// `?` or `#` is cut, and the authority loses what precedes its last `@`.
fn redact_url_text(text: &str) -> String {
    let text = text.split(['?', '#']).next().unwrap_or("");
    let (scheme, rest) = match text.find("://") {
        Some(i) => text.split_at(i + 3),
        None => ("", text),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    format!("{scheme}{rest}")
}

/// Milliseconds since the Unix epoch, now (0 for a clock before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn an_operator_may_add_data_refusals_but_not_statuses_with_a_fixed_meaning() {
        let p = StatusPolicy::with_drop_on(&[404, 500, 404]).unwrap();
        assert_eq!(p.drop_on(), &[404, 500]);
        assert!(p.refuses_data(404) && p.refuses_data(400) && !p.refuses_data(401));
        for bad in [413, 429, 200, 204, 302, 99, 600] {
            let e = StatusPolicy::with_drop_on(&[bad]).unwrap_err();
            assert!(e.contains(&bad.to_string()), "{e}");
        }
    }

    #[test]
    fn status_lists_parse_with_commas_and_name_what_is_wrong() {
        assert_eq!(parse_statuses("404, 410,").unwrap(), vec![404, 410]);
        assert!(parse_statuses("404,x").unwrap_err().contains("\"x\""));
    }

    #[test]
    fn urls_lose_their_userinfo_query_and_fragment_for_display() {
        assert_eq!(
            redact_url("https://user:secret@x:1/api/v1/write"),
            "https://x:1/api/v1/write"
        );
        assert_eq!(redact_url("http://x:1/w"), "http://x:1/w");
        assert_eq!(
            redact_url("https://u:pw@x:1/push?api_key=k3y&tenant=t#frag"),
            "https://x:1/push"
        );
        // Not a URL: cut by its text all the same.
        assert_eq!(
            redact_url("ht tp://u:p@w@host:1/path?api_key=k3y"),
            "ht tp://host:1/path"
        );
        assert_eq!(redact_url("u:p@host/w?k=v#f"), "host/w");
    }

    #[test]
    fn a_new_replica_starts_at_the_head_or_at_the_oldest_record() {
        assert_eq!(StartAt::Head.position(3, 10), 10);
        assert_eq!(StartAt::Oldest.position(3, 10), 3);
    }
}
