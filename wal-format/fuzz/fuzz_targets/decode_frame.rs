//! Coverage-guided fuzzing of the decoders:
//! `cargo +nightly fuzz run decode_frame` from `wal-format/`.
//!
//! The walk itself is in `walk.rs`, which `tests/decode_never_panics.rs`
//! also runs (seeded, bounded) in CI.

#![no_main]

use libfuzzer_sys::fuzz_target;

mod walk;

fuzz_target!(|data: &[u8]| {
    walk::walk(data);
});
