#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::record::{PayloadEncoding, PayloadKind, RecordMeta};

const SALT: u64 = 1000;

fn meta(i: i64) -> RecordMeta {
    RecordMeta {
        receive_time_ms: 1_700_000_000_000 + i,
        min_sample_ts: 1_699_999_990_000 + i,
        max_sample_ts: 1_699_999_999_000 + i,
        samples: 3,
        kind: PayloadKind::RemoteWriteV1,
        encoding: PayloadEncoding::Snappy,
    }
}

fn refs(payloads: &[&'static [u8]]) -> Vec<RecordRef<'static>> {
    payloads
        .iter()
        .enumerate()
        .map(|(i, p)| RecordRef {
            meta: meta(i as i64),
            payload: p,
        })
        .collect()
}

fn encode(payloads: &[&'static [u8]], compression: Compression) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(SALT, SALT, &refs(payloads), compression, 3, &mut out).unwrap();
    out
}

fn expect_frame(buf: &[u8]) -> (FrameHeader, &[u8]) {
    match decode_frame(SALT, buf) {
        Decoded::Frame { header, body } => (header, body),
        other => panic!("expected a frame, got {other:?}"),
    }
}

fn expect_corrupt(buf: &[u8]) -> CorruptReason {
    match decode_frame(SALT, buf) {
        Decoded::Corrupt { reason } => reason,
        other => panic!("expected corrupt, got {other:?}"),
    }
}

/// Recomputes the header checksum so a test can alter a header field and
/// still reach the checks behind the checksum.
fn reseal_header(buf: &mut [u8]) {
    let h: [u8; FRAME_HEADER_LEN] = buf[..FRAME_HEADER_LEN].try_into().unwrap();
    buf[4..8].copy_from_slice(&header_crc(SALT, &h).to_le_bytes());
}

/// A frame with a hand-made header (checksums made valid) and body.
fn hand_made(header: FrameHeader, body: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        body_crc: crc32fast::hash(body),
        ..header
    };
    let mut buf = header.encode(SALT).to_vec();
    buf.extend_from_slice(body);
    buf
}

fn header_for(body_len: usize, raw_len: usize, compression: Compression) -> FrameHeader {
    FrameHeader {
        first_seq: SALT,
        record_count: 1,
        body_len: body_len as u32,
        raw_len: raw_len as u32,
        compression,
        body_crc: 0,
    }
}

/// One valid raw entry holding `payload`.
fn raw_entry(payload: &[u8]) -> Vec<u8> {
    let mut raw = Vec::new();
    encode_entry(
        &RecordRef {
            meta: meta(0),
            payload,
        },
        &mut raw,
    );
    raw
}

#[test]
fn uncompressed_frame_round_trips() {
    let buf = encode(&[b"alpha", b"", b"gamma"], Compression::None);
    let (header, body) = expect_frame(&buf);
    assert_eq!(header.first_seq, SALT);
    assert_eq!(header.record_count, 3);
    assert_eq!(header.end_seq(), SALT + 3);
    assert_eq!(header.total_len(), buf.len());
    assert_eq!(header.compression, Compression::None);
    let records = decode_records(&header, body).unwrap();
    assert_eq!(records.len(), 3);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq, SALT + i as u64);
        assert_eq!(r.meta, meta(i as i64));
    }
    assert_eq!(records[2].payload.as_ref(), b"gamma");
}

#[test]
fn compressible_frame_is_stored_as_zstd_and_round_trips() {
    static BIG: [u8; 4096] = [b'x'; 4096];
    let mut out = Vec::new();
    let summary = encode_frame(
        SALT,
        1234,
        &refs(&[&BIG, &BIG]),
        Compression::Zstd,
        3,
        &mut out,
    )
    .unwrap();
    assert_eq!(summary.len, out.len());
    assert_eq!(summary.raw_len, 2 * (36 + 4096));
    let (header, body) = expect_frame(&out);
    assert_eq!(header.compression, Compression::Zstd);
    assert!((header.body_len as usize) < summary.raw_len);
    let records = decode_records(&header, body).unwrap();
    assert_eq!(records[1].seq, 1235);
    assert_eq!(records[1].payload.as_ref(), &BIG[..]);
}

#[test]
fn zstd_that_does_not_shrink_the_body_is_stored_uncompressed() {
    // xorshift noise: incompressible, so zstd's output is larger than its input.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..512)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let rec = RecordRef {
        meta: meta(0),
        payload: &noise,
    };
    let mut out = Vec::new();
    let s = encode_frame(SALT, SALT, &[rec], Compression::Zstd, 3, &mut out).unwrap();
    let (header, body) = expect_frame(&out);
    assert_eq!(header.compression, Compression::None);
    assert_eq!(header.body_len, header.raw_len);
    assert_eq!(s.raw_len, header.raw_len as usize);
    assert_eq!(decode_records(&header, body).unwrap()[0].payload, noise);
}

#[test]
fn encode_appends_after_existing_bytes() {
    let mut out = b"prefix".to_vec();
    let s = encode_frame(SALT, SALT, &refs(&[b"a"]), Compression::None, 0, &mut out).unwrap();
    assert_eq!(&out[..6], b"prefix");
    assert_eq!(s.len, out.len() - 6);
    expect_frame(&out[6..]);
}

#[test]
fn encode_refuses_bad_batches_and_leaves_out_untouched() {
    let mut out = b"keep".to_vec();
    let err = encode_frame(SALT, SALT, &[], Compression::None, 0, &mut out).unwrap_err();
    assert!(matches!(err, EncodeError::Empty));

    let huge = vec![0u8; MAX_RECORD_PAYLOAD + 1];
    let big = RecordRef {
        meta: meta(0),
        payload: &huge,
    };
    let err = encode_frame(
        SALT,
        SALT,
        std::slice::from_ref(&big),
        Compression::Zstd,
        0,
        &mut out,
    )
    .unwrap_err();
    assert!(matches!(err, EncodeError::PayloadTooLarge { len } if len == MAX_RECORD_PAYLOAD + 1));

    let max = RecordRef {
        payload: &huge[..MAX_RECORD_PAYLOAD],
        ..big
    };
    let err = encode_frame(
        SALT,
        SALT,
        &[max.clone(), max],
        Compression::None,
        0,
        &mut out,
    )
    .unwrap_err();
    assert!(
        matches!(err, EncodeError::FrameTooLarge { raw_len } if raw_len == 2 * (MAX_RECORD_PAYLOAD + 36))
    );
    assert_eq!(err.as_error_code(), "frame_too_large");

    let err = encode_frame(
        SALT,
        u64::MAX,
        &refs(&[b"a"]),
        Compression::None,
        0,
        &mut out,
    )
    .unwrap_err();
    assert!(matches!(err, EncodeError::SeqOverflow { .. }));
    assert_eq!(out, b"keep");
}

#[test]
fn truncation_at_every_byte_is_incomplete_with_the_bytes_needed() {
    let buf = encode(&[b"alpha", b"beta"], Compression::None);
    for n in 0..buf.len() {
        let needed = if n < FRAME_HEADER_LEN {
            FRAME_HEADER_LEN
        } else {
            buf.len()
        };
        assert_eq!(
            decode_frame(SALT, &buf[..n]),
            Decoded::Incomplete { needed },
            "cut at {n}"
        );
    }
    let header_only = &buf[..FRAME_HEADER_LEN];
    assert_eq!(
        decode_frame_header(SALT, header_only).unwrap().total_len(),
        buf.len()
    );
    assert_eq!(
        decode_frame_header(SALT, &buf[..39]),
        Err(HeaderStatus::Incomplete)
    );
}

#[test]
fn bad_magic_is_corrupt() {
    let mut buf = encode(&[b"a"], Compression::None);
    buf[0] = 0;
    assert_eq!(
        expect_corrupt(&buf),
        CorruptReason::BadMagic { found: *b"\0RFR" }
    );
}

#[test]
fn damaged_header_is_a_header_checksum_error() {
    let mut buf = encode(&[b"a"], Compression::None);
    buf[20] ^= 0x80; // body_len
    assert_eq!(expect_corrupt(&buf).as_error_code(), "bad_header_checksum");
}

#[test]
fn intact_frame_from_another_segment_never_reads_as_valid() {
    let buf = encode(&[b"a"], Compression::None);
    assert!(matches!(
        decode_frame(SALT + 1, &buf),
        Decoded::Corrupt {
            reason: CorruptReason::BadHeaderChecksum { .. }
        }
    ));
    assert_eq!(find_next_frame(SALT + 1, &buf, 0), None);
}

#[test]
fn damaged_body_is_a_body_checksum_error() {
    let mut buf = encode(&[b"abc"], Compression::None);
    let last = buf.len() - 1;
    buf[last] ^= 1;
    assert_eq!(expect_corrupt(&buf).as_error_code(), "bad_body_checksum");
}

#[test]
fn nonzero_reserved_header_fields_are_corrupt() {
    for at in [29, 30, 31, 36, 39] {
        let mut buf = encode(&[b"a"], Compression::None);
        buf[at] = 1;
        reseal_header(&mut buf);
        let reason = expect_corrupt(&buf);
        assert!(
            matches!(reason, CorruptReason::ReservedNotZero { .. }),
            "{at}: {reason:?}"
        );
    }
}

#[test]
fn unknown_compression_is_corrupt() {
    let mut buf = encode(&[b"a"], Compression::None);
    buf[28] = 4;
    reseal_header(&mut buf);
    assert_eq!(expect_corrupt(&buf), CorruptReason::BadCompression(4));
}

#[test]
fn zero_record_count_is_corrupt() {
    let h = FrameHeader {
        record_count: 0,
        ..header_for(0, 0, Compression::None)
    };
    assert_eq!(
        expect_corrupt(&hand_made(h, &[])),
        CorruptReason::ZeroRecordCount
    );
}

#[test]
fn a_four_gib_body_len_is_corrupt_not_an_allocation() {
    let h = header_for(u32::MAX as usize, 100, Compression::Zstd);
    let reason = expect_corrupt(&h.encode(SALT));
    assert_eq!(
        reason,
        CorruptReason::LengthOverLimit {
            field: "body_len",
            len: u64::from(u32::MAX),
            limit: MAX_FRAME_BODY as u64
        }
    );
}

#[test]
fn raw_len_over_the_limit_is_corrupt() {
    let h = header_for(100, MAX_FRAME_RAW + 1, Compression::Zstd);
    let reason = expect_corrupt(&h.encode(SALT));
    assert!(matches!(
        reason,
        CorruptReason::LengthOverLimit {
            field: "raw_len",
            ..
        }
    ));
}

#[test]
fn a_body_len_within_limits_but_beyond_the_buffer_is_incomplete() {
    let h = header_for(MAX_FRAME_BODY, MAX_FRAME_RAW, Compression::Zstd);
    let needed = FRAME_HEADER_LEN + MAX_FRAME_BODY;
    assert_eq!(
        decode_frame(SALT, &h.encode(SALT)),
        Decoded::Incomplete { needed }
    );
}

#[test]
fn sequence_overflow_is_corrupt() {
    let h = FrameHeader {
        first_seq: u64::MAX,
        ..header_for(36, 36, Compression::None)
    };
    assert!(matches!(
        expect_corrupt(&hand_made(h, &[0; 36])),
        CorruptReason::SeqOverflow { .. }
    ));
}

#[test]
fn raw_len_too_small_for_the_record_count_is_corrupt() {
    let h = FrameHeader {
        record_count: 2,
        ..header_for(40, 40, Compression::None)
    };
    let reason = expect_corrupt(&hand_made(h, &[0; 40]));
    assert_eq!(reason.as_error_code(), "record_count_exceeds_body");
}

#[test]
fn uncompressed_frame_with_body_len_unlike_raw_len_is_corrupt() {
    let h = header_for(37, 38, Compression::None);
    let reason = expect_corrupt(&hand_made(h, &[0; 37]));
    assert_eq!(
        reason,
        CorruptReason::RawLengthMismatch {
            expected: 38,
            actual: 37
        }
    );
}

#[test]
fn decode_records_refuses_a_body_slice_of_the_wrong_length() {
    let buf = encode(&[b"a"], Compression::None);
    let (header, body) = expect_frame(&buf);
    let reason = decode_records(&header, &body[1..]).unwrap_err();
    assert_eq!(reason.as_error_code(), "body_length_mismatch");
}

/// Decodes a hand-made zstd frame whose header claims `raw_len`.
fn zstd_records(body: &[u8], raw_len: usize) -> Result<Vec<Record>, CorruptReason> {
    let buf = hand_made(header_for(body.len(), raw_len, Compression::Zstd), body);
    let (header, body) = expect_frame(&buf);
    decode_records(&header, body)
}

#[test]
fn garbage_zstd_body_is_a_decompress_error() {
    let reason = zstd_records(&[0xde; 50], 100).unwrap_err();
    assert_eq!(reason.as_error_code(), "decompress");
    assert!(reason.to_string().contains("zstd"));
}

#[test]
fn zstd_content_size_unlike_raw_len_is_refused_before_decompressing() {
    let raw = raw_entry(&[7; 500]);
    let body = zstd::bulk::compress(&raw, 3).unwrap();
    let reason = zstd_records(&body, raw.len() + 1).unwrap_err();
    assert_eq!(
        reason,
        CorruptReason::RawLengthMismatch {
            expected: raw.len() as u32 + 1,
            actual: raw.len() as u64
        }
    );
    assert_eq!(
        zstd_records(&body, raw.len()).unwrap()[0].payload.as_ref(),
        &[7; 500][..]
    );
}

#[test]
fn zstd_body_with_bytes_after_its_frame_is_corrupt() {
    let raw = raw_entry(&[7; 500]);
    let mut body = zstd::bulk::compress(&raw, 3).unwrap();
    body.extend_from_slice(&body.clone());
    let reason = zstd_records(&body, raw.len()).unwrap_err();
    assert_eq!(
        reason,
        CorruptReason::ZstdTrailingBytes {
            trailing: body.len() / 2
        }
    );
}

/// zstd output without a content size, as another encoder might write.
fn compress_without_content_size(raw: &[u8]) -> Vec<u8> {
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
        .unwrap();
    c.compress(raw).unwrap()
}

#[test]
fn zstd_output_beyond_raw_len_fails_instead_of_growing_the_buffer() {
    let raw = raw_entry(&[7; 500]);
    let body = compress_without_content_size(&raw);
    let reason = zstd_records(&body, raw.len() - 1).unwrap_err();
    assert_eq!(reason.as_error_code(), "decompress");
    assert_eq!(zstd_records(&body, raw.len()).unwrap().len(), 1);
}

#[test]
fn zstd_output_shorter_than_raw_len_is_a_length_mismatch() {
    let raw = raw_entry(&[7; 500]);
    let body = compress_without_content_size(&raw);
    let reason = zstd_records(&body, raw.len() + 5).unwrap_err();
    assert_eq!(reason.as_error_code(), "raw_length_mismatch");
}

#[test]
fn malformed_entries_inside_a_valid_frame_are_corrupt() {
    let mut raw = raw_entry(b"abc");
    raw.push(0);
    let buf = hand_made(header_for(raw.len(), raw.len(), Compression::None), &raw);
    let (header, body) = expect_frame(&buf);
    assert_eq!(
        decode_records(&header, body),
        Err(CorruptReason::TrailingBytes { count: 1 })
    );
}

#[test]
fn find_next_frame_skips_damage_and_stale_frames() {
    let mut buf = encode(&[b"one"], Compression::None);
    let second = buf.len();
    buf.extend_from_slice(&encode(&[b"two"], Compression::None));
    assert_eq!(find_next_frame(SALT, &buf, 0), Some(0));
    assert_eq!(find_next_frame(SALT, &buf, 1), Some(second));
    buf[10] ^= 0xff; // damage the first header
    assert_eq!(find_next_frame(SALT, &buf, 0), Some(second));
    assert_eq!(find_next_frame(SALT, &buf, second + 1), None);
    assert_eq!(find_next_frame(SALT, &buf, buf.len() + 10), None);
    // A header cut off by the end of the buffer is not found.
    assert_eq!(find_next_frame(SALT, &buf[..second + 39], 1), None);
}

#[test]
fn find_next_frame_ignores_magic_bytes_without_a_valid_header() {
    let mut buf = b"WRFRWRFR garbage garbage garbage garbage garbage".to_vec();
    let at = buf.len();
    buf.extend_from_slice(&encode(&[b"x"], Compression::None));
    assert_eq!(find_next_frame(SALT, &buf, 0), Some(at));
}

#[test]
fn error_codes_are_distinct_snake_case_and_messages_readable() {
    let reasons = [
        CorruptReason::BadMagic { found: [0; 4] },
        CorruptReason::BadHeaderChecksum {
            stored: 1,
            computed: 2,
        },
        CorruptReason::BadBodyChecksum {
            stored: 1,
            computed: 2,
        },
        CorruptReason::ReservedNotZero {
            field: "frame.reserved29",
            value: 1,
        },
        CorruptReason::BadCompression(9),
        CorruptReason::ZeroRecordCount,
        CorruptReason::LengthOverLimit {
            field: "raw_len",
            len: 1,
            limit: 0,
        },
        CorruptReason::SeqOverflow {
            first_seq: 1,
            record_count: 2,
        },
        CorruptReason::RecordCountExceedsBody {
            record_count: 1,
            raw_len: 0,
        },
        CorruptReason::RawLengthMismatch {
            expected: 1,
            actual: 2,
        },
        CorruptReason::BodyLengthMismatch {
            expected: 1,
            actual: 2,
        },
        CorruptReason::Decompress("x".into()),
        CorruptReason::ZstdTrailingBytes { trailing: 1 },
        CorruptReason::EntryOverrun {
            index: 0,
            offset: 0,
            needed: 36,
            remaining: 1,
        },
        CorruptReason::UnknownKind(9),
        CorruptReason::UnknownEncoding(9),
        CorruptReason::TrailingBytes { count: 1 },
        CorruptReason::RecordCountMismatch {
            expected: 2,
            found: 1,
        },
    ];
    let mut codes: Vec<&str> = reasons.iter().map(CorruptReason::as_error_code).collect();
    assert!(codes
        .iter()
        .all(|c| c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
    codes.sort_unstable();
    codes.dedup();
    assert_eq!(codes.len(), reasons.len());
    assert!(reasons.iter().all(|r| r.to_string().len() > 10));
}

#[test]
fn headers_alone_index_a_segment_even_when_a_body_is_damaged() {
    let mut buf = Vec::new();
    let mut seq = SALT;
    for payloads in [&[b"a" as &[u8], b"b"][..], &[b"c"], &[b"d", b"e", b"f"]] {
        let records: Vec<RecordRef<'_>> = payloads
            .iter()
            .map(|p| RecordRef {
                meta: meta(0),
                payload: p,
            })
            .collect();
        let s = encode_frame(SALT, seq, &records, Compression::None, 0, &mut buf).unwrap();
        seq += u64::from(s.record_count);
    }
    let last = buf.len() - 1;
    buf[last] ^= 0xff; // body damage: invisible to a header-only scan
    let (mut at, mut index) = (0, Vec::new());
    while let Ok(h) = decode_frame_header(SALT, &buf[at..]) {
        index.push((h.first_seq, h.end_seq(), at));
        at += h.total_len();
    }
    assert_eq!(at, buf.len());
    let ranges: Vec<(u64, u64)> = index.iter().map(|&(a, b, _)| (a, b)).collect();
    assert_eq!(ranges, vec![(1000, 1002), (1002, 1003), (1003, 1006)]);
    let (_, _, off) = index[2];
    assert_eq!(
        expect_corrupt(&buf[off..]).as_error_code(),
        "bad_body_checksum"
    );
}

#[test]
fn the_kept_compression_context_writes_what_a_fresh_one_writes() {
    // Frames must not depend on what the thread compressed before.
    let bodies: Vec<Vec<u8>> = (0..6u8)
        .map(|i| {
            (0..4000u32)
                .map(|j| (j % (7 + u32::from(i))) as u8)
                .collect()
        })
        .collect();
    for level in [3, 3, 1, 3, 19] {
        for raw in &bodies {
            assert_eq!(
                super::compress(raw, level).unwrap(),
                zstd::bulk::compress(raw, level).unwrap(),
                "level {level}"
            );
        }
    }
}
