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
//!   with a shipper's kept `BodyBuilder`; `_as_received`: records from the
//!   tail cache, the senders' snappy bodies spliced in without compression.
//! - `checkpoint/*`: one shipped request's checkpoint writes: `begin_send` +
//!   `complete` (two flushes), `complete_and_begin` (what a busy shipper
//!   does: one flush), next to one raw fdatasync.
//! - `shapes/*`: validation of the request shapes of the memory table below,
//!   1 MiB each, on the bytes (`streaming`) and by decoding into owned
//!   structs (`prost`, how it was done before).
//! - `reencode/*`: a shipper's build of a request from 2.0 records of such
//!   shapes (translation to 1.0, merging two), the same two ways.
//!
//! Before the timings, a table of **memory per decoded byte** (printed when
//! no group is named, or with `-- memory`): for each shape of issue 15 (2.0
//! with millions of tiny series, 1.0 with exemplars, histograms with many
//! buckets, metadata only, and the worst shapes for the streaming
//! validation), the peak of heap bytes allocated (a counting global
//! allocator, this thread only) during validation, and during a shipper's
//! re-encoding (2.0 to 1.0 translation, merging two 2.0 records), divided by
//! the decoded size: on the bytes (`now`) and by decoding into owned structs
//! (`owned`, how it was done before).
//!
//! Throughput is in samples (elements) so stages compare directly.
//! Run: `cargo bench --bench hotpath -- --noplot` (a group: append its name,
//! e.g. `-- validate`). `WALRELAY_BENCH_DIR` picks the disk for the groups
//! that write.
#![allow(clippy::unwrap_used, clippy::expect_used, unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chaos_tests::encode::{encode_labels, put_timeseries, put_varint, snappy_compress};
use chaos_tests::load::{encode_value, LoadSpec};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use prom_remote_write::{decode, encode as rw_encode, translate, Limits, Protocol};
use wal_format::{Compression, PayloadEncoding, PayloadKind, Record, RecordMeta, RecordRef};
use walrelay::checkpoint::Checkpoints;
use walrelay::commit::{Budget, Committer};
use walrelay::retention::Retention;
use walrelay::ship::payload::{build_v1, BodyBuilder};
use walrelay::types::FullPolicy;
use walrelay::types::ReplicaProtocol;
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
    // Without the one-pass fast path: the streaming path every other shape
    // takes.
    g.bench_function("protobuf_and_rules_streaming", |b| {
        b.iter(|| decode::validate_without_fast_path(Protocol::V1, &raw, &limits).unwrap());
    });
    // Decoding into owned structs, as before the streaming path: kept to
    // show the difference.
    g.bench_function("protobuf_and_rules_prost", |b| {
        b.iter(|| decode::validate_v1(&decode::decode_v1(&raw).unwrap(), &limits).unwrap());
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
        // Records from the tail cache: the senders' snappy bodies, spliced.
        let received: Vec<Record> = records[..n]
            .iter()
            .map(|r| {
                let mut wire = r.clone();
                wire.payload = Bytes::from(prom_remote_write::encode::snappy_compress(&r.payload));
                wire.meta.encoding = wal_format::PayloadEncoding::Snappy;
                wire
            })
            .collect();
        g.bench_function(
            BenchmarkId::new("build_v1_as_received", format!("{n}_records")),
            |b| {
                let mut builder = BodyBuilder::default();
                b.iter(|| builder.build_v1(&received).unwrap());
            },
        );
        // How it was done before: the whole request, then its snappy copy.
        g.bench_function(
            BenchmarkId::new("build_v1_whole_request", format!("{n}_records")),
            |b| {
                let mut builder = WholeRequest::default();
                b.iter(|| builder.build(&records[..n], ReplicaProtocol::V1));
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

// ---------------------------------------------------------------------------
// Memory per decoded byte.

/// Counts the heap bytes live on threads that asked for it, and their peak.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
}

fn tracking() -> bool {
    TRACK.try_with(Cell::get).unwrap_or(false)
}

fn grow(n: usize) {
    let live = LIVE.fetch_add(n as i64, Ordering::Relaxed) + n as i64;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: forwards to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if tracking() {
            grow(layout.size());
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if tracking() {
            grow(layout.size());
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if tracking() {
            // Counted as a new block before the old one is freed.
            grow(new_size);
            LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if tracking() {
            LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The peak of heap bytes allocated while `f` runs (its result dropped).
fn peak_bytes<T>(f: impl FnOnce() -> T) -> u64 {
    LIVE.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
    TRACK.with(|t| t.set(true));
    drop(f());
    TRACK.with(|t| t.set(false));
    PEAK.load(Ordering::Relaxed).max(0) as u64
}

fn key(out: &mut Vec<u8>, tag: u64, wire_type: u64) {
    put_varint(out, (tag << 3) | wire_type);
}

fn len_field(out: &mut Vec<u8>, tag: u64, body: &[u8]) {
    key(out, tag, 2);
    put_varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

fn label(name: &str, value: &str) -> Vec<u8> {
    let mut l = vec![];
    len_field(&mut l, 1, name.as_bytes());
    if !value.is_empty() {
        len_field(&mut l, 2, value.as_bytes());
    }
    l
}

/// Repeats `unit` after `head` until `size` bytes.
fn repeat_to(head: Vec<u8>, unit: &[u8], size: usize) -> Vec<u8> {
    let mut out = head;
    while out.len() + unit.len() <= size {
        out.extend_from_slice(unit);
    }
    out
}

/// 2.0 symbols, as the start of a request.
fn symbols(strings: &[&str]) -> Vec<u8> {
    let mut out = vec![];
    for s in strings {
        len_field(&mut out, 4, s.as_bytes());
    }
    out
}

/// An integer histogram with `buckets` buckets of one observation each, in
/// one span: 1.0 and 2.0 alike.
fn many_bucket_histogram(buckets: u64) -> Vec<u8> {
    let mut h = vec![];
    key(&mut h, 1, 0);
    put_varint(&mut h, buckets); // count_int
    key(&mut h, 6, 0);
    put_varint(&mut h, 0); // zero_count_int
    let mut span = vec![];
    key(&mut span, 2, 0);
    put_varint(&mut span, buckets);
    len_field(&mut h, 11, &span);
    let mut deltas = vec![2u8]; // sint64 1, then 0s
    deltas.resize(buckets as usize, 0);
    len_field(&mut h, 12, &deltas);
    key(&mut h, 15, 0);
    put_varint(&mut h, 1_700_000_000_000);
    h
}

struct Shape {
    id: &'static str,
    name: &'static str,
    protocol: Protocol,
    body: Vec<u8>,
}

/// The shapes of issue 15, and the worst ones for the streaming path, of
/// about `size` decoded bytes.
fn shapes(size: usize) -> Vec<Shape> {
    let v2_tiny = {
        let mut s = vec![];
        len_field(&mut s, 1, &[1, 2]);
        let mut unit = vec![];
        len_field(&mut unit, 5, &s);
        repeat_to(symbols(&["", "__name__", "a"]), &unit, size)
    };
    let v1_exemplars = {
        let mut s = vec![];
        len_field(&mut s, 1, &label("__name__", "a"));
        len_field(&mut s, 3, &[]);
        let mut unit = vec![];
        len_field(&mut unit, 1, &s);
        repeat_to(vec![], &unit, size)
    };
    let histogram_series = |labels_field: &[u8], histogram_tag: u64| {
        let mut s = labels_field.to_vec();
        len_field(&mut s, histogram_tag, &many_bucket_histogram(1000));
        s
    };
    let v1_histograms = {
        let mut l = vec![];
        len_field(&mut l, 1, &label("__name__", "h"));
        let mut unit = vec![];
        len_field(&mut unit, 1, &histogram_series(&l, 4));
        repeat_to(vec![], &unit, size)
    };
    let v2_histograms = {
        let mut l = vec![];
        len_field(&mut l, 1, &[1, 2]);
        let mut unit = vec![];
        len_field(&mut unit, 5, &histogram_series(&l, 3));
        repeat_to(symbols(&["", "__name__", "h"]), &unit, size)
    };
    let v1_metadata = {
        let mut m = vec![];
        key(&mut m, 1, 0);
        put_varint(&mut m, 1);
        len_field(&mut m, 2, b"m");
        len_field(&mut m, 4, b"h");
        let mut unit = vec![];
        len_field(&mut unit, 3, &m);
        repeat_to(vec![], &unit, size)
    };
    // Worst cases of the streaming path: one series whose labels are not in
    // order (1.0: 5-byte labels; 2.0: distinct name references), and a
    // table of empty symbols.
    let v1_unsorted = {
        let mut s = vec![];
        len_field(&mut s, 1, &label("__name__", "m"));
        let mut n = 0u32;
        while s.len() < size - 16 {
            n += 1;
            // Distinct 4-letter names in decreasing order: "~~~~", "~~~}", ...
            let name: String = (0..4)
                .rev()
                .map(|i| (b'~' - ((n / 94u32.pow(i)) % 94) as u8) as char)
                .collect();
            len_field(&mut s, 1, &label(&name, ""));
        }
        let mut out = vec![];
        len_field(&mut out, 1, &s);
        out
    };
    let v2_unsorted = {
        let count = (size / 8) as u32;
        let mut strings: Vec<String> = vec![String::new(), "__name__".into(), "m".into()];
        strings.extend((0..count).map(|i| format!("{:x}", u32::MAX - i)));
        let refs_of: Vec<&str> = strings.iter().map(String::as_str).collect();
        let mut refs = vec![];
        put_varint(&mut refs, 1);
        put_varint(&mut refs, 2);
        for r in 3..3 + count as u64 {
            put_varint(&mut refs, r);
            put_varint(&mut refs, 0);
        }
        let mut s = vec![];
        len_field(&mut s, 1, &refs);
        let mut out = symbols(&refs_of);
        len_field(&mut out, 5, &s);
        out
    };
    let v2_empty_symbols = {
        let mut s = vec![];
        len_field(&mut s, 1, &[1, 2]);
        let mut tail = vec![];
        len_field(&mut tail, 5, &s);
        let mut out = repeat_to(
            symbols(&["", "__name__", "a"]),
            &[0x22, 0x00],
            size - tail.len(),
        );
        out.extend(tail);
        out
    };
    vec![
        Shape {
            id: "v2_tiny_series",
            name: "2.0 tiny series (labels_refs [1,2])",
            protocol: Protocol::V2,
            body: v2_tiny,
        },
        Shape {
            id: "v1_exemplars",
            name: "1.0 series with one empty exemplar",
            protocol: Protocol::V1,
            body: v1_exemplars,
        },
        Shape {
            id: "v1_histograms",
            name: "1.0 histograms, 1000 buckets",
            protocol: Protocol::V1,
            body: v1_histograms,
        },
        Shape {
            id: "v2_histograms",
            name: "2.0 histograms, 1000 buckets",
            protocol: Protocol::V2,
            body: v2_histograms,
        },
        Shape {
            id: "v1_metadata",
            name: "1.0 metadata only",
            protocol: Protocol::V1,
            body: v1_metadata,
        },
        Shape {
            id: "v1_unsorted",
            name: "1.0 one series, unsorted labels",
            protocol: Protocol::V1,
            body: v1_unsorted,
        },
        Shape {
            id: "v2_unsorted",
            name: "2.0 one series, unsorted labels",
            protocol: Protocol::V2,
            body: v2_unsorted,
        },
        Shape {
            id: "v2_empty_symbols",
            name: "2.0 empty symbols",
            protocol: Protocol::V2,
            body: v2_empty_symbols,
        },
    ]
}

fn validate_owned(protocol: Protocol, body: &[u8], limits: &Limits) {
    match protocol {
        Protocol::V1 => decode::validate_v1(&decode::decode_v1(body).unwrap(), limits).unwrap(),
        Protocol::V2 => decode::validate_v2(&decode::decode_v2(body).unwrap(), limits).unwrap(),
    };
}

fn record_of(kind: PayloadKind, seq: u64, body: &[u8]) -> Record {
    Record {
        seq,
        meta: RecordMeta { kind, ..meta(1) },
        payload: Bytes::copy_from_slice(body),
    }
}

/// The shipper's build as it was before requests were compressed as they
/// are built (a copy of the old `BodyBuilder`): the whole uncompressed
/// request in one buffer, then its snappy copy in another, both kept.
#[derive(Default)]
struct WholeRequest {
    raw: Vec<u8>,
    out: Vec<u8>,
}

impl WholeRequest {
    fn build(&mut self, records: &[Record], protocol: ReplicaProtocol) -> Bytes {
        self.raw.clear();
        let to_v2 =
            protocol == ReplicaProtocol::V2 && records[0].meta.kind == PayloadKind::RemoteWriteV2;
        if !to_v2 {
            self.raw
                .reserve(records.iter().map(|r| r.payload.len()).sum());
            for r in records {
                match r.meta.kind {
                    PayloadKind::RemoteWriteV1 => self.raw.extend_from_slice(&r.payload),
                    PayloadKind::RemoteWriteV2 => {
                        let req = translate::CheckedV2::new(&r.payload).unwrap();
                        translate::v2_to_v1_bytes(&req, &mut self.raw).unwrap();
                    }
                }
            }
        } else if records.len() == 1 {
            self.raw.extend_from_slice(&records[0].payload);
        } else {
            let parts: Vec<_> = records
                .iter()
                .map(|r| translate::CheckedV2::new(&r.payload).unwrap())
                .collect();
            rw_encode::merge_v2_bytes(&parts, &mut self.raw).unwrap();
        }
        let need = snap::raw::max_compress_len(self.raw.len());
        if self.out.len() < need {
            self.out.resize(need, 0);
        }
        let n = snap::raw::Encoder::new()
            .compress(&self.raw, &mut self.out[..need])
            .unwrap();
        let body = Bytes::copy_from_slice(&self.out[..n]);
        if self.raw.capacity() > 4 * self.raw.len().max(1 << 20) {
            self.raw = Vec::new();
            self.out = Vec::new();
        }
        body
    }
}

/// The shipper's 2.0 re-encoding as it was: decode, translate or merge,
/// encode, compress.
fn build_owned(bodies: &[&[u8]], protocol: ReplicaProtocol) -> Vec<u8> {
    let mut raw = vec![];
    let decoded = || bodies.iter().map(|b| decode::decode_v2(b).unwrap());
    match protocol {
        ReplicaProtocol::V1 => {
            for req in decoded() {
                let (v1, _) = translate::v2_to_v1(&req).unwrap();
                prost::Message::encode(&v1, &mut raw).unwrap();
            }
        }
        ReplicaProtocol::V2 => {
            let merged = rw_encode::merge_v2(decoded().collect()).unwrap();
            prost::Message::encode(&merged, &mut raw).unwrap();
        }
    }
    snappy_compress(&raw).unwrap()
}

fn per_byte(bytes: u64, of: usize) -> String {
    let r = bytes as f64 / of as f64;
    if r < 0.01 {
        format!("{r:.5} ({bytes} B)")
    } else {
        format!("{r:.3}")
    }
}

/// The table of memory per decoded byte.
fn memory_report() {
    const SIZE: usize = 8 << 20;
    let limits = Limits {
        max_decoded_bytes: 64 << 20,
        ..Limits::default()
    };
    println!(
        "memory per decoded byte (peak heap bytes allocated / decoded bytes), {} MiB bodies",
        SIZE >> 20
    );
    println!("| shape | validate: now | validate: owned |");
    println!("|---|---|---|");
    for shape in shapes(SIZE) {
        let (p, body) = (shape.protocol, &shape.body);
        let now = peak_bytes(|| decode::validate(p, body, &limits).unwrap());
        let owned = peak_bytes(|| validate_owned(p, body, &limits));
        println!(
            "| {} | {} | {} |",
            shape.name,
            per_byte(now, body.len()),
            per_byte(owned, body.len())
        );
    }
    println!();
    shipper_memory_report(SIZE);
}

/// The heap bytes still live when `f` returns what it built (kept by it).
fn live_after<T>(f: impl FnOnce() -> T) -> (u64, T) {
    LIVE.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
    TRACK.with(|t| t.set(true));
    let t = f();
    TRACK.with(|t| t.set(false));
    (LIVE.load(Ordering::Relaxed).max(0) as u64, t)
}

/// A shipper's build, per byte of the records: 1.0 records concatenated,
/// 2.0 records translated to 1.0 or merged; the whole request built then
/// compressed (before) against the request compressed as it is built (now).
fn shipper_memory_report(size: usize) {
    println!("shipper: peak heap bytes during a build / bytes of the records (the body built counts); compressed = the body");
    println!("| records | request | whole request (before) | streamed (now) | owned | request / records | body / records | now / body | kept after: before, now |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut cases: Vec<(String, ReplicaProtocol, Vec<Record>)> = vec![];
    let load: Vec<Record> = (0..(size / request(0, 0).len()) as u64)
        .map(|i| {
            record_of(
                PayloadKind::RemoteWriteV1,
                i,
                &request((i % 8) as u32, i / 8),
            )
        })
        .collect();
    cases.push((
        format!("load-shaped 1.0 (1000 series of 8 labels) x {}", load.len()),
        ReplicaProtocol::V1,
        load,
    ));
    for shape in shapes(size) {
        let records = |kind, n: u64| (0..n).map(|i| record_of(kind, i, &shape.body)).collect();
        match shape.protocol {
            Protocol::V1 => cases.push((
                format!("{} x 2: 1.0 concatenation", shape.name),
                ReplicaProtocol::V1,
                records(PayloadKind::RemoteWriteV1, 2),
            )),
            Protocol::V2 => {
                cases.push((
                    format!("{}: 1.0 translation", shape.name),
                    ReplicaProtocol::V1,
                    records(PayloadKind::RemoteWriteV2, 1),
                ));
                cases.push((
                    format!("{} x 2: 2.0 merge", shape.name),
                    ReplicaProtocol::V2,
                    records(PayloadKind::RemoteWriteV2, 2),
                ));
            }
        }
    }
    for (name, protocol, records) in &cases {
        let (name, protocol) = (name.as_str(), *protocol);
        let decoded: usize = records.iter().map(|r| r.payload.len()).sum();
        let before = peak_bytes(|| WholeRequest::default().build(records, protocol));
        let now = peak_bytes(|| BodyBuilder::default().build(records, protocol).unwrap());
        let owned = match records[0].meta.kind {
            PayloadKind::RemoteWriteV2 => {
                let bodies: Vec<&[u8]> = records.iter().map(|r| &r.payload[..]).collect();
                per_byte(peak_bytes(|| build_owned(&bodies, protocol)), decoded)
            }
            PayloadKind::RemoteWriteV1 => "-".into(),
        };
        let (kept_before, _) = live_after(|| {
            let mut b = WholeRequest::default();
            drop(b.build(records, protocol));
            b
        });
        let (kept_now, _) = live_after(|| {
            let mut b = BodyBuilder::default();
            drop(b.build(records, protocol).unwrap());
            b
        });
        let built = BodyBuilder::default().build(records, protocol).unwrap();
        assert_eq!(built.body, WholeRequest::default().build(records, protocol));
        let raw = snap::raw::decompress_len(&built.body).unwrap();
        println!(
            "| {name} | {} | {} | {owned} | {:.2} | {:.3} | {:.2} | {} KiB, {} KiB |",
            per_byte(before, decoded),
            per_byte(now, decoded),
            raw as f64 / decoded as f64,
            built.body.len() as f64 / decoded as f64,
            now as f64 / built.body.len() as f64,
            kept_before >> 10,
            kept_now >> 10,
        );
    }
    println!();
}

/// Validation speed per shape, on the bytes and by decoding.
fn validate_shapes(c: &mut Criterion) {
    let mut g = c.benchmark_group("shapes");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let limits = Limits::default();
    for shape in shapes(1 << 20) {
        let (p, body) = (shape.protocol, &shape.body);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(BenchmarkId::new("streaming", shape.id), |b| {
            b.iter(|| decode::validate(p, body, &limits).unwrap());
        });
        g.bench_function(BenchmarkId::new("prost", shape.id), |b| {
            b.iter(|| validate_owned(p, body, &limits));
        });
    }
    g.finish();
}

/// A shipper's build from records of 1 MiB: 2.0 records translated to 1.0
/// or merged, 1.0 records concatenated; compressed as the request is built
/// (`streaming`, what the shipper does), the whole request built then
/// compressed (`whole`, how it was done before), and for 2.0 by decoding
/// into owned structs (`prost`).
fn reencode_shapes(c: &mut Criterion) {
    let mut g = c.benchmark_group("reencode");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let picked = [
        "v2_tiny_series",
        "v2_histograms",
        "v2_unsorted",
        "v1_exemplars",
    ];
    for shape in shapes(1 << 20)
        .into_iter()
        .filter(|s| picked.contains(&s.id))
    {
        let ways: &[(ReplicaProtocol, u64, &str)] = match shape.protocol {
            Protocol::V2 => &[
                (ReplicaProtocol::V1, 1, "to_v1"),
                (ReplicaProtocol::V2, 2, "merge_2"),
            ],
            Protocol::V1 => &[(ReplicaProtocol::V1, 2, "concat_2")],
        };
        let kind = match shape.protocol {
            Protocol::V1 => PayloadKind::RemoteWriteV1,
            Protocol::V2 => PayloadKind::RemoteWriteV2,
        };
        for &(protocol, n, what) in ways {
            let records: Vec<Record> = (0..n).map(|i| record_of(kind, i, &shape.body)).collect();
            let bodies: Vec<&[u8]> = records.iter().map(|r| &r.payload[..]).collect();
            g.throughput(Throughput::Bytes(n * shape.body.len() as u64));
            g.bench_function(
                BenchmarkId::new(format!("{what}/streaming"), shape.id),
                |b| {
                    let mut builder = BodyBuilder::default();
                    b.iter(|| builder.build(&records, protocol).unwrap());
                },
            );
            g.bench_function(BenchmarkId::new(format!("{what}/whole"), shape.id), |b| {
                let mut builder = WholeRequest::default();
                b.iter(|| builder.build(&records, protocol));
            });
            if shape.protocol == Protocol::V2 {
                g.bench_function(BenchmarkId::new(format!("{what}/prost"), shape.id), |b| {
                    b.iter(|| build_owned(&bodies, protocol));
                });
            }
        }
    }
    g.finish();
}

criterion_group!(
    benches,
    validate,
    validate_shapes,
    reencode_shapes,
    encode,
    commit,
    ship,
    checkpoint
);

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.as_deref().is_none_or(|f| f == "memory") {
        memory_report();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
