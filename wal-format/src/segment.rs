//! Segment files: their names and their 32-byte header.

use crate::error::SegmentHeaderError;
use crate::le::{put, u32_at, u64_at};

/// The first eight bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"WALRELAY";
/// The format version this build writes. Version 2 adds zstd chains
/// (frame compression 2 and 3) to version 1; this build reads both
/// ([`READ_VERSIONS`]). A relay that knows only version 1 refuses a log
/// holding a version 2 segment at start, instead of taking its chained
/// frames for damage.
pub const FORMAT_VERSION: u32 = 2;
/// The format versions this build reads.
pub const READ_VERSIONS: [u32; 2] = [1, 2];
/// Length of the segment header; the first frame starts at this offset.
pub const SEGMENT_HEADER_LEN: usize = 32;

/// Suffix of segment file names.
const SEGMENT_SUFFIX: &str = ".wal";
/// Digits in the zero-padded sequence number of a segment name; 20 digits
/// hold any u64, so lexical order of names is log order.
const SEGMENT_NAME_DIGITS: usize = 20;

/// The file name of the segment whose first record has sequence `first_seq`:
/// 20 zero-padded decimal digits and `.wal`, so `ls` lists log order.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

/// Parses a segment file name made by [`segment_file_name`]. Strict: exactly
/// 20 ASCII digits followed by `.wal`; anything else (temporary files, other
/// suffixes, a value over `u64::MAX`) is `None`, so stray files in the WAL
/// directory are never mistaken for segments.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The 32-byte header at offset 0 of every segment file.
///
/// `first_seq` is the sequence number of the segment's first record and the
/// salt of every frame checksum in the segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SegmentHeader {
    /// Format version; [`FORMAT_VERSION`] for everything this build writes.
    pub version: u32,
    /// Sequence number of the first record in the segment.
    pub first_seq: u64,
}

impl SegmentHeader {
    /// A header of the current [`FORMAT_VERSION`].
    pub fn new(first_seq: u64) -> Self {
        Self {
            version: FORMAT_VERSION,
            first_seq,
        }
    }

    /// Appends the 32 header bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut h = [0u8; SEGMENT_HEADER_LEN];
        put(&mut h, 0, &SEGMENT_MAGIC);
        put(&mut h, 8, &self.version.to_le_bytes());
        // 12: flags, 24: reserved — both zero in v1.
        put(&mut h, 16, &self.first_seq.to_le_bytes());
        let crc = crc32fast::hash(&h[..28]);
        put(&mut h, 28, &crc.to_le_bytes());
        out.extend_from_slice(&h);
    }

    /// Decodes the header from the first 32 bytes of `buf` (extra bytes are
    /// ignored).
    ///
    /// The version is checked before the checksum: every format version keeps
    /// the magic at 0..8 and the version at 8..12, but a later version may
    /// place its checksum elsewhere, and an operator must see "unsupported
    /// version", not "bad checksum", for a file from a newer walrelay.
    ///
    /// # Errors
    /// [`SegmentHeaderError::Incomplete`] for fewer than 32 bytes, then
    /// `BadMagic`, `UnsupportedVersion`, `BadChecksum`, `UnsupportedFlags`,
    /// `ReservedNotZero`, in that order.
    pub fn decode(buf: &[u8]) -> Result<SegmentHeader, SegmentHeaderError> {
        let h = buf
            .first_chunk::<SEGMENT_HEADER_LEN>()
            .ok_or(SegmentHeaderError::Incomplete)?;
        if h[..8] != SEGMENT_MAGIC {
            return Err(SegmentHeaderError::BadMagic);
        }
        let version = u32_at(h, 8);
        if !READ_VERSIONS.contains(&version) {
            return Err(SegmentHeaderError::UnsupportedVersion(version));
        }
        if u32_at(h, 28) != crc32fast::hash(&h[..28]) {
            return Err(SegmentHeaderError::BadChecksum);
        }
        match (u32_at(h, 12), u32_at(h, 24)) {
            (0, 0) => Ok(SegmentHeader {
                version,
                first_seq: u64_at(h, 16),
            }),
            (0, reserved) => Err(SegmentHeaderError::ReservedNotZero(reserved)),
            (flags, _) => Err(SegmentHeaderError::UnsupportedFlags(flags)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn encoded(h: SegmentHeader) -> Vec<u8> {
        let mut out = Vec::new();
        h.encode(&mut out);
        out
    }

    /// Rewrites the checksum so a test can change a field and still pass the
    /// CRC check, reaching the checks behind it.
    fn reseal(b: &mut [u8]) {
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn segment_file_names_are_zero_padded_and_sort_in_log_order() {
        assert_eq!(segment_file_name(1000), "00000000000000001000.wal");
        assert_eq!(segment_file_name(u64::MAX), "18446744073709551615.wal");
        let mut names: Vec<String> = [10, 9, 1_000_000, 0].map(segment_file_name).into();
        names.sort();
        let seqs: Vec<u64> = names
            .iter()
            .map(|n| parse_segment_file_name(n).unwrap())
            .collect();
        assert_eq!(seqs, vec![0, 9, 10, 1_000_000]);
    }

    #[test]
    fn parse_segment_file_name_rejects_anything_not_exactly_twenty_digits_dot_wal() {
        for bad in [
            "1000.wal",
            "000000000000000001000.wal",
            "0000000000000000100.wal",
            "00000000000000001000.wal.tmp",
            "00000000000000001000.WAL",
            "0000000000000000100a.wal",
            "+0000000000000000100.wal",
            "99999999999999999999.wal",
            "",
            ".wal",
        ] {
            assert_eq!(parse_segment_file_name(bad), None, "{bad}");
        }
        assert_eq!(
            parse_segment_file_name("00000000000000001000.wal"),
            Some(1000)
        );
    }

    #[test]
    fn segment_header_round_trips_and_is_32_bytes() {
        let h = SegmentHeader::new(1000);
        let b = encoded(h);
        assert_eq!(b.len(), SEGMENT_HEADER_LEN);
        assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
    }

    #[test]
    fn both_versions_are_read_and_the_newer_one_is_written() {
        assert_eq!(SegmentHeader::new(1).version, 2);
        for version in READ_VERSIONS {
            let h = SegmentHeader {
                version,
                first_seq: 1000,
            };
            assert_eq!(SegmentHeader::decode(&encoded(h)).unwrap(), h);
        }
    }

    #[test]
    fn segment_header_shorter_than_32_bytes_is_incomplete_at_every_length() {
        let b = encoded(SegmentHeader::new(7));
        for n in 0..SEGMENT_HEADER_LEN {
            assert_eq!(
                SegmentHeader::decode(&b[..n]),
                Err(SegmentHeaderError::Incomplete)
            );
        }
    }

    #[test]
    fn segment_header_reports_each_defect() {
        let good = encoded(SegmentHeader::new(7));

        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(SegmentHeader::decode(&b), Err(SegmentHeaderError::BadMagic));

        let mut b = good.clone();
        b[16] ^= 1;
        assert_eq!(
            SegmentHeader::decode(&b),
            Err(SegmentHeaderError::BadChecksum)
        );

        let mut b = good.clone();
        b[12] = 1;
        reseal(&mut b);
        assert_eq!(
            SegmentHeader::decode(&b),
            Err(SegmentHeaderError::UnsupportedFlags(1))
        );

        let mut b = good.clone();
        b[24] = 2;
        reseal(&mut b);
        assert_eq!(
            SegmentHeader::decode(&b),
            Err(SegmentHeaderError::ReservedNotZero(2))
        );
    }

    #[test]
    fn newer_version_is_refused_as_unsupported_even_if_its_checksum_lives_elsewhere() {
        let mut b = encoded(SegmentHeader {
            version: 3,
            first_seq: 7,
        });
        b[28] ^= 0xff;
        let err = SegmentHeader::decode(&b).unwrap_err();
        assert_eq!(err, SegmentHeaderError::UnsupportedVersion(3));
        assert!(err.to_string().contains("version 3"), "{err}");
        assert_eq!(err.as_error_code(), "segment_unsupported_version");
    }
}
