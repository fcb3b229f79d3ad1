//! A shipper in process, on the crash-simulating storage (which can fail
//! reads on demand, a fault a real disk cannot be made to produce here),
//! against a small HTTP receiver that records what it is sent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use prost::Message;
use tokio_util::sync::CancellationToken;
use wal_format::{PayloadEncoding, PayloadKind, RecordMeta, RecordRef};

use super::*;
use crate::types::Shards;
use crate::wal::sim::SimStorage;
use crate::wal::WalOptions;

/// A remote-write receiver on a free port: answers every request with
/// `status` (413 for a body over `max_body`) and, for a 2xx, records the
/// timestamps of its samples.
struct Receiver {
    url: String,
    status: Arc<AtomicU16>,
    max_body: Arc<AtomicUsize>,
    stored: Arc<Mutex<Vec<i64>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/api/v1/write", listener.local_addr().unwrap());
        let status = Arc::new(AtomicU16::new(204));
        let max_body = Arc::new(AtomicUsize::new(usize::MAX));
        let stored = Arc::new(Mutex::new(Vec::new()));
        let (st, max, got) = (
            Arc::clone(&status),
            Arc::clone(&max_body),
            Arc::clone(&stored),
        );
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (st, max, got) = (Arc::clone(&st), Arc::clone(&max), Arc::clone(&got));
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (st, max, got) = (Arc::clone(&st), Arc::clone(&max), Arc::clone(&got));
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
                            let wr = prom_remote_write::v1::WriteRequest::decode(&raw[..]).unwrap();
                            let stamps: Vec<i64> = wr
                                .timeseries
                                .iter()
                                .flat_map(|ts| ts.samples.iter().map(|s| s.timestamp))
                                .collect();
                            let status = if body.len() > max.load(Ordering::SeqCst) {
                                413
                            } else if stamps.contains(&REFUSED_TS) {
                                400
                            } else {
                                st.load(Ordering::SeqCst)
                            };
                            if (200..300).contains(&status) {
                                got.lock().unwrap().extend(stamps);
                            }
                            let resp = hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"test receiver")))
                                .unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        Receiver {
            url,
            status,
            max_body,
            stored,
        }
    }

    fn stored(&self) -> Vec<i64> {
        let mut v = self.stored.lock().unwrap().clone();
        v.sort_unstable();
        v
    }
}

/// The receiver refuses (400) every request holding a sample at this
/// timestamp, as Prometheus refuses a whole request for one out-of-order
/// sample: record 4 of a 10-record log made with [`log_of`] has it when
/// `log_of` is asked for a bad record.
const REFUSED_TS: i64 = -4;

/// Record `seq`'s payload: one series with one sample at `1000 + seq`.
fn payload(seq: u64) -> Vec<u8> {
    payload_at(seq, 1000 + seq as i64)
}

fn payload_at(seq: u64, ts: i64) -> Vec<u8> {
    let req = prom_remote_write::v1::WriteRequest {
        timeseries: vec![prom_remote_write::v1::TimeSeries {
            labels: vec![prom_remote_write::v1::Label {
                name: "__name__".into(),
                value: format!("t{seq}"),
            }],
            samples: vec![prom_remote_write::v1::Sample {
                value: seq as f64,
                timestamp: ts,
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    req.encode_to_vec()
}

/// A log of `n` records on `storage`, reopened (so that readers read the
/// segment files, not the writer's in-memory tail).
fn log_of(storage: &SimStorage, dir: &Path, n: u64) -> Wal {
    log_with(storage, dir, n, None)
}

/// [`log_of`], with record `bad` (if any) holding its sample at
/// [`REFUSED_TS`].
fn log_with(storage: &SimStorage, dir: &Path, n: u64, bad: Option<u64>) -> Wal {
    let options = WalOptions {
        segment_bytes: 1 << 20,
        ..WalOptions::default()
    };
    let storage: Arc<dyn crate::wal::Storage> = Arc::new(storage.clone());
    {
        let (mut w, _, _) = crate::wal::open(Arc::clone(&storage), dir, options.clone()).unwrap();
        let payloads: Vec<Vec<u8>> = (0..n)
            .map(|i| match bad {
                Some(b) if b == i => payload_at(i, REFUSED_TS),
                _ => payload(i),
            })
            .collect();
        let refs: Vec<RecordRef<'_>> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| RecordRef {
                meta: RecordMeta {
                    receive_time_ms: 1,
                    min_sample_ts: 1000 + i as i64,
                    max_sample_ts: 1000 + i as i64,
                    samples: 1,
                    kind: PayloadKind::RemoteWriteV1,
                    encoding: PayloadEncoding::Identity,
                },
                payload: p,
            })
            .collect();
        w.append(&refs).unwrap();
        w.sync().unwrap();
    }
    crate::wal::open(storage, dir, options).unwrap().1
}

fn shipper(wal: &Wal, checkpoints: &Checkpoints, url: &str) -> (Shipper, Arc<ReplicaState>) {
    let state = Arc::new(ReplicaState::new("r", url, 0));
    let sender = Sender::new(
        "r",
        url,
        SenderOptions {
            timeout: Duration::from_secs(5),
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            tls: Default::default(),
            policy: Default::default(),
            max_blocked_attempts: None,
            headers: Vec::new(),
            auth: None,
        },
    )
    .unwrap();
    let limits = BatchLimits {
        max_samples: 1000,
        max_bytes: 1 << 20,
    };
    let s = Shipper::new(
        Arc::clone(&state),
        wal.clone(),
        checkpoints.clone(),
        sender,
        ReplicaProtocol::V1,
        limits,
        StartAt::Oldest,
    );
    (s, state)
}

/// Polls `cond` until it holds; panics naming `what` after 30 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "not within 30 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_startup_resend_retries_a_read_error_instead_of_checkpointing_unread_records() {
    let storage = SimStorage::new();
    let wal = log_of(&storage, Path::new("/sim/wal"), 10);
    let tmp = tempfile::tempdir().unwrap();
    let checkpoints = Checkpoints::open(&tmp.path().join("cp")).unwrap();
    // The relay stopped while records 0..10 were in flight.
    checkpoints.set("r", 0).unwrap();
    checkpoints.begin_send("r", 0..10).unwrap();
    let receiver = Receiver::start().await;
    let (shipper, state) = shipper(&wal, &checkpoints, &receiver.url);
    // The disk fails the first reads of the re-send.
    storage.fail_reads(3);
    let stop = CancellationToken::new();
    let task = tokio::spawn(shipper.run(stop.clone(), CancellationToken::new()));

    until(
        "every record of the interrupted request reaches the replica",
        || receiver.stored().len() == 10,
    )
    .await;
    assert_eq!(receiver.stored(), (1000..1010).collect::<Vec<i64>>());
    assert_eq!(storage.reads_left_to_fail(), 0, "the reads did fail");
    until("the cursor is past the delivered records", || {
        state.delivered() == 10
    })
    .await;
    let status = state.status(10, 0);
    assert_eq!(
        (status.skipped_records, status.rejected_records),
        (0, 0),
        "{status:?}"
    );
    stop.cancel();
    task.await.unwrap();
    assert_eq!(checkpoints.cursor("r").unwrap().delivered, Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_shipper_writes_its_last_delivery_and_says_so_only_once_written() {
    let receiver = Receiver::start().await;
    let (state, stop, checkpoints) = ship_ten(&receiver, None).await;
    // No further record comes: the delivery's completion cannot ride on a
    // next request and is written on its own, with no stop to force it.
    let mut checked = 0;
    until("the last delivery is in the checkpoint store", || {
        let status = state.status(10, 0);
        if status.cursor == 10 && !status.checkpoint_pending {
            // Read after the status: a status that says nothing is
            // pending speaks for a write already made.
            assert_eq!(checkpoints.cursor("r").unwrap().delivered, Some(10));
            checked += 1;
        }
        checked > 0
    })
    .await;
    assert_eq!(receiver.stored(), (1000..1010).collect::<Vec<i64>>());
    stop.cancel();
}

/// Starts a shipper for replica "r" at position 0 of a 10-record log
/// (with record `bad` refused by the receiver).
async fn ship_ten(
    receiver: &Receiver,
    bad: Option<u64>,
) -> (Arc<ReplicaState>, CancellationToken, Checkpoints) {
    let storage = SimStorage::new();
    let wal = log_with(&storage, Path::new("/sim/wal"), 10, bad);
    let tmp = tempfile::tempdir().unwrap().keep();
    let checkpoints = Checkpoints::open(&tmp.join("cp")).unwrap();
    checkpoints.set("r", 0).unwrap();
    let (shipper, state) = shipper(&wal, &checkpoints, &receiver.url);
    let stop = CancellationToken::new();
    tokio::spawn(shipper.run(stop.clone(), CancellationToken::new()));
    (state, stop, checkpoints)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_are_not_about_the_data_block_the_replica_and_skip_nothing() {
    let receiver = Receiver::start().await;
    receiver.status.store(401, Ordering::SeqCst);
    let (state, stop, checkpoints) = ship_ten(&receiver, None).await;
    for status in [401, 403, 404, 407, 421, 500, 429] {
        receiver.status.store(status, Ordering::SeqCst);
        let want = format!("HTTP {status}: test receiver");
        let phase = if status >= 429 { "retrying" } else { "blocked" };
        until(
            &format!("the replica shows {phase} with HTTP {status}"),
            || {
                let s = state.status(10, 0);
                s.state == phase && s.last_error.as_deref() == Some(want.as_str())
            },
        )
        .await;
        let s = state.status(10, 0);
        assert_eq!(
            s.blocked_since_unix_ms.is_some(),
            phase == "blocked",
            "{s:?}"
        );
        assert_eq!(state.delivered(), 0, "the cursor does not move");
        assert_eq!(checkpoints.cursor("r").unwrap().delivered, Some(0));
    }
    assert!(receiver.stored().is_empty());
    receiver.status.store(204, Ordering::SeqCst);
    until("everything arrives once the replica takes it", || {
        receiver.stored().len() == 10
    })
    .await;
    until("the cursor is past it", || state.delivered() == 10).await;
    let s = state.status(10, 0);
    assert_eq!((s.rejected_records, s.skipped_records), (0, 0), "{s:?}");
    assert_eq!(s.blocked_since_unix_ms, None);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_large_is_split_down_to_single_records_and_only_those_are_rejected() {
    let receiver = Receiver::start().await;
    // One record's body passes, two records' do not.
    let one = snap::raw::Encoder::new()
        .compress_vec(&payload(9))
        .unwrap()
        .len();
    receiver.max_body.store(one + 2, Ordering::SeqCst);
    let (state, stop, _) = ship_ten(&receiver, None).await;
    until("every record arrives, one request each", || {
        receiver.stored().len() == 10
    })
    .await;
    until("the cursor is past them", || state.delivered() == 10).await;
    let s = state.status(10, 0);
    assert_eq!(s.rejected_records, 0, "{s:?}");
    stop.cancel();

    // A replica that takes no record at all rejects each on its own.
    let receiver = Receiver::start().await;
    receiver.max_body.store(1, Ordering::SeqCst);
    let (state, stop, _) = ship_ten(&receiver, None).await;
    until("every record is refused on its own", || {
        state.delivered() == 10
    })
    .await;
    let s = state.status(10, 0);
    assert_eq!((s.rejected_records, s.rejected_samples), (10, 10), "{s:?}");
    assert!(receiver.stored().is_empty());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_of_several_records_skips_only_the_record_refused_alone() {
    let receiver = Receiver::start().await;
    let (state, stop, _) = ship_ten(&receiver, Some(4)).await;
    until("the cursor is past every record", || {
        state.delivered() == 10
    })
    .await;
    let mut want: Vec<i64> = (1000..1010).filter(|&t| t != 1004).collect();
    want.sort_unstable();
    assert_eq!(receiver.stored(), want);
    let s = state.status(10, 0);
    assert_eq!(
        (s.rejected_records, s.assumed_delivered_records),
        (1, 0),
        "{s:?}"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_resend_refused_whole_was_already_delivered() {
    // The relay stopped with records 0..10 in flight; the replica refuses
    // the re-send (it holds them): counted as already delivered, not sent
    // one by one.
    let receiver = Receiver::start().await;
    let storage = SimStorage::new();
    let wal = log_with(&storage, Path::new("/sim/wal"), 10, Some(4));
    let tmp = tempfile::tempdir().unwrap();
    let checkpoints = Checkpoints::open(&tmp.path().join("cp")).unwrap();
    checkpoints.set("r", 0).unwrap();
    checkpoints.begin_send("r", 0..10).unwrap();
    let (shipper, state) = shipper(&wal, &checkpoints, &receiver.url);
    let stop = CancellationToken::new();
    tokio::spawn(shipper.run(stop.clone(), CancellationToken::new()));
    until("the cursor is past the range", || state.delivered() == 10).await;
    let s = state.status(10, 0);
    assert_eq!(
        (s.assumed_delivered_records, s.rejected_records),
        (10, 0),
        "{s:?}"
    );
    assert!(receiver.stored().is_empty());
    stop.cancel();
}

/// The shard, of `of`, of record `seq`'s one series (see [`payload`]).
fn shard_of_record(seq: u64, of: u32) -> u32 {
    let name = format!("t{seq}");
    prom_remote_write::shard::shard_of(
        prom_remote_write::shard::series_hash([(&b"__name__"[..], name.as_bytes())]),
        of,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_each_shard_resends_exactly_its_part_then_the_count_changes_at_a_barrier() {
    let storage = SimStorage::new();
    let wal = log_of(&storage, Path::new("/sim/wal"), 12);
    let tmp = tempfile::tempdir().unwrap();
    let checkpoints = Checkpoints::open(&tmp.path().join("cp")).unwrap();
    // The relay stopped with 3 shards: shard 0 had everything, shard 1 had
    // 4..12 in flight, shard 2 nothing yet.
    checkpoints.set("r", 0).unwrap();
    checkpoints.reshard("r", 0, 3, None).unwrap();
    let shard = |index| Stream::Shard { index, of: 3 };
    checkpoints.complete_on("r", shard(0), 12).unwrap();
    checkpoints.complete_on("r", shard(1), 4).unwrap();
    checkpoints.begin_send_on("r", shard(1), 4..12).unwrap();
    let receiver = Receiver::start().await;
    let (shipper, state) = shipper(&wal, &checkpoints, &receiver.url);
    // Configured for 2 shards now.
    let shipper = shipper.with_shards(Shards::Fixed(2), Duration::from_secs(10));
    let stop = CancellationToken::new();
    let task = tokio::spawn(shipper.run(stop.clone(), CancellationToken::new()));

    // What each old shard still owed: shard 1 its series of 4..12 (its
    // request in flight, re-sent), shard 2 its series of 0..12.
    let mut owed: Vec<i64> = (0..12)
        .filter(|&seq| match shard_of_record(seq, 3) {
            1 => seq >= 4,
            2 => true,
            _ => false,
        })
        .map(|seq| 1000 + seq as i64)
        .collect();
    owed.sort_unstable();
    assert!(!owed.is_empty() && owed.len() < 12, "a mix: {owed:?}");
    until("the new shard count is stored", || {
        checkpoints.cursor("r").unwrap().shard_count() == 2
    })
    .await;
    assert_eq!(
        receiver.stored(),
        owed,
        "exactly what the old shards owed, nothing twice"
    );
    let c = checkpoints.cursor("r").unwrap();
    assert!(
        c.shards
            .iter()
            .all(|s| s.delivered == 12 && s.inflight.is_none()),
        "{c:?}"
    );
    assert_eq!(state.shards(), 2);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shard_s_checkpoint_reaches_the_head_even_a_shard_with_no_series() {
    let storage = SimStorage::new();
    // 10 series over 16 shards: some shards have none.
    let wal = log_of(&storage, Path::new("/sim/wal"), 10);
    let tmp = tempfile::tempdir().unwrap();
    let checkpoints = Checkpoints::open(&tmp.path().join("cp")).unwrap();
    let receiver = Receiver::start().await;
    let (shipper, state) = shipper(&wal, &checkpoints, &receiver.url);
    let shipper = shipper.with_shards(Shards::Fixed(16), Duration::from_secs(10));
    assert!((0..16).any(|i| (0..10).all(|seq| shard_of_record(seq, 16) != i)));
    let stop = CancellationToken::new();
    let task = tokio::spawn(shipper.run(stop.clone(), CancellationToken::new()));
    until("every record delivered", || receiver.stored().len() == 10).await;
    assert_eq!(receiver.stored(), (1000..1010).collect::<Vec<i64>>());
    until("every shard's checkpoint at the head", || {
        let c = checkpoints.cursor("r").unwrap();
        c.shard_count() == 16 && c.shards.iter().all(|s| s.delivered == 10)
    })
    .await;
    assert_eq!(state.delivered(), 10);
    assert_eq!(state.status(10, 0).shard_cursors.len(), 16);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_live_first_replica_splits_at_a_barrier_and_its_backfill_fills_the_gap() {
    let storage = SimStorage::new();
    // Every record was received long ago (receive time 1 ms after the
    // epoch): far past the threshold.
    let wal = log_of(&storage, Path::new("/sim/wal"), 10);
    let tmp = tempfile::tempdir().unwrap();
    let checkpoints = Checkpoints::open(&tmp.path().join("cp")).unwrap();
    checkpoints.set("r", 0).unwrap();
    checkpoints.reshard("r", 0, 3, None).unwrap();
    let receiver = Receiver::start().await;
    let (shipper, state) = shipper(&wal, &checkpoints, &receiver.url);
    let shipper = shipper
        .with_shards(Shards::Fixed(3), Duration::from_secs(10))
        .with_catch_up(CatchUp::LiveFirst {
            after: Duration::from_secs(1),
        });
    // The replica is away at first: the split needs no delivery.
    receiver.status.store(503, Ordering::SeqCst);
    let stop = CancellationToken::new();
    let task = tokio::spawn(shipper.run(stop.clone(), CancellationToken::new()));
    until(
        "the split: the shards at the head, the gap left to a backfill",
        || {
            let c = checkpoints.cursor("r").unwrap();
            c.backfill
                .as_ref()
                .is_some_and(|b| (b.from, b.to) == (0, 10))
                && c.shard_count() == 3
                && c.shards.iter().all(|s| s.delivered == 10)
        },
    )
    .await;
    assert!(receiver.stored().is_empty());
    receiver.status.store(204, Ordering::SeqCst);
    until("every record delivered once", || {
        receiver.stored().len() == 10
    })
    .await;
    assert_eq!(receiver.stored(), (1000..1010).collect::<Vec<i64>>());
    until("the backfill is done and forgotten", || {
        let c = checkpoints.cursor("r").unwrap();
        c.backfill.is_none() && c.shard_count() == 3 && c.shards.iter().all(|s| s.delivered == 10)
    })
    .await;
    assert_eq!(state.status(10, 0).skipped_records, 0);
    assert_eq!(state.backfill(), None);
    stop.cancel();
    task.await.unwrap();
    assert_eq!(receiver.stored().len(), 10, "nothing sent twice");
}
