//! The relay's hot path, stage by stage, on requests shaped like the
//! end-to-end benchmark's load (`walrelay-load`: 1000 series of 8 labels,
//! one fresh sample each, ~18 KB snappy, ~200 KB decoded):
//!
//! - `validate/*`: what ingest does to a body before it is stored:
//!   `decompress_snappy`, `validate` (protobuf structure + label rules;
//!   `_prost` is the full path that decodes into owned structs, which the
//!   allocation-free fast path replaces for plain requests), and both.
//! - `encode/*`: turning a group-commit batch into frames and writing it to
//!   the page cache (`WalWriter::append`, no fsync), zstd (the default) and
//!   uncompressed: the CPU cost of a commit.
//! - `commit/*`: `Committer::append` from N concurrent requests, each
//!   waiting for its fsync: the latency and throughput a sender sees from
//!   the log, with N = 1, 8, 32 requests per group commit.
//! - `ship/*`: a shipper's CPU per request: reading coalesced records back
//!   from the log (zstd frames; records that are still in the writer's
//!   in-memory tail cache skip this), and `payload::build_v1` (concatenation
//!   plus snappy re-compression) for 1 and 20 records, with fresh buffers and
//!   with a shipper's kept `BodyBuilder`.
//! - `checkpoint/*`: one shipped request's checkpoint writes: `begin_send` +
//!   `complete` (two flushes), `complete_and_begin` (what a busy shipper
//!   does: one flush), next to one raw fdatasync.
//!
//! Throughput is in samples (elements) so stages compare directly.
//! Run: `cargo bench --bench hotpath -- --noplot` (a group: append its name,
//! e.g. `-- validate`). `WALRELAY_BENCH_DIR` picks the disk for the groups
//! that write.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chaos_tests::encode::{encode_labels, put_timeseries, snappy_compress};
use chaos_tests::load::{encode_value, LoadSpec};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prom_remote_write::{decode, Limits, Protocol};
use wal_format::{Compression, PayloadEncoding, PayloadKind, Record, RecordMeta, RecordRef};
use walrelay::checkpoint::Checkpoints;
use walrelay::commit::{Budget, Committer};
use walrelay::config::FullPolicy;
use walrelay::retention::Retention;
use walrelay::ship::payload::{build_v1, BodyBuilder};
use walrelay::wal::{open, ReadItem, RealStorage, WalOptions};

const SERIES: u32 = 1000;

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("WALRELAY_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

/// The decoded (protobuf) WriteRequest the load generator's worker `w`
/// sends as its `seq`-th request.
fn request(w: u32, seq: u64) -> Vec<u8> {
    let spec = LoadSpec {
        run_id: "bench".into(),
        ..LoadSpec::default()
    };
    let ts = 1_700_000_000_000 + seq as i64 * 1000;
    let mut raw = Vec::new();
    for s in 0..SERIES {
        let l = spec.series_labels(w, s);
        let refs: Vec<(&str, &str)> = l.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        put_timeseries(
            &mut raw,
            &encode_labels(&refs),
            &[(encode_value(w, s, seq), ts)],
        );
    }
    raw
}

fn meta(samples: u32) -> RecordMeta {
    RecordMeta {
        receive_time_ms: 1_700_000_000_000,
        min_sample_ts: 1_700_000_000_000,
        max_sample_ts: 1_700_000_000_000,
        samples,
        kind: PayloadKind::RemoteWriteV1,
        encoding: PayloadEncoding::Identity,
    }
}

fn validate(c: &mut Criterion) {
    let mut g = c.benchmark_group("validate");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    let raw = request(0, 0);
    let body = snappy_compress(&raw).unwrap();
    let limits = Limits::default();
    g.throughput(Throughput::Elements(u64::from(SERIES)));
    g.bench_function("snappy_decompress", |b| {
        b.iter(|| decode::decompress_snappy(&body, limits.max_decoded_bytes).unwrap());
    });
    g.bench_function("protobuf_and_rules", |b| {
        b.iter(|| decode::validate(Protocol::V1, &raw, &limits).unwrap());
    });
    // The full path (prost decode into owned structs), which the fast path
    // above skips for plain requests: kept to show the difference.
    g.bench_function("protobuf_and_rules_prost", |b| {
        b.iter(|| decode::validate_without_fast_path(Protocol::V1, &raw, &limits).unwrap());
    });
    g.bench_function("both", |b| {
        b.iter(|| {
            let d = decode::decompress_snappy(&body, limits.max_decoded_bytes).unwrap();
            decode::validate(Protocol::V1, &d, &limits).unwrap()
        });
    });
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    let payloads: Vec<Vec<u8>> = (0..8).map(|w| request(w, 0)).collect();
    for (name, compression) in [("zstd", Compression::Zstd), ("none", Compression::None)] {
        for batch in [1usize, 8] {
            g.throughput(Throughput::Elements(u64::from(SERIES) * batch as u64));
            g.bench_function(BenchmarkId::new(name, format!("{batch}_requests")), |b| {
                let dir = bench_dir();
                let options = WalOptions {
                    compression,
                    ..WalOptions::default()
                };
                let (mut w, wal, _) = open(Arc::new(RealStorage), dir.path(), options).unwrap();
                let mut n = 0u64;
                b.iter(|| {
                    let refs: Vec<RecordRef<'_>> = payloads[..batch]
                        .iter()
                        .map(|p| RecordRef {
                            meta: meta(SERIES),
                            payload: p,
                        })
                        .collect();
                    w.append(&refs).unwrap();
                    n += 1;
                    if n.is_multiple_of(512) {
                        // Publish and drop what is written, so the bench
                        // measures CPU and page cache, not disk capacity.
                        w.sync().unwrap();
                        wal.delete_before(w.next_seq()).unwrap();
                    }
                });
            });
        }
    }
    g.finish();
}

fn commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("commit");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let payloads: Vec<Bytes> = (0..32).map(|w| Bytes::from(request(w, 0))).collect();
    for concurrent in [1usize, 8, 32] {
        g.throughput(Throughput::Elements(u64::from(SERIES) * concurrent as u64));
        g.bench_function(
            BenchmarkId::new("zstd_fdatasync", format!("{concurrent}_concurrent")),
            |b| {
                let dir = bench_dir();
                let (writer, wal, _) =
                    open(Arc::new(RealStorage), dir.path(), WalOptions::default()).unwrap();
                let retention = Arc::new(Retention::new(wal.clone(), None));
                let (committer, thread) = Committer::start(
                    writer,
                    wal.clone(),
                    retention,
                    Budget {
                        max_disk_bytes: 0,
                        policy: FullPolicy::Block,
                    },
                )
                .unwrap();
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let started = Instant::now();
                        for _ in 0..iters {
                            let tasks: Vec<_> = payloads[..concurrent]
                                .iter()
                                .map(|p| {
                                    let c = committer.clone();
                                    let p = p.clone();
                                    tokio::spawn(async move { c.append(meta(SERIES), p).await })
                                })
                                .collect();
                            for t in tasks {
                                t.await.unwrap().unwrap();
                            }
                        }
                        let took = started.elapsed();
                        wal.delete_before(wal.durable_end()).unwrap();
                        took
                    })
                });
                committer.stop();
                drop(committer);
                thread.join().unwrap();
            },
        );
    }
    g.finish();
}

fn ship(c: &mut Criterion) {
    let mut g = c.benchmark_group("ship");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    let records: Vec<Record> = (0..20u64)
        .map(|i| Record {
            seq: i,
            meta: meta(SERIES),
            payload: Bytes::from(request((i % 8) as u32, i / 8)),
        })
        .collect();
    for n in [1usize, 20] {
        g.throughput(Throughput::Elements(u64::from(SERIES) * n as u64));
        g.bench_function(BenchmarkId::new("build_v1", format!("{n}_records")), |b| {
            b.iter(|| build_v1(&records[..n]).unwrap());
        });
        // What a shipper does: the same builder, its buffers kept.
        g.bench_function(
            BenchmarkId::new("build_v1_reused_buffers", format!("{n}_records")),
            |b| {
                let mut builder = BodyBuilder::default();
                b.iter(|| builder.build_v1(&records[..n]).unwrap());
            },
        );
    }
    // Reading back: what each shipper does before build_v1, from frames of
    // 8 requests each (a busy group commit).
    let dir = bench_dir();
    let (mut w, wal, _) = open(Arc::new(RealStorage), dir.path(), WalOptions::default()).unwrap();
    for chunk in records.chunks(4).cycle().take(40) {
        let refs: Vec<RecordRef<'_>> = chunk.iter().map(Record::as_record_ref).collect();
        w.append(&refs).unwrap();
    }
    w.sync().unwrap();
    let total = w.next_seq();
    g.throughput(Throughput::Elements(u64::from(SERIES) * total));
    g.bench_function("read_zstd_frames", |b| {
        b.iter(|| {
            let mut r = wal.reader(0);
            let mut n = 0u64;
            while let Some(ReadItem::Record(_)) = r.try_next().unwrap() {
                n += 1;
            }
            assert_eq!(n, total);
        });
    });
    g.finish();
}

fn checkpoint(c: &mut Criterion) {
    let mut g = c.benchmark_group("checkpoint");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(1));
    g.bench_function("begin_send_and_complete", |b| {
        let dir = bench_dir();
        let cp = Checkpoints::open(&dir.path().join("cp")).unwrap();
        cp.set("a", 0).unwrap();
        let mut seq = 0u64;
        b.iter(|| {
            cp.begin_send("a", seq..seq + 10).unwrap();
            seq += 10;
            cp.complete("a", seq).unwrap();
        });
    });
    // A busy shipper: the previous request's completion and the next one's
    // range in one flush.
    g.bench_function("complete_and_begin", |b| {
        let dir = bench_dir();
        let cp = Checkpoints::open(&dir.path().join("cp")).unwrap();
        cp.set("a", 0).unwrap();
        let mut seq = 0u64;
        b.iter(|| {
            cp.complete_and_begin("a", seq, seq..seq + 10).unwrap();
            seq += 10;
        });
    });
    g.bench_function("raw_fdatasync_4KiB", |b| {
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

criterion_group!(benches, validate, encode, commit, ship, checkpoint);
criterion_main!(benches);
