//! Live-first catch-up: when a replica that accepts out-of-order samples
//! falls far behind, its newest records should not wait behind the whole
//! backlog.
//!
//! A replica set to `catch_up = "live-first"` splits once its lag passes
//! `live_first_after`: the lag is the age of the oldest record it has not
//! received (the relay's receive time, as `lag_seconds` in the status),
//! measured when the shipper takes its next batch. At the split,
//!
//! - the live stream (the replica's ordinary cursor) jumps to the log's
//!   durable end, the head, and delivers what arrives from then on at once;
//! - a second stream, the backfill, delivers `[cursor, head)` in log order.
//!
//! Both are [`super::Shipper`]s over the same replica state, HTTP client and
//! rate limiter, each with one request in flight and its own checkpoint
//! ([`crate::checkpoint::Stream`]): its own position and its own in-flight
//! range, re-sent alone after a crash. The split is one atomic checkpoint
//! write, so a crash leaves either the old cursor or both streams.
//!
//! Rules that keep every range accounted for:
//!
//! - No second split while a backfill runs. If the replica goes away again
//!   during a backfill, both streams retry; the live stream then catches up
//!   in order, and may split again only once the backfill is done (the new
//!   gap starts at the live stream's cursor, so the two never overlap).
//! - Retention holds segments back from the lowest position of both streams
//!   ([`super::ReplicaState::low_water`]), so what the backfill needs stays.
//! - The backfill's remaining range is in the status and in
//!   `walrelay_replica_backfill_remaining_records`; when it reaches its end
//!   its checkpoint is removed.
//! - A backfill found in the store is always finished, even if the replica
//!   was switched back to in-order since: dropping it would lose the range.

use std::ops::Range;
use std::time::Duration;

/// The gap a live-first replica's live stream leaves to a backfill, if it
/// should split now; `None` to go on in order.
///
/// `batch` is the range of the batch just read (its first record was
/// received at `first_receive_ms`), `head` the log's durable end. A split
/// needs live-first (`after` set), no backfill running already, a lag above
/// `after`, and more behind than this one batch: a backlog that one request
/// clears gains nothing from a second stream.
pub(crate) fn split_gap(
    after: Option<Duration>,
    backfill_running: bool,
    now_ms: i64,
    first_receive_ms: i64,
    batch: &Range<u64>,
    head: u64,
) -> Option<Range<u64>> {
    let after = after?;
    if backfill_running || head <= batch.end {
        return None;
    }
    let lag_ms = now_ms.saturating_sub(first_receive_ms);
    let after_ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
    (lag_ms > after_ms).then_some(batch.start..head)
}

/// What the backfill stream does with the item it read next, given the
/// end of its range.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Bound {
    /// Inside the range: use it as it is.
    Inside,
    /// A gap reaching past the end: count only up to the end.
    ClipTo(u64),
    /// At or past the end: the backfill is done.
    Past,
}

/// Where an item starting at `from` and ending before `to_item` stands
/// against a backfill ending before `end`.
pub(crate) fn bound(from: u64, to_item: u64, end: u64) -> Bound {
    if from >= end {
        Bound::Past
    } else if to_item > end {
        Bound::ClipTo(end)
    } else {
        Bound::Inside
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Option<Duration> = Some(Duration::from_secs(30));
    const NOW: i64 = 1_000_000;

    #[test]
    fn a_live_first_replica_splits_once_its_lag_passes_the_threshold() {
        // 31 s behind, with more than this batch to go: split at the head.
        assert_eq!(
            split_gap(AFTER, false, NOW, NOW - 31_000, &(100..150), 900),
            Some(100..900)
        );
    }

    #[test]
    fn a_lag_at_or_below_the_threshold_stays_in_order() {
        assert_eq!(
            split_gap(AFTER, false, NOW, NOW - 30_000, &(100..150), 900),
            None
        );
        assert_eq!(
            split_gap(AFTER, false, NOW, NOW - 1_000, &(100..150), 900),
            None
        );
    }

    #[test]
    fn an_in_order_replica_never_splits() {
        assert_eq!(split_gap(None, false, NOW, 0, &(100..150), 900), None);
    }

    #[test]
    fn no_second_split_while_a_backfill_runs() {
        assert_eq!(
            split_gap(AFTER, true, NOW, NOW - 3_600_000, &(100..150), 900),
            None
        );
    }

    #[test]
    fn a_backlog_that_one_batch_clears_is_not_split() {
        assert_eq!(
            split_gap(AFTER, false, NOW, NOW - 3_600_000, &(100..150), 150),
            None
        );
        assert_eq!(
            split_gap(AFTER, false, NOW, NOW - 3_600_000, &(100..150), 151),
            Some(100..151)
        );
    }

    #[test]
    fn a_receive_time_in_the_future_does_not_split() {
        // A clock stepped back: the lag is negative, not huge.
        assert_eq!(
            split_gap(AFTER, false, NOW, NOW + 60_000, &(100..150), 900),
            None
        );
    }

    #[test]
    fn the_backfill_stops_at_its_end_and_clips_gaps_reaching_past_it() {
        assert_eq!(bound(10, 11, 20), Bound::Inside);
        assert_eq!(bound(19, 20, 20), Bound::Inside);
        assert_eq!(bound(15, 40, 20), Bound::ClipTo(20));
        assert_eq!(bound(20, 21, 20), Bound::Past);
        assert_eq!(bound(25, 30, 20), Bound::Past);
    }
}
