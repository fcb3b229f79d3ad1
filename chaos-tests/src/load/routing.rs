//! Which relay the next attempt of a worker goes to.

use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Which relay each request of a worker goes to, when a load is given
/// several URLs ([`Load::start_routed`](super::Load::start_routed)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Routing {
    /// Worker `i` (counted from `first_worker`) always sends to URL
    /// `i % n`, retries included: a sender pinned to one relay pod, waiting
    /// for it while it restarts.
    Pinned,
    /// Every attempt goes to the next URL, so consecutive requests of a
    /// series land on different relays and a retry fails over to another
    /// one: a round-robin Service in front of several relays.
    RoundRobin,
}

impl FromStr for Routing {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pinned" => Ok(Routing::Pinned),
            "round-robin" => Ok(Routing::RoundRobin),
            _ => bail!("routing must be pinned or round-robin, not {s:?}"),
        }
    }
}

/// One worker's way through the URLs.
pub(super) struct Router<'a> {
    urls: &'a [String],
    routing: Routing,
    next: usize,
}

impl<'a> Router<'a> {
    /// `worker` is counted from the load's first worker. Workers start on
    /// different relays so a round-robin load is spread from the first
    /// request on. `urls` must not be empty.
    pub(super) fn new(urls: &'a [String], routing: Routing, worker: u32) -> Self {
        Router {
            urls,
            routing,
            next: worker as usize % urls.len(),
        }
    }

    /// The URL of the next attempt.
    pub(super) fn next_url(&mut self) -> &'a str {
        let url = &self.urls[self.next];
        if self.routing == Routing::RoundRobin {
            self.next = (self.next + 1) % self.urls.len();
        }
        url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The URLs of a worker's first four attempts over relays a, b and c.
    fn route(routing: Routing, worker: u32) -> Vec<String> {
        let urls = ["a", "b", "c"].map(String::from);
        let mut router = Router::new(&urls, routing, worker);
        (0..4).map(|_| router.next_url().to_string()).collect()
    }

    #[test]
    fn a_pinned_worker_always_sends_to_its_own_relay() {
        assert_eq!(route(Routing::Pinned, 0), ["a", "a", "a", "a"]);
        assert_eq!(route(Routing::Pinned, 4), ["b", "b", "b", "b"]);
    }

    #[test]
    fn round_robin_moves_on_at_every_attempt_from_a_start_that_differs_per_worker() {
        assert_eq!(route(Routing::RoundRobin, 0), ["a", "b", "c", "a"]);
        assert_eq!(route(Routing::RoundRobin, 2), ["c", "a", "b", "c"]);
    }
}
