//! Tests of the log against the crash-simulating storage: a model (the list
//! of appended payloads and how many of them were synced) checked after
//! random appends, syncs, crashes that keep any prefix of the unsynced bytes,
//! and bit flips.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use proptest::prelude::*;
use wal_format::{Compression, PayloadEncoding, PayloadKind, RecordMeta, RecordRef};

use super::sim::SimStorage;
use super::*;

fn dir() -> PathBuf {
    PathBuf::from("/sim/wal")
}

fn small_options(compression: Compression) -> WalOptions {
    WalOptions {
        segment_bytes: 4096,
        compression,
        zstd_level: 1,
        zstd_max_level: 1,
        max_frame_bytes: 1024,
        initial_seq: 0,
        segment_max_age: None,
    }
}

fn meta(t: i64) -> RecordMeta {
    RecordMeta {
        receive_time_ms: t,
        min_sample_ts: t,
        max_sample_ts: t,
        samples: 1,
        kind: PayloadKind::RemoteWriteV1,
        encoding: PayloadEncoding::Identity,
    }
}

fn payload(seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq as usize * 31 + i * 7) as u8)
        .collect()
}

fn append(w: &mut WalWriter, payloads: &[Vec<u8>]) -> std::ops::Range<u64> {
    let refs: Vec<RecordRef<'_>> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| RecordRef {
            meta: meta(i as i64),
            payload: p,
        })
        .collect();
    w.append(&refs).unwrap()
}

/// Everything a fresh reader from `from` yields until caught up.
fn read_all(wal: &Wal, from: u64) -> Vec<ReadItem> {
    let mut r = wal.reader(from);
    let mut out = Vec::new();
    while let Some(item) = r.try_next().unwrap() {
        out.push(item);
    }
    out
}

fn open_sim(storage: &SimStorage, options: WalOptions) -> (WalWriter, Wal, RecoveryReport) {
    open(Arc::new(storage.clone()), &dir(), options).unwrap()
}

/// A log of `records` records of `len` bytes, each appended and synced on
/// its own (so one frame each), with the writer closed.
fn synced_log(records: u64, len: usize) -> SimStorage {
    let storage = SimStorage::new();
    let (mut w, _, _) = open_sim(&storage, small_options(Compression::None));
    for i in 0..records {
        append(&mut w, &[payload(i, len)]);
        w.sync().unwrap();
    }
    storage
}

/// Flips a bit inside the body of the second frame of a [`synced_log`] of
/// 200-byte records; returns the segment's path.
fn flip_in_second_frame_body(storage: &SimStorage) -> PathBuf {
    let seg = dir().join(wal_format::segment_file_name(0));
    let second = wal_format::SEGMENT_HEADER_LEN + (wal_format::FRAME_HEADER_LEN + 36 + 200) + 60;
    storage.flip_bit(&seg, second, 3);
    seg
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<usize>),
    Sync,
    Crash(u16),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(0usize..1500, 1..6).prop_map(Op::Append),
        3 => Just(Op::Sync),
        1 => any::<u16>().prop_map(Op::Crash),
        1 => Just(Op::Reopen),
    ]
}

/// Reads from `pos` to the end and checks the reader's promises: records
/// in order and as appended, never one below `pos`; every gap starts at the
/// reader's position and does not end before it; records and gaps cover
/// `pos..end` exactly once. Returns the gaps.
fn read_checked(wal: &Wal, model: &[Vec<u8>], pos: u64) -> Vec<(u64, u64)> {
    let mut expect = pos;
    let mut gaps = Vec::new();
    for item in read_all(wal, pos) {
        match item {
            ReadItem::Record(r) => {
                assert_eq!(r.seq, expect, "reader at {pos}: record out of order");
                assert_eq!(
                    r.payload.as_ref(),
                    model[r.seq as usize].as_slice(),
                    "reader at {pos}: record {} differs",
                    r.seq
                );
                expect += 1;
            }
            ReadItem::Gap(g) => {
                assert!(g.to >= g.from, "reader at {pos}: backwards gap {g:?}");
                assert_eq!(
                    g.from, expect,
                    "reader at {pos}: gap not at its position {g:?}"
                );
                gaps.push((g.from, g.to));
                expect = g.to;
            }
        }
    }
    assert_eq!(expect, wal.durable_end(), "reader at {pos}: stopped early");
    gaps
}

/// Checks the log against the model: records `first..` read back in order
/// and equal to what was appended, and every synced record is there.
fn check(wal: &Wal, model: &[Vec<u8>], synced: u64) {
    let gaps = read_checked(wal, model, wal.extent().first_seq);
    assert!(gaps.is_empty(), "gaps without damage: {gaps:?}");
    let end = wal.durable_end();
    assert!(
        end >= synced,
        "synced records lost: have ..{end}, synced ..{synced}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// The central promise: whatever sequence of appends, syncs and power
    /// losses (keeping any prefix of the unsynced bytes), every synced record
    /// reads back, nothing reads back that was not appended, and the log
    /// continues at the first lost sequence number.
    #[test]
    fn synced_records_survive_any_crash(
        ops in prop::collection::vec(op(), 1..40),
        zstd in any::<bool>(),
    ) {
        let compression = if zstd { Compression::Zstd } else { Compression::None };
        let storage = SimStorage::new();
        let (mut w, mut wal, _) = open_sim(&storage, small_options(compression));
        let mut model: Vec<Vec<u8>> = Vec::new();
        let mut synced = 0u64;
        for op in ops {
            match op {
                Op::Append(lens) => {
                    let next = w.next_seq();
                    let ps: Vec<Vec<u8>> = lens.iter().enumerate()
                        .map(|(i, &l)| payload(next + i as u64, l)).collect();
                    let range = append(&mut w, &ps);
                    prop_assert_eq!(range.start as usize, model.len());
                    model.extend(ps);
                }
                Op::Sync => { synced = w.sync().unwrap(); }
                Op::Crash(keep) => {
                    drop(w);
                    storage.crash(|n| if n == 0 { 0 } else { keep as usize % (n + 1) });
                    let (w2, wal2, report) = open_sim(&storage, small_options(compression));
                    prop_assert!(report.next_seq >= synced);
                    prop_assert!(report.damage.is_empty(), "damage after a clean crash: {:?}", report.damage);
                    check(&wal2, &model, synced);
                    model.truncate(report.next_seq as usize);
                    synced = report.next_seq;
                    w = w2;
                    wal = wal2;
                }
                Op::Reopen => {
                    w.sync().unwrap();
                    drop(w);
                    let (w2, wal2, report) = open_sim(&storage, small_options(compression));
                    prop_assert_eq!(report.next_seq as usize, model.len());
                    prop_assert!(report.truncated.is_none());
                    synced = report.next_seq;
                    w = w2;
                    wal = wal2;
                }
            }
        }
        w.sync().unwrap();
        check(&wal, &model, model.len() as u64);
    }

    /// A bit flipped anywhere in a synced log never yields a corrupted
    /// record: what is read is exactly what was appended, and the reader's
    /// records and gaps together cover the log in order.
    #[test]
    fn a_flipped_bit_costs_only_the_damaged_records(
        batches in prop::collection::vec(prop::collection::vec(0usize..800, 1..5), 2..15),
        which_segment in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        zstd in any::<bool>(),
    ) {
        // With zstd the frames are chains, and a damaged frame costs the
        // rest of its chain: still only damaged records, never a wrong one.
        let compression = if zstd { Compression::Zstd } else { Compression::None };
        let storage = SimStorage::new();
        let (mut w, _, _) = open_sim(&storage, small_options(compression));
        let mut model: Vec<Vec<u8>> = Vec::new();
        for lens in batches {
            let next = w.next_seq();
            let ps: Vec<Vec<u8>> = lens.iter().enumerate()
                .map(|(i, &l)| payload(next + i as u64, l)).collect();
            append(&mut w, &ps);
            model.extend(ps);
            w.sync().unwrap();
        }
        drop(w);
        let files = {
            let mut v = storage.list(&dir()).unwrap();
            v.sort();
            v
        };
        let victim = dir().join(&files[which_segment.index(files.len())]);
        let len = storage.file_len(&victim).unwrap();
        storage.flip_bit(&victim, at.index(len), bit);

        // Opening may refuse a damaged newest header, but never panics.
        let Ok((_, wal, _)) = open(Arc::new(storage.clone()), &dir(), small_options(compression)) else {
            return Ok(());
        };
        let first = wal.extent().first_seq;
        let mut expect = first;
        for item in read_all(&wal, first) {
            match item {
                ReadItem::Record(r) => {
                    prop_assert_eq!(r.seq, expect);
                    prop_assert_eq!(r.payload.as_ref(), model[r.seq as usize].as_slice());
                    expect += 1;
                }
                ReadItem::Gap(g) => {
                    prop_assert_eq!(g.from, expect);
                    prop_assert!(g.to >= g.from);
                    expect = g.to;
                }
            }
        }
        // A flip in the newest segment's tail may have been cut as torn, but
        // the log never extends past what was written.
        prop_assert!(expect <= model.len() as u64);
    }
}

#[test]
fn writer_truncates_torn_tail_instead_of_failing_open() {
    let storage = SimStorage::new();
    let (mut w, _, _) = open_sim(&storage, small_options(Compression::None));
    append(&mut w, &[payload(0, 100), payload(1, 100)]);
    w.sync().unwrap();
    append(&mut w, &[payload(2, 300)]);
    drop(w);
    // Keep 50 of the unsynced frame's bytes: a torn write, into the zeros
    // the writer reserved after its frames.
    storage.crash(|n| n.min(50));
    let seg = dir().join(wal_format::segment_file_name(0));
    let len = storage.file_len(&seg).unwrap() as u64;
    let (_, wal, report) = open_sim(&storage, small_options(Compression::None));
    let t = report.truncated.expect("the torn tail is reported");
    assert!(t.reason.starts_with("torn write"), "{}", t.reason);
    assert_eq!(
        t.bytes_removed,
        len - t.offset,
        "the cut takes the zeros too"
    );
    assert_eq!(storage.file_len(&seg).unwrap() as u64, t.offset);
    assert_eq!(report.next_seq, 2);
    assert_eq!(read_all(&wal, 0).len(), 2);
}

/// Bytes of the first segment's file after its last frame: the zeros the
/// writer reserved (or left).
fn reserved_zeros(storage: &SimStorage, wal: &Wal) -> u64 {
    let first = &wal.segments()[0];
    storage.file_len(&first.path).unwrap() as u64 - first.len
}

/// Reopens the log after a crash: recovery reports nothing and reads
/// `records` records.
fn reopen_clean(storage: &SimStorage, records: usize) -> (WalWriter, Wal) {
    let (w, wal, report) = open_sim(storage, small_options(Compression::None));
    assert!(report.truncated.is_none(), "{:?}", report.truncated);
    assert!(report.damage.is_empty(), "{:?}", report.damage);
    assert_eq!(read_all(&wal, 0).len(), records);
    (w, wal)
}

#[test]
fn the_writer_reserves_zeros_ahead_and_a_crash_leaves_them_as_the_end_not_as_damage() {
    let storage = SimStorage::new();
    let (mut w, wal, _) = open_sim(&storage, small_options(Compression::None));
    append(&mut w, &[payload(0, 100), payload(1, 100)]);
    w.sync().unwrap();
    assert!(
        reserved_zeros(&storage, &wal) > 0,
        "zeros reserved after the frames"
    );

    // A crash after the sync: the zeros are still there, and recovery
    // cuts them without reporting anything.
    append(&mut w, &[payload(2, 50)]);
    w.sync().unwrap();
    drop(w);
    storage.crash(|_| 0);
    assert!(
        reserved_zeros(&storage, &wal) > 0,
        "the zeros survive the crash"
    );
    let (mut w, wal) = reopen_clean(&storage, 3);
    assert_eq!(reserved_zeros(&storage, &wal), 0, "zeros cut");

    // Appending goes on right after the last frame, and closing the writer
    // cuts the new reservation: a clean stop leaves no zeros.
    append(&mut w, &[payload(3, 70)]);
    w.sync().unwrap();
    assert!(reserved_zeros(&storage, &wal) > 0);
    w.close();
    assert_eq!(reserved_zeros(&storage, &wal), 0);
    drop(w);
    storage.crash(|_| 0);
    reopen_clean(&storage, 4);
}

#[test]
fn a_small_segment_reserves_no_more_zeros_than_it_holds_from_16_kib() {
    use super::writer::{MIN_RESERVE_BYTES, RESERVE_BYTES};
    let storage = SimStorage::new();
    let options = WalOptions {
        segment_bytes: 4 << 20,
        max_frame_bytes: 64 << 10,
        ..small_options(Compression::None)
    };
    let (mut w, wal, _) = open_sim(&storage, options);
    append(&mut w, &[payload(0, 100)]);
    w.sync().unwrap();
    assert_eq!(reserved_zeros(&storage, &wal), MIN_RESERVE_BYTES);
    let mut i = 1;
    while wal.segments()[0].len < 100 << 10 {
        append(&mut w, &[payload(i, 4000)]);
        w.sync().unwrap();
        i += 1;
        let (held, zeros) = (wal.segments()[0].len, reserved_zeros(&storage, &wal));
        assert!(
            zeros <= held.max(MIN_RESERVE_BYTES),
            "{zeros} zeros after {held} bytes"
        );
    }
    while wal.segments()[0].len < 600 << 10 {
        append(&mut w, &[payload(i, 60_000)]);
        w.sync().unwrap();
        i += 1;
        assert!(reserved_zeros(&storage, &wal) <= RESERVE_BYTES);
    }
}

#[test]
fn a_reservation_is_about_a_second_of_appends() {
    use super::writer::AppendRate;
    use std::time::Duration;
    let t = std::time::Instant::now();
    let mut rate = AppendRate::new(t);
    // A real Prometheus: a 2 KB frame every 2.4 s.
    let mut last = 0;
    for i in 1..=20u32 {
        last = rate.note(2000, t + Duration::from_millis(2400) * i);
    }
    assert!(last <= 3000, "{last} bytes a second");
    // Group commits of 1.7 KB every half millisecond from then on: past
    // 256 KiB within 100 ms.
    let t = t + Duration::from_secs(50);
    for i in 1..=200u32 {
        last = rate.note(1700, t + Duration::from_micros(500) * i);
    }
    assert!(last >= 256 << 10, "{last} bytes a second");
    // A quiet spell after it: the next window says so.
    let t = t + Duration::from_secs(1);
    rate.note(2000, t + Duration::from_secs(30));
    assert!(rate.note(2000, t + Duration::from_secs(33)) <= 30_000);
}

#[test]
fn a_failed_reservation_is_cut_off_and_appends_go_on() {
    let storage = SimStorage::new();
    let (mut w, wal, _) = open_sim(&storage, small_options(Compression::None));
    storage.fail_next_reserve();
    append(&mut w, &[payload(0, 100)]);
    w.sync().unwrap();
    assert_eq!(reserved_zeros(&storage, &wal), 0, "half-written zeros cut");
    // The next append that makes the file longer reserves again.
    append(&mut w, &[payload(1, 100)]);
    w.sync().unwrap();
    assert!(reserved_zeros(&storage, &wal) > 0);
    drop(w);
    storage.crash(|_| 0);
    reopen_clean(&storage, 2);
}

#[test]
fn a_damaged_last_frame_before_the_reserved_zeros_is_a_corrupt_tail_not_a_torn_one() {
    let storage = SimStorage::new();
    let seg = dir().join(wal_format::segment_file_name(0));
    let (mut w, wal, _) = open_sim(&storage, small_options(Compression::None));
    append(&mut w, &[payload(0, 100)]);
    w.sync().unwrap();
    let first_end = wal.segments()[0].len;
    append(&mut w, &[payload(1, 300)]);
    w.sync().unwrap();
    drop(w);
    // Acknowledged, whole, then damaged on the medium: not a torn write.
    storage.flip_bit(&seg, first_end as usize + 100, 3);
    storage.crash(|_| 0);
    let (_, _, report) = open_sim(&storage, small_options(Compression::None));
    let t = report.truncated.expect("the damaged tail is reported");
    assert_eq!(t.offset, first_end);
    assert!(t.reason.starts_with("corrupt tail"), "{}", t.reason);
}

#[test]
fn a_sealed_segment_ends_with_its_last_frame() {
    let storage = SimStorage::new();
    let (mut w, wal, _) = open_sim(&storage, small_options(Compression::None));
    for i in 0..40 {
        append(&mut w, &[payload(i, 200)]);
        w.sync().unwrap();
    }
    let segments = wal.segments();
    assert!(segments.len() > 1, "the writer rolled");
    for s in &segments[..segments.len() - 1] {
        assert!(s.sealed);
        assert_eq!(
            storage.file_len(&s.path).unwrap() as u64,
            s.len,
            "{}",
            s.path.display()
        );
    }
}

#[test]
fn failed_fsync_stops_the_writer_for_good() {
    let storage = SimStorage::new();
    let (mut w, wal, _) = open_sim(&storage, small_options(Compression::None));
    append(&mut w, &[payload(0, 10)]);
    w.sync().unwrap();
    append(&mut w, &[payload(1, 10)]);
    storage.fail_next_sync();
    let err = w.sync().unwrap_err();
    assert!(matches!(err, WalError::SyncFailed { .. }), "{err}");
    // The next sync would succeed at the storage level; the writer must not
    // try it and pretend.
    assert!(matches!(w.sync(), Err(WalError::WriterFailed { .. })));
    let refs = [RecordRef {
        meta: meta(0),
        payload: b"x",
    }];
    assert!(matches!(
        w.append(&refs),
        Err(WalError::WriterFailed { .. })
    ));
    assert_eq!(
        wal.durable_end(),
        1,
        "the unsynced record is never published"
    );
}

/// A [`SimStorage`] that counts the bytes read from each file: which files a
/// reader touched, and how much of them.
#[derive(Clone, Default)]
struct CountingStorage {
    inner: SimStorage,
    read: Arc<std::sync::Mutex<std::collections::BTreeMap<PathBuf, u64>>>,
}

struct CountingFile {
    inner: Arc<dyn env::ReadableFile>,
    path: PathBuf,
    read: Arc<std::sync::Mutex<std::collections::BTreeMap<PathBuf, u64>>>,
}

impl env::ReadableFile for CountingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let n = self.inner.read_at(buf, offset)?;
        *self
            .read
            .lock()
            .unwrap()
            .entry(self.path.clone())
            .or_default() += n as u64;
        Ok(n)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
}

impl env::Storage for CountingStorage {
    fn create_new(&self, path: &std::path::Path) -> std::io::Result<Box<dyn env::WritableFile>> {
        self.inner.create_new(path)
    }
    fn open_append(&self, path: &std::path::Path) -> std::io::Result<Box<dyn env::WritableFile>> {
        self.inner.open_append(path)
    }
    fn open_read(&self, path: &std::path::Path) -> std::io::Result<Arc<dyn env::ReadableFile>> {
        Ok(Arc::new(CountingFile {
            inner: self.inner.open_read(path)?,
            path: path.to_path_buf(),
            read: Arc::clone(&self.read),
        }))
    }
    fn list(&self, dir: &std::path::Path) -> std::io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn remove(&self, path: &std::path::Path) -> std::io::Result<()> {
        self.inner.remove(path)
    }
    fn rename(&self, from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn sync_dir(&self, dir: &std::path::Path) -> std::io::Result<()> {
        self.inner.sync_dir(dir)
    }
    fn create_dir_all(&self, dir: &std::path::Path) -> std::io::Result<()> {
        self.inner.create_dir_all(dir)
    }
}

#[test]
fn segments_roll_and_reader_opens_mid_log_without_scanning_from_the_start() {
    let storage = CountingStorage::default();
    let (mut w, wal, _) = open_sim(&storage.inner, small_options(Compression::Zstd));
    for i in 0..50u64 {
        append(&mut w, &[payload(i, 700)]);
        w.sync().unwrap();
    }
    drop((w, wal));
    // Reopened, so that nothing is in the writer's in-memory tail: the
    // reader must find record 37 in the files.
    let (_w, wal, _) = open(
        Arc::new(storage.clone()),
        &dir(),
        small_options(Compression::Zstd),
    )
    .unwrap();
    let segments = wal.segments();
    assert!(segments.len() > 3, "small segments roll");
    let holding = segments.iter().rposition(|s| s.first_seq <= 37).unwrap();
    assert!(holding >= 2, "37 is in a middle segment: {segments:?}");
    storage.read.lock().unwrap().clear();

    let items = read_all(&wal, 37);
    assert_eq!(items.len(), 13);
    match &items[0] {
        ReadItem::Record(r) => assert_eq!(r.seq, 37),
        other => panic!("{other:?}"),
    }
    let read = storage.read.lock().unwrap().clone();
    assert!(
        read.get(&segments[holding].path).copied().unwrap_or(0) > 0,
        "the reader read 37's segment from the files: {read:?}"
    );
    for s in &segments[..holding] {
        assert_eq!(
            read.get(&s.path),
            None,
            "a reader from 37 read {} (before 37's segment): {read:?}",
            s.path.display()
        );
    }
}

#[test]
fn delete_before_keeps_readers_further_along_and_reports_the_rest_as_a_gap() {
    let storage = SimStorage::new();
    let (mut w, wal, _) = open_sim(&storage, small_options(Compression::None));
    for i in 0..40u64 {
        append(&mut w, &[payload(i, 700)]);
        w.sync().unwrap();
    }
    let deleted = wal.delete_before(20).unwrap();
    assert!(!deleted.is_empty());
    let first = wal.extent().first_seq;
    assert!(first <= 20 && first > 0);
    assert_eq!(read_all(&wal, 20).len(), 20);
    let items = read_all(&wal, 0);
    match &items[0] {
        ReadItem::Gap(g) => {
            assert_eq!((g.from, g.to, g.error_code), (0, first, "retention"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn damage_mid_segment_is_reported_with_file_and_offset() {
    let storage = synced_log(3, 200);
    let seg = flip_in_second_frame_body(&storage);
    let (_, wal, report) = open_sim(&storage, small_options(Compression::None));
    assert_eq!(report.damage.len(), 1, "{report:?}");
    assert!(report.truncated.is_none());
    let items = read_all(&wal, 0);
    assert_eq!(items.len(), 3);
    match &items[1] {
        ReadItem::Gap(g) => {
            assert_eq!((g.from, g.to), (1, 2));
            assert_eq!(g.file.as_deref(), Some(seg.as_path()));
            assert_eq!(
                g.offset,
                Some(
                    (wal_format::SEGMENT_HEADER_LEN + wal_format::FRAME_HEADER_LEN + 36 + 200)
                        as u64
                )
            );
        }
        other => panic!("{other:?}"),
    }
}

/// Counts how many times the future it wraps is polled: a reader that waits
/// for the writer is polled once when it starts waiting and once when it is
/// woken; a polling one, at each of its ticks.
struct CountPolls<F> {
    inner: std::pin::Pin<Box<F>>,
    polls: usize,
}

impl<F: std::future::Future> std::future::Future for CountPolls<F> {
    type Output = (F::Output, usize);
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.polls += 1;
        let polls = self.polls;
        self.inner.as_mut().poll(cx).map(|out| (out, polls))
    }
}

// The clock is paused: the test's sleeps pass at once, in virtual time, and
// give a reader that polls on a timer a minute of ticks to show itself.
#[tokio::test(start_paused = true)]
async fn reader_follows_the_tail_without_polling() {
    let storage = SimStorage::new();
    let (mut w, wal, _) = open_sim(&storage, small_options(Compression::None));
    let mut r = wal.reader(0);
    let task = tokio::spawn(async move {
        let mut seqs = Vec::new();
        let mut polls = Vec::new();
        while seqs.len() < 5 {
            let next = CountPolls {
                inner: Box::pin(r.next()),
                polls: 0,
            };
            let (item, n) = next.await;
            polls.push(n);
            if let ReadItem::Record(rec) = item.unwrap() {
                seqs.push(rec.seq);
            }
        }
        (seqs, polls)
    });
    for i in 0..5u64 {
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        append(&mut w, &[payload(i, 20)]);
        w.sync().unwrap();
    }
    let (seqs, polls) = task.await.unwrap();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
    assert!(
        polls.iter().all(|n| *n <= 3),
        "the reader was polled more than to wait and to wake, per record: {polls:?}"
    );
}

#[test]
fn unsynced_records_are_invisible_to_readers() {
    let storage = SimStorage::new();
    let (mut w, wal, _) = open_sim(&storage, small_options(Compression::None));
    append(&mut w, &[payload(0, 20)]);
    assert!(read_all(&wal, 0).is_empty());
    w.sync().unwrap();
    assert_eq!(read_all(&wal, 0).len(), 1);
}

#[test]
fn a_damaged_newest_header_is_reported_and_its_frames_still_read() {
    let storage = synced_log(3, 100);
    let seg = dir().join(wal_format::segment_file_name(0));
    storage.flip_bit(&seg, 3, 1);
    let (mut w, wal, report) = open_sim(&storage, small_options(Compression::None));
    assert_eq!(report.damage.len(), 1, "{report:?}");
    assert_eq!(report.next_seq, 3);
    append(&mut w, &[payload(3, 100)]);
    w.sync().unwrap();
    let items = read_all(&wal, 0);
    let records: Vec<u64> = items
        .iter()
        .filter_map(|i| match i {
            ReadItem::Record(r) => Some(r.seq),
            ReadItem::Gap(_) => None,
        })
        .collect();
    assert_eq!(records, vec![0, 1, 2, 3]);
    assert!(items
        .iter()
        .any(|i| matches!(i, ReadItem::Gap(g) if g.offset == Some(0) && g.from == g.to)));
}

#[test]
fn damage_in_the_newest_segment_seals_it_and_appends_go_to_a_new_one() {
    let storage = synced_log(3, 200);
    let seg = flip_in_second_frame_body(&storage);
    let (mut w, wal, _) = open_sim(&storage, small_options(Compression::None));
    append(&mut w, &[payload(3, 10)]);
    w.sync().unwrap();
    assert_eq!(
        wal.segments().len(),
        2,
        "a new segment after the damaged one"
    );
    assert_eq!(
        storage.file_len(&seg).unwrap(),
        wal.segments()[0].len as usize
    );
}

/// Appends and syncs like the commit thread: staged for the tail cache.
fn append_staged(w: &mut WalWriter, payloads: &[Vec<u8>]) -> std::ops::Range<u64> {
    let range = append(w, payloads);
    w.stage_for_readers(
        range.start,
        payloads
            .iter()
            .enumerate()
            .map(|(i, p)| (meta(i as i64), bytes::Bytes::from(p.clone()))),
    );
    w.sync().unwrap();
    range
}

/// Readers opened at every position read exactly the model from there,
/// with no gap.
fn every_reader_reads_the_model(wal: &Wal, model: &[Vec<u8>]) {
    for pos in 0..=wal.durable_end() {
        assert_eq!(read_checked(wal, model, pos), Vec::new(), "reader at {pos}");
    }
}

/// Appends five more records, staged for readers, one sync each, and
/// returns the model with them.
fn with_newer_records(w: &mut WalWriter, mut model: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    for i in 0..5u64 {
        let p = payload(model.len() as u64 + i, 100);
        append_staged(w, std::slice::from_ref(&p));
        model.push(p);
    }
    model
}

fn records_of(items: &[ReadItem]) -> Vec<(u64, Vec<u8>)> {
    items
        .iter()
        .filter_map(|i| match i {
            ReadItem::Record(r) => Some((r.seq, r.payload.to_vec())),
            ReadItem::Gap(_) => None,
        })
        .collect()
}

#[test]
fn readers_take_recent_records_from_memory_and_older_ones_from_disk() {
    let storage = SimStorage::new();
    let (mut w, wal, _) = open_sim(&storage, small_options(Compression::Zstd));
    // Unstaged records come from disk, staged ones from memory; a reader
    // crosses from one to the other without noticing.
    for i in 0..10u64 {
        append(&mut w, &[payload(i, 300)]);
        w.sync().unwrap();
    }
    for i in 10..20u64 {
        append_staged(&mut w, &[payload(i, 300), payload(i + 100, 50)]);
    }
    let expect: Vec<(u64, Vec<u8>)> = (0..10u64)
        .map(|i| (i, payload(i, 300)))
        .chain((10..20u64).flat_map(|i| {
            let seq = 10 + (i - 10) * 2;
            [(seq, payload(i, 300)), (seq + 1, payload(i + 100, 50))]
        }))
        .collect();
    for from in [0, 5, 10, 11, 29] {
        let items = read_all(&wal, from);
        assert_eq!(records_of(&items), expect[from as usize..].to_vec());
    }
    // A reader waiting at the end gets staged records as they come.
    let mut r = wal.reader(30);
    assert!(r.try_next().unwrap().is_none());
    append_staged(&mut w, &[payload(7, 10)]);
    match r.try_next().unwrap() {
        Some(ReadItem::Record(rec)) => {
            assert_eq!((rec.seq, rec.payload.to_vec()), (30, payload(7, 10)))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn deleted_segments_are_gaps_even_when_their_records_are_in_memory() {
    let storage = SimStorage::new();
    let (mut w, wal, _) = open_sim(&storage, small_options(Compression::None));
    for i in 0..40u64 {
        append_staged(&mut w, &[payload(i, 700)]);
    }
    let deleted = wal.delete_before(20).unwrap();
    assert!(!deleted.is_empty());
    let first = wal.extent().first_seq;
    let items = read_all(&wal, 0);
    match &items[0] {
        ReadItem::Gap(g) => assert_eq!((g.from, g.to, g.error_code), (0, first, "retention")),
        other => panic!("{other:?}"),
    }
    assert_eq!(items.len() as u64, 1 + 40 - first);
}

#[test]
fn tail_cache_keeps_the_newest_contiguous_records_within_its_bound() {
    let rec = |seq: u64, len: usize| wal_format::Record {
        seq,
        meta: meta(0),
        payload: bytes::Bytes::from(vec![0u8; len]),
    };
    let mut c = TailCache::default();
    c.push(vec![rec(5, 10), rec(6, 10)]);
    let mut out = std::collections::VecDeque::new();
    assert_eq!(c.read(4, 100, &mut out), 4, "before the cache");
    assert_eq!(c.read(6, 100, &mut out), 7);
    assert_eq!(out.len(), 1);
    out.clear();
    assert_eq!(c.read(5, 6, &mut out), 6, "bounded by the durable end");
    // A jump in sequence numbers starts over.
    c.push(vec![rec(10, 10)]);
    assert_eq!(c.read(5, 100, &mut out), 5);
    // Oldest records go first past the byte bound; one always stays.
    c.push(vec![rec(11, TAIL_CACHE_BYTES), rec(12, TAIL_CACHE_BYTES)]);
    assert_eq!(c.records.len(), 1);
    assert_eq!(c.records.front().map(|r| r.seq), Some(12));
}

// Readers opened past damage. A reader positioned inside a segment skips the
// frames before its position by their headers alone; a damaged frame header
// there stops that skip, and the frame the reader resynchronises on may
// start below its position. None of that may show as a gap: a shipper
// checkpoints a gap's end, so a gap ending behind its start moves a cursor
// backwards.

/// The frames of a segment as written: (offset, first_seq, end_seq).
fn frames_of(storage: &SimStorage, seg: &SegmentMeta) -> Vec<(usize, u64, u64)> {
    let mut c = segment::SegmentCursor::open(storage, &seg.path, seg.first_seq, seg.len).unwrap();
    let mut out = Vec::new();
    loop {
        match c.read_next().unwrap() {
            segment::Scan::Frame { offset, header, .. } => {
                out.push((offset as usize, header.first_seq, header.end_seq()))
            }
            segment::Scan::Damage { offset, reason, .. } => {
                panic!("the log is damaged before the test damages it: {offset}: {reason}")
            }
            segment::Scan::End => return out,
        }
    }
}

/// A closed log of the given batches (each appended and synced on its own),
/// with the payloads appended, in sequence order.
fn log_of_batches(batches: &[Vec<usize>]) -> (SimStorage, Vec<Vec<u8>>) {
    log_of_batches_in(Compression::None, batches)
}

fn log_of_batches_in(
    compression: Compression,
    batches: &[Vec<usize>],
) -> (SimStorage, Vec<Vec<u8>>) {
    let storage = SimStorage::new();
    let (mut w, _, _) = open_sim(&storage, small_options(compression));
    let mut model = Vec::new();
    for lens in batches {
        let next = w.next_seq();
        let ps: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| payload(next + i as u64, l))
            .collect();
        append(&mut w, &ps);
        w.sync().unwrap();
        model.extend(ps);
    }
    (storage, model)
}

/// [`read_checked`], and the only gap is the `lost` records at or after
/// `pos`: so the records are exactly the intact ones from `pos` on.
fn check_reader_from(wal: &Wal, model: &[Vec<u8>], pos: u64, lost: std::ops::Range<u64>) {
    let own = lost.start.max(pos)..lost.end;
    let want = if own.is_empty() {
        Vec::new()
    } else {
        vec![(own.start, own.end)]
    };
    assert_eq!(
        read_checked(wal, model, pos),
        want,
        "reader at {pos}: lost {lost:?}"
    );
}

/// Flips `bit` of byte `byte` in the header of frame `frame` of sealed
/// segment `segment`; returns the damaged records and the damaged place.
fn damage_frame_header(
    storage: &SimStorage,
    segment: usize,
    frame: usize,
    byte: usize,
    bit: u8,
) -> (std::ops::Range<u64>, PathBuf, u64) {
    let (_, wal, _) = open_sim(storage, small_options(Compression::None));
    let seg = wal.segments()[segment].clone();
    assert!(seg.sealed);
    let (offset, first, end) = frames_of(storage, &seg)[frame];
    storage.flip_bit(&seg.path, offset + byte, bit);
    (first..end, seg.path, offset as u64)
}

#[test]
fn readers_opened_past_a_damaged_frame_header_see_only_their_own_records_and_gaps() {
    // Three records per frame, several frames per segment.
    let (storage, model) = log_of_batches(&vec![vec![200, 200, 200]; 30]);
    let (lost, file, offset) = damage_frame_header(&storage, 1, 2, 12, 5);
    let (mut w, wal, _) = open_sim(&storage, small_options(Compression::None));
    assert!(wal.segments().len() > 3, "{:?}", wal.segments());
    // A reader opened past the damage finds it (the skip stops at the bad
    // header) and counts the place, once, without reporting it as its gap.
    check_reader_from(&wal, &model, lost.end + 1, lost.clone());
    assert!(
        !wal.shared.note_damage(&file, offset),
        "damage found behind a reader's position is counted as a damaged place"
    );
    // Newer records, some from the writer's memory, do not change that.
    let model = with_newer_records(&mut w, model);
    for pos in 0..=wal.durable_end() {
        check_reader_from(&wal, &model, pos, lost.clone());
    }
}

#[test]
fn readers_inside_a_segment_whose_header_is_damaged_report_it_only_from_its_start() {
    let (storage, model) = log_of_batches(&vec![vec![200, 200, 200]; 30]);
    let (_, wal, _) = open_sim(&storage, small_options(Compression::None));
    let seg = wal.segments()[1].clone();
    storage.flip_bit(&seg.path, 5, 2);
    let (_, wal, report) = open_sim(&storage, small_options(Compression::None));
    assert_eq!(report.damage.len(), 1, "{report:?}");
    for pos in 0..=wal.durable_end() {
        // The header holds no record: an empty gap where the segment
        // starts, for a reader that starts there or before.
        let want = if pos <= seg.first_seq {
            vec![(seg.first_seq, seg.first_seq)]
        } else {
            Vec::new()
        };
        assert_eq!(read_checked(&wal, &model, pos), want, "reader at {pos}");
    }
}

#[test]
fn a_frame_after_damage_numbered_below_the_position_yields_no_backwards_gap() {
    let (storage, model) = log_of_batches(&vec![vec![200, 200, 200]; 30]);
    let (_, wal, _) = open_sim(&storage, small_options(Compression::None));
    let seg = wal.segments()[1].clone();
    let frames = frames_of(&storage, &seg);
    // Frame 3 is overwritten by an intact copy of frame 1 (numbered below
    // it, same size), then frame 2's header is damaged: a reader crossing
    // the damage resynchronises on a frame behind its position.
    let (_, f1_first, f1_end) = frames[1];
    let (f3_offset, _, f3_end) = frames[3];
    let refs: Vec<RecordRef<'_>> = (f1_first..f1_end)
        .map(|s| RecordRef {
            meta: meta(0),
            payload: &model[s as usize],
        })
        .collect();
    let mut copy = Vec::new();
    wal_format::encode_frame(
        seg.first_seq,
        f1_first,
        &refs,
        Compression::None,
        1,
        &mut copy,
    )
    .unwrap();
    assert_eq!(f3_offset + copy.len(), frames[4].0, "same size as frame 3");
    storage.overwrite(&seg.path, f3_offset, &copy);
    storage.flip_bit(&seg.path, frames[2].0 + 12, 5);
    let (_, wal, _) = open_sim(&storage, small_options(Compression::None));
    for pos in 0..=wal.durable_end() {
        let gaps = read_checked(&wal, &model, pos);
        // Nothing from the end of the overwritten frame on is lost.
        if pos >= f3_end {
            assert_eq!(gaps, Vec::new(), "reader at {pos}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever frame header of a sealed segment is damaged, a reader opened
    /// anywhere yields exactly the intact records from its position on, and
    /// a gap only for the damaged records at or after its position.
    #[test]
    fn a_damaged_frame_header_is_a_gap_only_for_readers_not_past_it(
        batches in prop::collection::vec(prop::collection::vec(150usize..400, 1..5), 20..40),
        which_segment in any::<prop::sample::Index>(),
        which_frame in any::<prop::sample::Index>(),
        byte in 0usize..wal_format::FRAME_HEADER_LEN,
        bit in 0u8..8,
    ) {
        let (storage, model) = log_of_batches(&batches);
        let (_, wal, _) = open_sim(&storage, small_options(Compression::None));
        let sealed = wal.segments().iter().filter(|s| s.sealed).count();
        prop_assume!(sealed > 0);
        let segment = which_segment.index(sealed);
        let frames = frames_of(&storage, &wal.segments()[segment]).len();
        let (lost, _, _) =
            damage_frame_header(&storage, segment, which_frame.index(frames), byte, bit);
        let (_, wal, _) = open_sim(&storage, small_options(Compression::None));
        for pos in 0..=wal.durable_end() {
            check_reader_from(&wal, &model, pos, lost.clone());
        }
    }
}

// Repacking sealed segments (`repack.rs`).

fn repack_options() -> repack::RepackOptions {
    repack::RepackOptions {
        zstd_level: 3,
        max_frame_bytes: 64 << 10,
    }
}

fn sealed_firsts(wal: &Wal) -> Vec<u64> {
    wal.segments()
        .into_iter()
        .filter(|s| s.sealed)
        .map(|s| s.first_seq)
        .collect()
}

fn repack(wal: &Wal, first_seq: u64) -> repack::Repacked {
    wal.repack(first_seq, repack_options(), &AtomicBool::new(false))
        .unwrap()
}

#[test]
fn a_repacked_segment_holds_the_same_records_in_one_frame_and_fewer_bytes() {
    let storage = synced_log(60, 200);
    let (_w, wal, _) = open_sim(&storage, small_options(Compression::None));
    let before = records_of(&read_all(&wal, 0));
    assert_eq!(before.len(), 60);
    let sealed = sealed_firsts(&wal);
    assert!(sealed.len() >= 3, "{sealed:?}");
    let bytes_before = wal.extent().bytes;
    for &first in &sealed {
        match repack(&wal, first) {
            repack::Repacked::Done { before, after, .. } => assert!(after < before / 2),
            other => panic!("segment {first}: {other:?}"),
        }
        let seg = wal.segments().into_iter().find(|s| s.first_seq == first);
        let seg = seg.unwrap();
        assert_eq!(seg.generation, 1);
        assert_eq!(frames_of(&storage, &seg).len(), 1, "one frame");
        assert_eq!(
            repack(&wal, first),
            repack::Repacked::AlreadyDense,
            "never twice"
        );
    }
    assert!(wal.extent().bytes < bytes_before);
    assert_eq!(records_of(&read_all(&wal, 0)), before);
    for pos in [0, 7, 16, 33, 59] {
        assert_eq!(
            records_of(&read_all(&wal, pos)),
            before[pos as usize..].to_vec()
        );
    }
    // Durable: the same records after a power loss and a reopen.
    drop(_w);
    storage.crash(|_| 0);
    let (_w, wal, report) = open_sim(&storage, small_options(Compression::None));
    assert!(report.damage.is_empty(), "{:?}", report.damage);
    assert_eq!(records_of(&read_all(&wal, 0)), before);
}

#[test]
fn a_chained_segment_repacks_to_the_same_records() {
    let (storage, model) = log_of_batches_in(Compression::Zstd, &vec![vec![120, 80]; 60]);
    let (_w, wal, _) = open_sim(&storage, small_options(Compression::Zstd));
    let sealed = sealed_firsts(&wal);
    assert!(sealed.len() >= 2, "{sealed:?}");
    assert!(frame_kinds(&storage, &wal.segments()[1])
        .iter()
        .any(|k| k.3 == Compression::ZstdChained));
    for &first in &sealed {
        // Read in full through its chains: never taken for damage.
        match repack(&wal, first) {
            repack::Repacked::Done { .. } | repack::Repacked::NotWorth { .. } => {}
            other => panic!("segment {first}: {other:?}"),
        }
    }
    every_reader_reads_the_model(&wal, &model);
}

#[test]
fn a_repack_stores_snappy_records_decoded_and_keeps_one_that_does_not_decode() {
    // As ingest stores 1.0 bodies: the sender's snappy body, `encoding = 1`.
    // Record 5 is marked snappy but is not: it is copied as it is.
    let message = |i: u64| -> Vec<u8> {
        let mut m = b"__name__ up job node instance host:9100 ".repeat(8);
        m.extend_from_slice(&i.to_le_bytes());
        m
    };
    let stored = |i: u64| -> Vec<u8> {
        if i == 5 {
            vec![0xff; 40]
        } else {
            snap::raw::Encoder::new().compress_vec(&message(i)).unwrap()
        }
    };
    let storage = SimStorage::new();
    let (mut w, _, _) = open_sim(&storage, small_options(Compression::None));
    let snappy_meta = |i: u64| RecordMeta {
        encoding: PayloadEncoding::Snappy,
        ..meta(i as i64)
    };
    for i in 0..60u64 {
        let payload = stored(i);
        w.append(&[RecordRef {
            meta: snappy_meta(i),
            payload: &payload,
        }])
        .unwrap();
        w.sync().unwrap();
    }
    drop(w);
    let (_w, wal, _) = open_sim(&storage, small_options(Compression::None));
    let sealed = sealed_firsts(&wal);
    assert!(!sealed.is_empty());
    for &first in &sealed {
        assert!(
            matches!(repack(&wal, first), repack::Repacked::Done { .. }),
            "segment {first}"
        );
    }
    let active = wal.segments().last().unwrap().first_seq;
    for item in read_all(&wal, 0) {
        let ReadItem::Record(r) = item else {
            panic!("{item:?}")
        };
        let (encoding, payload) = if r.seq >= active || r.seq == 5 {
            (PayloadEncoding::Snappy, stored(r.seq))
        } else {
            (PayloadEncoding::Identity, message(r.seq))
        };
        assert_eq!(
            r.meta,
            RecordMeta {
                encoding,
                ..snappy_meta(r.seq)
            },
            "record {}",
            r.seq
        );
        assert_eq!(r.payload.to_vec(), payload, "record {}", r.seq);
    }
}

#[test]
fn a_reader_inside_a_segment_reads_on_across_its_repack_without_a_gap() {
    let storage = synced_log(60, 200);
    let (_w, wal, _) = open_sim(&storage, small_options(Compression::None));
    let all = records_of(&read_all(&wal, 0));
    let mut reader = wal.reader(2);
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(reader.try_next().unwrap().unwrap());
    }
    for first in sealed_firsts(&wal) {
        assert!(matches!(repack(&wal, first), repack::Repacked::Done { .. }));
    }
    while let Some(item) = reader.try_next().unwrap() {
        seen.push(item);
    }
    assert!(
        seen.iter().all(|i| matches!(i, ReadItem::Record(_))),
        "{seen:?}"
    );
    assert_eq!(records_of(&seen), all[2..].to_vec());
}

#[test]
fn a_damaged_segment_is_left_as_it_is_and_its_damage_still_reported() {
    let storage = synced_log(60, 200);
    let seg = flip_in_second_frame_body(&storage);
    let len = storage.file_len(&seg);
    let (_w, wal, _) = open_sim(&storage, small_options(Compression::None));
    assert!(matches!(repack(&wal, 0), repack::Repacked::Damaged { .. }));
    assert_eq!(storage.file_len(&seg), len);
    let gaps: Vec<_> = read_all(&wal, 0)
        .into_iter()
        .filter_map(|i| match i {
            ReadItem::Gap(g) => Some((g.from, g.to)),
            ReadItem::Record(_) => None,
        })
        .collect();
    assert_eq!(gaps, vec![(1, 2)]);
    let mut copy = seg.into_os_string();
    copy.push(repack::REPACK_SUFFIX);
    assert_eq!(storage.file_len(&PathBuf::from(copy)), None, "no copy left");
}

#[test]
fn the_copy_of_a_repack_cut_short_is_removed_at_open() {
    let storage = synced_log(60, 200);
    let copy = dir().join(format!(
        "{}{}",
        wal_format::segment_file_name(0),
        repack::REPACK_SUFFIX
    ));
    {
        let mut f = env::Storage::create_new(&storage, &copy).unwrap();
        f.append(b"half a copy").unwrap();
        f.sync_data().unwrap();
        env::Storage::sync_dir(&storage, &dir()).unwrap();
    }
    let (_w, wal, report) = open_sim(&storage, small_options(Compression::None));
    assert!(report.removed.contains(&copy), "{report:?}");
    assert_eq!(storage.file_len(&copy), None);
    assert_eq!(records_of(&read_all(&wal, 0)).len(), 60);
}

#[test]
fn a_raised_stop_abandons_the_copy_and_the_active_segment_is_never_repacked() {
    let storage = synced_log(60, 200);
    let (_w, wal, _) = open_sim(&storage, small_options(Compression::None));
    let stopped = wal.repack(0, repack_options(), &AtomicBool::new(true));
    assert_eq!(stopped.unwrap(), repack::Repacked::Stopped);
    let active = wal.segments().last().unwrap().clone();
    assert!(!active.sealed);
    assert_eq!(repack(&wal, active.first_seq), repack::Repacked::Gone);
    assert_eq!(repack(&wal, 12_345), repack::Repacked::Gone);
    let names = env::Storage::list(&storage, &dir()).unwrap();
    assert!(
        names.iter().all(|n| !n.ends_with(repack::REPACK_SUFFIX)),
        "{names:?}"
    );
}

#[test]
fn a_segment_past_its_age_is_sealed_at_the_next_append() {
    for (age, segments) in [(None, 1), (Some(std::time::Duration::ZERO), 3)] {
        let storage = SimStorage::new();
        let options = WalOptions {
            segment_bytes: 1 << 20,
            segment_max_age: age,
            ..small_options(Compression::None)
        };
        let (mut w, wal, _) = open_sim(&storage, options);
        for i in 0..3 {
            append(&mut w, &[payload(i, 100)]);
            w.sync().unwrap();
        }
        assert_eq!(wal.segments().len(), segments, "age {age:?}");
        assert_eq!(records_of(&read_all(&wal, 0)).len(), 3);
    }
}

/// The frames of a segment with their compression, read by headers only.
fn frame_kinds(storage: &SimStorage, seg: &SegmentMeta) -> Vec<(usize, u64, u64, Compression)> {
    let file = storage.open_read(&seg.path).unwrap();
    let mut bytes = vec![0; seg.len as usize];
    assert_eq!(file.read_at(&mut bytes, 0).unwrap(), bytes.len());
    let mut at = wal_format::SEGMENT_HEADER_LEN;
    let mut out = Vec::new();
    while at < bytes.len() {
        let h = wal_format::decode_frame_header(seg.first_seq, &bytes[at..]).unwrap();
        out.push((at, h.first_seq, h.end_seq(), h.compression));
        at += h.total_len();
    }
    out
}

#[test]
fn readers_opened_anywhere_inside_a_chain_read_exactly_their_records() {
    // Small records, one frame per batch: chains of several frames, which
    // restart at each segment and after `max_frame_bytes` raw bytes.
    let (storage, model) = log_of_batches_in(Compression::Zstd, &vec![vec![120, 80]; 60]);
    let (mut w, wal, report) = open_sim(&storage, small_options(Compression::Zstd));
    assert!(
        report.damage.is_empty() && report.truncated.is_none(),
        "{report:?}"
    );
    let segs = wal.segments();
    assert!(segs.len() > 2, "{segs:?}");
    let kinds = frame_kinds(&storage, &segs[1]);
    assert_eq!(kinds[0].3, Compression::ZstdChainStart, "{kinds:?}");
    assert!(
        kinds
            .iter()
            .filter(|k| k.3 == Compression::ZstdChained)
            .count()
            >= 2,
        "{kinds:?}"
    );
    // A reader opened inside a chain decodes it from its first frame and
    // yields its own records only, from disk and, for the newest, from the
    // writer's memory.
    let model = with_newer_records(&mut w, model);
    every_reader_reads_the_model(&wal, &model);
}

#[test]
fn a_damaged_frame_of_a_chain_costs_the_rest_of_its_chain_and_no_more() {
    let (storage, model) = log_of_batches_in(Compression::Zstd, &vec![vec![120, 80]; 60]);
    let (_, wal, _) = open_sim(&storage, small_options(Compression::Zstd));
    let seg = wal.segments()[1].clone();
    let kinds = frame_kinds(&storage, &seg);
    // The second frame of the segment's first chain is damaged: its chain
    // ends at the next frame that does not continue one, or at the
    // segment's end.
    let chain_end = kinds[2..]
        .iter()
        .find(|k| k.3 != Compression::ZstdChained)
        .map_or(kinds[kinds.len() - 1].2, |k| k.1);
    assert_eq!(kinds[1].3, Compression::ZstdChained, "{kinds:?}");
    let (offset, first, _, _) = kinds[1];
    storage.flip_bit(&seg.path, offset + wal_format::FRAME_HEADER_LEN + 3, 4);
    let (_, wal, _) = open_sim(&storage, small_options(Compression::Zstd));
    let lost = first..chain_end;
    assert!(
        lost.end > kinds[1].2,
        "the chain goes on after the damaged frame: {kinds:?}"
    );
    for pos in 0..=wal.durable_end() {
        check_reader_from(&wal, &model, pos, lost.clone());
    }
}

#[test]
fn a_new_level_starts_a_chain_and_every_reader_reads_across_the_change() {
    let storage = SimStorage::new();
    let (mut w, _, _) = open_sim(&storage, small_options(Compression::Zstd));
    let mut model = Vec::new();
    // The level changes at appends 4, 8 and 12: each starts a chain.
    for (i, level) in [1, 1, 1, 1, 6, 6, 6, 6, 19, 19, 19, 19, 3, 3]
        .into_iter()
        .enumerate()
    {
        w.pin_zstd_level(level);
        let p = payload(i as u64, 60);
        append(&mut w, std::slice::from_ref(&p));
        model.push(p);
        w.sync().unwrap();
        assert_eq!(w.zstd_level(), level);
    }
    drop(w);
    let (mut w, wal, report) = open_sim(&storage, small_options(Compression::Zstd));
    assert!(
        report.damage.is_empty() && report.truncated.is_none(),
        "{report:?}"
    );
    let segs = wal.segments();
    assert_eq!(segs.len(), 1, "{segs:?}");
    let starts: Vec<u64> = frame_kinds(&storage, &segs[0])
        .iter()
        .filter(|k| k.3 == Compression::ZstdChainStart)
        .map(|k| k.1)
        .collect();
    assert_eq!(starts, [0, 4, 8, 12]);
    let model = with_newer_records(&mut w, model);
    every_reader_reads_the_model(&wal, &model);
}

#[test]
fn a_failed_append_restarts_the_chain_and_nothing_after_it_is_lost() {
    let storage = SimStorage::new();
    let (mut w, _, _) = open_sim(&storage, small_options(Compression::Zstd));
    let mut model = Vec::new();
    for i in 0..3u64 {
        let p = payload(i, 100);
        append(&mut w, std::slice::from_ref(&p));
        model.push(p);
        w.sync().unwrap();
    }
    // Half of this append's frame lands, then the disk is full: the file is
    // cut back, and the frame is in the chain's stream but not on the disk.
    storage.fail_next_append();
    let refs = [RecordRef {
        meta: meta(0),
        payload: &payload(99, 100),
    }];
    assert!(matches!(w.append(&refs), Err(WalError::NoSpace { .. })));
    for i in 3..6u64 {
        let p = payload(i, 100);
        append(&mut w, std::slice::from_ref(&p));
        model.push(p);
        w.sync().unwrap();
    }
    drop(w);
    let (_, wal, report) = open_sim(&storage, small_options(Compression::Zstd));
    assert!(
        report.damage.is_empty() && report.truncated.is_none(),
        "{report:?}"
    );
    let kinds = frame_kinds(&storage, &wal.segments()[0]);
    assert_eq!(kinds[3].3, Compression::ZstdChainStart, "{kinds:?}");
    every_reader_reads_the_model(&wal, &model);
}

#[test]
fn a_segment_of_the_older_version_is_sealed_and_appends_go_to_a_new_one() {
    let storage = synced_log(3, 100);
    let (_, wal, _) = open_sim(&storage, small_options(Compression::Zstd));
    let seg = wal.segments()[0].clone();
    // Written by a relay of format version 1 (the same bytes, but for the
    // version and the header's checksum).
    let mut header = Vec::new();
    wal_format::SegmentHeader {
        version: 1,
        first_seq: seg.first_seq,
    }
    .encode(&mut header);
    storage.overwrite(&seg.path, 0, &header);
    let (mut w, wal, report) = open_sim(&storage, small_options(Compression::Zstd));
    assert!(
        report.damage.is_empty() && report.truncated.is_none(),
        "{report:?}"
    );
    let mut model: Vec<Vec<u8>> = (0..3).map(|i| payload(i, 100)).collect();
    let p = payload(3, 100);
    append(&mut w, std::slice::from_ref(&p));
    model.push(p);
    w.sync().unwrap();
    let segs = wal.segments();
    assert_eq!(segs.len(), 2, "{segs:?}");
    assert!(segs[0].sealed);
    assert_eq!(segs[1].first_seq, 3);
    every_reader_reads_the_model(&wal, &model);
}
