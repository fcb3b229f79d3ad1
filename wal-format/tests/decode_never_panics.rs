//! A deterministic fuzz run for CI: the decoders on 100k pseudo-random and
//! mutated buffers must never panic (nor allocate by an unchecked length,
//! which would abort the test). `fuzz/` holds the coverage-guided version;
//! its target's walk (`fuzz/fuzz_targets/walk.rs`) is run here too, over a
//! bounded, seeded mutation of valid segments' frames.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use wal_format::{
    encode_frame, Compression, FrameHeader, PayloadEncoding, PayloadKind, RecordMeta, RecordRef,
    FRAME_HEADER_LEN, MAX_FRAME_RAW,
};

#[path = "../fuzz/fuzz_targets/walk.rs"]
mod fuzz_target;

const CASES: usize = 100_000;
/// Inputs of the fuzz target's run: about 30 s in a debug build on the CI
/// machine (2 shared cores). An iteration count, not a clock, so every run
/// walks the same inputs.
const FUZZ_TARGET_CASES: usize = 800_000;
const SALT: u64 = 77;

/// splitmix64: tiny, seedable, good enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn up_to(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        self.bytes(n)
    }
}

/// Valid multi-frame buffers to mutate, uncompressed and zstd.
fn corpus(rng: &mut Rng) -> Vec<Vec<u8>> {
    (0..32)
        .map(|i| {
            let mut buf = Vec::new();
            let mut seq = SALT;
            for _ in 0..1 + rng.below(3) {
                let payloads: Vec<Vec<u8>> = (0..1 + rng.below(4))
                    .map(|_| {
                        let n = rng.below(80);
                        if rng.below(2) == 0 {
                            rng.bytes(n)
                        } else {
                            vec![b'z'; n]
                        }
                    })
                    .collect();
                let records: Vec<RecordRef<'_>> = payloads
                    .iter()
                    .map(|p| RecordRef {
                        meta: meta(),
                        payload: p,
                    })
                    .collect();
                let compression = if i % 2 == 0 {
                    Compression::None
                } else {
                    Compression::Zstd
                };
                let s = encode_frame(SALT, seq, &records, compression, 1, &mut buf).unwrap();
                seq += u64::from(s.record_count);
            }
            buf
        })
        .collect()
}

fn meta() -> RecordMeta {
    RecordMeta {
        receive_time_ms: 1,
        min_sample_ts: 2,
        max_sample_ts: 3,
        samples: 4,
        kind: PayloadKind::RemoteWriteV1,
        encoding: PayloadEncoding::Snappy,
    }
}

/// Flips, overwrites, inserts, deletes or truncates a few bytes.
fn mutate(rng: &mut Rng, buf: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let pos = rng.below(buf.len() + 1);
        match rng.below(6) {
            0 if pos < buf.len() => buf[pos] ^= 1 << rng.below(8),
            1 if pos < buf.len() => buf[pos] = rng.next() as u8,
            2 => buf.insert(pos, rng.next() as u8),
            3 if pos < buf.len() => {
                buf.remove(pos);
            }
            4 => buf.truncate(pos),
            _ if pos + 4 <= buf.len() => {
                // Plant an extreme length in a 32-bit field.
                let v = [0u32, 1, 35, 36, u32::MAX, MAX_FRAME_RAW as u32 + 1][rng.below(6)];
                buf[pos..pos + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
}

/// Makes the checksums of the first frame valid again (where the buffer is
/// long enough), so mutations reach the checks behind them.
fn reseal(buf: &mut [u8]) {
    if buf.len() < FRAME_HEADER_LEN {
        return;
    }
    let body_len = u32::from_le_bytes(buf[20..24].try_into().unwrap()) as usize;
    if let Some(body) = buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN.saturating_add(body_len)) {
        let crc = crc32fast::hash(body);
        buf[32..36].copy_from_slice(&crc.to_le_bytes());
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&SALT.to_le_bytes());
    h.update(&buf[8..FRAME_HEADER_LEN]);
    let crc = h.finalize();
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// A frame with arbitrary header fields and valid checksums.
fn structured(rng: &mut Rng) -> Vec<u8> {
    let body_len = rng.below(300);
    let mut body = rng.bytes(body_len);
    if rng.below(3) == 0 {
        let raw = rng.up_to(300);
        body = zstd::bulk::compress(&raw, 1).unwrap();
    }
    let pick = |rng: &mut Rng, small: usize| -> u32 {
        match rng.below(4) {
            0 => rng.next() as u32,
            _ => rng.below(small) as u32,
        }
    };
    let header = FrameHeader {
        first_seq: if rng.below(8) == 0 {
            u64::MAX - rng.below(4) as u64
        } else {
            SALT
        },
        record_count: pick(rng, 8),
        body_len: if rng.below(4) == 0 {
            rng.next() as u32
        } else {
            body.len() as u32
        },
        raw_len: pick(rng, 400),
        compression: if rng.below(2) == 0 {
            Compression::None
        } else {
            Compression::Zstd
        },
        body_crc: crc32fast::hash(&body),
    };
    let mut buf = header.encode(SALT).to_vec();
    buf.extend_from_slice(&body);
    buf
}

/// The fuzz target's walk, collecting the refusals' codes.
fn walk(buf: &[u8], codes: &mut BTreeSet<&'static str>) -> usize {
    fuzz_target::walk_frames(SALT, buf, &mut |code| {
        codes.insert(code);
    })
}

#[test]
fn decoders_never_panic_on_random_and_mutated_buffers() {
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let corpus = corpus(&mut rng);
    let (mut frames, mut codes) = (0, BTreeSet::new());
    for i in 0..CASES {
        let buf = match i % 4 {
            0 => rng.up_to(200),
            1 => {
                let mut b = corpus[rng.below(corpus.len())].clone();
                mutate(&mut rng, &mut b);
                b
            }
            2 => {
                let mut b = corpus[rng.below(corpus.len())].clone();
                mutate(&mut rng, &mut b);
                reseal(&mut b);
                b
            }
            _ => structured(&mut rng),
        };
        frames += walk(&buf, &mut codes);
    }
    // Guard against a generator that never reaches the deeper checks.
    eprintln!("{frames} valid frames; corrupt reasons reached: {codes:?}");
    assert!(frames > CASES / 20, "only {frames} valid frames seen");
    for code in [
        "bad_magic",
        "bad_header_checksum",
        "bad_body_checksum",
        "length_over_limit",
        "record_count_exceeds_body",
        "raw_length_mismatch",
        "decompress",
        "entry_overrun",
        "unknown_kind",
        "trailing_bytes",
        "record_count_mismatch",
        "bad_compression",
        "body_length_mismatch",
        "reserved_not_zero",
        "seq_overflow",
        "unknown_encoding",
        "zero_record_count",
        "zstd_trailing_bytes",
    ] {
        assert!(codes.contains(code), "{code} never reached; saw {codes:?}");
    }
}

#[test]
fn the_fuzz_target_survives_a_bounded_seeded_mutation_of_valid_frames() {
    let mut rng = Rng(0x5eed_cafe_f00d_0002);
    // The target's input: the salt, then the frames.
    let seeds: Vec<Vec<u8>> = corpus(&mut rng)
        .into_iter()
        .map(|frames| [SALT.to_le_bytes().as_slice(), &frames].concat())
        .collect();
    for seed in &seeds {
        assert!(
            fuzz_target::walk(seed) > 0,
            "a valid seed has no intact frame"
        );
    }
    let mut intact = 0;
    for i in 0..FUZZ_TARGET_CASES {
        let mut input = seeds[rng.below(seeds.len())].clone();
        // Every few inputs, another salt: nothing may read as intact then.
        let salted = i % 16 == 0;
        if salted {
            input[..8].copy_from_slice(&rng.next().to_le_bytes());
        }
        let (salt, frames) = input.split_at_mut(8);
        let mut frames = frames.to_vec();
        mutate(&mut rng, &mut frames);
        if i % 2 == 0 {
            reseal(&mut frames);
        }
        let input = [&*salt, frames.as_slice()].concat();
        let n = fuzz_target::walk(&input);
        assert!(
            !salted || n == 0,
            "a frame read as intact under another salt"
        );
        intact += n;
    }
    // Guard against mutations so heavy that nothing deep is reached.
    assert!(
        intact > FUZZ_TARGET_CASES / 4,
        "only {intact} intact frames"
    );
}
