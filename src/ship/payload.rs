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
//! ([`prom_remote_write::encode::merge_v2`]) rather than sent one record per
//! request: a shipper has one request in flight (log order, see the module
//! above), so one request per record would cap a 2.0 replica at one sender
//! batch per round trip, and the decode/encode this costs is small next to
//! the network and the replica's own work.

use bytes::Bytes;
use prom_remote_write::decode::Summary;
use prom_remote_write::{encode, translate, v2, Dropped, Protocol};
use prost::Message;
use wal_format::{PayloadEncoding, PayloadKind, Record};

use crate::config::ReplicaProtocol;

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
}

/// The snappy-compressed 1.0 request body for `records`.
///
/// # Errors
/// A record's payload cannot be decoded.
pub fn build_v1(records: &[Record]) -> Result<Bytes, PayloadError> {
    BodyBuilder::default().build_v1(records)
}

/// Builds request bodies with buffers kept from one request to the next: a
/// shipper's steady state then neither allocates nor zero-fills the
/// concatenation and compression buffers (a fresh snappy output buffer is
/// zeroed in full, ~1.2 times the raw size, before being written), and the
/// body costs one copy of its compressed bytes.
pub struct BodyBuilder {
    raw: Vec<u8>,
    out: Vec<u8>,
    encoder: snap::raw::Encoder,
}

impl Default for BodyBuilder {
    fn default() -> Self {
        Self {
            raw: Vec::new(),
            out: Vec::new(),
            encoder: snap::raw::Encoder::new(),
        }
    }
}

impl BodyBuilder {
    /// As [`build_v1`].
    ///
    /// # Errors
    /// A record's payload cannot be decoded.
    pub fn build_v1(&mut self, records: &[Record]) -> Result<Bytes, PayloadError> {
        Ok(self.build(records, ReplicaProtocol::V1)?.body)
    }

    /// The request for `records` to a replica speaking `protocol`: 2.0 when
    /// the replica speaks 2.0 and the records are 2.0, else 1.0.
    ///
    /// # Errors
    /// A record's payload cannot be decoded, or a 2.0 request would mix
    /// kinds (see [`same_request`]).
    pub fn build(
        &mut self,
        records: &[Record],
        protocol: ReplicaProtocol,
    ) -> Result<Built, PayloadError> {
        self.raw.clear();
        let first_seq = records.first().map_or(0, |r| r.seq);
        let kind = records
            .first()
            .map_or(PayloadKind::RemoteWriteV1, |r| r.meta.kind);
        let wire = request_protocol(protocol, kind);
        let (dropped, sent) = match wire {
            Protocol::V1 => (append_v1(records, &mut self.raw)?, None),
            Protocol::V2 => (Dropped::default(), Some(append_v2(records, &mut self.raw)?)),
        };
        let need = snap::raw::max_compress_len(self.raw.len());
        if self.out.len() < need {
            self.out.resize(need, 0);
        }
        let n = self
            .encoder
            .compress(&self.raw, &mut self.out[..need])
            .map_err(|e| PayloadError::Snappy {
                seq: first_seq,
                message: e.to_string(),
            })?;
        let body = Bytes::copy_from_slice(&self.out[..n]);
        // Give back what one unusually large request grew the buffers to.
        if self.raw.capacity() > 4 * self.raw.len().max(1 << 20) {
            self.raw = Vec::new();
            self.out = Vec::new();
        }
        Ok(Built {
            body,
            protocol: wire,
            dropped,
            sent,
        })
    }
}

/// A record's protobuf bytes, uncompressed.
fn plain(r: &Record) -> Result<std::borrow::Cow<'_, [u8]>, PayloadError> {
    match r.meta.encoding {
        PayloadEncoding::Identity => Ok(std::borrow::Cow::Borrowed(&r.payload)),
        PayloadEncoding::Snappy => snap::raw::Decoder::new()
            .decompress_vec(&r.payload)
            .map(std::borrow::Cow::Owned)
            .map_err(|e| PayloadError::Snappy {
                seq: r.seq,
                message: e.to_string(),
            }),
    }
}

/// Appends the uncompressed 1.0 encoding of `records` to `raw`; returns
/// what translating 2.0 records dropped.
fn append_v1(records: &[Record], raw: &mut Vec<u8>) -> Result<Dropped, PayloadError> {
    raw.reserve(records.iter().map(|r| r.payload.len()).sum());
    let mut dropped = Dropped::default();
    for r in records {
        let bytes = plain(r)?;
        match r.meta.kind {
            PayloadKind::RemoteWriteV1 => raw.extend_from_slice(&bytes),
            PayloadKind::RemoteWriteV2 => {
                let v2_error = |e: &dyn std::fmt::Display| PayloadError::V2 {
                    seq: r.seq,
                    message: e.to_string(),
                };
                let req = v2::Request::decode(&*bytes).map_err(|e| v2_error(&e))?;
                let (v1, d) = translate::v2_to_v1(&req).map_err(|e| v2_error(&e))?;
                dropped.created_timestamps += d.created_timestamps;
                dropped.metadata += d.metadata;
                v1.encode(raw).map_err(|e| v2_error(&e))?;
            }
        }
    }
    Ok(dropped)
}

/// Appends one 2.0 request merging the 2.0 `records` to `raw`; returns what
/// it carries.
fn append_v2(records: &[Record], raw: &mut Vec<u8>) -> Result<Summary, PayloadError> {
    let seq = records.first().map_or(0, |r| r.seq);
    let v2_error = |seq: u64, e: &dyn std::fmt::Display| PayloadError::V2 {
        seq,
        message: e.to_string(),
    };
    let mut parts = Vec::with_capacity(records.len());
    for r in records {
        if r.meta.kind != PayloadKind::RemoteWriteV2 {
            return Err(PayloadError::MixedKinds {
                first: seq,
                last: records.last().map_or(0, |r| r.seq),
            });
        }
        let bytes = plain(r)?;
        let req = v2::Request::decode(&*bytes).map_err(|e| v2_error(r.seq, &e))?;
        if records.len() == 1 {
            // One record needs no merge: its bytes go exactly as the
            // sender wrote them.
            raw.extend_from_slice(&bytes);
            return Ok(translate::count_v2(&req));
        }
        parts.push(req);
    }
    let req = encode::merge_v2(parts).map_err(|e| v2_error(seq, &e))?;
    req.encode(raw).map_err(|e| v2_error(seq, &e))?;
    Ok(translate::count_v2(&req))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
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
        Record {
            seq,
            meta: RecordMeta {
                receive_time_ms: 0,
                min_sample_ts: 0,
                max_sample_ts: 0,
                samples: 1,
                kind: PayloadKind::RemoteWriteV1,
                encoding: PayloadEncoding::Identity,
            },
            payload: Bytes::from(body),
        }
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
}
