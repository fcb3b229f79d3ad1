//! How dense, and how costly, a segment's records would be under other
//! framings: measured on real segments before the format is changed.
//!
//! ```text
//! cargo run --release -p wal-format --example frame_context -- SEGMENT...
//! ```
//!
//! Under a light load the writer frames one request per group commit, and
//! each frame is compressed on its own, so every request pays again for the
//! label sets the last one carried (issue 19: about 19.5 bytes per sample of
//! a real Prometheus's requests, against 4.4 once a sealed segment is
//! repacked). This program reads every record of each segment given (any
//! intact segment: sealed, repacked or the active one of a stopped relay)
//! and compresses the records again, in log order, one record per frame as
//! the writer would under that load, in these ways:
//!
//! - **per record**: each record compressed on its own (what the writer does
//!   today), as the sender's snappy body and decoded;
//! - **dictionary**: each record compressed against the segment's first
//!   records as a raw-content dictionary (the dictionary stored once, its
//!   size reported apart);
//! - **chained**: one zstd stream per chain of records, flushed after each
//!   record, so that a frame's compressed bytes end where its record does
//!   and a reader that has decoded the chain's earlier frames can decode it;
//!   a chain restarts after `cap` raw bytes, which bounds what damage to one
//!   frame costs (the frames after it in its chain cannot be decoded); and
//!   the snappy bodies' chains at levels 2 to 9, through which the writer
//!   climbs under a light load;
//! - **repacked**: decoded records in frames of 4 MiB at level 6 (what
//!   `Wal::repack` writes), for reference.
//!
//! For each it prints the bytes per sample and the compression time per
//! sample (one thread, this machine; compare rows of one run, not runs).
//! Decompression is not timed: every framing reads at several hundred MB/s.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use wal_format::{
    decode_frame, ChainDecoder, Decoded, PayloadEncoding, SegmentHeader, FRAME_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};

/// One record as the writer got it and decoded.
struct Rec {
    /// The sender's snappy body (the stored bytes for `encoding = 1`; for a
    /// record stored decoded, its snappy compression).
    snappy: Vec<u8>,
    decoded: Vec<u8>,
    samples: u64,
}

/// Which bytes of a record a framing compresses.
#[derive(Clone, Copy)]
enum Form {
    Snappy,
    Decoded,
}

impl Form {
    fn of(self, r: &Rec) -> &[u8] {
        match self {
            Form::Snappy => &r.snappy,
            Form::Decoded => &r.decoded,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Form::Snappy => "snappy body",
            Form::Decoded => "decoded",
        }
    }
}

fn main() -> ExitCode {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() {
        eprintln!("usage: frame_context SEGMENT...");
        return ExitCode::from(2);
    }
    for path in &paths {
        match read_segment(path) {
            Ok((recs, frame_bytes)) => {
                if let Err(e) = report(path, &recs, frame_bytes) {
                    eprintln!("{path}: {e}");
                    return ExitCode::FAILURE;
                }
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

/// Every record of the segment at `path`, and the bytes its frames take.
/// Stops at the first byte that is not an intact frame (the end, reserved
/// zeros or damage alike: this is a measurement, not `wal verify`).
fn read_segment(path: &str) -> Result<(Vec<Rec>, usize), String> {
    let buf = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let header = SegmentHeader::decode(&buf).map_err(|e| format!("{path}: segment header: {e}"))?;
    let mut offset = SEGMENT_HEADER_LEN;
    let mut chain = ChainDecoder::new();
    let mut recs = Vec::new();
    let mut frame_bytes = 0;
    while buf.len() - offset >= FRAME_HEADER_LEN {
        let Decoded::Frame { header: h, body } = decode_frame(header.first_seq, &buf[offset..])
        else {
            break;
        };
        let records = chain
            .decode(&h, body)
            .map_err(|e| format!("{path}: frame at byte {offset}: {e}"))?;
        for r in records {
            let (snappy, decoded) = match r.meta.encoding {
                PayloadEncoding::Snappy => {
                    let decoded = snap::raw::Decoder::new()
                        .decompress_vec(&r.payload)
                        .map_err(|e| format!("{path}: record {}: snappy: {e}", r.seq))?;
                    (r.payload.to_vec(), decoded)
                }
                _ => {
                    let snappy = snap::raw::Encoder::new()
                        .compress_vec(&r.payload)
                        .map_err(|e| format!("{path}: record {}: snappy: {e}", r.seq))?;
                    (snappy, r.payload.to_vec())
                }
            };
            recs.push(Rec {
                snappy,
                decoded,
                samples: u64::from(r.meta.samples),
            });
        }
        frame_bytes += h.total_len();
        offset += h.total_len();
    }
    Ok((recs, frame_bytes))
}

fn report(path: &str, recs: &[Rec], frame_bytes: usize) -> std::io::Result<()> {
    let samples: u64 = recs.iter().map(|r| r.samples).sum();
    if samples == 0 {
        println!("{path}: no samples");
        return Ok(());
    }
    let per_sample = |bytes: usize, n: u64| bytes as f64 / n as f64;
    let row = |name: &str, bytes: usize, t: Duration, n: u64| {
        println!(
            "  {name:60} {:6.2} B/sample {:7.1} ns/sample",
            per_sample(bytes, n),
            t.as_nanos() as f64 / n as f64
        );
    };
    let total = |f: fn(&Rec) -> usize| recs.iter().map(f).sum::<usize>();
    println!(
        "{path}: {} records, {samples} samples; as stored {:.2} B/sample (frames), \
         snappy bodies {:.2}, decoded {:.1}",
        recs.len(),
        per_sample(frame_bytes, samples),
        per_sample(total(|r| r.snappy.len()), samples),
        per_sample(total(|r| r.decoded.len()), samples),
    );
    for level in [1, 3] {
        for form in [Form::Snappy, Form::Decoded] {
            let t = Instant::now();
            let mut bytes = 0;
            for r in recs {
                bytes += zstd::bulk::compress(form.of(r), level)?.len();
            }
            row(
                &format!("per record, {}, zstd {level}", form.name()),
                bytes,
                t.elapsed(),
                samples,
            );
        }
    }
    // The dictionary: the first records, decoded, up to 256 KiB.
    let mut dict = Vec::new();
    let mut first = 0;
    while first < recs.len() && dict.len() + recs[first].decoded.len() <= 256 << 10 {
        dict.extend_from_slice(&recs[first].decoded);
        first += 1;
    }
    if first > 0 && first < recs.len() {
        let stored = zstd::bulk::compress(&dict, 19)?.len();
        let rest: u64 = recs[first..].iter().map(|r| r.samples).sum();
        let mut c = zstd::bulk::Compressor::with_dictionary(1, &dict)?;
        let t = Instant::now();
        let mut bytes = 0;
        for r in &recs[first..] {
            bytes += c.compress(&r.decoded)?.len();
        }
        row(
            &format!(
                "dictionary of {first} records ({} KiB), decoded, zstd 1",
                dict.len() >> 10
            ),
            bytes,
            t.elapsed(),
            rest,
        );
        println!(
            "  {:60} (the dictionary itself: {stored} bytes at level 19)",
            ""
        );
    }
    let mut cases = Vec::new();
    for form in [Form::Snappy, Form::Decoded] {
        for level in [1, 3] {
            for cap in [4usize << 20, 16 << 20] {
                cases.push((form, level, cap));
            }
        }
    }
    // The writer's chains climb from level 1 to 6 under a light load
    // (`src/wal/chain_level.rs`): what each level costs and saves.
    cases.extend([2, 4, 5, 6, 7, 9].map(|level| (Form::Snappy, level, 4 << 20)));
    for (form, level, cap) in cases {
        let t = Instant::now();
        let bytes = chained(recs, form, level, cap)?;
        row(
            &format!(
                "chained, {}, zstd {level}, 2 MiB window, {} MiB chains",
                form.name(),
                cap >> 20
            ),
            bytes,
            t.elapsed(),
            samples,
        );
    }
    let t = Instant::now();
    let mut bytes = 0;
    let mut frame = Vec::new();
    for r in recs {
        if !frame.is_empty() && frame.len() + r.decoded.len() > 4 << 20 {
            bytes += zstd::bulk::compress(&frame, 6)?.len();
            frame.clear();
        }
        frame.extend_from_slice(&r.decoded);
    }
    bytes += zstd::bulk::compress(&frame, 6)?.len();
    row(
        "repacked: decoded, 4 MiB frames, zstd 6",
        bytes,
        t.elapsed(),
        samples,
    );
    Ok(())
}

/// Bytes of the records compressed as chains of frames: one zstd stream
/// per chain, flushed after every record, a new chain once `cap` raw bytes
/// are in the current one.
fn chained(recs: &[Rec], form: Form, level: i32, cap: usize) -> std::io::Result<usize> {
    let mut bytes = 0;
    let mut i = 0;
    while i < recs.len() {
        let mut out = Vec::new();
        let mut enc = zstd::stream::write::Encoder::new(&mut out, level)?;
        enc.window_log(21)?;
        let mut raw = 0;
        while i < recs.len() && (raw == 0 || raw + form.of(&recs[i]).len() <= cap) {
            raw += form.of(&recs[i]).len();
            enc.write_all(form.of(&recs[i]))?;
            enc.flush()?;
            i += 1;
        }
        // The chain is left open, as a writer's would be: no end-of-frame.
        drop(enc);
        bytes += out.len();
    }
    Ok(bytes)
}
