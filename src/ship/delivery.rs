//! The delivery core that a replica's shipper and `walrelay wal replay`
//! share: coalescing records into a batch, reading a range of the log with
//! the gaps inside it, building a request, sending it, and what each answer
//! means for its records ([`super::policy`]): 413 and timeouts split the
//! request, a refused request of several records is re-sent record by
//! record, and the range that was in flight when a run stopped is re-sent
//! on its own first.
//!
//! What a delivery leaves behind is its caller's: a [`Ledger`]. The
//! shipper's checkpoints every request's range before sending it, moves the
//! replica's cursor and counts into the replica's status and metrics
//! ([`super::Shipper`]); `wal replay`'s writes its resumable journal, paces
//! itself and counts into its report. Both send through a [`Link`], whose
//! [`Sender`] reports each attempt to an observer of the caller's
//! ([`super::send::SendObserver`]).

use std::ops::{ControlFlow, Range};
use std::sync::Arc;

use prom_remote_write::Dropped;
use wal_format::{PayloadKind, Record};

use super::payload::{self, BodyBuilder};
use super::send::{Body, Outcome, SendObserver, Sender, WrittenCounts};
use crate::types::ReplicaProtocol;
use crate::wal::{Gap, ReadItem, Wal, WalError};

/// Limits of one coalesced request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_samples: u64,
    pub max_bytes: usize,
}

/// The running size of a batch being gathered, and the rule for what may
/// join it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchFill {
    pub(crate) samples: u64,
    pub(crate) bytes: usize,
    kind: PayloadKind,
}

impl BatchFill {
    pub(crate) fn new(first: &Record) -> Self {
        BatchFill {
            samples: u64::from(first.meta.samples),
            bytes: payload::decoded_len(first),
            kind: first.meta.kind,
        }
    }

    /// Whether more records may still be looked for.
    pub(crate) fn has_room(&self, limits: BatchLimits) -> bool {
        self.samples < limits.max_samples && self.bytes < limits.max_bytes
    }

    /// Takes `r` into the batch if it fits the limits and may share a
    /// request with the batch's records ([`payload::same_request`]).
    pub(crate) fn take(
        &mut self,
        r: &Record,
        limits: BatchLimits,
        protocol: ReplicaProtocol,
    ) -> bool {
        let samples = self.samples + u64::from(r.meta.samples);
        let bytes = self.bytes + payload::decoded_len(r);
        if samples > limits.max_samples
            || bytes > limits.max_bytes
            || !payload::same_request(protocol, self.kind, r.meta.kind)
        {
            return false;
        }
        self.samples = samples;
        self.bytes = bytes;
        true
    }
}

/// What an earlier attempt may have done with the records being delivered:
/// decides what a data refusal of them means ([`super::policy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resend {
    /// Never sent: a refusal is about their data.
    No,
    /// Part of a request an earlier attempt of which may have been stored:
    /// a refusal of a single record means it most likely was; several are
    /// re-sent one by one.
    MaybeStored,
    /// Exactly the request that was in flight when the last run stopped: a
    /// refusal means it was stored.
    Exact,
}

impl Resend {
    /// What a part of these records is: a part of the request in flight
    /// is not that request.
    pub(crate) fn part(self) -> Resend {
        match self {
            Resend::Exact => Resend::MaybeStored,
            other => other,
        }
    }
}

/// A target's client and what its requests are built with.
pub(crate) struct Link {
    pub(crate) sender: Sender,
    /// What the target is sent; decides the request format.
    pub(crate) protocol: ReplicaProtocol,
    /// Buffers for request bodies, kept between requests.
    pub(crate) builder: BodyBuilder,
    /// Told about every attempt the sender makes.
    pub(crate) observer: Arc<dyn SendObserver>,
}

impl Link {
    pub(crate) fn new(
        sender: Sender,
        protocol: ReplicaProtocol,
        observer: Arc<dyn SendObserver>,
    ) -> Self {
        Link {
            sender,
            protocol,
            builder: BodyBuilder::default(),
            observer,
        }
    }
}

/// One request about to be sent: consecutive records of the log (gaps
/// aside), in log order.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    /// From its first record to one past its last.
    pub(crate) range: Range<u64>,
    pub(crate) records: u64,
    /// Samples and histograms.
    pub(crate) samples: u64,
    /// Decoded bytes of its records.
    pub(crate) bytes: u64,
    /// When the relay received its first record (unix ms).
    pub(crate) first_received_ms: i64,
}

impl Request {
    fn of(records: &[Record]) -> Option<Request> {
        let (first, last) = (records.first()?, records.last()?);
        Some(Request {
            range: first.seq..last.seq + 1,
            records: records.len() as u64,
            samples: records.iter().map(|r| u64::from(r.meta.samples)).sum(),
            bytes: records.iter().map(|r| payload::decoded_len(r) as u64).sum(),
            first_received_ms: first.meta.receive_time_ms,
        })
    }
}

/// How the records of a request are done with.
#[derive(Debug)]
pub(crate) enum Done {
    /// The target stored them. `slow`: it answered only after the send
    /// timeout, so later requests should be smaller. `dropped`: what the
    /// translation to 1.0 could not carry.
    Delivered { slow: bool, dropped: Dropped },
    /// The target refused them after an attempt that may have stored them
    /// (the exact request in flight before a restart, or one record of a
    /// request that timed out): most likely it had them already.
    AlreadyDelivered,
    /// The target refused the data of this one record (`status`, with its
    /// answer): it is skipped and counted as rejected.
    Rejected { status: u16, body: String },
    /// This one record cannot be turned into a request (it passed its
    /// checksum but does not decode): it is skipped.
    Undecodable { error: String },
}

/// The caller's side of a delivery: where it stands, what it counts, how it
/// paces itself. See the module documentation.
pub(crate) trait Ledger {
    /// Names the target in logs.
    fn name(&self) -> &str;
    /// The target's client and body builder.
    fn link(&mut self) -> &mut Link;
    /// Before each request: waits for the caller's pace, then records the
    /// request's range as the one in flight (what a restart re-sends on its
    /// own). `Break`: the request must not be sent (the caller could not
    /// record it); the delivery stops.
    async fn begin(&mut self, request: &Request) -> ControlFlow<()>;
    /// The request was answered or given up, whatever the outcome.
    fn end(&mut self);
    /// The records of `request` are done with, as `how` says; everything
    /// before them in the delivery is done too.
    async fn done(&mut self, request: &Request, how: Done);
    /// A request of several records is split in halves (`reason`:
    /// `"too_large"` or `"timeout"`).
    fn split(&mut self, reason: &'static str);
    /// The target refused the request for a reason that is not about the
    /// data for the sender's limit of attempts (only for a sender given
    /// one); nothing was stored.
    fn blocked(&mut self, reason: String);
    /// Whether the delivery stops here (a caller that gave up): the records
    /// not done stay where they are.
    fn stopped(&self) -> bool;
}

/// Delivers `records` (in log order): each is delivered, or refused on its
/// own by the target, or cannot be made into a request, and the ledger is
/// told which ([`Ledger::done`]). `resend` says what an earlier attempt may
/// have done with them.
pub(crate) async fn deliver<L: Ledger>(ledger: &mut L, records: Vec<Record>, resend: Resend) {
    if ledger.stopped() {
        return;
    }
    let Some(request) = Request::of(&records) else {
        return;
    };
    // Batches are cut where the kind changes, but a request re-sent after a
    // restart was batched under the settings of then: with the target
    // switched to 2.0 since, it can mix kinds. Its parts go in order; a part
    // is not the request that was in flight.
    if let Some(cut) = kind_cut(ledger.link().protocol, &records) {
        let mut head = records;
        let tail = head.split_off(cut);
        Box::pin(deliver(ledger, head, resend.part())).await;
        Box::pin(deliver(ledger, tail, resend.part())).await;
        return;
    }
    let range = request.range.clone();
    let built = {
        let link = ledger.link();
        link.builder.build(&records, link.protocol)
    };
    let built = match built {
        Ok(built) => built,
        Err(e) if records.len() == 1 => {
            tracing::error!(replica = %ledger.name(), seq = range.start, error = %e,
                "a record in the log cannot be turned into a request (it passed its \
                 checksum but does not decode); skipping it");
            let error = e.to_string();
            ledger.done(&request, Done::Undecodable { error }).await;
            return;
        }
        Err(_) => {
            // Find the record that cannot be built; send the others.
            for r in records {
                Box::pin(deliver(ledger, vec![r], resend.part())).await;
            }
            return;
        }
    };
    // Waited out before the in-flight range is recorded, so that the range
    // marked in flight is one that is really being sent.
    if ledger.begin(&request).await.is_break() {
        return;
    }
    let body = Body {
        bytes: built.body,
        protocol: built.protocol,
        samples: request.samples,
        sent: built.sent.map(|s| WrittenCounts {
            samples: s.samples,
            histograms: s.histograms,
            exemplars: s.exemplars,
        }),
    };
    let outcome = {
        let link = ledger.link();
        let splittable = records.len() > 1;
        link.sender
            .send_with_retries(&*link.observer, body, splittable)
            .await
    };
    ledger.end();
    match outcome {
        Outcome::Delivered { slow } => {
            let dropped = built.dropped;
            ledger
                .done(&request, Done::Delivered { slow, dropped })
                .await;
        }
        Outcome::Refused { status, body, .. } if resend == Resend::Exact => {
            // The request that was in flight when the last run stopped,
            // refused whole: its earlier attempt was stored, and the target
            // refuses samples older than what it holds.
            tracing::info!(replica = %ledger.name(), from = range.start, to = range.end, status,
                body = %body, "re-sent request refused: the replica already had it");
            ledger.done(&request, Done::AlreadyDelivered).await;
        }
        Outcome::Refused {
            status,
            body,
            ambiguous,
        } if records.len() == 1 => {
            if ambiguous || resend == Resend::MaybeStored {
                tracing::info!(replica = %ledger.name(), seq = range.start, status, body = %body,
                    "record refused after an attempt that may have stored it: most likely \
                     the replica already had it");
                ledger.done(&request, Done::AlreadyDelivered).await;
            } else {
                tracing::warn!(replica = %ledger.name(), seq = range.start, status, body = %body,
                    "replica refused the record's data; skipping it");
                ledger.done(&request, Done::Rejected { status, body }).await;
            }
        }
        Outcome::Refused {
            status, ambiguous, ..
        } => {
            tracing::info!(replica = %ledger.name(), from = range.start, to = range.end, status,
                "replica refused a request of several records; re-sending them one by one");
            let each = if ambiguous {
                Resend::MaybeStored
            } else {
                resend.part()
            };
            for r in records {
                Box::pin(deliver(ledger, vec![r], each)).await;
            }
        }
        Outcome::TooLarge { body } if records.len() == 1 => {
            tracing::warn!(replica = %ledger.name(), seq = range.start, body = %body,
                "replica refused a single record as too large (413); skipping it");
            let how = Done::Rejected { status: 413, body };
            ledger.done(&request, how).await;
        }
        Outcome::TooLarge { .. } => {
            tracing::info!(replica = %ledger.name(), from = range.start, to = range.end,
                "replica refused the request as too large (413); splitting it");
            split(ledger, records, "too_large", resend.part()).await;
        }
        Outcome::Blocked { reason } => {
            // Only a sender given a limit of blocked attempts returns this
            // (`wal replay`, which stops); for any other, the records are
            // sent again.
            ledger.blocked(reason);
            Box::pin(deliver(ledger, records, resend)).await;
        }
        Outcome::TooSlow => {
            // Smaller requests may get through where this one times out.
            // Its attempts may have been stored.
            tracing::info!(replica = %ledger.name(), from = range.start, to = range.end,
                "request timed out; splitting it and sending smaller requests");
            split(ledger, records, "timeout", Resend::MaybeStored).await;
        }
    }
}

/// Delivers the two halves of `records` in order.
async fn split<L: Ledger>(
    ledger: &mut L,
    mut records: Vec<Record>,
    reason: &'static str,
    resend: Resend,
) {
    ledger.split(reason);
    let second = records.split_off(records.len() / 2);
    Box::pin(deliver(ledger, records, resend)).await;
    Box::pin(deliver(ledger, second, resend)).await;
}

/// Where `records` must be split so that no request to a target speaking
/// `protocol` mixes kinds ([`payload::same_request`]); `None` when they can
/// go together.
pub(crate) fn kind_cut(protocol: ReplicaProtocol, records: &[Record]) -> Option<usize> {
    let first = records.first()?.meta.kind;
    records
        .iter()
        .position(|r| !payload::same_request(protocol, first, r.meta.kind))
}

/// What the log holds of a range of sequence numbers.
#[derive(Debug, Default)]
pub(crate) struct RangeRead {
    /// Its records, in order.
    pub(crate) records: Vec<Record>,
    /// The parts of the range the log cannot provide, in order.
    pub(crate) gaps: Vec<Gap>,
}

impl RangeRead {
    /// What the records read are, when the range is the request that was in
    /// flight when the last run stopped, re-sent on its own: that request
    /// only when the log still holds all of it; with records of it missing,
    /// a refusal of the rest proves nothing.
    pub(crate) fn resend(&self) -> Resend {
        if self.gaps.iter().any(|g| g.to > g.from) {
            Resend::MaybeStored
        } else {
            Resend::Exact
        }
    }
}

/// Reads the records of `range` still in the log, and the gaps inside it
/// (damage, retention, and the part past the end of the log).
///
/// # Errors
/// An I/O error reading the log: it is not the end of the range (the
/// shipper retries, `wal replay` stops).
pub(crate) fn read_range(wal: &Wal, range: Range<u64>) -> Result<RangeRead, WalError> {
    let mut reader = wal.reader(range.start);
    let mut read = RangeRead::default();
    while let Some(item) = reader.try_next()? {
        match item {
            ReadItem::Record(r) if r.seq < range.end => read.records.push(r),
            ReadItem::Gap(mut g) if g.from < range.end => {
                g.to = g.to.min(range.end);
                read.gaps.push(g);
            }
            _ => break,
        }
    }
    // The log ends inside the range: what is missing there was never
    // durable (or was cut as a torn tail).
    let read_to = read
        .records
        .last()
        .map(|r| r.seq + 1)
        .into_iter()
        .chain(read.gaps.iter().map(|g| g.to))
        .max()
        .unwrap_or(range.start);
    if read_to < range.end {
        read.gaps.push(Gap {
            from: read_to,
            to: range.end,
            file: None,
            offset: None,
            reason: "records past the end of the log".into(),
            error_code: "not_in_log",
        });
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn record(seq: u64, kind: PayloadKind) -> Record {
        super::super::test_record(seq, kind, 1, vec![0u8; 10])
    }

    #[test]
    fn a_mixed_resend_to_a_2_0_replica_is_cut_at_each_kind_change() {
        use PayloadKind::{RemoteWriteV1 as V1, RemoteWriteV2 as V2};
        let records: Vec<Record> = [V1, V1, V2, V1]
            .iter()
            .enumerate()
            .map(|(i, &k)| record(i as u64, k))
            .collect();
        assert_eq!(kind_cut(ReplicaProtocol::V2, &records), Some(2));
        assert_eq!(kind_cut(ReplicaProtocol::V2, &records[2..]), Some(1));
        assert_eq!(kind_cut(ReplicaProtocol::V2, &records[3..]), None);
        assert_eq!(kind_cut(ReplicaProtocol::V1, &records), None);
        assert_eq!(kind_cut(ReplicaProtocol::V2, &[]), None);
    }
}
