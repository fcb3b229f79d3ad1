//! Proves that hostile bodies are refused without large allocations, with a
//! global allocator recording the largest single allocation made by the
//! test's own thread.
#![allow(unsafe_code, clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use prom_remote_write::decode::{decompress_snappy, validate, DecodeError, Limits};
use prom_remote_write::Protocol;

struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
}

fn note(size: usize) {
    if TRACK.with(|t| t.get()) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
        TOTAL.fetch_add(size, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator unchanged.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// One measurement at a time (the counters are global).
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` and returns its result with the largest single allocation and
/// the total bytes allocated by this thread meanwhile.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    LARGEST.store(0, Ordering::Relaxed);
    TOTAL.store(0, Ordering::Relaxed);
    TRACK.with(|t| t.set(true));
    let out = f();
    TRACK.with(|t| t.set(false));
    (
        out,
        LARGEST.load(Ordering::Relaxed),
        TOTAL.load(Ordering::Relaxed),
    )
}

// All measurements in one test, so they never run concurrently.
#[test]
fn hostile_bodies_are_refused_without_allocating() {
    // A snappy header declaring 4 GiB.
    let body = [0x80, 0x80, 0x80, 0x80, 0x10, 0, 0, 0];
    let (res, largest, _) = measure(|| decompress_snappy(&body, 32 << 20));
    assert!(matches!(res, Err(DecodeError::TooLarge { declared, .. }) if declared == 1 << 32));
    assert!(largest < 4096, "largest allocation {largest}");

    // A header declaring just over the limit (valid for snappy).
    let body = [0x81, 0x80, 0x80, 0x10, 0, 0];
    let (res, largest, _) = measure(|| decompress_snappy(&body, 32 << 20));
    assert!(matches!(res, Err(DecodeError::TooLarge { .. })), "{res:?}");
    assert!(largest < 4096, "largest allocation {largest}");

    // A protobuf field declaring 4 GiB.
    let body = [0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f];
    let (res, largest, _) = measure(|| validate(Protocol::V1, &body, &Limits::default()));
    assert!(matches!(res, Err(DecodeError::Protobuf(_))), "{res:?}");
    assert!(largest < 4096, "largest allocation {largest}");

    // 8 MiB of empty series: prost would need ~400 MiB.
    let body = [0x0a, 0x00].repeat(4 << 20);
    let (res, largest, total) = measure(|| validate(Protocol::V1, &body, &Limits::default()));
    assert!(
        matches!(res, Err(DecodeError::ExpandsTooMuch { .. })),
        "{res:?}"
    );
    assert!(largest < 4096, "largest allocation {largest}");
    assert!(total < 1 << 20, "total allocated {total}");

    // Over the series limit: refused before prost allocates the series.
    let body = [0x0a, 0x00].repeat(1000);
    let limits = Limits {
        max_series: 10,
        ..Limits::default()
    };
    let (res, largest, _) = measure(|| validate(Protocol::V1, &body, &limits));
    assert!(
        matches!(
            res,
            Err(DecodeError::TooManySeries {
                count: 1000,
                limit: 10
            })
        ),
        "{res:?}"
    );
    assert!(largest < 4096, "largest allocation {largest}");
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field(out: &mut Vec<u8>, tag: u64, body: &[u8]) {
    put_varint(out, tag << 3 | 2);
    put_varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

fn label(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut l = vec![];
    field(&mut l, 1, name);
    field(&mut l, 2, value);
    l
}

/// `unit` repeated after `head` up to about 4 MiB.
fn repeated(head: Vec<u8>, unit: &[u8]) -> Vec<u8> {
    let mut out = head;
    while out.len() < 4 << 20 {
        out.extend_from_slice(unit);
    }
    out
}

/// Issue 15: decoded into owned structs, these 4 MiB bodies took from 9 to
/// 47 bytes of memory per byte. Read where they lie, they take none that
/// grows with them.
#[test]
fn the_shapes_of_issue_15_are_validated_without_memory_that_grows_with_them() {
    let v2_symbols = [b"".as_slice(), b"__name__", b"a"]
        .iter()
        .fold(vec![], |mut out, s| {
            field(&mut out, 4, s);
            out
        });
    let mut series = vec![];
    field(&mut series, 1, &[1, 2]);
    let mut unit = vec![];
    field(&mut unit, 5, &series);
    let v2_tiny_series = repeated(v2_symbols.clone(), &unit);

    let mut series = vec![];
    field(&mut series, 1, &label(b"__name__", b"a"));
    field(&mut series, 3, &[]);
    let mut unit = vec![];
    field(&mut unit, 1, &series);
    let v1_exemplars = repeated(vec![], &unit);

    // One integer histogram of 1000 buckets of one observation each.
    let mut h = vec![0x08, 0xe8, 0x07, 0x30, 0x00];
    field(&mut h, 11, &[0x10, 0xe8, 0x07]);
    let mut deltas = vec![2u8];
    deltas.resize(1000, 0);
    field(&mut h, 12, &deltas);
    let mut series = vec![];
    field(&mut series, 1, &[1, 2]);
    field(&mut series, 3, &h);
    let mut unit = vec![];
    field(&mut unit, 5, &series);
    let v2_histograms = repeated(v2_symbols, &unit);

    let mut md = vec![0x08, 0x01];
    field(&mut md, 2, b"m");
    field(&mut md, 4, b"help");
    let mut unit = vec![];
    field(&mut unit, 3, &md);
    let v1_metadata = repeated(vec![], &unit);

    for (name, p, body) in [
        ("2.0 tiny series", Protocol::V2, v2_tiny_series),
        ("1.0 exemplars", Protocol::V1, v1_exemplars),
        ("2.0 histograms", Protocol::V2, v2_histograms),
        ("1.0 metadata", Protocol::V1, v1_metadata),
    ] {
        let (res, largest, total) = measure(|| validate(p, &body, &Limits::default()));
        assert!(res.is_ok(), "{name}: {res:?}");
        assert!(total < 4096, "{name}: {total} bytes allocated");
        assert!(largest < 4096, "{name}: largest allocation {largest}");
    }
}

/// The duplicate-name check of a series whose labels are out of order sorts
/// 4-byte positions, not copies of the labels; in order, nothing at all.
#[test]
fn one_series_of_a_million_labels_takes_less_memory_than_its_bytes() {
    let names: Vec<Vec<u8>> = (0..1_000_000u32)
        .map(|i| format!("{:06}", 999_999 - i).into_bytes())
        .collect();
    for sorted in [true, false] {
        // Digits sort before "__name__".
        let mut series = vec![];
        let mut put = |n: &[u8], v: &[u8]| field(&mut series, 1, &label(n, v));
        if sorted {
            names.iter().rev().for_each(|n| put(n, b""));
            put(b"__name__", b"m");
        } else {
            put(b"__name__", b"m");
            names.iter().for_each(|n| put(n, b""));
        }
        let mut body = vec![];
        field(&mut body, 1, &series);
        let (res, largest, total) = measure(|| validate(Protocol::V1, &body, &Limits::default()));
        assert!(res.is_ok(), "{res:?}");
        if sorted {
            assert!(total < 4096, "sorted: {total} bytes allocated");
        } else {
            assert!(
                largest <= body.len() / 2,
                "unsorted: largest allocation {largest}"
            );
        }
    }
}

/// A 2.0 request referencing one long symbol from every series is small;
/// its 1.0 translation spells the symbol out for each series. Over
/// `max_translated_bytes` it is refused as too large (413), so no such
/// record is ever stored for a 1.0 replica's shipper to expand.
#[test]
fn a_2_0_request_whose_1_0_translation_explodes_is_refused_as_too_large() {
    let long = vec![b'x'; 64 << 10];
    let mut body = [b"".as_slice(), b"__name__", &long]
        .iter()
        .fold(vec![], |mut out, s| {
            field(&mut out, 4, s);
            out
        });
    let mut series = vec![];
    field(&mut series, 1, &[1, 2]);
    let mut unit = vec![];
    field(&mut unit, 5, &series);
    for _ in 0..10_000 {
        body.extend_from_slice(&unit);
    }
    // 10,000 series of a 64 KiB value: about 655 MB of labels in 1.0, from
    // a body of about 125 KiB.
    let limits = Limits {
        max_translated_bytes: 128 << 20,
        ..Limits::default()
    };
    let e = validate(Protocol::V2, &body, &limits).unwrap_err();
    assert!(
        matches!(e, DecodeError::TranslationTooLarge { bytes, limit }
            if bytes == 10_000 * (8 + (64 << 10)) && limit == 128 << 20),
        "{e}"
    );
    assert!(e.is_too_large(), "answered 413: {e}");
    // Within the limit it is an ordinary request.
    let roomy = Limits {
        max_translated_bytes: 1 << 30,
        ..Limits::default()
    };
    assert!(validate(Protocol::V2, &body, &roomy).is_ok());
}
