#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::frame::{decode_frame, decode_records, encode_frame, Decoded};
use crate::record::{PayloadEncoding, PayloadKind, RecordMeta};

const SALT: u64 = 1000;

fn meta(i: u64) -> RecordMeta {
    RecordMeta {
        receive_time_ms: 1_700_000_000_000 + i as i64,
        min_sample_ts: 1_700_000_000_000,
        max_sample_ts: 1_700_000_000_000,
        samples: 20,
        kind: PayloadKind::RemoteWriteV1,
        encoding: PayloadEncoding::Identity,
    }
}

/// A request-like payload: the same label text every time, values that
/// change.
fn payload(i: u64) -> Vec<u8> {
    (0..20)
        .flat_map(|s| {
            format!(
                "__name__=node_cpu_seconds_total,cpu={s:02},mode=idle,instance=host:9100 {:08}\n",
                i * 31 + s
            )
            .into_bytes()
        })
        .collect()
}

/// Record `i` of the tests' logs, holding `p`.
fn record(i: usize, p: &[u8]) -> [RecordRef<'_>; 1] {
    [RecordRef {
        meta: meta(i as u64),
        payload: p,
    }]
}

/// Frames of one record each, `first_seq` from SALT, chained by `enc`.
fn chain_of(enc: &mut ChainEncoder, n: u64) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let payloads: Vec<Vec<u8>> = (0..n).map(payload).collect();
    let frames = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut out = Vec::new();
            let seq = SALT + i as u64;
            enc.encode_frame(SALT, seq, &record(i, p), &mut out)
                .unwrap();
            out
        })
        .collect();
    (frames, payloads)
}

fn parts(frame: &[u8]) -> (FrameHeader, &[u8]) {
    match decode_frame(SALT, frame) {
        Decoded::Frame { header, body } => (header, body),
        other => panic!("expected a frame, got {other:?}"),
    }
}

#[test]
fn a_chain_decodes_in_order_and_is_smaller_than_its_frames_alone() {
    let mut enc = ChainEncoder::new(1, 1 << 20);
    let (frames, payloads) = chain_of(&mut enc, 50);
    let mut dec = ChainDecoder::new();
    for (i, f) in frames.iter().enumerate() {
        let (h, body) = parts(f);
        let want = if i == 0 {
            Compression::ZstdChainStart
        } else {
            Compression::ZstdChained
        };
        assert_eq!(h.compression, want, "frame {i}");
        let records = dec.decode(&h, body).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].seq, SALT + i as u64);
        assert_eq!(records[0].meta, meta(i as u64));
        assert_eq!(&records[0].payload[..], &payloads[i][..]);
    }
    let alone: usize = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut out = Vec::new();
            let seq = SALT + i as u64;
            encode_frame(SALT, seq, &record(i, p), Compression::Zstd, 1, &mut out).unwrap();
            out.len()
        })
        .sum();
    let chained: usize = frames.iter().map(Vec::len).sum();
    assert!(
        chained * 3 < alone * 2,
        "chained {chained} bytes, alone {alone}"
    );
}

#[test]
fn a_later_frame_needs_the_frames_before_it() {
    let mut enc = ChainEncoder::new(1, 1 << 20);
    let (frames, _) = chain_of(&mut enc, 4);
    // Without the chain: the first frame decodes on its own, a later one
    // does not; neither is decode_records' to decode.
    let (h0, b0) = parts(&frames[0]);
    assert_eq!(ChainDecoder::new().decode(&h0, b0).unwrap().len(), 1);
    assert_eq!(decode_records(&h0, b0), Err(CorruptReason::ChainBroken));
    let (h2, b2) = parts(&frames[2]);
    assert_eq!(decode_records(&h2, b2), Err(CorruptReason::ChainBroken));
    assert_eq!(
        ChainDecoder::new().decode(&h2, b2),
        Err(CorruptReason::ChainBroken)
    );
    // A frame skipped in between breaks the chain too: frame 2 after 0.
    let mut dec = ChainDecoder::new();
    dec.decode(&h0, b0).unwrap();
    assert_eq!(dec.decode(&h2, b2), Err(CorruptReason::ChainBroken));
    // So does break_chain, and so does a failed frame.
    let mut dec = ChainDecoder::new();
    let (h1, b1) = parts(&frames[1]);
    dec.decode(&h0, b0).unwrap();
    dec.break_chain();
    assert_eq!(dec.decode(&h1, b1), Err(CorruptReason::ChainBroken));
    assert_eq!(
        dec.decode(&h2, b2),
        Err(CorruptReason::ChainBroken),
        "a failed frame is not a link of the chain"
    );
    // A chain's first frame starts over.
    dec.decode(&h0, b0).unwrap();
    dec.decode(&h1, b1).unwrap();
    dec.decode(&h2, b2).unwrap();
}

#[test]
fn a_chain_ends_at_its_cap_and_at_a_restart() {
    let size = frame_raw_len();
    // Room for three frames in a chain.
    let mut enc = ChainEncoder::new(1, 3 * size);
    let (frames, _) = chain_of(&mut enc, 7);
    let codes: Vec<Compression> = frames.iter().map(|f| parts(f).0.compression).collect();
    use Compression::{ZstdChainStart as S, ZstdChained as C};
    assert_eq!(codes, [S, C, C, S, C, C, S]);
    let mut dec = ChainDecoder::new();
    for f in &frames {
        let (h, b) = parts(f);
        dec.decode(&h, b).unwrap();
    }
    let mut enc = ChainEncoder::new(1, 1 << 20);
    let (first, _) = chain_of(&mut enc, 2);
    enc.restart();
    let (again, _) = chain_of(&mut enc, 1);
    assert_eq!(parts(&first[1]).0.compression, C);
    assert_eq!(parts(&again[0]).0.compression, S);
}

#[test]
fn a_level_change_starts_a_chain_and_keeps_the_window() {
    let mut enc = ChainEncoder::new(1, 1 << 20);
    let (first, _) = chain_of(&mut enc, 2);
    enc.set_level(1);
    let (same, _) = chain_of(&mut enc, 1);
    use Compression::{ZstdChainStart as S, ZstdChained as C};
    assert_eq!(parts(&same[0]).0.compression, C, "the same level goes on");
    // Level 19 alone would open an 8 MiB window on a stream of unknown
    // size, which a reader refuses (CHAIN_WINDOW_LOG).
    enc.set_level(19);
    assert_eq!(enc.level(), 19);
    let (high, payloads) = chain_of(&mut enc, 3);
    assert_eq!(parts(&high[0]).0.compression, S);
    let mut dec = ChainDecoder::new();
    for (i, f) in high.iter().enumerate() {
        let (h, b) = parts(f);
        let records = dec.decode(&h, b).unwrap();
        assert_eq!(&records[0].payload[..], &payloads[i][..]);
    }
    let (h, b) = parts(&first[0]);
    ChainDecoder::new().decode(&h, b).unwrap();
}

fn frame_raw_len() -> usize {
    crate::record_entry_len(payload(0).len())
}

#[test]
fn a_body_that_holds_more_or_less_than_raw_len_is_refused() {
    let mut enc = ChainEncoder::new(1, 1 << 20);
    let (frames, _) = chain_of(&mut enc, 1);
    let (h, body) = parts(&frames[0]);
    for raw_len in [h.raw_len - 1, h.raw_len + 1] {
        let lying = FrameHeader { raw_len, ..h };
        let e = ChainDecoder::new().decode(&lying, body).unwrap_err();
        assert!(
            matches!(
                e,
                CorruptReason::Decompress(_) | CorruptReason::RawLengthMismatch { .. }
            ),
            "raw_len {raw_len}: {e:?}"
        );
    }
    let e = ChainDecoder::new().decode(&h, &body[..body.len() - 1]);
    assert!(
        matches!(e, Err(CorruptReason::BodyLengthMismatch { .. })),
        "{e:?}"
    );
}

#[test]
fn frames_not_chained_decode_as_they_always_did_and_break_a_chain() {
    let mut enc = ChainEncoder::new(1, 1 << 20);
    let (frames, _) = chain_of(&mut enc, 2);
    let mut plain = Vec::new();
    let p = payload(9);
    encode_frame(
        SALT,
        SALT + 1,
        &record(1, &p),
        Compression::Zstd,
        1,
        &mut plain,
    )
    .unwrap();
    let mut dec = ChainDecoder::new();
    let (h0, b0) = parts(&frames[0]);
    dec.decode(&h0, b0).unwrap();
    let (hp, bp) = parts(&plain);
    assert_eq!(&dec.decode(&hp, bp).unwrap()[0].payload[..], &p[..]);
    let (h1, b1) = parts(&frames[1]);
    assert_eq!(dec.decode(&h1, b1), Err(CorruptReason::ChainBroken));
}
