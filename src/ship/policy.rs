//! What a replica's answer means for the records of a request: the status
//! policy.
//!
//! Only the replica may say that a record is unwanted, and only by an answer
//! about that record's data. Everything else (credentials, routes, sizes,
//! timeouts, an overloaded replica) says nothing about the data: the request
//! waits and is retried, for as long as it takes, and the cursor stays where
//! it is. A relay that skipped records on a 401 or a 404 would turn a
//! rotated credential or an ingress route missing for a minute into data
//! lost for good.
//!
//! | answer | what it says | what the shipper does |
//! |---|---|---|
//! | 2xx | stored | advances past the request |
//! | 400, 409, 422 | the data is refused (Prometheus: out of order, out of bounds, a bad label; Thanos Receive: 409 for conflicts) | one record: skipped and counted as rejected; several: re-sent one by one, so that only the refused records are skipped; the exact range that was in flight before a restart: already delivered (see below) |
//! | 413 | the request is too large | split in halves, down to one record; one record still refused with 413 is rejected |
//! | 429, 5xx | the replica is overloaded or failing | retried with backoff (honouring `Retry-After`), no give-up |
//! | any other answer (401, 403, 404, 405, 407, 408, 421, other 4xx, a redirect other than 307/308) | configuration or path: nothing about the data | retried with backoff, no give-up; the replica shows as `blocked` (status, `walrelay_replica_blocked`, the `WalrelayReplicaBlocked` alert) |
//! | a TLS certificate refused, by the relay (a CA that did not sign the replica's, expired, another name) or by the replica (ours: none, unknown, expired) | configuration: nothing about the data | as above: retried, `blocked` |
//! | connection error, timeout | the path | retried; a request of several records that times out is split in halves |
//!
//! An operator may add statuses to the data refusals of one replica
//! (`drop_on_status`), for a replica known to answer, say, 404 for a record
//! it will never take. Nothing is added by default.
//!
//! A data refusal of a re-send proves "already delivered" in one case only:
//! the replica (Prometheus) refuses a whole request whose samples are older
//! than what it holds, so when the exact request that was in flight before a
//! restart is refused, it was stored by its earlier attempt. A part of a
//! request (a half of a split one) proves nothing: the replica may have
//! stored nothing and refused the part for one bad record in it. Parts are
//! therefore re-sent one by one, and only a single record refused after an
//! attempt that may have stored it is counted as already delivered.

use crate::types::StatusPolicy;

/// What an HTTP answer means for the request's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 2xx: the replica stored the request.
    Stored,
    /// The replica refuses the data (400, 409, 422, or a status listed in
    /// the replica's `drop_on_status`).
    DataRefused,
    /// 413: the request is too large for the replica; smaller ones may pass.
    TooLarge,
    /// 429 or 5xx: retry, the replica will take it later.
    Overloaded,
    /// Any other answer: a fault of configuration or of the path (a
    /// credential, a route, a method, a proxy). Retried; the replica is
    /// blocked until it passes.
    Blocked,
}

impl Answer {
    /// What `status` means for the request's records, for a replica with
    /// `policy` (the statuses its operator added to the data refusals).
    pub fn of(status: u16, policy: &StatusPolicy) -> Answer {
        match status {
            200..=299 => Answer::Stored,
            s if policy.refuses_data(s) => Answer::DataRefused,
            413 => Answer::TooLarge,
            429 | 500..=599 => Answer::Overloaded,
            _ => Answer::Blocked,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn only_answers_about_the_data_refuse_it_by_default() {
        let p = StatusPolicy::default();
        let table: &[(u16, Answer)] = &[
            (200, Answer::Stored),
            (204, Answer::Stored),
            (400, Answer::DataRefused),
            (409, Answer::DataRefused),
            (422, Answer::DataRefused),
            (413, Answer::TooLarge),
            (429, Answer::Overloaded),
            (500, Answer::Overloaded),
            (502, Answer::Overloaded),
            (503, Answer::Overloaded),
            (401, Answer::Blocked),
            (403, Answer::Blocked),
            (404, Answer::Blocked),
            (405, Answer::Blocked),
            (407, Answer::Blocked),
            (408, Answer::Blocked),
            (410, Answer::Blocked),
            (421, Answer::Blocked),
            (451, Answer::Blocked),
            (301, Answer::Blocked),
            (302, Answer::Blocked),
            (100, Answer::Blocked),
        ];
        for &(status, want) in table {
            assert_eq!(Answer::of(status, &p), want, "HTTP {status}");
        }
    }

    #[test]
    fn statuses_an_operator_adds_refuse_the_data_and_the_rest_keep_their_meaning() {
        let p = StatusPolicy::with_drop_on(&[404, 500]).unwrap();
        assert_eq!(Answer::of(404, &p), Answer::DataRefused);
        assert_eq!(Answer::of(500, &p), Answer::DataRefused);
        assert_eq!(Answer::of(401, &p), Answer::Blocked);
        assert_eq!(Answer::of(503, &p), Answer::Overloaded);
    }
}
