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
    let mut raw = Vec::with_capacity(records.iter().map(|r| r.payload.len()).sum());
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
                v1.encode(&mut raw).map_err(|e| PayloadError::V2 {
                    seq: r.seq,
                    message: e.to_string(),
                })?;
            }
        }
    }
    let compressed =
        snap::raw::Encoder::new()
            .compress_vec(&raw)
            .map_err(|e| PayloadError::Snappy {
                seq: records.first().map_or(0, |r| r.seq),
                message: e.to_string(),
            })?;
    Ok(Bytes::from(compressed))
}
