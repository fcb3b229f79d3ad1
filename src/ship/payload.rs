//! Building one remote-write 1.0 request from consecutive log records.
//!
//! Concatenated encodings of 1.0 `WriteRequest` messages are themselves one
//! valid `WriteRequest` (protobuf merges repeated fields by appending), so
//! coalescing 1.0 records costs a copy, not a decode. 2.0 records are
//! translated to 1.0 (symbol table to labels), since the replicas this relay
//! feeds today accept 1.0.

use bytes::Bytes;
use prom_remote_write::{translate, v2};
use prost::Message;
use wal_format::{PayloadEncoding, PayloadKind, Record};

/// Why a record could not be turned into a request. The record was validated
/// at ingest, so this means damage that the checksums did not catch.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("record {seq}: bad snappy payload: {message}")]
    Snappy { seq: u64, message: String },
    #[error("record {seq}: bad 2.0 payload: {message}")]
    V2 { seq: u64, message: String },
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
        self.raw.clear();
        append_v1(records, &mut self.raw)?;
        let need = snap::raw::max_compress_len(self.raw.len());
        if self.out.len() < need {
            self.out.resize(need, 0);
        }
        let n = self
            .encoder
            .compress(&self.raw, &mut self.out[..need])
            .map_err(|e| PayloadError::Snappy {
                seq: records.first().map_or(0, |r| r.seq),
                message: e.to_string(),
            })?;
        let body = Bytes::copy_from_slice(&self.out[..n]);
        // Give back what one unusually large request grew the buffers to.
        if self.raw.capacity() > 4 * self.raw.len().max(1 << 20) {
            self.raw = Vec::new();
            self.out = Vec::new();
        }
        Ok(body)
    }
}

/// Appends the uncompressed 1.0 encoding of `records` to `raw`.
fn append_v1(records: &[Record], raw: &mut Vec<u8>) -> Result<(), PayloadError> {
    raw.reserve(records.iter().map(|r| r.payload.len()).sum());
    for r in records {
        let decoded;
        let bytes: &[u8] = match r.meta.encoding {
            PayloadEncoding::Identity => &r.payload,
            PayloadEncoding::Snappy => {
                decoded = snap::raw::Decoder::new()
                    .decompress_vec(&r.payload)
                    .map_err(|e| PayloadError::Snappy {
                        seq: r.seq,
                        message: e.to_string(),
                    })?;
                &decoded
            }
        };
        match r.meta.kind {
            PayloadKind::RemoteWriteV1 => raw.extend_from_slice(bytes),
            PayloadKind::RemoteWriteV2 => {
                let req = v2::Request::decode(bytes).map_err(|e| PayloadError::V2 {
                    seq: r.seq,
                    message: e.to_string(),
                })?;
                let (v1, dropped) = translate::v2_to_v1(&req).map_err(|e| PayloadError::V2 {
                    seq: r.seq,
                    message: e.to_string(),
                })?;
                if dropped.created_timestamps + dropped.metadata > 0 {
                    metrics::counter!("walrelay_translate_dropped_total", "what" => "created_timestamps")
                        .increment(dropped.created_timestamps);
                    metrics::counter!("walrelay_translate_dropped_total", "what" => "metadata")
                        .increment(dropped.metadata);
                }
                v1.encode(raw).map_err(|e| PayloadError::V2 {
                    seq: r.seq,
                    message: e.to_string(),
                })?;
            }
        }
    }
    Ok(())
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
}
