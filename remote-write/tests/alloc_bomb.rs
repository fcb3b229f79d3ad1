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

/// Runs `f` and returns its result with the largest single allocation and
/// the total bytes allocated by this thread meanwhile.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
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
