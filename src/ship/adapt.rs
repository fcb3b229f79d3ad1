//! How many shards a replica's live stream wants: the adaptive default.
//!
//! As Prometheus's remote write does, the count follows from what the
//! replica costs per sample and how many samples must go:
//!
//! - `time_per_sample`: seconds the shards spent in requests that the
//!   replica stored, over the samples they carried, in the last interval.
//!   A round trip of 100 ms for 20,000 samples is 5 µs per sample.
//! - `rate`: samples per second arriving in the log (its head's advance
//!   over the interval, times the samples per record read), plus a fifth
//!   of the backlog per second, so that a backlog is worked off in a few
//!   seconds on top of the live rate (Prometheus takes 5 %; a relay's
//!   backlog is an outage to fill, and the replica's round trip, not its
//!   CPU, is usually what limits it).
//! - `desired = ceil(time_per_sample × rate)`, kept within the replica's
//!   bounds.
//!
//! The count changes only when `desired` is more than 30 % away from the
//! current one (a reshard drains every shard to a common position, which
//! costs a round trip), never downwards while a backlog remains, and not
//! at all in an interval where nothing was stored (the replica is down:
//! its round trip tells nothing, and more shards would not help).

use std::time::Duration;

use crate::types::Shards;

/// What happened in one interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    pub interval: Duration,
    /// Samples the replica stored.
    pub samples_out: u64,
    /// Time spent in the requests that carried them, summed over shards.
    pub busy: Duration,
    /// Records that arrived in the log.
    pub records_in: u64,
    /// Samples per record, as read.
    pub samples_per_record: f64,
    /// Records not yet delivered (the log's head minus the lowest shard's
    /// position).
    pub backlog_records: u64,
}

/// Share of the backlog to work off per second on top of the live rate.
const BACKLOG_PER_SECOND: f64 = 0.2;
/// How far `desired` may stray from the current count before it changes.
const TOLERANCE: f64 = 0.3;

/// The count wanted after `window`, with `current` shards.
pub fn desired(shards: Shards, current: u32, window: &Window) -> u32 {
    let keep = shards.clamp(current);
    let Shards::Adaptive { .. } = shards else {
        return keep;
    };
    let seconds = window.interval.as_secs_f64();
    if seconds <= 0.0 {
        return keep;
    }
    if window.samples_out == 0 {
        // Idle: the fewest. Down (a backlog and nothing stored): as is.
        return if window.backlog_records == 0 && window.records_in == 0 {
            shards.clamp(1)
        } else {
            keep
        };
    }
    let time_per_sample = window.busy.as_secs_f64() / window.samples_out as f64;
    let in_rate = window.records_in as f64 * window.samples_per_record / seconds;
    let backlog = window.backlog_records as f64 * window.samples_per_record;
    let want = time_per_sample * (in_rate + BACKLOG_PER_SECOND * backlog);
    let current_f = f64::from(current.max(1));
    if want > current_f * (1.0 - TOLERANCE) && want < current_f * (1.0 + TOLERANCE) {
        return keep;
    }
    let want = shards.clamp(want.ceil().min(f64::from(u32::MAX)) as u32);
    if want < current && window.backlog_records as f64 * window.samples_per_record > in_rate {
        // Still more than a second behind: not the moment to slow down.
        return keep;
    }
    want
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADAPTIVE: Shards = Shards::Adaptive { min: 1, max: 16 };

    /// One 10 s window: `rate` samples/s in and out at `rtt` per request
    /// of 20,000 samples (one record = 1,000 samples), `backlog` records.
    fn window(rate: f64, rtt: Duration, backlog: u64) -> Window {
        let samples_out = (rate * 10.0) as u64;
        let requests = samples_out as f64 / 20_000.0;
        Window {
            interval: Duration::from_secs(10),
            samples_out,
            busy: rtt.mul_f64(requests),
            records_in: samples_out / 1000,
            samples_per_record: 1000.0,
            backlog_records: backlog,
        }
    }

    #[test]
    fn a_far_replica_at_400k_samples_per_second_gets_enough_shards_to_keep_up() {
        // 100 ms per 20,000 samples: 5 us a sample, 2 shards' worth busy.
        let w = window(400_000.0, Duration::from_millis(100), 0);
        assert_eq!(desired(ADAPTIVE, 1, &w), 2);
    }

    #[test]
    fn a_backlog_asks_for_more_shards_than_the_live_rate() {
        // 11.5M samples behind, a fifth a second = 2.3M/s more: 13.5.
        let w = window(400_000.0, Duration::from_millis(100), 11_500);
        assert_eq!(desired(ADAPTIVE, 2, &w), 14);
    }

    #[test]
    fn a_replica_next_door_needs_one_shard() {
        let w = window(400_000.0, Duration::from_millis(1), 0);
        assert_eq!(desired(ADAPTIVE, 4, &w), 1);
    }

    #[test]
    fn within_thirty_percent_the_count_stays() {
        let w = window(400_000.0, Duration::from_millis(100), 0);
        // 2.0 wanted: 2 stays; from 3 it is more than 30 % below.
        assert_eq!(desired(ADAPTIVE, 2, &w), 2);
        assert_eq!(desired(ADAPTIVE, 3, &w), 2);
        let w = window(560_000.0, Duration::from_millis(100), 0);
        assert_eq!(desired(ADAPTIVE, 3, &w), 3, "2.8 is within 30 % of 3");
    }

    #[test]
    fn a_down_replica_keeps_its_count_and_an_idle_one_goes_to_the_minimum() {
        let mut down = window(0.0, Duration::from_millis(100), 5000);
        down.records_in = 100;
        assert_eq!(desired(ADAPTIVE, 8, &down), 8);
        let idle = window(0.0, Duration::from_millis(100), 0);
        assert_eq!(desired(ADAPTIVE, 8, &idle), 1);
    }

    #[test]
    fn the_count_stays_within_its_bounds_and_a_fixed_count_never_moves() {
        let w = window(4_000_000.0, Duration::from_millis(100), 0);
        assert_eq!(desired(ADAPTIVE, 1, &w), 16);
        let bounded = Shards::Adaptive { min: 2, max: 4 };
        assert_eq!(desired(bounded, 1, &w), 4);
        let slow = window(1000.0, Duration::from_millis(1), 0);
        assert_eq!(desired(bounded, 4, &slow), 2);
        assert_eq!(desired(Shards::Fixed(8), 3, &w), 8);
        assert_eq!(desired(Shards::Fixed(8), 8, &slow), 8);
    }

    #[test]
    fn no_fewer_shards_while_more_than_a_second_behind() {
        // 1 ms round trip would need 1 shard, but 2 s of samples wait.
        let w = window(400_000.0, Duration::from_millis(1), 800);
        assert_eq!(desired(ADAPTIVE, 8, &w), 8);
    }
}
