//! Log throughput, reported next to what the disk itself does in the same
//! run, so the result reads as a ratio:
//!
//! - `disk/sequential_write_1MiB_fdatasync_every_8MiB`: raw `write` + fdatasync
//!   throughput of the disk under the bench's temp dir (the ceiling).
//! - `disk/fdatasync_4KiB`: the fsync rate (what bounds group commit).
//! - `append/{8KiB,64KiB}_sync_every_{1,16,128}`: `WalWriter::append` one
//!   record at a time with a sync every N records (uncompressed, to compare
//!   byte for byte with the raw disk).
//! - `scan/{none,zstd}`: reading every record back from the page cache.
//!
//! Run: `cargo bench --bench wal` (set `WALRELAY_BENCH_DIR` to measure a
//! particular disk; the default is the system temp dir).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wal_format::{Compression, PayloadEncoding, PayloadKind, RecordMeta, RecordRef};
use walrelay::wal::{open, ReadItem, RealStorage, WalOptions};

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("WALRELAY_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn meta() -> RecordMeta {
    RecordMeta {
        receive_time_ms: 0,
        min_sample_ts: 0,
        max_sample_ts: 0,
        samples: 100,
        kind: PayloadKind::RemoteWriteV1,
        encoding: PayloadEncoding::Identity,
    }
}

/// A payload that compresses like remote-write protobuf: repeated label text
/// with varying numbers.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = seed;
    while out.len() < len {
        let line = format!(
            "__name__\x08node_cpu_seconds_total\x04mode\x06system\x03cpu\x01{}\x08instance\x0e10.0.0.{}:9100{:016x}",
            i % 8,
            i % 250,
            i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        );
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

fn disk(c: &mut Criterion) {
    let mut g = c.benchmark_group("disk");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    let chunk = vec![7u8; 1 << 20];
    g.throughput(Throughput::Bytes(8 << 20));
    g.bench_function("sequential_write_1MiB_fdatasync_every_8MiB", |b| {
        let dir = bench_dir();
        let mut f = std::fs::File::create(dir.path().join("raw")).unwrap();
        let mut written = 0u64;
        b.iter(|| {
            for _ in 0..8 {
                f.write_all(&chunk).unwrap();
            }
            f.sync_data().unwrap();
            written += 8 << 20;
            if written > 1 << 30 {
                f.set_len(0).unwrap();
                written = 0;
            }
        });
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("fdatasync_4KiB", |b| {
        let dir = bench_dir();
        let mut f = std::fs::File::create(dir.path().join("raw")).unwrap();
        let block = vec![1u8; 4096];
        b.iter(|| {
            f.write_all(&block).unwrap();
            f.sync_data().unwrap();
        });
    });
    g.finish();
}

fn append(c: &mut Criterion) {
    let mut g = c.benchmark_group("append");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for size in [8 << 10, 64 << 10] {
        let payloads: Vec<Vec<u8>> = (0..64).map(|s| payload(size, s)).collect();
        for every in [1usize, 16, 128] {
            g.throughput(Throughput::Bytes((size * every) as u64));
            let id = BenchmarkId::new(format!("{}KiB_sync_every", size >> 10), every);
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let dir = bench_dir();
                    let options = WalOptions {
                        compression: Compression::None,
                        ..WalOptions::default()
                    };
                    let (mut w, wal, _) = open(Arc::new(RealStorage), dir.path(), options).unwrap();
                    let started = Instant::now();
                    for i in 0..iters {
                        for j in 0..every {
                            let p = &payloads[(i as usize + j) % payloads.len()];
                            w.append(&[RecordRef {
                                meta: meta(),
                                payload: p,
                            }])
                            .unwrap();
                        }
                        w.sync().unwrap();
                        // Keep the directory bounded on long runs.
                        if i % 256 == 255 {
                            wal.delete_before(w.next_seq()).unwrap();
                        }
                    }
                    started.elapsed()
                });
            });
        }
    }
    g.finish();
}

fn scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("scan");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    let records = 4096u64;
    let size = 16 << 10;
    for compression in [Compression::None, Compression::Zstd] {
        let dir = bench_dir();
        let options = WalOptions {
            compression,
            ..WalOptions::default()
        };
        let (mut w, wal, _) = open(Arc::new(RealStorage), dir.path(), options).unwrap();
        for s in 0..records / 16 {
            let ps: Vec<Vec<u8>> = (0..16).map(|i| payload(size, s * 16 + i)).collect();
            let refs: Vec<RecordRef<'_>> = ps
                .iter()
                .map(|p| RecordRef {
                    meta: meta(),
                    payload: p,
                })
                .collect();
            w.append(&refs).unwrap();
        }
        w.sync().unwrap();
        g.throughput(Throughput::Bytes(records * size as u64));
        let name = if compression == Compression::None {
            "none"
        } else {
            "zstd"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut r = wal.reader(0);
                let mut n = 0u64;
                while let Some(ReadItem::Record(rec)) = r.try_next().unwrap() {
                    n += rec.payload.len() as u64;
                }
                assert_eq!(n, records * size as u64);
            });
        });
    }
    g.finish();
}

criterion_group!(benches, disk, append, scan);
criterion_main!(benches);
