//! Property tests of the frame codec: round trips, torn tails at every byte,
//! and single-byte damage anywhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use wal_format::{
    decode_frame, decode_records, encode_frame, find_next_frame, Compression, Decoded,
    PayloadEncoding, PayloadKind, Record, RecordMeta, RecordRef, FRAME_HEADER_LEN,
};

/// A record to encode, owning its payload.
#[derive(Clone, Debug)]
struct Rec {
    meta: RecordMeta,
    payload: Vec<u8>,
}

fn meta() -> impl Strategy<Value = RecordMeta> {
    (
        any::<i64>(),
        any::<i64>(),
        any::<i64>(),
        any::<u32>(),
        prop_oneof![
            Just(PayloadKind::RemoteWriteV1),
            Just(PayloadKind::RemoteWriteV2)
        ],
        prop_oneof![
            Just(PayloadEncoding::Identity),
            Just(PayloadEncoding::Snappy)
        ],
    )
        .prop_map(
            |(receive_time_ms, min_sample_ts, max_sample_ts, samples, kind, encoding)| RecordMeta {
                receive_time_ms,
                min_sample_ts,
                max_sample_ts,
                samples,
                kind,
                encoding,
            },
        )
}

/// Random bytes, or a repeated pattern so zstd frames really get compressed.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..160),
        (prop::collection::vec(any::<u8>(), 1..8), 1usize..64)
            .prop_map(|(pattern, times)| pattern.repeat(times)),
    ]
}

fn batch() -> impl Strategy<Value = Vec<Rec>> {
    prop::collection::vec(
        (meta(), payload()).prop_map(|(meta, payload)| Rec { meta, payload }),
        1..6,
    )
}

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![Just(Compression::None), Just(Compression::Zstd)]
}

fn refs(batch: &[Rec]) -> Vec<RecordRef<'_>> {
    batch
        .iter()
        .map(|r| RecordRef {
            meta: r.meta.clone(),
            payload: &r.payload,
        })
        .collect()
}

fn expected(first_seq: u64, batch: &[Rec]) -> Vec<Record> {
    batch
        .iter()
        .enumerate()
        .map(|(i, r)| Record {
            seq: first_seq + i as u64,
            meta: r.meta.clone(),
            payload: r.payload.clone().into(),
        })
        .collect()
}

/// Several frames back to back in one segment: the bytes, each frame's start
/// offset, and each frame's records.
#[derive(Debug)]
struct Log {
    salt: u64,
    bytes: Vec<u8>,
    starts: Vec<usize>,
    records: Vec<Vec<Record>>,
}

fn build_log(salt: u64, batches: &[(Vec<Rec>, Compression)]) -> Log {
    let mut log = Log {
        salt,
        bytes: Vec::new(),
        starts: Vec::new(),
        records: Vec::new(),
    };
    let mut seq = salt;
    for (batch, compression) in batches {
        log.starts.push(log.bytes.len());
        let s = encode_frame(salt, seq, &refs(batch), *compression, 1, &mut log.bytes).unwrap();
        log.records.push(expected(seq, batch));
        seq += u64::from(s.record_count);
    }
    log
}

fn log_strategy() -> impl Strategy<Value = Log> {
    (
        0u64..u64::MAX / 2,
        prop::collection::vec((batch(), compression()), 1..5),
    )
        .prop_map(|(salt, batches)| build_log(salt, &batches))
}

fn frame_records(salt: u64, buf: &[u8]) -> Option<(usize, Vec<Record>)> {
    match decode_frame(salt, buf) {
        Decoded::Frame { header, body } => {
            Some((header.total_len(), decode_records(&header, body).unwrap()))
        }
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_batch_round_trips_through_a_frame(
        salt in any::<u64>(),
        offset in 0u64..1 << 40,
        batch in batch(),
        compression in compression(),
    ) {
        let first_seq = salt.saturating_add(offset).min(u64::MAX - 8);
        let mut out = Vec::new();
        let s = encode_frame(salt, first_seq, &refs(&batch), compression, 3, &mut out).unwrap();
        prop_assert_eq!(s.len, out.len());
        prop_assert_eq!(s.record_count as usize, batch.len());
        let Decoded::Frame { header, body } = decode_frame(salt, &out) else {
            panic!("not a frame: {:?}", decode_frame(salt, &out));
        };
        prop_assert_eq!(header.total_len(), out.len());
        prop_assert_eq!(header.raw_len as usize, s.raw_len);
        prop_assert_eq!(decode_records(&header, body).unwrap(), expected(first_seq, &batch));
        // The same bytes under another segment's salt never verify.
        let other = decode_frame(salt.wrapping_add(1), &out);
        prop_assert!(matches!(other, Decoded::Corrupt { .. }), "{:?}", other);
    }

    #[test]
    fn truncation_at_any_byte_gives_the_frames_before_it_then_incomplete(
        log in log_strategy(),
        cut_seed in any::<prop::sample::Index>(),
    ) {
        let cut = cut_seed.index(log.bytes.len() + 1);
        let buf = &log.bytes[..cut];
        let mut at = 0;
        for (i, &start) in log.starts.iter().enumerate() {
            prop_assert_eq!(at, start);
            let frame_len = log.starts.get(i + 1).copied().unwrap_or(log.bytes.len()) - start;
            if start + frame_len <= cut {
                let (len, records) = frame_records(log.salt, &buf[at..]).expect("whole frame");
                prop_assert_eq!(len, frame_len);
                prop_assert_eq!(&records, &log.records[i]);
                at += len;
                continue;
            }
            if start < cut {
                let needed = if cut - start < FRAME_HEADER_LEN { FRAME_HEADER_LEN } else { frame_len };
                prop_assert_eq!(decode_frame(log.salt, &buf[at..]), Decoded::Incomplete { needed });
            }
            break;
        }
    }

    #[test]
    fn a_damaged_byte_makes_its_frame_corrupt_and_resync_finds_the_next_frame(
        log in log_strategy(),
        pos_seed in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let mut buf = log.bytes.clone();
        let pos = pos_seed.index(buf.len());
        buf[pos] ^= mask;
        let k = log.starts.iter().rposition(|&s| s <= pos).unwrap();
        // Frames before the damage still decode to exactly their records.
        for i in 0..k {
            let (_, records) = frame_records(log.salt, &buf[log.starts[i]..]).expect("intact frame");
            prop_assert_eq!(&records, &log.records[i]);
        }
        let damaged = decode_frame(log.salt, &buf[log.starts[k]..]);
        prop_assert!(matches!(damaged, Decoded::Corrupt { .. }), "{:?}", damaged);
        let next = find_next_frame(log.salt, &buf, pos);
        prop_assert_eq!(next, log.starts.get(k + 1).copied());
        if let Some(next) = next {
            let (_, records) = frame_records(log.salt, &buf[next..]).expect("next frame");
            prop_assert_eq!(&records, &log.records[k + 1]);
        }
    }
}
