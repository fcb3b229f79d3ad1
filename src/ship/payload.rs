//! Building one remote-write request from consecutive log records.
//!
//! 1.0 requests: concatenated encodings of 1.0 `WriteRequest` messages are
//! themselves one valid `WriteRequest` (protobuf merges repeated fields by
//! appending), so coalescing 1.0 records costs a copy, not a decode. 2.0
//! records are translated to 1.0 (symbol table to labels) for replicas that
//! speak 1.0, and what 1.0 cannot carry is counted in [`Built::dropped`].
//!
//! 2.0 requests (only for replicas set to `protocol = "2.0"`, and only from
//! 2.0 records; see [`same_request`]): each 2.0 message indexes its own
//! symbol table, so the records cannot be concatenated. They are merged into
//! one request with one rebuilt symbol table
//! ([`prom_remote_write::encode::merge_v2_bytes`]) rather than sent one
//! record per request: a shipper has one request in flight (log order, see
//! the module above), so one request per record would cap a 2.0 replica at
//! one sender batch per round trip.
//!
//! # Memory and CPU
//!
//! Translation and merging read the records where they lie
//! ([`prom_remote_write::translate::v2_to_v1_into`]): a record is never
//! decoded into owned structs, which took about 27 bytes of memory per byte
//! of a record of millions of tiny series. They need an index of the
//! symbols (at most 1/16 byte per byte of record), one entry per metric
//! family with metadata (translation) or per distinct symbol (merging),
//! whatever the number of series.
//!
//! The request is compressed as it is made
//! ([`prom_remote_write::sink::SnappyWriter`], 64 KiB at a time, the same
//! bytes as compressing it whole): it is never held uncompressed, which
//! matters because it can be larger than its records (1.0 spells out every
//! label that 2.0 refers to by number: 2.8 times for a record of one-label
//! series, and ingest allows up to 4 times `--max-decoded-bytes` of label
//! bytes). A build takes at most twice the compressed body (the blocks as
//! they are compressed, then the body they are copied into, of its exact
//! size), plus about 250 KiB: the 64 KiB window of the compressor, its
//! block buffer and table, and one nested message of at most 64 KiB of the
//! re-encoding. The body is handed to the request, not kept: between
//! requests a builder keeps only the constant part (170 KiB), whatever the
//! size of the largest request it ever built (`benches/README.md` has the
//! figures).
//!
//! Building a request of a few MiB takes milliseconds, and the shippers run
//! on the async runtime's workers: a build of more than
//! [`BLOCK_IN_PLACE_BYTES`] of records runs in [`tokio::task::block_in_place`]
//! when on a multi-threaded runtime, so that the worker's other tasks (the
//! other replicas' shippers, ingest, health) move to another thread instead
//! of waiting for it. Compressing as the request is made takes the same CPU
//! as compressing it afterwards, so this is as needed as before.

use bytes::Bytes;
use prom_remote_write::decode::Summary;
use prom_remote_write::sink::{Sink, SnappyWriter};
use prom_remote_write::translate::CheckedV2;
use prom_remote_write::{encode, translate, Dropped, Protocol};
use wal_format::{PayloadEncoding, PayloadKind, Record};

use crate::types::ReplicaProtocol;

/// Why a record could not be turned into a request. The record was validated
/// at ingest, so this means damage that the checksums did not catch (or, for
/// `MixedKinds`, a batch the shipper should not have made).
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("record {seq}: bad snappy payload: {message}")]
    Snappy { seq: u64, message: String },
    #[error("record {seq}: bad 2.0 payload: {message}")]
    V2 { seq: u64, message: String },
    #[error("records {first}..={last}: 1.0 and 2.0 records in one 2.0 request")]
    MixedKinds { first: u64, last: u64 },
}

/// Whether a record of kind `next` may join a request whose first record is
/// of kind `first`, for a replica speaking `protocol`.
///
/// To a 1.0 replica every record becomes 1.0, so kinds mix freely. To a 2.0
/// replica a request is either 2.0 records as they are, or 1.0 records as a
/// 1.0 request (with the 1.0 headers): one request has one content type, so
/// the batch is cut where the kind changes.
pub fn same_request(protocol: ReplicaProtocol, first: PayloadKind, next: PayloadKind) -> bool {
    match protocol {
        ReplicaProtocol::V1 => true,
        ReplicaProtocol::V2 => first == next,
    }
}

/// The protocol of the request made of records starting with a `first`
/// record, for a replica speaking `protocol`.
pub fn request_protocol(protocol: ReplicaProtocol, first: PayloadKind) -> Protocol {
    match (protocol, first) {
        (ReplicaProtocol::V2, PayloadKind::RemoteWriteV2) => Protocol::V2,
        _ => Protocol::V1,
    }
}

/// A request body and what it carries.
#[derive(Debug, Clone)]
pub struct Built {
    /// Snappy-compressed protobuf.
    pub body: Bytes,
    /// Which message `body` is (decides the request headers).
    pub protocol: Protocol,
    /// What translation to 1.0 could not carry (always zero for 2.0).
    pub dropped: Dropped,
    /// For 2.0 requests: float samples, histograms and exemplars in it, to
    /// compare with the replica's `X-Prometheus-Remote-Write-*-Written`.
    pub sent: Option<Summary>,
    /// It carries nothing (no series, no metadata): a shard none of whose
    /// series are in the records. Never true for the whole request.
    pub empty: bool,
}

/// Which part of the records' series a request carries: those of shard
/// `index` of `of` ([`prom_remote_write::shard`]). [`Shard::WHOLE`] is
/// every series, the request built without looking at them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub of: u32,
}

impl Shard {
    /// All of the series: one shard.
    pub const WHOLE: Shard = Shard { index: 0, of: 1 };

    fn is_whole(self) -> bool {
        self.of <= 1
    }
}

/// Records above this many bytes are built in
/// [`tokio::task::block_in_place`] (a millisecond or more of CPU).
pub const BLOCK_IN_PLACE_BYTES: usize = 1 << 20;

/// The snappy-compressed 1.0 request body for `records`.
///
/// # Errors
/// A record's payload cannot be decoded.
pub fn build_v1(records: &[Record]) -> Result<Bytes, PayloadError> {
    BodyBuilder::default().build_v1(records)
}

/// Builds request bodies, compressing them as they are made (see the module
/// docs). The compressor's fixed buffers are kept from one request to the
/// next; the body's buffer is not.
#[derive(Default)]
pub struct BodyBuilder {
    snappy: SnappyWriter,
}

impl BodyBuilder {
    /// Heap bytes of the buffers it keeps between requests (besides the
    /// snappy encoder's 32 KiB table): a constant, whatever it built.
    pub fn buffered_bytes(&self) -> usize {
        self.snappy.buffered_bytes()
    }

    /// As [`build_v1`].
    ///
    /// # Errors
    /// A record's payload cannot be decoded.
    pub fn build_v1(&mut self, records: &[Record]) -> Result<Bytes, PayloadError> {
        Ok(self.build(records, ReplicaProtocol::V1)?.body)
    }

    /// The request for `records` to a replica speaking `protocol`: 2.0 when
    /// the replica speaks 2.0 and the records are 2.0, else 1.0. Off the
    /// async worker when large (see the module docs).
    ///
    /// # Errors
    /// A record's payload cannot be decoded, or a 2.0 request would mix
    /// kinds (see [`same_request`]).
    pub fn build(
        &mut self,
        records: &[Record],
        protocol: ReplicaProtocol,
    ) -> Result<Built, PayloadError> {
        self.build_shard(records, protocol, Shard::WHOLE)
    }

    /// [`Self::build`] of the series of `shard` only. With
    /// [`Shard::WHOLE`], the same bytes as [`Self::build`].
    ///
    /// # Errors
    /// As [`Self::build`].
    pub fn build_shard(
        &mut self,
        records: &[Record],
        protocol: ReplicaProtocol,
        shard: Shard,
    ) -> Result<Built, PayloadError> {
        let kind = records
            .first()
            .map_or(PayloadKind::RemoteWriteV1, |r| r.meta.kind);
        let wire = request_protocol(protocol, kind);
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread && build_work(records, wire, shard) > BLOCK_IN_PLACE_BYTES {
            tokio::task::block_in_place(|| self.build_here(records, wire, shard))
        } else {
            self.build_here(records, wire, shard)
        }
    }

    /// Builds the request, as `wire` (see [`request_protocol`]).
    fn build_here(
        &mut self,
        records: &[Record],
        wire: Protocol,
        shard: Shard,
    ) -> Result<Built, PayloadError> {
        let first_seq = records.first().map_or(0, |r| r.seq);
        self.snappy.begin();
        let made = match wire {
            Protocol::V1 => append_v1(records, shard, &mut self.snappy).map(|d| (d, None)),
            Protocol::V2 => {
                append_v2(records, shard, &mut self.snappy).map(|s| (Dropped::default(), Some(s)))
            }
        };
        let empty = !shard.is_whole()
            && match &made {
                Ok((_, Some(summary))) => summary.series == 0,
                _ => self.snappy.is_empty(),
            };
        let finished = made.and_then(|made| {
            let body = self.snappy.finish().map_err(|e| PayloadError::Snappy {
                seq: first_seq,
                message: e.to_string(),
            })?;
            Ok((made, body))
        });
        // On an error, what was compressed is not kept until the next request.
        let ((dropped, sent), body) = finished.inspect_err(|_| self.snappy.begin())?;
        Ok(Built {
            body,
            protocol: wire,
            dropped,
            sent,
            empty,
        })
    }
}

/// Whether [`append_v1`] puts `r` into a request as the sender's own
/// snappy body, its compressed elements copied as they are.
fn spliced(r: &Record, shard: Shard) -> bool {
    r.meta.kind == PayloadKind::RemoteWriteV1
        && r.meta.encoding == PayloadEncoding::Snappy
        && shard.is_whole()
}

/// The bytes a build of `records` as `wire` works through, for the choice of
/// [`tokio::task::block_in_place`]: a spliced record's compressed bytes
/// (copied, at least as cheap per byte as compressing), any other record's
/// decoded bytes (decoded and compressed). Counting spliced records decoded
/// sent every full request of a busy replica (20,000 samples, a few MiB
/// decoded, built in tens of µs) through a hand-off of the worker to
/// another thread.
fn build_work(records: &[Record], wire: Protocol, shard: Shard) -> usize {
    let v1 = wire == Protocol::V1;
    records
        .iter()
        .map(|r| {
            if v1 && spliced(r, shard) {
                r.payload.len()
            } else {
                decoded_len(r)
            }
        })
        .sum()
}

/// A stored record's payload as the protobuf message it holds (1.0 or
/// 2.0, as its kind says): [`crate::wal::message::of`], its error named
/// with the record. What the shippers' builds, `wal dump` and `wal verify`
/// start from.
///
/// # Errors
/// A snappy payload that does not decompress, or declares more than a
/// record may hold.
pub fn protobuf(r: &Record) -> Result<std::borrow::Cow<'_, [u8]>, PayloadError> {
    crate::wal::message::of(r).map_err(|e| PayloadError::Snappy {
        seq: r.seq,
        message: e.to_string(),
    })
}

/// The size of a record's protobuf message, however it is held: what the
/// batch limits and rate limits count.
pub fn decoded_len(r: &Record) -> usize {
    match r.meta.encoding {
        PayloadEncoding::Identity => r.payload.len(),
        // Read from the header; a header that does not parse counts as
        // stored (the build then reports the record).
        PayloadEncoding::Snappy => snap::raw::decompress_len(&r.payload).unwrap_or(r.payload.len()),
    }
}

/// Writes the 1.0 encoding of `records` into `out`; returns what
/// translating 2.0 records dropped.
fn append_v1(
    records: &[Record],
    shard: Shard,
    out: &mut dyn Sink,
) -> Result<Dropped, PayloadError> {
    let mut dropped = Dropped::default();
    for r in records {
        if spliced(r, shard) {
            // The sender's own compressed body (records in the writer's
            // tail cache): its elements go into the request as they are.
            out.put_snappy(&r.payload)
                .map_err(|e| PayloadError::Snappy {
                    seq: r.seq,
                    message: e.to_string(),
                })?;
            continue;
        }
        let bytes = protobuf(r)?;
        match r.meta.kind {
            PayloadKind::RemoteWriteV1 if shard.is_whole() => encode::concat_v1(&[&bytes], out),
            PayloadKind::RemoteWriteV1 => {
                prom_remote_write::shard::filter_v1(&bytes, shard.index, shard.of, out);
            }
            PayloadKind::RemoteWriteV2 => {
                let v2_error = |e: prom_remote_write::DecodeError| PayloadError::V2 {
                    seq: r.seq,
                    message: e.to_string(),
                };
                let req = CheckedV2::new(&bytes).map_err(v2_error)?;
                let d = if shard.is_whole() {
                    translate::v2_to_v1_into(&req, out)
                } else {
                    translate::v2_to_v1_shard_into(&req, shard.index, shard.of, out)
                }
                .map_err(v2_error)?;
                dropped.created_timestamps += d.created_timestamps;
                dropped.metadata += d.metadata;
            }
        }
    }
    Ok(dropped)
}

/// Writes one 2.0 request merging the 2.0 `records` into `out`; returns
/// what it carries.
fn append_v2(
    records: &[Record],
    shard: Shard,
    out: &mut dyn Sink,
) -> Result<Summary, PayloadError> {
    let seq = records.first().map_or(0, |r| r.seq);
    let v2_error = |seq: u64, e: prom_remote_write::DecodeError| PayloadError::V2 {
        seq,
        message: e.to_string(),
    };
    let mut plains = Vec::with_capacity(records.len());
    for r in records {
        if r.meta.kind != PayloadKind::RemoteWriteV2 {
            return Err(PayloadError::MixedKinds {
                first: seq,
                last: records.last().map_or(0, |r| r.seq),
            });
        }
        plains.push((r.seq, protobuf(r)?));
    }
    let parts = plains
        .iter()
        .map(|(seq, bytes)| CheckedV2::new(bytes).map_err(|e| v2_error(*seq, e)))
        .collect::<Result<Vec<_>, _>>()?;
    if !shard.is_whole() {
        return encode::shard_v2_into(&parts, shard.index, shard.of, out)
            .map_err(|e| v2_error(seq, e));
    }
    if let [one] = parts.as_slice() {
        // One record needs no merge: its bytes go exactly as the sender
        // wrote them.
        out.put(one.bytes());
        return Ok(one.summary());
    }
    encode::merge_v2_into(&parts, out).map_err(|e| v2_error(seq, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use prom_remote_write::{v2, Summary};
    use prost::Message;
    use wal_format::RecordMeta;

    fn record(seq: u64, len: usize) -> Record {
        // A 1.0 WriteRequest with one series (one label) per record.
        let name = vec![b'x'; len];
        let mut label = vec![0x0a, 0x08];
        label.extend_from_slice(b"__name__");
        label.push(0x12);
        prost::encoding::encode_varint(name.len() as u64, &mut label);
        label.extend_from_slice(&name);
        let mut series = vec![0x0a];
        prost::encoding::encode_varint(label.len() as u64, &mut series);
        series.extend_from_slice(&label);
        let mut body = vec![0x0a];
        prost::encoding::encode_varint(series.len() as u64, &mut body);
        body.extend_from_slice(&series);
        super::super::test_record(seq, PayloadKind::RemoteWriteV1, 1, body)
    }

    /// `r` as the writer's tail cache holds a 1.0 record: the body its
    /// sender sent, snappy-compressed.
    fn as_received(r: &Record) -> Record {
        let mut wire = r.clone();
        wire.payload = Bytes::from(prom_remote_write::encode::snappy_compress(&r.payload));
        wire.meta.encoding = PayloadEncoding::Snappy;
        wire
    }

    #[test]
    fn records_held_as_received_go_into_a_1_0_request_as_they_would_decoded() {
        let records: Vec<Record> = (0..6)
            .map(|i| record(i, 10 + 40_000 * i as usize))
            .collect();
        // Mixed: some from the tail cache, some read from disk.
        let mixed: Vec<Record> = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                if i % 3 == 1 {
                    r.clone()
                } else {
                    as_received(r)
                }
            })
            .collect();
        let want = unsnappy(&build_v1(&records).unwrap());
        for protocol in [ReplicaProtocol::V1, ReplicaProtocol::V2] {
            let built = BodyBuilder::default().build(&mixed, protocol).unwrap();
            assert_eq!(built.protocol, Protocol::V1);
            assert_eq!(unsnappy(&built.body), want, "{protocol:?}");
        }
        // A shard of them is cut from the decoded records, as before.
        let shard = Shard { index: 0, of: 2 };
        let cut = |rs: &[Record]| {
            let b = BodyBuilder::default()
                .build_shard(rs, ReplicaProtocol::V1, shard)
                .unwrap();
            unsnappy(&b.body)
        };
        assert_eq!(cut(&mixed), cut(&records));
        let sizes: Vec<usize> = mixed.iter().map(decoded_len).collect();
        let stored: Vec<usize> = records.iter().map(|r| r.payload.len()).collect();
        assert_eq!(sizes, stored, "limits count the decoded size");
    }

    /// What decides `block_in_place`: records spliced as received weigh
    /// their compressed bytes; decoded ones, or any record cut into a
    /// shard, their decoded bytes.
    #[test]
    fn the_work_of_a_build_counts_spliced_records_as_copied() {
        let decoded = vec![record(1, 300_000), record(2, 300_000)];
        let received: Vec<Record> = decoded.iter().map(as_received).collect();
        let decoded_bytes: usize = decoded.iter().map(decoded_len).sum();
        let copied: usize = received.iter().map(|r| r.payload.len()).sum();
        assert!(copied * 10 < decoded_bytes, "{copied} of {decoded_bytes}");
        for protocol in [ReplicaProtocol::V1, ReplicaProtocol::V2] {
            let wire = request_protocol(protocol, PayloadKind::RemoteWriteV1);
            assert_eq!(build_work(&received, wire, Shard::WHOLE), copied);
            assert_eq!(build_work(&decoded, wire, Shard::WHOLE), decoded_bytes);
        }
        let shard = Shard { index: 0, of: 2 };
        assert_eq!(build_work(&received, Protocol::V1, shard), decoded_bytes);
    }

    #[test]
    fn a_reused_builder_builds_what_a_fresh_one_does() {
        let mut b = BodyBuilder::default();
        // Growing, shrinking, and one request large enough to be given back.
        for (n, len) in [(3, 100), (1, 10), (20, 1000), (1, 5 << 20), (2, 7)] {
            let records: Vec<Record> = (0..n).map(|i| record(i, len + i as usize)).collect();
            let body = b.build_v1(&records).unwrap();
            let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
            let req = prom_remote_write::decode::decode_v1(&raw).unwrap();
            assert_eq!(req.timeseries.len(), n as usize);
            assert_eq!(body, build_v1(&records).unwrap());
        }
    }

    fn v2_record(seq: u64, name: &str, ts: i64) -> Record {
        use prom_remote_write::v2::*;
        let req = Request {
            symbols: vec![
                String::new(),
                "__name__".into(),
                name.into(),
                "trace_id".into(),
                format!("t{seq}"),
            ],
            timeseries: vec![
                TimeSeries {
                    labels_refs: vec![1, 2],
                    samples: vec![Sample {
                        value: 1.5,
                        timestamp: ts,
                    }],
                    exemplars: vec![Exemplar {
                        labels_refs: vec![3, 4],
                        value: 1.5,
                        timestamp: ts,
                    }],
                    created_timestamp: ts - 500,
                    ..Default::default()
                },
                TimeSeries {
                    labels_refs: vec![1, 2, 3, 4],
                    histograms: vec![Histogram {
                        count: Some(histogram::Count::CountInt(2)),
                        sum: 3.0,
                        schema: 0,
                        zero_count: Some(histogram::ZeroCount::ZeroCountInt(0)),
                        positive_spans: vec![BucketSpan {
                            offset: 0,
                            length: 1,
                        }],
                        positive_deltas: vec![2],
                        timestamp: ts,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
        };
        Record {
            seq,
            meta: RecordMeta {
                receive_time_ms: 0,
                min_sample_ts: ts,
                max_sample_ts: ts,
                samples: 2,
                kind: PayloadKind::RemoteWriteV2,
                encoding: PayloadEncoding::Identity,
            },
            payload: Bytes::from(req.encode_to_vec()),
        }
    }

    fn unsnappy(b: &[u8]) -> Vec<u8> {
        snap::raw::Decoder::new().decompress_vec(b).unwrap()
    }

    #[test]
    fn one_2_0_record_goes_to_a_2_0_replica_byte_for_byte() {
        let r = v2_record(7, "m", 1000);
        let built = BodyBuilder::default()
            .build(std::slice::from_ref(&r), ReplicaProtocol::V2)
            .unwrap();
        assert_eq!(built.protocol, Protocol::V2);
        assert_eq!(unsnappy(&built.body), r.payload.to_vec());
        let sent = built.sent.unwrap();
        assert_eq!((sent.samples, sent.histograms, sent.exemplars), (1, 1, 1));
        assert_eq!(built.dropped, Dropped::default(), "nothing dropped in 2.0");
    }

    #[test]
    fn several_2_0_records_become_one_2_0_request_with_one_symbol_table() {
        let records = [v2_record(1, "a", 1000), v2_record(2, "b", 2000)];
        let built = BodyBuilder::default()
            .build(&records, ReplicaProtocol::V2)
            .unwrap();
        assert_eq!(built.protocol, Protocol::V2);
        let req = prom_remote_write::decode::decode_v2(&unsnappy(&built.body)).unwrap();
        assert_eq!(req.timeseries.len(), 4);
        assert_eq!(req.timeseries[0].created_timestamp, 500);
        assert_eq!(req.timeseries[1].created_timestamp, 0);
        assert_eq!(req.timeseries[2].created_timestamp, 1500);
        let sent = built.sent.unwrap();
        assert_eq!((sent.samples, sent.histograms, sent.exemplars), (2, 2, 2));
    }

    #[test]
    fn to_a_1_0_replica_2_0_records_are_translated_and_the_losses_counted() {
        let records = [
            record(0, 10),
            v2_record(1, "a", 1000),
            v2_record(2, "b", 2000),
        ];
        let built = BodyBuilder::default()
            .build(&records, ReplicaProtocol::V1)
            .unwrap();
        assert_eq!(built.protocol, Protocol::V1);
        assert!(built.sent.is_none());
        assert_eq!(built.dropped.created_timestamps, 2);
        let req = prom_remote_write::decode::decode_v1(&unsnappy(&built.body)).unwrap();
        assert_eq!(req.timeseries.len(), 5);
        assert_eq!(req.timeseries[1].exemplars.len(), 1);
        assert_eq!(req.timeseries[2].histograms.len(), 1);
    }

    #[test]
    fn a_1_0_batch_to_a_2_0_replica_is_a_1_0_request_and_mixing_is_refused() {
        let built = BodyBuilder::default()
            .build(&[record(0, 10), record(1, 10)], ReplicaProtocol::V2)
            .unwrap();
        assert_eq!(built.protocol, Protocol::V1);
        let e = BodyBuilder::default()
            .build(&[v2_record(0, "a", 1), record(1, 10)], ReplicaProtocol::V2)
            .unwrap_err();
        assert!(matches!(e, PayloadError::MixedKinds { .. }), "{e}");
    }

    /// The request as it was built before the records were read where they
    /// lie: each 2.0 record decoded into owned structs, translated or
    /// merged, and encoded by prost.
    fn built_the_decoding_way(records: &[Record], protocol: ReplicaProtocol) -> Vec<u8> {
        let decode = |r: &Record| prom_remote_write::decode::decode_v2(&r.payload).unwrap();
        let mut raw = Vec::new();
        match request_protocol(protocol, records[0].meta.kind) {
            Protocol::V1 => {
                for r in records {
                    match r.meta.kind {
                        PayloadKind::RemoteWriteV1 => raw.extend_from_slice(&r.payload),
                        PayloadKind::RemoteWriteV2 => {
                            let (v1, _) = translate::v2_to_v1(&decode(r)).unwrap();
                            v1.encode(&mut raw).unwrap();
                        }
                    }
                }
            }
            Protocol::V2 if records.len() == 1 => raw.extend_from_slice(&records[0].payload),
            Protocol::V2 => {
                let parts = records.iter().map(decode).collect();
                encode::merge_v2(parts).unwrap().encode(&mut raw).unwrap();
            }
        }
        raw
    }

    fn v2_record_with_metadata(seq: u64, family: &str, help: &str) -> Record {
        let mut r = v2_record(seq, family, 1000 + seq as i64);
        let mut req = v2::Request::decode(&r.payload[..]).unwrap();
        req.symbols.push(help.to_string());
        let help_ref = req.symbols.len() as u32 - 1;
        for ts in &mut req.timeseries {
            ts.metadata = Some(v2::Metadata {
                r#type: v2::MetricType::Counter as i32,
                help_ref,
                unit_ref: 0,
            });
        }
        r.payload = Bytes::from(req.encode_to_vec());
        r
    }

    #[test]
    fn bodies_are_those_the_decoding_way_built() {
        let batches: Vec<Vec<Record>> = vec![
            vec![v2_record(1, "a", 1000)],
            vec![v2_record(1, "a", 1000), v2_record(2, "b", 2000)],
            vec![record(0, 10), v2_record(1, "a", 1000), record(2, 200)],
            vec![
                v2_record_with_metadata(1, "a", "A"),
                v2_record_with_metadata(2, "a", "other help: dropped in 1.0"),
                v2_record_with_metadata(3, "b", "B"),
            ],
            vec![record(0, 10), record(1, 20)],
        ];
        for records in &batches {
            for protocol in [ReplicaProtocol::V1, ReplicaProtocol::V2] {
                if request_protocol(protocol, records[0].meta.kind) == Protocol::V2
                    && records
                        .iter()
                        .any(|r| r.meta.kind != PayloadKind::RemoteWriteV2)
                {
                    continue;
                }
                let built = BodyBuilder::default().build(records, protocol).unwrap();
                assert_eq!(
                    unsnappy(&built.body),
                    built_the_decoding_way(records, protocol),
                    "{protocol:?}, records {:?}",
                    records.iter().map(|r| r.seq).collect::<Vec<_>>()
                );
            }
        }
    }

    /// A 2.0 record of `n` one-label series with a sample each, and one
    /// series of `labels` labels (larger than the 64 KiB the encoder
    /// buffers whole, in 1.0 and in 2.0), and metadata.
    fn large_v2_record(seq: u64, n: usize, labels: usize) -> Record {
        use prom_remote_write::v2::*;
        let mut symbols: Vec<String> = vec!["".into(), "__name__".into(), "m".into()];
        symbols.extend((0..labels).map(|i| format!("label_{seq}_{i:06}")));
        let small = (0..n).map(|i| TimeSeries {
            labels_refs: vec![1, 2],
            samples: vec![Sample {
                value: i as f64,
                timestamp: 1000 + i as i64,
            }],
            metadata: Some(Metadata {
                r#type: MetricType::Gauge as i32,
                help_ref: 2,
                unit_ref: 0,
            }),
            ..Default::default()
        });
        let large = TimeSeries {
            labels_refs: [1, 2]
                .into_iter()
                .chain((0..labels as u32).flat_map(|i| [3 + i, 2]))
                .collect(),
            exemplars: vec![Exemplar {
                labels_refs: (3..3 + labels as u32).flat_map(|i| [i, 1]).collect(),
                value: 2.0,
                timestamp: 7,
            }],
            ..Default::default()
        };
        let req = Request {
            symbols,
            timeseries: small.chain([large]).collect(),
        };
        Record {
            payload: Bytes::from(req.encode_to_vec()),
            ..v2_record(seq, "m", 1000)
        }
    }

    #[test]
    fn bodies_of_many_blocks_and_of_series_larger_than_a_block_are_those_compressed_whole() {
        let (a, b) = (
            large_v2_record(1, 20_000, 6_000),
            large_v2_record(2, 3, 9_000),
        );
        let (v1, v2) = (ReplicaProtocol::V1, ReplicaProtocol::V2);
        let cases = [
            (vec![a.clone()], v1),
            (vec![a.clone()], v2),
            (vec![a.clone(), b.clone()], v1),
            (vec![a.clone(), b.clone()], v2),
            (vec![record(0, 200_000), a, record(3, 65_536), b], v1),
        ];
        let mut builder = BodyBuilder::default();
        for (records, protocol) in &cases {
            let whole = built_the_decoding_way(records, *protocol);
            assert!(whole.len() > 4 * 65_536, "{}", whole.len());
            let want = encode::snappy_compress(&whole);
            let built = builder.build(records, *protocol).unwrap();
            assert!(
                built.body == want,
                "{protocol:?}, {} records",
                records.len()
            );
            let fresh = BodyBuilder::default().build(records, *protocol).unwrap();
            assert!(
                fresh.body == want,
                "{protocol:?}, {} records",
                records.len()
            );
        }
    }

    #[test]
    fn a_builder_keeps_nothing_of_the_size_of_a_large_request() {
        // 8 MiB of bytes that do not compress: an 8 MiB body.
        let mut noisy = record(0, 8 << 20);
        let mut x = 0x9e37_79b9_u32;
        let payload: Vec<u8> = noisy
            .payload
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                // The protobuf framing in front stays as it is.
                if i < 16 {
                    b
                } else {
                    x as u8
                }
            })
            .collect();
        noisy.payload = Bytes::from(payload);
        let mut builder = BodyBuilder::default();
        let body = builder.build_v1(std::slice::from_ref(&noisy)).unwrap();
        assert!(body.len() > 8 << 20, "{}", body.len());
        let kept = builder.buffered_bytes();
        assert!(kept < 256 << 10, "kept {kept} bytes after an 8 MiB body");
        // Nor of a request that failed after 8 MiB.
        let mut bad = v2_record(1, "a", 1000);
        bad.payload = Bytes::from_static(&[0x2a, 0x05, 0x0a]);
        let failed = builder.build(&[noisy, bad], ReplicaProtocol::V1);
        assert!(matches!(failed, Err(PayloadError::V2 { seq: 1, .. })));
        assert!(builder.buffered_bytes() < 256 << 10);
        // And it still builds what a fresh builder builds.
        let small = [record(2, 100)];
        assert_eq!(builder.build_v1(&small).unwrap(), build_v1(&small).unwrap());
        assert!(builder.buffered_bytes() < 256 << 10);
    }

    #[test]
    fn a_2_0_record_that_prost_refuses_is_an_error_naming_it() {
        let mut bad = v2_record(5, "a", 1000);
        bad.payload = Bytes::from_static(&[0x2a, 0x05, 0x0a]);
        for protocol in [ReplicaProtocol::V1, ReplicaProtocol::V2] {
            let e = BodyBuilder::default()
                .build(&[v2_record(4, "a", 1000), bad.clone()], protocol)
                .unwrap_err();
            assert!(matches!(e, PayloadError::V2 { seq: 5, .. }), "{e}");
        }
    }

    /// A build above `BLOCK_IN_PLACE_BYTES` moves off the async worker on a
    /// multi-threaded runtime; on a current-thread runtime (the replay
    /// command's) it must not try to (`block_in_place` would panic).
    #[test]
    fn a_large_build_runs_on_either_runtime_flavor() {
        let records: Vec<Record> = (0..3)
            .map(|i| record(i, BLOCK_IN_PLACE_BYTES / 2))
            .collect();
        let build = || {
            let built = BodyBuilder::default()
                .build(&records, ReplicaProtocol::V1)
                .unwrap();
            unsnappy(&built.body).len()
        };
        let want = build();
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        assert_eq!(multi.block_on(async { build() }), want);
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(current.block_on(async { build() }), want);
    }

    #[test]
    fn the_summary_of_a_2_0_request_is_what_it_carries() {
        let records = [v2_record(1, "a", 1000), v2_record(2, "b", 3000)];
        let sent = BodyBuilder::default()
            .build(&records, ReplicaProtocol::V2)
            .unwrap()
            .sent
            .unwrap();
        let mut want = Summary::default();
        for r in &records {
            want.merge(&translate::count_v2(
                &prom_remote_write::decode::decode_v2(&r.payload).unwrap(),
            ));
        }
        assert_eq!(sent, want);
    }
}

#[cfg(test)]
mod shard_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use prom_remote_write::shard::{series_hash, shard_of};
    use prom_remote_write::{v1, v2};
    use prost::Message;

    /// Record `seq` holds series `job="j<seq>", instance="0".."3"`, as 1.0
    /// or 2.0.
    fn record(seq: u64, kind: PayloadKind) -> Record {
        let labels = |i: u64| {
            [
                ("__name__".to_owned(), "up".to_owned()),
                ("instance".to_owned(), i.to_string()),
                ("job".to_owned(), format!("j{seq}")),
            ]
        };
        let payload = match kind {
            PayloadKind::RemoteWriteV1 => v1::WriteRequest {
                timeseries: (0..4)
                    .map(|i| v1::TimeSeries {
                        labels: labels(i)
                            .into_iter()
                            .map(|(name, value)| v1::Label { name, value })
                            .collect(),
                        samples: vec![v1::Sample {
                            value: 1.0,
                            timestamp: seq as i64,
                        }],
                        ..Default::default()
                    })
                    .collect(),
                metadata: vec![],
            }
            .encode_to_vec(),
            PayloadKind::RemoteWriteV2 => {
                let mut symbols = vec![String::new()];
                let mut sym = |s: &str| match symbols.iter().position(|x| x == s) {
                    Some(i) => i as u32,
                    None => {
                        symbols.push(s.to_owned());
                        symbols.len() as u32 - 1
                    }
                };
                let timeseries = (0..4)
                    .map(|i| v2::TimeSeries {
                        labels_refs: labels(i)
                            .iter()
                            .flat_map(|(n, v)| [sym(n), sym(v)])
                            .collect(),
                        samples: vec![v2::Sample {
                            value: 1.0,
                            timestamp: seq as i64,
                        }],
                        ..Default::default()
                    })
                    .collect();
                v2::Request {
                    symbols,
                    timeseries,
                }
                .encode_to_vec()
            }
        };
        super::super::test_record(seq, kind, 4, payload)
    }

    fn labels_v1(ts: &v1::TimeSeries) -> Vec<(String, String)> {
        ts.labels
            .iter()
            .map(|l| (l.name.clone(), l.value.clone()))
            .collect()
    }

    fn shard_of_labels(l: &[(String, String)], of: u32) -> u32 {
        shard_of(
            series_hash(l.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()))),
            of,
        )
    }

    /// The series of every shard's request, as label lists, by shard.
    fn series_by_shard(
        records: &[Record],
        protocol: ReplicaProtocol,
        of: u32,
    ) -> Vec<Vec<Vec<(String, String)>>> {
        let mut b = BodyBuilder::default();
        (0..of)
            .map(|index| {
                let built = b
                    .build_shard(records, protocol, Shard { index, of })
                    .unwrap();
                let raw = snap::raw::Decoder::new()
                    .decompress_vec(&built.body)
                    .unwrap();
                let series: Vec<Vec<(String, String)>> = match built.protocol {
                    Protocol::V1 => v1::WriteRequest::decode(raw.as_slice())
                        .unwrap()
                        .timeseries
                        .iter()
                        .map(labels_v1)
                        .collect(),
                    Protocol::V2 => {
                        let req = v2::Request::decode(raw.as_slice()).unwrap();
                        req.timeseries
                            .iter()
                            .map(|ts| {
                                ts.labels_refs
                                    .chunks(2)
                                    .map(|p| {
                                        (
                                            req.symbols[p[0] as usize].clone(),
                                            req.symbols[p[1] as usize].clone(),
                                        )
                                    })
                                    .collect()
                            })
                            .collect()
                    }
                };
                assert_eq!(built.empty, series.is_empty(), "shard {index} of {of}");
                series
            })
            .collect()
    }

    /// Batches of three records of these kinds, each with the protocol of
    /// a replica they are sent to.
    fn batches() -> Vec<([PayloadKind; 3], ReplicaProtocol, Vec<Record>)> {
        use PayloadKind::{RemoteWriteV1 as V1, RemoteWriteV2 as V2};
        [
            ([V1, V1, V1], ReplicaProtocol::V1),
            ([V2, V1, V2], ReplicaProtocol::V1),
            ([V2, V2, V2], ReplicaProtocol::V2),
        ]
        .into_iter()
        .map(|(kinds, protocol)| {
            let records = (0..).zip(kinds).map(|(i, k)| record(i, k)).collect();
            (kinds, protocol, records)
        })
        .collect()
    }

    #[test]
    fn each_shard_s_request_holds_its_series_of_the_batch_in_log_order() {
        for (kinds, protocol, records) in batches() {
            let whole = series_by_shard(&records, protocol, 1).remove(0);
            assert_eq!(whole.len(), 12);
            for of in [2, 3, 8] {
                let shards = series_by_shard(&records, protocol, of);
                for (index, series) in shards.iter().enumerate() {
                    let want: Vec<_> = whole
                        .iter()
                        .filter(|l| shard_of_labels(l, of) == index as u32)
                        .cloned()
                        .collect();
                    assert_eq!(series, &want, "{kinds:?} shard {index} of {of}");
                }
            }
        }
    }

    #[test]
    fn a_shard_s_request_of_cut_parts_is_the_request_cut_to_the_shard() {
        use super::super::cut;
        for (kinds, protocol, records) in batches() {
            for of in [1, 2, 3, 8] {
                let mut samples = vec![0u32; records.len()];
                for index in 0..of {
                    let parts = cut::parts_of(records.clone(), index, of);
                    for p in &parts {
                        samples[p.seq as usize] += p.meta.samples;
                    }
                    let mut b = BodyBuilder::default();
                    let cut = b
                        .build_shard(&records, protocol, Shard { index, of })
                        .unwrap();
                    if parts.is_empty() {
                        assert!(cut.empty, "{kinds:?} shard {index} of {of}");
                        continue;
                    }
                    let built = b.build(&parts, protocol).unwrap();
                    assert_eq!(built.body, cut.body, "{kinds:?} shard {index} of {of}");
                }
                assert_eq!(samples, vec![4; records.len()], "{kinds:?} of {of}");
            }
        }
    }

    #[test]
    fn the_whole_shard_is_the_request_built_without_shards() {
        let records: Vec<Record> = (0..3)
            .map(|i| record(i, PayloadKind::RemoteWriteV2))
            .collect();
        for protocol in [ReplicaProtocol::V1, ReplicaProtocol::V2] {
            let mut b = BodyBuilder::default();
            let whole = b.build(&records, protocol).unwrap();
            let shard = b.build_shard(&records, protocol, Shard::WHOLE).unwrap();
            assert_eq!(whole.body, shard.body);
            assert!(!shard.empty);
        }
    }
}
