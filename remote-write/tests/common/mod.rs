//! Builders shared by the integration tests.
#![allow(dead_code)]

use prom_remote_write::{v1, v2};

pub fn label(name: &str, value: &str) -> v1::Label {
    v1::Label {
        name: name.into(),
        value: value.into(),
    }
}

pub fn series(labels: &[(&str, &str)]) -> v1::TimeSeries {
    v1::TimeSeries {
        labels: labels.iter().map(|(n, v)| label(n, v)).collect(),
        samples: vec![v1::Sample {
            value: 1.0,
            timestamp: 1000,
        }],
        ..Default::default()
    }
}

pub fn req(timeseries: Vec<v1::TimeSeries>) -> v1::WriteRequest {
    v1::WriteRequest {
        timeseries,
        metadata: vec![],
    }
}

/// An integer histogram: `count`, zero bucket `zero`, positive deltas.
pub fn int_hist(count: u64, zero: u64, deltas: &[i64], sum: f64) -> v1::Histogram {
    v1::Histogram {
        count: Some(v1::histogram::Count::CountInt(count)),
        sum,
        schema: 3,
        zero_threshold: 1e-128,
        zero_count: Some(v1::histogram::ZeroCount::ZeroCountInt(zero)),
        positive_spans: if deltas.is_empty() {
            vec![]
        } else {
            vec![v1::BucketSpan {
                offset: 0,
                length: deltas.len() as u32,
            }]
        },
        positive_deltas: deltas.to_vec(),
        timestamp: 2000,
        ..Default::default()
    }
}

/// A 2.0 request builder interning its strings.
#[derive(Default)]
pub struct V2Builder {
    pub req: v2::Request,
}

impl V2Builder {
    pub fn new() -> Self {
        V2Builder {
            req: v2::Request {
                symbols: vec![String::new()],
                timeseries: vec![],
            },
        }
    }

    pub fn sym(&mut self, s: &str) -> u32 {
        if let Some(i) = self.req.symbols.iter().position(|x| x == s) {
            return i as u32;
        }
        self.req.symbols.push(s.to_string());
        (self.req.symbols.len() - 1) as u32
    }

    pub fn refs(&mut self, labels: &[(&str, &str)]) -> Vec<u32> {
        let mut out = vec![];
        for (n, v) in labels {
            out.push(self.sym(n));
            out.push(self.sym(v));
        }
        out
    }

    /// Adds a series with one sample and returns its index.
    pub fn series(&mut self, labels: &[(&str, &str)]) -> usize {
        let labels_refs = self.refs(labels);
        self.req.timeseries.push(v2::TimeSeries {
            labels_refs,
            samples: vec![v2::Sample {
                value: 1.0,
                timestamp: 1000,
            }],
            ..Default::default()
        });
        self.req.timeseries.len() - 1
    }
}

/// A 2.0 series carrying what the 1.0 `ts` carries, its strings interned by
/// `sym`, with metadata (type, help, unit) and a created timestamp.
pub fn v2_series_from(
    ts: &v1::TimeSeries,
    sym: &mut dyn FnMut(&str) -> u32,
    metadata: Option<(i32, &str, &str)>,
    created_timestamp: i64,
) -> v2::TimeSeries {
    let mut refs = |labels: &[v1::Label]| -> Vec<u32> {
        labels
            .iter()
            .flat_map(|l| [sym(&l.name), sym(&l.value)])
            .collect()
    };
    let labels_refs = refs(&ts.labels);
    let exemplars = ts
        .exemplars
        .iter()
        .map(|e| v2::Exemplar {
            labels_refs: refs(&e.labels),
            value: e.value,
            timestamp: e.timestamp,
        })
        .collect();
    let metadata = metadata.map(|(t, h, u)| v2::Metadata {
        r#type: t,
        help_ref: sym(h),
        unit_ref: sym(u),
    });
    v2::TimeSeries {
        labels_refs,
        samples: ts
            .samples
            .iter()
            .map(|s| v2::Sample {
                value: s.value,
                timestamp: s.timestamp,
            })
            .collect(),
        histograms: ts.histograms.iter().map(histogram_v1_to_v2).collect(),
        exemplars,
        metadata,
        created_timestamp,
    }
}

/// In memory, so that -0.0 survives (it would not through the wire).
pub fn histogram_v1_to_v2(h: &v1::Histogram) -> v2::Histogram {
    let span = |s: &v1::BucketSpan| v2::BucketSpan {
        offset: s.offset,
        length: s.length,
    };
    v2::Histogram {
        count: h.count.map(|c| match c {
            v1::histogram::Count::CountInt(n) => v2::histogram::Count::CountInt(n),
            v1::histogram::Count::CountFloat(f) => v2::histogram::Count::CountFloat(f),
        }),
        sum: h.sum,
        schema: h.schema,
        zero_threshold: h.zero_threshold,
        zero_count: h.zero_count.map(|z| match z {
            v1::histogram::ZeroCount::ZeroCountInt(n) => v2::histogram::ZeroCount::ZeroCountInt(n),
            v1::histogram::ZeroCount::ZeroCountFloat(f) => {
                v2::histogram::ZeroCount::ZeroCountFloat(f)
            }
        }),
        negative_spans: h.negative_spans.iter().map(span).collect(),
        negative_deltas: h.negative_deltas.clone(),
        negative_counts: h.negative_counts.clone(),
        positive_spans: h.positive_spans.iter().map(span).collect(),
        positive_deltas: h.positive_deltas.clone(),
        positive_counts: h.positive_counts.clone(),
        reset_hint: h.reset_hint,
        timestamp: h.timestamp,
        custom_values: h.custom_values.clone(),
    }
}
