//! `walrelay wal dump`: records (metadata) or their decoded samples, as text
//! or JSON lines, selected by sequence range, receive time, sample time and
//! series selectors.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use prom_remote_write::v1::{self, histogram};
use prom_remote_write::{decode, translate};
use serde_json::{json, Value};
use wal_format::{PayloadEncoding, PayloadKind, Record};

use super::common::{self, DataDir};
use super::matcher::Selector;
use crate::wal::ReadItem;

/// `walrelay wal dump`
#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    /// The relay's data directory.
    #[arg(long, env = "WALRELAY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Print one line per record: sequence, receive time, sample count and
    /// time range, kind, size (the default).
    #[arg(long, conflicts_with = "samples")]
    pub records: bool,
    /// Print the decoded samples: labels, timestamp, value; native
    /// histograms and exemplars too.
    #[arg(long)]
    pub samples: bool,
    /// First sequence number to print.
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Last sequence number to print (inclusive).
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// Records received at or after this time (RFC 3339, unix ms, or a
    /// duration ago such as 2h).
    #[arg(long)]
    pub since: Option<String>,
    /// Records received before this time.
    #[arg(long)]
    pub until: Option<String>,
    /// Samples timestamped at or after this time.
    #[arg(long)]
    pub sample_since: Option<String>,
    /// Samples timestamped before this time.
    #[arg(long)]
    pub sample_until: Option<String>,
    /// Series selector, e.g. '{__name__="up",job=~"node.*"}' (=, !=, =~,
    /// !~). Repeat to print series matching any of them. With --records,
    /// prints records holding at least one matching series.
    #[arg(long = "match")]
    pub matchers: Vec<String>,
    /// JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The selection, parsed.
struct Filter {
    from: u64,
    to: Option<u64>,
    since: Option<i64>,
    until: Option<i64>,
    sample_since: Option<i64>,
    sample_until: Option<i64>,
    selectors: Vec<Selector>,
}

impl Filter {
    fn from_args(a: &DumpArgs) -> Result<Filter> {
        let t = |s: &Option<String>| s.as_deref().map(common::parse_time).transpose();
        let f = Filter {
            from: a.from_seq.unwrap_or(0),
            to: a.to_seq,
            since: t(&a.since)?,
            until: t(&a.until)?,
            sample_since: t(&a.sample_since)?,
            sample_until: t(&a.sample_until)?,
            selectors: a
                .matchers
                .iter()
                .map(|m| Selector::parse(m))
                .collect::<Result<_>>()?,
        };
        if let Some(to) = f.to {
            if to < f.from {
                bail!("--to-seq {to} is before --from-seq {}", f.from);
            }
        }
        Ok(f)
    }

    fn record_in_range(&self, r: &Record) -> bool {
        let t = r.meta.receive_time_ms;
        if self.since.is_some_and(|s| t < s) || self.until.is_some_and(|u| t >= u) {
            return false;
        }
        // Skip records whose samples all lie outside the sample-time range
        // without decoding them.
        let (lo, hi) = (r.meta.min_sample_ts, r.meta.max_sample_ts);
        if lo <= hi
            && (self.sample_since.is_some_and(|s| hi < s)
                || self.sample_until.is_some_and(|u| lo >= u))
        {
            return false;
        }
        true
    }

    fn sample_in_range(&self, ts: i64) -> bool {
        !(self.sample_since.is_some_and(|s| ts < s) || self.sample_until.is_some_and(|u| ts >= u))
    }

    fn series_matches(&self, labels: &[v1::Label]) -> bool {
        self.selectors.is_empty() || self.selectors.iter().any(|s| s.matches(labels))
    }
}

/// A record's payload as a 1.0 request (2.0 payloads translated).
///
/// # Errors
/// The payload does not decode.
pub fn decode_record(r: &Record) -> Result<v1::WriteRequest> {
    let bytes = crate::ship::payload::protobuf(r)?;
    Ok(match r.meta.kind {
        PayloadKind::RemoteWriteV1 => decode::decode_v1(&bytes)?,
        PayloadKind::RemoteWriteV2 => translate::v2_to_v1(&decode::decode_v2(&bytes)?)?.0,
    })
}

const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

fn value_text(v: f64) -> String {
    if v.to_bits() == STALE_NAN {
        "StaleNaN".into()
    } else if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

fn value_json(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        json!(value_text(v))
    }
}

fn labels_text(labels: &[v1::Label]) -> String {
    let name = labels
        .iter()
        .find(|l| l.name == prom_remote_write::METRIC_NAME_LABEL)
        .map_or("", |l| l.value.as_str());
    let rest: Vec<String> = labels
        .iter()
        .filter(|l| l.name != prom_remote_write::METRIC_NAME_LABEL)
        .map(|l| format!("{}={:?}", l.name, l.value))
        .collect();
    format!("{name}{{{}}}", rest.join(","))
}

fn labels_json(labels: &[v1::Label]) -> Value {
    let m: BTreeMap<&str, &str> = labels
        .iter()
        .map(|l| (l.name.as_str(), l.value.as_str()))
        .collect();
    json!(m)
}

fn histogram_json(h: &v1::Histogram) -> Value {
    let count = match h.count {
        Some(histogram::Count::CountInt(c)) => json!(c),
        Some(histogram::Count::CountFloat(c)) => value_json(c),
        None => Value::Null,
    };
    let zero_count = match h.zero_count {
        Some(histogram::ZeroCount::ZeroCountInt(c)) => json!(c),
        Some(histogram::ZeroCount::ZeroCountFloat(c)) => value_json(c),
        None => Value::Null,
    };
    let spans = |s: &[v1::BucketSpan]| -> Value {
        s.iter()
            .map(|s| json!({"offset": s.offset, "length": s.length}))
            .collect()
    };
    let floats = |v: &[f64]| -> Value { v.iter().map(|x| value_json(*x)).collect() };
    let is_float = matches!(h.count, Some(histogram::Count::CountFloat(_)));
    let mut o = json!({
        "kind": if is_float { "float" } else { "integer" },
        "count": count,
        "sum": value_json(h.sum),
        "schema": h.schema,
        "zero_threshold": value_json(h.zero_threshold),
        "zero_count": zero_count,
        "positive_spans": spans(&h.positive_spans),
        "negative_spans": spans(&h.negative_spans),
        "reset_hint": h.reset_hint,
    });
    if is_float {
        o["positive_counts"] = floats(&h.positive_counts);
        o["negative_counts"] = floats(&h.negative_counts);
    } else {
        o["positive_deltas"] = json!(h.positive_deltas);
        o["negative_deltas"] = json!(h.negative_deltas);
    }
    if !h.custom_values.is_empty() {
        o["custom_values"] = floats(&h.custom_values);
    }
    o
}

/// Counts of what was printed.
#[derive(Default)]
struct Counts {
    records: u64,
    samples: u64,
    histograms: u64,
    exemplars: u64,
    gaps: u64,
    undecodable: u64,
}

/// Runs `walrelay wal dump`.
///
/// # Errors
/// The data dir is missing or unreadable, or a bad selection.
pub fn run(args: &DumpArgs) -> Result<ExitCode> {
    let filter = Filter::from_args(args)?;
    let dir = DataDir::open(&args.data_dir)?;
    let (wal, _) = dir.open_wal()?;
    let mut reader = wal.reader(filter.from);
    let mut out = common::stdout();
    let mut n = Counts::default();
    if !args.samples && !args.json {
        writeln!(
            out,
            "{:>10}  {:<24}  {:>8}  {:<24}  {:<24}  {:<4}  {:>9}",
            "SEQ", "RECEIVED", "SAMPLES", "OLDEST_SAMPLE", "NEWEST_SAMPLE", "KIND", "BYTES"
        )?;
    }
    while let Some(item) = reader.try_next()? {
        let r = match item {
            ReadItem::Gap(g) => {
                if filter.to.is_some_and(|to| g.from > to) {
                    break;
                }
                n.gaps += 1;
                out.flush()?;
                eprintln!(
                    "walrelay: records {}..{} cannot be read: {}{}",
                    g.from,
                    g.to,
                    g.file.as_ref().map_or_else(String::new, |f| format!(
                        "{} at offset {}: ",
                        f.display(),
                        g.offset.unwrap_or(0)
                    )),
                    g.reason
                );
                continue;
            }
            ReadItem::Record(r) => r,
        };
        if r.seq < filter.from {
            continue;
        }
        if filter.to.is_some_and(|to| r.seq > to) {
            break;
        }
        if !filter.record_in_range(&r) {
            continue;
        }
        let needs_decoding = args.samples || !filter.selectors.is_empty();
        let req = if needs_decoding {
            match decode_record(&r) {
                Ok(req) => Some(req),
                Err(e) => {
                    n.undecodable += 1;
                    out.flush()?;
                    eprintln!("walrelay: record {}: payload does not decode: {e:#}", r.seq);
                    continue;
                }
            }
        } else {
            None
        };
        if args.samples {
            if let Some(req) = &req {
                write_samples(&mut out, &r, req, &filter, args.json, &mut n)?;
            }
        } else {
            let matched = req.as_ref().map(|q| {
                q.timeseries
                    .iter()
                    .filter(|s| filter.series_matches(&s.labels))
                    .count()
            });
            if matched == Some(0) {
                continue;
            }
            n.records += 1;
            write_record(&mut out, &r, matched, args.json)?;
        }
    }
    out.flush()?;
    if !args.json {
        if args.samples {
            eprintln!(
                "{} samples, {} histograms, {} exemplars",
                n.samples, n.histograms, n.exemplars
            );
        } else {
            eprintln!("{} records", n.records);
        }
    }
    if n.gaps > 0 || n.undecodable > 0 {
        eprintln!(
            "walrelay: {} unreadable range(s), {} undecodable record(s) in the selection",
            n.gaps, n.undecodable
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn kind_name(k: PayloadKind) -> &'static str {
    match k {
        PayloadKind::RemoteWriteV1 => "v1",
        PayloadKind::RemoteWriteV2 => "v2",
    }
}

fn ts_opt(ts: i64, valid: bool) -> Value {
    if valid {
        json!(ts)
    } else {
        Value::Null
    }
}

fn write_record(
    out: &mut impl Write,
    r: &Record,
    matched: Option<usize>,
    json: bool,
) -> Result<()> {
    let m = &r.meta;
    let has_ts = m.min_sample_ts <= m.max_sample_ts;
    if json {
        let mut o = json!({
            "seq": r.seq,
            "receive_time_ms": m.receive_time_ms,
            "receive_time": common::fmt_time(m.receive_time_ms),
            "samples": m.samples,
            "min_sample_ts": ts_opt(m.min_sample_ts, has_ts),
            "max_sample_ts": ts_opt(m.max_sample_ts, has_ts),
            "kind": kind_name(m.kind),
            "encoding": match m.encoding { PayloadEncoding::Identity => "identity", PayloadEncoding::Snappy => "snappy" },
            "payload_bytes": r.payload.len(),
        });
        if let Some(n) = matched {
            o["matching_series"] = json!(n);
        }
        common::write_json(out, &o)
    } else {
        let (lo, hi) = if has_ts {
            (
                common::fmt_time(m.min_sample_ts),
                common::fmt_time(m.max_sample_ts),
            )
        } else {
            ("-".into(), "-".into())
        };
        writeln!(
            out,
            "{:>10}  {:<24}  {:>8}  {:<24}  {:<24}  {:<4}  {:>9}",
            r.seq,
            common::fmt_time(m.receive_time_ms),
            m.samples,
            lo,
            hi,
            kind_name(m.kind),
            r.payload.len()
        )?;
        Ok(())
    }
}

fn write_samples(
    out: &mut impl Write,
    r: &Record,
    req: &v1::WriteRequest,
    filter: &Filter,
    json: bool,
    n: &mut Counts,
) -> Result<()> {
    for series in &req.timeseries {
        if !filter.series_matches(&series.labels) {
            continue;
        }
        let text_labels = if json {
            String::new()
        } else {
            labels_text(&series.labels)
        };
        let json_labels = if json {
            labels_json(&series.labels)
        } else {
            Value::Null
        };
        for s in &series.samples {
            if !filter.sample_in_range(s.timestamp) {
                continue;
            }
            n.samples += 1;
            if json {
                common::write_json(
                    out,
                    &json!({"seq": r.seq, "labels": json_labels, "timestamp": s.timestamp, "value": value_json(s.value)}),
                )?;
            } else {
                writeln!(out, "{text_labels} {} {}", value_text(s.value), s.timestamp)?;
            }
        }
        for h in &series.histograms {
            if !filter.sample_in_range(h.timestamp) {
                continue;
            }
            n.histograms += 1;
            let hj = histogram_json(h);
            if json {
                common::write_json(
                    out,
                    &json!({"seq": r.seq, "labels": json_labels, "timestamp": h.timestamp, "histogram": hj}),
                )?;
            } else {
                writeln!(out, "{text_labels} histogram{hj} {}", h.timestamp)?;
            }
        }
        for e in &series.exemplars {
            if !filter.sample_in_range(e.timestamp) {
                continue;
            }
            n.exemplars += 1;
            if json {
                common::write_json(
                    out,
                    &json!({"seq": r.seq, "labels": json_labels, "timestamp": e.timestamp,
                        "exemplar": {"labels": labels_json(&e.labels), "value": value_json(e.value)}}),
                )?;
            } else {
                let el: Vec<String> = e
                    .labels
                    .iter()
                    .map(|l| format!("{}={:?}", l.name, l.value))
                    .collect();
                writeln!(
                    out,
                    "{text_labels} # exemplar {{{}}} {} {}",
                    el.join(","),
                    value_text(e.value),
                    e.timestamp
                )?;
            }
        }
    }
    Ok(())
}
