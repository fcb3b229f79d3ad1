//! Records: what a frame carries, and the 36-byte entry each one is stored as
//! inside a frame's raw body.

use bytes::Bytes;

use crate::error::CorruptReason;
use crate::le::{i64_at, u16_at, u32_at};

/// Largest payload of one record (64 MiB). Ingest refuses larger requests
/// before they reach the log; the decoder refuses larger lengths before
/// reading them.
pub const MAX_RECORD_PAYLOAD: usize = 64 << 20;
/// Length of a record entry's fixed part, before its payload.
pub const RECORD_ENTRY_HEADER_LEN: usize = 36;

/// What protocol message a payload holds. How it travels over HTTP (content
/// type, headers) is the relay's business (`prom_remote_write::content`),
/// not the format's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PayloadKind {
    /// Prometheus remote-write 1.0 `prometheus.WriteRequest`.
    RemoteWriteV1 = 1,
    /// Prometheus remote-write 2.0 `io.prometheus.write.v2.Request`.
    RemoteWriteV2 = 2,
}

impl PayloadKind {
    /// The kind stored as `v`, or `None` for an unknown value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::RemoteWriteV1),
            2 => Some(Self::RemoteWriteV2),
            _ => None,
        }
    }
}

/// How the payload bytes are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PayloadEncoding {
    /// The protobuf bytes themselves.
    Identity = 0,
    /// Snappy block format, exactly as received on the wire.
    Snappy = 1,
}

impl PayloadEncoding {
    /// The encoding stored as `v`, or `None` for an unknown value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Identity),
            1 => Some(Self::Snappy),
            _ => None,
        }
    }
}

/// Everything about a record except its payload bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    /// Unix milliseconds when the relay received the request.
    pub receive_time_ms: i64,
    /// Smallest sample or histogram timestamp in the payload (ms);
    /// `i64::MAX` if the payload has none.
    pub min_sample_ts: i64,
    /// Largest sample or histogram timestamp in the payload (ms);
    /// `i64::MIN` if the payload has none.
    pub max_sample_ts: i64,
    /// Number of float samples plus histogram samples in the payload.
    pub samples: u32,
    /// Protocol message in the payload.
    pub kind: PayloadKind,
    /// Encoding of the payload bytes.
    pub encoding: PayloadEncoding,
}

/// A decoded record with its sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Sequence number: the frame's `first_seq` plus the record's index.
    pub seq: u64,
    /// Metadata stored with the payload.
    pub meta: RecordMeta,
    /// The payload (shares the frame's decoded body; cloning is cheap).
    pub payload: Bytes,
}

impl Record {
    /// Borrows the record in the form [`crate::encode_frame`] takes, e.g. to
    /// copy records into a new log.
    pub fn as_record_ref(&self) -> RecordRef<'_> {
        RecordRef {
            meta: self.meta.clone(),
            payload: &self.payload,
        }
    }
}

/// A record to encode: the writer hands these to [`crate::encode_frame`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Metadata stored with the payload.
    pub meta: RecordMeta,
    /// The payload bytes.
    pub payload: &'a [u8],
}

/// Bytes one record with a `payload_len`-byte payload takes in a raw body;
/// lets a writer split a batch into frames under [`crate::MAX_FRAME_RAW`].
pub fn record_entry_len(payload_len: usize) -> usize {
    RECORD_ENTRY_HEADER_LEN.saturating_add(payload_len)
}

/// Appends one record entry. The caller has checked the payload length.
pub(crate) fn encode_entry(r: &RecordRef<'_>, out: &mut Vec<u8>) {
    let m = &r.meta;
    out.extend_from_slice(&m.receive_time_ms.to_le_bytes());
    out.extend_from_slice(&m.min_sample_ts.to_le_bytes());
    out.extend_from_slice(&m.max_sample_ts.to_le_bytes());
    out.extend_from_slice(&m.samples.to_le_bytes());
    out.push(m.kind as u8);
    out.push(m.encoding as u8);
    out.extend_from_slice(&0u16.to_le_bytes());
    // Lossless: payloads were checked against MAX_RECORD_PAYLOAD (< 4 GiB).
    out.extend_from_slice(&(r.payload.len() as u32).to_le_bytes());
    out.extend_from_slice(r.payload);
}

/// Splits a raw body into exactly `count` records numbered from `first_seq`.
///
/// Every length is checked against the bytes left before it is used; the
/// payloads are slices of `raw`, not copies.
pub(crate) fn split_entries(
    raw: &Bytes,
    first_seq: u64,
    count: u32,
) -> Result<Vec<Record>, CorruptReason> {
    // `raw` is real data here (not a declared length), so this capacity is
    // bounded by the bytes present.
    let cap = (count as usize).min(raw.len() / RECORD_ENTRY_HEADER_LEN);
    let mut records = Vec::with_capacity(cap);
    let mut offset = 0usize;
    for index in 0..count {
        let (meta, payload_len) = entry_header(raw, offset, index, count)?;
        let start = offset + RECORD_ENTRY_HEADER_LEN;
        records.push(Record {
            seq: first_seq.saturating_add(u64::from(index)),
            meta,
            payload: raw.slice(start..start + payload_len),
        });
        offset = start + payload_len;
    }
    match raw.len() - offset {
        0 => Ok(records),
        count => Err(CorruptReason::TrailingBytes { count }),
    }
}

/// Parses and checks the fixed part of entry `index` at `offset`, including
/// that its payload fits in the body. Returns the metadata and payload length.
fn entry_header(
    raw: &[u8],
    offset: usize,
    index: u32,
    count: u32,
) -> Result<(RecordMeta, usize), CorruptReason> {
    let rest = raw.get(offset..).unwrap_or_default();
    if rest.is_empty() {
        return Err(CorruptReason::RecordCountMismatch {
            expected: count,
            found: index,
        });
    }
    let overrun = |needed: u64| CorruptReason::EntryOverrun {
        index,
        offset,
        needed,
        remaining: rest.len(),
    };
    let h = rest
        .first_chunk::<RECORD_ENTRY_HEADER_LEN>()
        .ok_or_else(|| overrun(RECORD_ENTRY_HEADER_LEN as u64))?;
    let meta = entry_meta(h)?;
    let payload_len = u32_at(h, 32) as usize;
    if payload_len > MAX_RECORD_PAYLOAD {
        return Err(CorruptReason::LengthOverLimit {
            field: "payload_len",
            len: payload_len as u64,
            limit: MAX_RECORD_PAYLOAD as u64,
        });
    }
    let needed = RECORD_ENTRY_HEADER_LEN + payload_len;
    if needed > rest.len() {
        return Err(overrun(needed as u64));
    }
    Ok((meta, payload_len))
}

fn entry_meta(h: &[u8; RECORD_ENTRY_HEADER_LEN]) -> Result<RecordMeta, CorruptReason> {
    let kind = PayloadKind::from_u8(h[28]).ok_or(CorruptReason::UnknownKind(h[28]))?;
    let encoding = PayloadEncoding::from_u8(h[29]).ok_or(CorruptReason::UnknownEncoding(h[29]))?;
    let reserved = u16_at(h, 30);
    if reserved != 0 {
        return Err(CorruptReason::ReservedNotZero {
            field: "record.reserved",
            value: u64::from(reserved),
        });
    }
    Ok(RecordMeta {
        receive_time_ms: i64_at(h, 0),
        min_sample_ts: i64_at(h, 8),
        max_sample_ts: i64_at(h, 16),
        samples: u32_at(h, 24),
        kind,
        encoding,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn meta() -> RecordMeta {
        RecordMeta {
            receive_time_ms: 1_700_000_000_000,
            min_sample_ts: -5,
            max_sample_ts: i64::MAX,
            samples: 42,
            kind: PayloadKind::RemoteWriteV2,
            encoding: PayloadEncoding::Snappy,
        }
    }

    fn raw_of(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            encode_entry(
                &RecordRef {
                    meta: meta(),
                    payload: p,
                },
                &mut out,
            );
        }
        out
    }

    fn split(raw: Vec<u8>, count: u32) -> Result<Vec<Record>, CorruptReason> {
        split_entries(&Bytes::from(raw), 10, count)
    }

    #[test]
    fn entries_round_trip_with_consecutive_seqs() {
        let recs = split(raw_of(&[b"ab", b"", b"xyz"]), 3).unwrap();
        let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![10, 11, 12]);
        assert_eq!(recs[2].payload.as_ref(), b"xyz");
        assert!(recs.iter().all(|r| r.meta == meta()));
        assert_eq!(recs[0].as_record_ref().payload, b"ab");
    }

    #[test]
    fn entry_layout_is_36_bytes_then_payload() {
        let raw = raw_of(&[b"P"]);
        assert_eq!(raw.len(), record_entry_len(1));
        assert_eq!(raw[28], 2, "kind");
        assert_eq!(raw[29], 1, "encoding");
        assert_eq!(&raw[32..36], &1u32.to_le_bytes());
        assert_eq!(raw[36], b'P');
    }

    #[test]
    fn unknown_kind_and_encoding_values_are_refused() {
        assert_eq!(PayloadKind::from_u8(1), Some(PayloadKind::RemoteWriteV1));
        assert_eq!(PayloadKind::from_u8(2), Some(PayloadKind::RemoteWriteV2));
        assert_eq!(PayloadKind::from_u8(0), None);
        assert_eq!(PayloadEncoding::from_u8(2), None);
    }

    #[test]
    fn short_entry_header_is_an_overrun() {
        let mut raw = raw_of(&[b"ab"]);
        raw.extend_from_slice(&[0; 10]);
        let err = split(raw, 2).unwrap_err();
        assert!(
            matches!(
                err,
                CorruptReason::EntryOverrun {
                    index: 1,
                    offset: 38,
                    needed: 36,
                    remaining: 10
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn payload_running_past_the_body_is_an_overrun() {
        let mut raw = raw_of(&[b"abcd"]);
        raw.truncate(38);
        let err = split(raw, 1).unwrap_err();
        assert!(
            matches!(
                err,
                CorruptReason::EntryOverrun {
                    index: 0,
                    needed: 40,
                    remaining: 38,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn payload_len_over_the_limit_is_refused_before_use() {
        let mut raw = raw_of(&[b""]);
        raw[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = split(raw, 1).unwrap_err();
        assert_eq!(err.as_error_code(), "length_over_limit");
    }

    #[test]
    fn unknown_kind_encoding_and_reserved_bits_are_corrupt() {
        let mut raw = raw_of(&[b"a"]);
        raw[28] = 9;
        assert_eq!(split(raw, 1), Err(CorruptReason::UnknownKind(9)));
        let mut raw = raw_of(&[b"a"]);
        raw[29] = 7;
        assert_eq!(split(raw, 1), Err(CorruptReason::UnknownEncoding(7)));
        let mut raw = raw_of(&[b"a"]);
        raw[31] = 1;
        assert_eq!(
            split(raw, 1).unwrap_err().as_error_code(),
            "reserved_not_zero"
        );
    }

    #[test]
    fn leftover_bytes_and_missing_records_are_corrupt() {
        let mut raw = raw_of(&[b"a"]);
        raw.push(0);
        assert_eq!(
            split(raw, 1),
            Err(CorruptReason::TrailingBytes { count: 1 })
        );
        assert_eq!(
            split(raw_of(&[b"a"]), 2),
            Err(CorruptReason::RecordCountMismatch {
                expected: 2,
                found: 1
            })
        );
    }
}
