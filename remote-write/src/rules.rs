//! The rules a series obeys (labels, 2.0 symbol references, native
//! histograms), shared by the validation of decoded requests (`decode`), of
//! their bytes (`stream`) and by the translation. The rules themselves are
//! described in `decode`'s module docs.

use crate::error::DecodeError;
use crate::limits::Limits;
use crate::{v1, v2, METRIC_NAME_LABEL};

/// [`Limits::max_translated_bytes`] against the label bytes a 2.0
/// request's 1.0 translation spells out.
pub(crate) fn check_translated(bytes: u64, limits: &Limits) -> Result<(), DecodeError> {
    let limit = limits.max_translated_bytes;
    if limit != 0 && bytes > limit as u64 {
        return Err(DecodeError::TranslationTooLarge { bytes, limit });
    }
    Ok(())
}

pub(crate) fn check_first_symbol(symbols: &[String]) -> Result<(), DecodeError> {
    match symbols.first() {
        Some(s) if !s.is_empty() => Err(DecodeError::FirstSymbolNotEmpty),
        _ => Ok(()),
    }
}

/// Looks a reference up in the symbol table.
pub(crate) fn symbol<'a>(
    symbols: &'a [String],
    series: usize,
    field: &'static str,
    reference: u32,
) -> Result<&'a str, DecodeError> {
    symbols
        .get(reference as usize)
        .map(String::as_str)
        .ok_or(DecodeError::SymbolRefOutOfRange {
            series,
            field,
            reference,
            symbols: symbols.len(),
        })
}

/// Checks a `labels_refs` list: even length, every reference in range.
pub(crate) fn check_refs(
    symbols: &[String],
    series: usize,
    field: &'static str,
    refs: &[u32],
) -> Result<(), DecodeError> {
    if !refs.len().is_multiple_of(2) {
        return Err(DecodeError::OddLabelRefs {
            series,
            field,
            len: refs.len(),
        });
    }
    for &r in refs {
        symbol(symbols, series, field, r)?;
    }
    Ok(())
}

/// Resolves a `labels_refs` list into name/value pairs appended to `out`.
pub(crate) fn resolve_pairs<'a>(
    symbols: &'a [String],
    series: usize,
    field: &'static str,
    refs: &[u32],
    out: &mut Vec<(&'a str, &'a str)>,
) -> Result<(), DecodeError> {
    check_refs(symbols, series, field, refs)?;
    for pair in refs.chunks_exact(2) {
        out.push((
            symbol(symbols, series, field, pair[0])?,
            symbol(symbols, series, field, pair[1])?,
        ));
    }
    Ok(())
}

/// The label rules; sorts `labels` by name when they are not sorted.
pub(crate) fn check_labels(
    series: usize,
    labels: &mut [(&str, &str)],
    limits: &Limits,
) -> Result<(), DecodeError> {
    let mut rules = LabelRules::new(series, limits);
    for &(name, value) in labels.iter() {
        rules.label(name.as_bytes(), value.as_bytes());
    }
    rules.check()?;
    let duplicate = match rules.duplicate_if_sorted() {
        Some(d) => d,
        None => {
            labels.sort_unstable_by(|a, b| a.0.cmp(b.0));
            labels
                .windows(2)
                .find(|w| w[0].0 == w[1].0)
                .map(|w| w[0].0.as_bytes())
        }
    };
    rules.finish(duplicate)
}

/// The label rules of one series, fed its labels in order; the checks and
/// their order are [`check_labels`']: the number of labels, then each label
/// (empty name, name and value lengths), then a name given twice (the
/// smallest such name, as found after sorting), then `__name__`. Names
/// compare as bytes, which for UTF-8 is the order of `str`. A label never
/// fails at once: the first failure is kept for [`LabelRules::check`],
/// since the number of labels, checked first, is known only at the end.
pub(crate) struct LabelRules<'a, 'l> {
    series: usize,
    limits: &'l Limits,
    count: usize,
    /// The first label that broke a rule.
    failed: Option<DecodeError>,
    has_name: bool,
    sorted: bool,
    previous: Option<&'a [u8]>,
    /// The first name equal to the one before it, while sorted.
    duplicate: Option<&'a [u8]>,
}

impl<'a, 'l> LabelRules<'a, 'l> {
    pub(crate) fn new(series: usize, limits: &'l Limits) -> Self {
        LabelRules {
            series,
            limits,
            count: 0,
            failed: None,
            has_name: false,
            sorted: true,
            previous: None,
            duplicate: None,
        }
    }

    /// Labels seen.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// The next label; `name` and `value` are UTF-8.
    #[inline]
    pub(crate) fn label(&mut self, name: &'a [u8], value: &[u8]) {
        self.count += 1;
        if self.failed.is_some() {
            return;
        }
        let (series, limits) = (self.series, self.limits);
        if name.is_empty() {
            self.failed = Some(DecodeError::EmptyLabelName { series });
        } else if limits.max_label_name_len != 0 && name.len() > limits.max_label_name_len {
            self.failed = Some(DecodeError::LabelNameTooLong {
                series,
                len: name.len(),
                limit: limits.max_label_name_len,
            });
        } else if limits.max_label_value_len != 0 && value.len() > limits.max_label_value_len {
            self.failed = Some(DecodeError::LabelValueTooLong {
                series,
                name: String::from_utf8_lossy(name).into_owned(),
                len: value.len(),
                limit: limits.max_label_value_len,
            });
        }
        if name == METRIC_NAME_LABEL.as_bytes() && !value.is_empty() {
            self.has_name = true;
        }
        if let Some(previous) = self.previous {
            if name < previous {
                self.sorted = false;
            } else if name == previous && self.sorted && self.duplicate.is_none() {
                self.duplicate = Some(name);
            }
        }
        self.previous = Some(name);
    }

    /// The number of labels, then the first label that broke a rule.
    pub(crate) fn check(&mut self) -> Result<(), DecodeError> {
        let (series, limits, count) = (self.series, self.limits, self.count);
        if count == 0 {
            return Err(DecodeError::NoLabels { series });
        }
        if limits.max_labels_per_series != 0 && count > limits.max_labels_per_series {
            return Err(DecodeError::TooManyLabels {
                series,
                count,
                limit: limits.max_labels_per_series,
            });
        }
        self.failed.take().map_or(Ok(()), Err)
    }

    /// When the labels were in order: `Some` of the name given twice, if
    /// any. `None` when they were not: the caller sorts them to find it.
    pub(crate) fn duplicate_if_sorted(&self) -> Option<Option<&'a [u8]>> {
        self.sorted.then_some(self.duplicate)
    }

    /// The last rules (after [`LabelRules::check`]), given the smallest name
    /// given twice.
    pub(crate) fn finish(&self, duplicate: Option<&[u8]>) -> Result<(), DecodeError> {
        if let Some(name) = duplicate {
            return Err(DecodeError::DuplicateLabelName {
                series: self.series,
                name: String::from_utf8_lossy(name).into_owned(),
            });
        }
        if !self.has_name {
            return Err(DecodeError::MissingMetricName {
                series: self.series,
            });
        }
        Ok(())
    }
}

/// Span rules: offsets of spans after the first are not negative, and the
/// spans describe exactly `buckets` buckets.
fn check_spans(
    series: usize,
    histogram: usize,
    side: &'static str,
    spans: impl Iterator<Item = (i32, u32)>,
    buckets: usize,
) -> Result<(), DecodeError> {
    let mut need: u64 = 0;
    for (n, (offset, length)) in spans.enumerate() {
        if n > 0 && offset < 0 {
            return Err(DecodeError::HistogramNegativeSpanOffset {
                series,
                histogram,
                side,
                span: n,
                offset,
            });
        }
        need += u64::from(length);
    }
    if need != buckets as u64 {
        return Err(DecodeError::HistogramSpansMismatch {
            series,
            histogram,
            side,
            spans: need,
            buckets,
        });
    }
    Ok(())
}

/// Sum of the absolute bucket counts decoded from deltas; refuses a negative
/// bucket.
fn sum_deltas(
    series: usize,
    histogram: usize,
    side: &'static str,
    deltas: impl Iterator<Item = i64>,
) -> Result<u128, DecodeError> {
    let mut current: i128 = 0;
    let mut total: u128 = 0;
    for (bucket, d) in deltas.enumerate() {
        current += i128::from(d);
        if current < 0 {
            return Err(DecodeError::HistogramNegativeBucketCount {
                series,
                histogram,
                side,
                bucket,
            });
        }
        total += current as u128;
    }
    Ok(total)
}

fn check_float_counts(
    series: usize,
    histogram: usize,
    side: &'static str,
    mut counts: impl Iterator<Item = f64>,
) -> Result<(), DecodeError> {
    match counts.position(|c| c < 0.0) {
        Some(bucket) => Err(DecodeError::HistogramNegativeBucketCount {
            series,
            histogram,
            side,
            bucket,
        }),
        None => Ok(()),
    }
}

/// What the histogram rules read of a native histogram, 1.0 or 2.0, decoded
/// or on the wire. `positive` picks the side.
pub(crate) trait HistogramParts {
    /// `count` is `count_float`.
    fn is_float(&self) -> bool;
    /// `count_int`, or 0.
    fn count_int(&self) -> u64;
    /// `zero_count_int`, or 0.
    fn zero_int(&self) -> u64;
    fn sum(&self) -> f64;
    /// (offset, length) of each span.
    fn spans(&self, positive: bool) -> impl Iterator<Item = (i32, u32)>;
    fn deltas(&self, positive: bool) -> impl Iterator<Item = i64>;
    fn delta_count(&self, positive: bool) -> usize;
    fn counts(&self, positive: bool) -> impl Iterator<Item = f64>;
    fn count_count(&self, positive: bool) -> usize;
}

/// The native histogram rules (see the module docs).
pub(crate) fn check_histogram(
    series: usize,
    histogram: usize,
    h: &impl HistogramParts,
) -> Result<(), DecodeError> {
    const SIDES: [(&str, bool); 2] = [("negative", false), ("positive", true)];
    if h.is_float() {
        for (side, positive) in SIDES {
            let buckets = h.count_count(positive);
            check_spans(series, histogram, side, h.spans(positive), buckets)?;
        }
        for (side, positive) in SIDES {
            check_float_counts(series, histogram, side, h.counts(positive))?;
        }
        return Ok(());
    }
    for (side, positive) in SIDES {
        let buckets = h.delta_count(positive);
        check_spans(series, histogram, side, h.spans(positive), buckets)?;
    }
    let mut buckets = u128::from(h.zero_int());
    for (side, positive) in SIDES {
        buckets += sum_deltas(series, histogram, side, h.deltas(positive))?;
    }
    let count = h.count_int();
    if h.sum().is_nan() {
        if buckets > u128::from(count) {
            return Err(DecodeError::HistogramCountNotBigEnough {
                series,
                histogram,
                count,
                buckets,
            });
        }
    } else if buckets != u128::from(count) {
        return Err(DecodeError::HistogramCountMismatch {
            series,
            histogram,
            count,
            buckets,
        });
    }
    Ok(())
}

/// [`HistogramParts`] of the decoded histograms of both protocols, which
/// have the same fields.
macro_rules! decoded_histogram_parts {
    ($m:ident) => {
        impl HistogramParts for $m::Histogram {
            fn is_float(&self) -> bool {
                matches!(self.count, Some($m::histogram::Count::CountFloat(_)))
            }
            fn count_int(&self) -> u64 {
                match self.count {
                    Some($m::histogram::Count::CountInt(c)) => c,
                    _ => 0,
                }
            }
            fn zero_int(&self) -> u64 {
                match self.zero_count {
                    Some($m::histogram::ZeroCount::ZeroCountInt(z)) => z,
                    _ => 0,
                }
            }
            fn sum(&self) -> f64 {
                self.sum
            }
            fn spans(&self, positive: bool) -> impl Iterator<Item = (i32, u32)> {
                let spans = if positive {
                    &self.positive_spans
                } else {
                    &self.negative_spans
                };
                spans.iter().map(|s| (s.offset, s.length))
            }
            fn deltas(&self, positive: bool) -> impl Iterator<Item = i64> {
                self.delta_slice(positive).iter().copied()
            }
            fn delta_count(&self, positive: bool) -> usize {
                self.delta_slice(positive).len()
            }
            fn counts(&self, positive: bool) -> impl Iterator<Item = f64> {
                self.count_slice(positive).iter().copied()
            }
            fn count_count(&self, positive: bool) -> usize {
                self.count_slice(positive).len()
            }
        }

        impl $m::Histogram {
            fn delta_slice(&self, positive: bool) -> &[i64] {
                if positive {
                    &self.positive_deltas
                } else {
                    &self.negative_deltas
                }
            }
            fn count_slice(&self, positive: bool) -> &[f64] {
                if positive {
                    &self.positive_counts
                } else {
                    &self.negative_counts
                }
            }
        }
    };
}
decoded_histogram_parts!(v1);
decoded_histogram_parts!(v2);
