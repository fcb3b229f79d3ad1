//! Translation of 2.0 requests into 1.0 requests, for replicas that only
//! speak 1.0 (Prometheus 2.42 among them), and counting helpers.
//!
//! Every float sample, histogram and exemplar is carried over with its
//! value bit for bit (NaN payloads such as the stale marker included).
//! What 1.0 cannot carry is counted in [`Dropped`]:
//!
//! * `created_timestamp` has no 1.0 field;
//! * 1.0 metadata is per metric family, not per series: the 2.0 metadata of
//!   the series are turned into one [`v1::MetricMetadata`] per family (the
//!   family name being the series' `__name__` value), in first-seen order;
//!   identical repeats are merged silently, and a series whose metadata
//!   differs from what its family already has is counted as dropped.
//!   Metadata with no content (unspecified type, no help, no unit) is not
//!   metadata and is skipped without counting.

use std::collections::HashMap;

use crate::decode::{check_first_symbol, resolve_pairs, symbol, DecodeError, Summary};
use crate::{v1, v2, METRIC_NAME_LABEL};

/// What [`v2_to_v1`] could not carry over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Dropped {
    /// Series whose non-zero `created_timestamp` was dropped.
    pub created_timestamps: u64,
    /// Series metadata that conflicted with the metadata already taken for
    /// the same metric family.
    pub metadata: u64,
}

/// Translates a 2.0 request into a 1.0 `WriteRequest`.
///
/// Fails only on what makes the symbol table unusable (`symbols[0]` not
/// empty, odd or out-of-range references); label rules are [`crate::decode`]'s
/// business.
pub fn v2_to_v1(req: &v2::Request) -> Result<(v1::WriteRequest, Dropped), DecodeError> {
    check_first_symbol(&req.symbols)?;
    let symbols = &req.symbols;
    let mut dropped = Dropped::default();
    let mut out = v1::WriteRequest {
        timeseries: Vec::with_capacity(req.timeseries.len()),
        metadata: Vec::new(),
    };
    let mut families: HashMap<&str, usize> = HashMap::new();
    let mut pairs: Vec<(&str, &str)> = Vec::new();

    for (i, ts) in req.timeseries.iter().enumerate() {
        pairs.clear();
        resolve_pairs(symbols, i, "labels_refs", &ts.labels_refs, &mut pairs)?;
        let labels = to_labels(&pairs);

        let mut exemplars = Vec::with_capacity(ts.exemplars.len());
        for e in &ts.exemplars {
            pairs.clear();
            resolve_pairs(
                symbols,
                i,
                "exemplar labels_refs",
                &e.labels_refs,
                &mut pairs,
            )?;
            exemplars.push(v1::Exemplar {
                labels: to_labels(&pairs),
                value: e.value,
                timestamp: e.timestamp,
            });
        }

        if ts.created_timestamp != 0 {
            dropped.created_timestamps += 1;
        }

        if let Some(m) = &ts.metadata {
            let help = symbol(symbols, i, "help_ref", m.help_ref)?;
            let unit = symbol(symbols, i, "unit_ref", m.unit_ref)?;
            let empty = m.r#type == v2::MetricType::Unspecified as i32
                && help.is_empty()
                && unit.is_empty();
            // Borrowed from the symbol table, so it can key `families`.
            let family = pairs_family(symbols, &ts.labels_refs);
            if !empty {
                let md = v1::MetricMetadata {
                    r#type: m.r#type,
                    metric_family_name: family.to_string(),
                    help: help.to_string(),
                    unit: unit.to_string(),
                };
                match families.get(family) {
                    Some(&idx) => {
                        if out.metadata[idx] != md {
                            dropped.metadata += 1;
                        }
                    }
                    None => {
                        families.insert(family, out.metadata.len());
                        out.metadata.push(md);
                    }
                }
            }
        }

        out.timeseries.push(v1::TimeSeries {
            labels,
            samples: ts
                .samples
                .iter()
                .map(|s| v1::Sample {
                    value: s.value,
                    timestamp: s.timestamp,
                })
                .collect(),
            exemplars,
            histograms: ts.histograms.iter().map(histogram_v2_to_v1).collect(),
        });
    }
    Ok((out, dropped))
}

/// The `__name__` value of already range-checked `labels_refs`, borrowed from
/// the symbol table ("" when absent).
fn pairs_family<'a>(symbols: &'a [String], refs: &[u32]) -> &'a str {
    refs.chunks_exact(2)
        .find(|p| symbols.get(p[0] as usize).map(String::as_str) == Some(METRIC_NAME_LABEL))
        .and_then(|p| symbols.get(p[1] as usize))
        .map(String::as_str)
        .unwrap_or("")
}

fn to_labels(pairs: &[(&str, &str)]) -> Vec<v1::Label> {
    pairs
        .iter()
        .map(|&(name, value)| v1::Label {
            name: name.to_string(),
            value: value.to_string(),
        })
        .collect()
}

/// Field-by-field copy of a 2.0 histogram into a 1.0 one (same numbers,
/// same meaning).
pub fn histogram_v2_to_v1(h: &v2::Histogram) -> v1::Histogram {
    use v1::histogram as h1;
    use v2::histogram as h2;
    v1::Histogram {
        count: h.count.map(|c| match c {
            h2::Count::CountInt(n) => h1::Count::CountInt(n),
            h2::Count::CountFloat(f) => h1::Count::CountFloat(f),
        }),
        sum: h.sum,
        schema: h.schema,
        zero_threshold: h.zero_threshold,
        zero_count: h.zero_count.map(|z| match z {
            h2::ZeroCount::ZeroCountInt(n) => h1::ZeroCount::ZeroCountInt(n),
            h2::ZeroCount::ZeroCountFloat(f) => h1::ZeroCount::ZeroCountFloat(f),
        }),
        negative_spans: h.negative_spans.iter().map(span_v2_to_v1).collect(),
        negative_deltas: h.negative_deltas.clone(),
        negative_counts: h.negative_counts.clone(),
        positive_spans: h.positive_spans.iter().map(span_v2_to_v1).collect(),
        positive_deltas: h.positive_deltas.clone(),
        positive_counts: h.positive_counts.clone(),
        reset_hint: h.reset_hint,
        timestamp: h.timestamp,
        custom_values: h.custom_values.clone(),
    }
}

fn span_v2_to_v1(s: &v2::BucketSpan) -> v1::BucketSpan {
    v1::BucketSpan {
        offset: s.offset,
        length: s.length,
    }
}

/// Counts what a 1.0 request carries (no validation).
pub fn count_v1(req: &v1::WriteRequest) -> Summary {
    let mut s = Summary::default();
    for ts in &req.timeseries {
        s.series += 1;
        s.samples += ts.samples.len() as u64;
        s.histograms += ts.histograms.len() as u64;
        s.exemplars += ts.exemplars.len() as u64;
        ts.samples.iter().for_each(|x| s.observe_ts(x.timestamp));
        ts.histograms.iter().for_each(|x| s.observe_ts(x.timestamp));
    }
    s
}

/// Counts what a 2.0 request carries (no validation).
pub fn count_v2(req: &v2::Request) -> Summary {
    let mut s = Summary::default();
    for ts in &req.timeseries {
        s.series += 1;
        s.samples += ts.samples.len() as u64;
        s.histograms += ts.histograms.len() as u64;
        s.exemplars += ts.exemplars.len() as u64;
        ts.samples.iter().for_each(|x| s.observe_ts(x.timestamp));
        ts.histograms.iter().for_each(|x| s.observe_ts(x.timestamp));
    }
    s
}
