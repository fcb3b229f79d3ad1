//! The rules of [`crate::decode`], checked on the bytes of a request instead
//! of on the structs prost would build from them.
//!
//! [`validate`] first walks the request with [`crate::pb::check`] (exactly
//! what prost accepts, with prost's errors), then applies the rules series by
//! series, in the order [`crate::decode::validate_v1`] and
//! [`crate::decode::validate_v2`] apply them to the decoded request, reading
//! each field where it lies (the last occurrence of a singular field wins, a
//! repeated scalar may come packed or not, as prost decodes them).
//!
//! # Memory
//!
//! Nothing is allocated per series, label, sample, exemplar, histogram,
//! bucket or metadata entry. What is allocated:
//!
//! * 2.0: the symbol table as an index of positions
//!   ([`crate::symbols::Symbols`]): at most 1/16 byte per byte of the request
//!   (4 bytes per symbol for ordinary requests, whose symbols are few).
//! * For a series whose label names are not in order (senders sort them, so
//!   this is rare) the duplicate check sorts the names: 4 bytes per label of
//!   the largest such series (1.0: the label's position; a label is at least
//!   5 bytes, so at most 0.8 byte per byte), and for 2.0 4 bytes per
//!   *distinct* name reference plus one bit per symbol (a name reference
//!   given twice is found by that bit; at most about 0.8 + 1/16 byte per byte
//!   for a request that is one such series).
//! * The error, when there is one.
//!
//! So validation needs less than 1 byte of memory per byte of request on top
//! of the request itself, and for every shape whose labels are sorted,
//! 1/16 byte per byte at most: `benches/hotpath.rs` measures it per shape
//! (see [`crate::decode`]'s "Memory" for the figures).
//!
//! # Time
//!
//! A series is read once for its labels, counts and metadata, then again
//! only for what it has (exemplars, histograms). Measured against decoding
//! with prost (`benches/hotpath.rs`, `shapes/*`), 1.2 to 3.7 times faster
//! for the shapes of issue 15. Unsorted labels are the exception (2 to 7
//! times slower): their names are sorted by position or reference, reading
//! each name again at every comparison instead of keeping a copy.

use crate::error::DecodeError;
use crate::limits::{Limits, Summary};
use crate::pb::{self, count_doubles, count_varints, Fields, Value};
use crate::rules::{check_histogram, check_translated, HistogramParts, LabelRules};
use crate::symbols::Symbols;
use crate::{v1, v2, Protocol};

/// Validates `buf` (already through [`crate::decode`]'s size, structure and
/// series-count checks) as the message of `protocol`.
pub(crate) fn validate(
    protocol: Protocol,
    buf: &[u8],
    limits: &Limits,
) -> Result<Summary, DecodeError> {
    match protocol {
        Protocol::V1 => {
            pb::check(buf, &v1::schema::WRITE_REQUEST, |_| ())
                .map_err(|e| protobuf_error(protocol, &e))?;
            validate_v1(buf, limits)
        }
        Protocol::V2 => {
            let symbols = check_v2(buf)?;
            validate_v2(buf, &symbols, limits)
        }
    }
}

/// [`pb::check`] of a 2.0 request, and its symbol table.
pub(crate) fn check_v2(buf: &[u8]) -> Result<Symbols<'_>, DecodeError> {
    let mut symbols = Symbols::new(buf);
    pb::check(buf, &v2::schema::REQUEST, |at| symbols.push(at))
        .map_err(|e| protobuf_error(Protocol::V2, &e))?;
    Ok(symbols)
}

/// The error [`crate::decode::decode_v1`] / [`crate::decode::decode_v2`]
/// give for the same bytes.
pub(crate) fn protobuf_error(protocol: Protocol, e: &pb::PbError) -> DecodeError {
    DecodeError::Protobuf(match protocol {
        Protocol::V1 => format!("prometheus.WriteRequest: {e}"),
        Protocol::V2 => format!("io.prometheus.write.v2.Request: {e}"),
    })
}

/// Reusable memory of the duplicate-name check of unsorted series.
#[derive(Default)]
struct Scratch {
    /// 1.0: positions of labels; 2.0: distinct name references.
    entries: Vec<u32>,
    /// 2.0: one bit per symbol, set for the name references of the series
    /// being checked (all clear between series).
    seen: Vec<u64>,
}

fn validate_v1(buf: &[u8], limits: &Limits) -> Result<Summary, DecodeError> {
    let mut summary = Summary::default();
    let mut scratch = Scratch::default();
    let series = Fields::new(buf).filter(|&(tag, _)| tag == 1);
    for (i, (_, s)) in series.enumerate() {
        series_v1(i, s.bytes(), limits, &mut summary, &mut scratch)?;
    }
    Ok(summary)
}

/// The last `timestamp` of a `Sample` (same field in 1.0 and 2.0).
fn sample_ts(sample: &[u8]) -> i64 {
    pb::last(sample, 2) as i64
}

/// The name and value of a 1.0 `Label` (last occurrences, "" if none).
fn label_v1(label: &[u8]) -> (&[u8], &[u8]) {
    let (mut name, mut value): (&[u8], &[u8]) = (&[], &[]);
    for (tag, v) in Fields::new(label) {
        match tag {
            1 => name = v.bytes(),
            2 => value = v.bytes(),
            _ => {}
        }
    }
    (name, value)
}

/// Where `inner`, a part of `outer`, starts in it.
fn offset_in(outer: &[u8], inner: &[u8]) -> usize {
    inner.as_ptr() as usize - outer.as_ptr() as usize
}

/// What a series holds, counted in one walk.
#[derive(Default)]
struct Counts {
    samples: u64,
    histograms: u64,
    exemplars: u64,
}

impl Counts {
    fn add_to(&self, summary: &mut Summary) {
        summary.series += 1;
        summary.samples += self.samples;
        summary.histograms += self.histograms;
        summary.exemplars += self.exemplars;
    }
}

fn series_v1(
    i: usize,
    s: &[u8],
    limits: &Limits,
    summary: &mut Summary,
    scratch: &mut Scratch,
) -> Result<(), DecodeError> {
    let mut rules = LabelRules::new(i, limits);
    let mut counts = Counts::default();
    for (tag, v) in Fields::new(s) {
        match tag {
            1 => {
                let (name, value) = label_v1(v.bytes());
                rules.label(name, value);
            }
            2 => {
                counts.samples += 1;
                summary.observe_ts(sample_ts(v.bytes()));
            }
            3 => counts.exemplars += 1,
            4 => counts.histograms += 1,
            _ => {}
        }
    }
    rules.check()?;
    let duplicate = match rules.duplicate_if_sorted() {
        Some(d) => d,
        None => unsorted_duplicate_v1(s, rules.count(), &mut scratch.entries),
    };
    rules.finish(duplicate)?;
    if counts.histograms > 0 {
        histograms(i, s, 4, summary)?;
    }
    counts.add_to(summary);
    Ok(())
}

/// The smallest label name given twice in a 1.0 series, by sorting the
/// positions of the names' fields (a `u32` per label).
fn unsorted_duplicate_v1<'a>(
    s: &'a [u8],
    labels: usize,
    positions: &mut Vec<u32>,
) -> Option<&'a [u8]> {
    positions.clear();
    positions.reserve_exact(labels);
    for (tag, label) in Fields::new(s) {
        if tag == 1 {
            // The key of the label's last name (every label here has one).
            let label = label.bytes();
            let mut fields = Fields::new(label);
            let mut name_at = None;
            loop {
                let at = fields.pos();
                match fields.next() {
                    Some((1, _)) => name_at = Some(at),
                    Some(_) => {}
                    None => break,
                }
            }
            let at = name_at.map_or(u32::MAX, |at| (offset_in(s, label) + at) as u32);
            positions.push(at);
        }
    }
    let name = |at: u32| match Fields::from_pos(s, at as usize).next() {
        Some((_, v)) => v.bytes(),
        None => &[],
    };
    positions.sort_unstable_by(|&a, &b| name(a).cmp(name(b)));
    positions
        .windows(2)
        .map(|w| (name(w[0]), name(w[1])))
        .find(|(a, b)| a == b)
        .map(|(a, _)| a)
}

/// Checks the histograms (field `tag` of series `i`) in order and takes
/// their timestamps.
fn histograms(i: usize, s: &[u8], tag: u32, summary: &mut Summary) -> Result<(), DecodeError> {
    let all = Fields::new(s).filter(|&(t, _)| t == tag);
    for (j, (_, h)) in all.enumerate() {
        let h = WireHistogram::new(h.bytes());
        check_histogram(i, j, &h)?;
        summary.observe_ts(h.timestamp);
    }
    Ok(())
}

/// `symbols[0]` is `""` when there are symbols.
pub(crate) fn check_first_symbol(symbols: &Symbols<'_>) -> Result<(), DecodeError> {
    match symbols.get(0) {
        Some(s) if !s.is_empty() => Err(DecodeError::FirstSymbolNotEmpty),
        _ => Ok(()),
    }
}

fn validate_v2(buf: &[u8], symbols: &Symbols<'_>, limits: &Limits) -> Result<Summary, DecodeError> {
    check_first_symbol(symbols)?;
    let mut summary = Summary::default();
    let mut scratch = Scratch::default();
    let mut translated = 0u64;
    let series = Fields::new(buf).filter(|&(tag, _)| tag == 5);
    for (i, (_, s)) in series.enumerate() {
        let t = series_v2(i, s.bytes(), symbols, limits, &mut summary, &mut scratch)?;
        translated = translated.saturating_add(t);
    }
    check_translated(translated, limits)?;
    Ok(summary)
}

/// The references of a `labels_refs` field (tag 1 in a 2.0 series and
/// exemplar), packed or not, in order, as prost's `uint32`.
pub(crate) fn refs(msg: &[u8]) -> impl Iterator<Item = u32> + '_ {
    pb::repeated_varints(Fields::new(msg), 1).map(|r| r as u32)
}

/// Checks a `labels_refs` list: even length, every reference in range.
pub(crate) fn check_refs(
    i: usize,
    field: &'static str,
    msg: &[u8],
    symbols: &Symbols<'_>,
) -> Result<(), DecodeError> {
    let len = count_varints(Fields::new(msg), 1);
    if !len.is_multiple_of(2) {
        return Err(DecodeError::OddLabelRefs {
            series: i,
            field,
            len,
        });
    }
    for r in refs(msg) {
        in_range(i, field, r, symbols)?;
    }
    Ok(())
}

fn in_range(
    series: usize,
    field: &'static str,
    reference: u32,
    symbols: &Symbols<'_>,
) -> Result<(), DecodeError> {
    if reference as usize >= symbols.len() {
        return Err(DecodeError::SymbolRefOutOfRange {
            series,
            field,
            reference,
            symbols: symbols.len(),
        });
    }
    Ok(())
}

/// The (name, value) references of a series' labels, in order.
fn pairs(s: &[u8]) -> impl Iterator<Item = (u32, u32)> + '_ {
    let mut refs = refs(s);
    std::iter::from_fn(move || Some((refs.next()?, refs.next()?)))
}

/// Checks one 2.0 series; returns the bytes of label names and values its
/// 1.0 translation spells out (its labels and its exemplars' labels).
fn series_v2(
    i: usize,
    s: &[u8],
    symbols: &Symbols<'_>,
    limits: &Limits,
    summary: &mut Summary,
    scratch: &mut Scratch,
) -> Result<u64, DecodeError> {
    let mut translated = 0u64;
    let mut counts = Counts::default();
    let (mut refs_len, mut refs_fields, mut packed_refs): (usize, usize, &[u8]) = (0, 0, &[]);
    // help_ref and unit_ref of the metadata, if any (its occurrences merge).
    let mut metadata: Option<(u32, u32)> = None;
    for (tag, v) in Fields::new(s) {
        match tag {
            1 => {
                refs_len += pb::varints_in(v);
                refs_fields += 1;
                packed_refs = v.bytes();
            }
            2 => {
                counts.samples += 1;
                summary.observe_ts(sample_ts(v.bytes()));
            }
            3 => counts.histograms += 1,
            4 => counts.exemplars += 1,
            5 => {
                let m = metadata.get_or_insert((0, 0));
                for (t, f) in Fields::new(v.bytes()) {
                    match t {
                        3 => m.0 = f.u64() as u32,
                        4 => m.1 = f.u64() as u32,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if !refs_len.is_multiple_of(2) {
        return Err(DecodeError::OddLabelRefs {
            series: i,
            field: "labels_refs",
            len: refs_len,
        });
    }
    // Every reference is checked before the label rules (`check_refs`, then
    // `check_labels`): the rules keep their first failure meanwhile.
    let mut rules = LabelRules::new(i, limits);
    // Senders write the references as one packed run: read it directly.
    let mut refs = match refs_fields {
        1 if !packed_refs.is_empty() => pb::packed_varints(packed_refs),
        _ => pb::repeated_varints(Fields::new(s), 1),
    }
    .map(|r| r as u32);
    while let (Some(name), Some(value)) = (refs.next(), refs.next()) {
        in_range(i, "labels_refs", name, symbols)?;
        in_range(i, "labels_refs", value, symbols)?;
        let symbol = |r: u32| symbols.get(r).unwrap_or_default();
        let (n, v) = (symbol(name), symbol(value));
        translated = translated.saturating_add((n.len() + v.len()) as u64);
        rules.label(n, v);
    }
    rules.check()?;
    let duplicate = match rules.duplicate_if_sorted() {
        Some(d) => d,
        None => unsorted_duplicate_v2(s, symbols, scratch),
    };
    rules.finish(duplicate)?;
    if counts.exemplars > 0 {
        for (tag, e) in Fields::new(s) {
            if tag == 4 {
                check_refs(i, "exemplar labels_refs", e.bytes(), symbols)?;
                for r in self::refs(e.bytes()) {
                    let len = symbols.get(r).unwrap_or_default().len();
                    translated = translated.saturating_add(len as u64);
                }
            }
        }
    }
    if let Some((help, unit)) = metadata {
        in_range(i, "help_ref", help, symbols)?;
        in_range(i, "unit_ref", unit, symbols)?;
    }
    if counts.histograms > 0 {
        histograms(i, s, 3, summary)?;
    }
    counts.add_to(summary);
    Ok(translated)
}

/// The smallest label name given twice in a 2.0 series whose references
/// are all in range. A name reference given twice is a duplicate by itself
/// (found with one bit per symbol); the distinct ones are sorted by their
/// strings, since two references may name equal strings.
fn unsorted_duplicate_v2<'a>(
    s: &[u8],
    symbols: &Symbols<'a>,
    scratch: &mut Scratch,
) -> Option<&'a [u8]> {
    let symbol = |r: u32| symbols.get(r).unwrap_or_default();
    if scratch.seen.is_empty() {
        scratch.seen = vec![0; symbols.len().div_ceil(64)];
    }
    let (distinct, seen) = (&mut scratch.entries, &mut scratch.seen);
    distinct.clear();
    let mut smallest: Option<&'a [u8]> = None;
    for (name, _) in pairs(s) {
        let (word, bit) = ((name / 64) as usize, 1u64 << (name % 64));
        let Some(w) = seen.get_mut(word) else {
            continue;
        };
        if *w & bit != 0 {
            let n = symbol(name);
            smallest = Some(smallest.map_or(n, |m| m.min(n)));
        } else {
            *w |= bit;
            distinct.push(name);
        }
    }
    distinct.sort_unstable_by(|&a, &b| symbol(a).cmp(symbol(b)));
    if let Some(w) = distinct.windows(2).find(|w| symbol(w[0]) == symbol(w[1])) {
        let n = symbol(w[0]);
        smallest = Some(smallest.map_or(n, |m| m.min(n)));
    }
    for &name in distinct.iter() {
        if let Some(w) = seen.get_mut((name / 64) as usize) {
            *w &= !(1u64 << (name % 64));
        }
    }
    smallest
}

/// What a 2.0 request that [`pb::check`] accepted carries (as
/// [`crate::translate::count_v2`] counts the decoded request).
pub(crate) fn summarize_v2(buf: &[u8]) -> Summary {
    summarize_v2_series(
        Fields::new(buf)
            .filter(|&(tag, _)| tag == 5)
            .map(|(_, s)| s.bytes()),
    )
}

/// [`summarize_v2`] of some of a request's series (their bytes).
pub(crate) fn summarize_v2_series<'a>(series: impl Iterator<Item = &'a [u8]>) -> Summary {
    let mut summary = Summary::default();
    for s in series {
        let mut counts = Counts::default();
        for (tag, v) in Fields::new(s) {
            match tag {
                2 => {
                    counts.samples += 1;
                    summary.observe_ts(sample_ts(v.bytes()));
                }
                3 => {
                    counts.histograms += 1;
                    summary.observe_ts(pb::last(v.bytes(), 15) as i64);
                }
                4 => counts.exemplars += 1,
                _ => {}
            }
        }
        counts.add_to(&mut summary);
    }
    summary
}

/// A native histogram (1.0 and 2.0 alike) read where it lies.
pub(crate) struct WireHistogram<'a> {
    buf: &'a [u8],
    float: bool,
    count_int: u64,
    zero_int: u64,
    sum: f64,
    pub timestamp: i64,
}

impl<'a> WireHistogram<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        let mut h = WireHistogram {
            buf,
            float: false,
            count_int: 0,
            zero_int: 0,
            sum: 0.0,
            timestamp: 0,
        };
        // The oneofs `count` (1 int, 2 float) and `zero_count` (6, 7) hold
        // the variant of their last occurrence.
        for (tag, v) in Fields::new(buf) {
            match tag {
                1 => (h.float, h.count_int) = (false, v.u64()),
                2 => (h.float, h.count_int) = (true, 0),
                3 => h.sum = f64::from_bits(v.u64()),
                6 => h.zero_int = v.u64(),
                7 => h.zero_int = 0,
                15 => h.timestamp = v.u64() as i64,
                _ => {}
            }
        }
        h
    }

    fn fields(&self) -> Fields<'a> {
        Fields::new(self.buf)
    }
}

impl HistogramParts for WireHistogram<'_> {
    fn is_float(&self) -> bool {
        self.float
    }
    fn count_int(&self) -> u64 {
        self.count_int
    }
    fn zero_int(&self) -> u64 {
        self.zero_int
    }
    fn sum(&self) -> f64 {
        self.sum
    }
    fn spans(&self, positive: bool) -> impl Iterator<Item = (i32, u32)> {
        let tag = if positive { 11 } else { 8 };
        self.fields()
            .filter(move |&(t, _)| t == tag)
            .map(|(_, v)| span(v))
    }
    fn deltas(&self, positive: bool) -> impl Iterator<Item = i64> {
        pb::repeated_varints(self.fields(), if positive { 12 } else { 9 }).map(pb::zigzag64)
    }
    fn delta_count(&self, positive: bool) -> usize {
        count_varints(self.fields(), if positive { 12 } else { 9 })
    }
    fn counts(&self, positive: bool) -> impl Iterator<Item = f64> {
        pb::repeated_doubles(self.fields(), if positive { 13 } else { 10 })
    }
    fn count_count(&self, positive: bool) -> usize {
        count_doubles(self.fields(), if positive { 13 } else { 10 })
    }
}

/// A `BucketSpan`'s (offset, length).
pub(crate) fn span(v: Value<'_>) -> (i32, u32) {
    let (mut offset, mut length) = (0, 0);
    for (tag, f) in Fields::new(v.bytes()) {
        match tag {
            1 => offset = pb::zigzag32(f.u64()),
            2 => length = f.u64() as u32,
            _ => {}
        }
    }
    (offset, length)
}
