//! Which delivery shard a series belongs to, and a 1.0 request cut down to
//! the series of one shard.
//!
//! A replica may be sent N requests at once, by N delivery shards. Each
//! series goes through exactly one of them, always the same, so that the
//! samples of a series still arrive in log order (what a replica without an
//! out-of-order window requires) while N requests are in flight.
//!
//! # The shard of a series
//!
//! `shard = mix(Σ fnv1a(name, 0xff, value)) mod N`, where the sum runs
//! over the series' labels, wrapping at 2^64:
//!
//! * `fnv1a` is 64-bit FNV-1a (offset basis `0xcbf29ce484222325`, prime
//!   `0x100000001b3`) taken a word at a time: over the label's name, then
//!   the one byte `0xff`, then its value. Over a string of bytes, each
//!   whole 8-byte word from its start, read little-endian, is one step
//!   (`h ^= word; h *= prime`), then each byte left over is one step
//!   (`h ^= byte; h *= prime`). `0xff` never occurs in UTF-8, so the name
//!   ends where it stands. A word at a time takes an eighth of the
//!   multiplications of a byte at a time: the hash runs for every series
//!   delivered through shards.
//! * The sum makes the hash independent of the order of the labels: a 1.0
//!   request may hold them in any order (ingest stores the request as it
//!   came), and a 2.0 record of the same series, its labels resolved through
//!   its symbol table, must land in the same shard. Duplicate names are
//!   refused at ingest, so no two terms of a sum cancel or repeat.
//! * `mix` is the finaliser of SplitMix64 (`x ^= x >> 30; x *= 0xbf58476d1ce4e5b9;
//!   x ^= x >> 27; x *= 0x94d049bb133111eb; x ^= x >> 31`), so that the low
//!   bits taken by `mod N` depend on every bit of the sum.
//!
//! This function is part of the relay's stored state and must never
//! change: a shard's request in flight is re-sent after a crash as "the
//! series of these records that hash to this shard", with the shard count
//! stored beside it. `tests/shard.rs` pins it with known values.

use crate::pb::{Fields, Value};
use crate::sink::Sink;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a over `bytes` a word at a time (see the module documentation).
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        h ^= u64::from_le_bytes(word);
        h = h.wrapping_mul(FNV_PRIME);
    }
    for &b in words.remainder() {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The hash of one label: FNV-1a of its name, `0xff`, then its value.
fn label_hash(name: &[u8], value: &[u8]) -> u64 {
    fnv1a(fnv1a(fnv1a(FNV_OFFSET, name), &[0xff]), value)
}

/// SplitMix64's finaliser.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The hash of a series from its labels, in any order (see the module
/// documentation).
pub fn series_hash<'a>(labels: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> u64 {
    mix(labels
        .into_iter()
        .fold(0u64, |sum, (n, v)| sum.wrapping_add(label_hash(n, v))))
}

/// The shard, of `shards`, of a series with this hash (0 for no shards).
pub fn shard_of(hash: u64, shards: u32) -> u32 {
    if shards <= 1 {
        return 0;
    }
    (hash % u64::from(shards)) as u32
}

/// `WriteRequest.timeseries`, `TimeSeries.labels`/`samples`/`histograms`,
/// `Label.name`/`value`.
const TIMESERIES: u32 = 1;
const LABELS: u32 = 1;
const SAMPLES: u32 = 2;
const HISTOGRAMS: u32 = 4;
const LABEL_NAME: u32 = 1;
const LABEL_VALUE: u32 = 2;

/// The hash of a 1.0 `TimeSeries` (its bytes), its labels as prost reads
/// them (the last occurrence of a label's name or value wins), and how many
/// samples and histograms it holds.
fn timeseries_hash(ts: &[u8]) -> (u64, u64) {
    let mut samples = 0u64;
    let hash = series_hash(Fields::new(ts).filter_map(|(tag, field)| {
        if tag != LABELS {
            samples += u64::from(tag == SAMPLES || tag == HISTOGRAMS);
            return None;
        }
        let (mut name, mut value): (&[u8], &[u8]) = (&[], &[]);
        for (tag, v) in Fields::new(field.bytes()) {
            match (tag, v) {
                (LABEL_NAME, Value::Len(b)) => name = b,
                (LABEL_VALUE, Value::Len(b)) => value = b,
                _ => {}
            }
        }
        Some((name, value))
    }));
    (hash, samples)
}

/// What [`filter_v1`] kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kept {
    /// Series of the shard.
    pub series: u64,
    /// Their samples and histograms.
    pub samples: u64,
    /// Fields that are not series (metadata, unknown fields): the first
    /// shard carries them.
    pub other: u64,
}

/// Writes to `out` the fields of the 1.0 `WriteRequest` `body` that belong
/// to `shard` of `shards`: its series whose labels hash there, in their
/// order, byte for byte; and, in shard 0 only, every other field (metadata
/// holds no series: sent once, with the first shard). With one shard this
/// is `body` itself.
///
/// `body` must have been validated (ingest does, before it is stored).
pub fn filter_v1(body: &[u8], shard: u32, shards: u32, out: &mut dyn Sink) -> Kept {
    let mut kept = Kept::default();
    route_v1(body, shards, |to, field, samples| {
        if to == shard {
            out.put(field);
            count(&mut kept, samples);
        }
    });
    kept
}

/// [`filter_v1`] into every shard at once, `outs.len()` of them, hashing
/// each series once: what each kept.
pub fn split_v1(body: &[u8], outs: &mut [Vec<u8>]) -> Vec<Kept> {
    let mut kept = vec![Kept::default(); outs.len()];
    let shards = u32::try_from(outs.len()).unwrap_or(u32::MAX);
    route_v1(body, shards, |to, field, samples| {
        let to = to as usize;
        if let (Some(out), Some(k)) = (outs.get_mut(to), kept.get_mut(to)) {
            out.put(field);
            count(k, samples);
        }
    });
    kept
}

/// Counts a field routed to a shard: a series (with its samples) or
/// another field.
fn count(kept: &mut Kept, samples: Option<u64>) {
    match samples {
        Some(n) => {
            kept.series += 1;
            kept.samples += n;
        }
        None => kept.other += 1,
    }
}

/// Calls `to(shard, field, samples)` for each top-level field of `body`,
/// in order, with the shard it belongs to: a series's by its hash (with its
/// samples and histograms), any other field's shard 0 (`samples` `None`).
fn route_v1(body: &[u8], shards: u32, mut to: impl FnMut(u32, &[u8], Option<u64>)) {
    let mut fields = Fields::new(body);
    let mut start = fields.pos();
    while let Some((tag, v)) = fields.next() {
        let end = fields.pos();
        let field = &body[start..end];
        match (tag, v) {
            (TIMESERIES, Value::Len(ts)) => {
                let (hash, samples) = timeseries_hash(ts);
                to(shard_of(hash, shards), field, Some(samples));
            }
            _ => to(0, field, None),
        }
        start = end;
    }
}
