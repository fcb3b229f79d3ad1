//! The protobuf message a stored record holds.
//!
//! A record's payload is the message itself (`encoding = 0`) or its
//! sender's snappy body (`encoding = 1`, what ingest stores for a 1.0
//! request; `wal-format/SPEC.md`, "Record entries"). Every reader of
//! messages starts here: the shippers' builds, `wal dump` and `wal verify`
//! (through `ship::payload::protobuf`), and a repack, which stores a
//! snappy record decoded.

use std::borrow::Cow;

use wal_format::{PayloadEncoding, Record, MAX_RECORD_PAYLOAD};

/// Why a snappy payload gave no message.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Its header declares more than a record may hold; nothing was
    /// allocated for it.
    #[error("declares {len} bytes decoded, over the record limit of {MAX_RECORD_PAYLOAD}")]
    TooLarge { len: usize },
    /// It does not decompress.
    #[error(transparent)]
    Snappy(#[from] snap::Error),
}

/// The message `r` holds: its payload as stored, or decompressed when it
/// is stored snappy-encoded.
///
/// # Errors
/// A snappy payload that does not decompress, or whose header declares
/// more than [`MAX_RECORD_PAYLOAD`].
pub fn of(r: &Record) -> Result<Cow<'_, [u8]>, MessageError> {
    match r.meta.encoding {
        PayloadEncoding::Identity => Ok(Cow::Borrowed(&r.payload)),
        PayloadEncoding::Snappy => {
            let len = snap::raw::decompress_len(&r.payload)?;
            if len > MAX_RECORD_PAYLOAD {
                return Err(MessageError::TooLarge { len });
            }
            Ok(Cow::Owned(
                snap::raw::Decoder::new().decompress_vec(&r.payload)?,
            ))
        }
    }
}
