//! The shard of a series and a 1.0 request cut to one shard
//! (`src/shard.rs`): the hash pinned to values computed independently from
//! its description, and every request, 1.0 or 2.0, cut into shards that
//! hold each series exactly once, in order, where its hash says: the same
//! shard for a series whichever protocol its record came in.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;

use prom_remote_write::encode::{encode_v1, encode_v2, merge_v2_into, shard_v2_into};
use prom_remote_write::shard::{filter_v1, series_hash, shard_of, Kept};
use prom_remote_write::translate::{v2_to_v1_into, v2_to_v1_shard_into, CheckedV2};
use prom_remote_write::{v1, v2};

mod common;

fn hash(labels: &[(&str, &str)]) -> u64 {
    series_hash(labels.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
}

fn hash_of(ts: &v1::TimeSeries) -> u64 {
    series_hash(
        ts.labels
            .iter()
            .map(|l| (l.name.as_bytes(), l.value.as_bytes())),
    )
}

#[test]
fn the_hash_is_the_one_described_and_never_changes() {
    // Computed by a separate implementation of the module's description
    // (FNV-1a a word at a time of name, 0xff, value; summed; SplitMix64's
    // finaliser), in Python.
    assert_eq!(
        hash(&[("__name__", "up"), ("job", "node")]),
        0x266f_508a_f01a_2521
    );
    assert_eq!(hash(&[("__name__", "a")]), 0x27ac_f35a_878d_352e);
    // Names and values of whole words and of leftover bytes.
    assert_eq!(
        hash(&[
            ("__name__", "node_cpu_seconds_total"),
            ("instance", "10.0.0.1:9100"),
            ("mode", "idle")
        ]),
        0x09fa_bbdb_9a32_7a1b
    );
    assert_eq!(hash(&[]), 0);
    assert_eq!(shard_of(0x266f_508a_f01a_2521, 8), 1);
    assert_eq!(shard_of(0x266f_508a_f01a_2521, 3), 1);
    assert_eq!(shard_of(u64::MAX, 1), 0);
    assert_eq!(shard_of(u64::MAX, 0), 0);
}

#[test]
fn the_order_of_the_labels_does_not_change_the_shard() {
    assert_eq!(
        hash(&[("__name__", "up"), ("job", "node"), ("instance", "a:9100")]),
        hash(&[("instance", "a:9100"), ("__name__", "up"), ("job", "node")])
    );
    // A name's bytes do not run into its value's.
    assert_ne!(hash(&[("ab", "c")]), hash(&[("a", "bc")]));
}

fn labels() -> impl Strategy<Value = Vec<(String, String)>> {
    (
        "[a-z_]{1,8}",
        proptest::collection::btree_map("[a-z]{1,6}", "[ -~]{0,8}", 0..4),
        any::<bool>(),
    )
        .prop_map(|(metric, rest, reversed)| {
            let mut v = vec![("__name__".to_string(), metric)];
            v.extend(rest.into_iter().filter(|(n, _)| n != "__name__"));
            if reversed {
                v.reverse();
            }
            v
        })
}

fn request() -> impl Strategy<Value = v1::WriteRequest> {
    (vec(labels(), 0..24), 0usize..3).prop_map(|(series, metadata)| v1::WriteRequest {
        timeseries: series
            .iter()
            .map(|l| {
                let refs: Vec<(&str, &str)> =
                    l.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                common::series(&refs)
            })
            .collect(),
        metadata: (0..metadata)
            .map(|i| v1::MetricMetadata {
                metric_family_name: format!("family_{i}"),
                help: "help".into(),
                ..Default::default()
            })
            .collect(),
    })
}

proptest! {
    #[test]
    fn one_shard_is_the_request_itself(req in request()) {
        let body = encode_v1(&req);
        let mut out = Vec::new();
        let kept = filter_v1(&body, 0, 1, &mut out);
        prop_assert_eq!(&out, &body);
        prop_assert_eq!(kept.series, req.timeseries.len() as u64);
    }

    #[test]
    fn the_shards_hold_every_series_once_in_order_where_its_hash_says(
        req in request(),
        shards in 1u32..9,
    ) {
        let body = encode_v1(&req);
        let mut seen = 0;
        for shard in 0..shards {
            let mut out = Vec::new();
            let kept: Kept = filter_v1(&body, shard, shards, &mut out);
            let part = v1::WriteRequest::decode(out.as_slice()).unwrap();
            let want: Vec<&v1::TimeSeries> = req
                .timeseries
                .iter()
                .filter(|ts| shard_of(hash_of(ts), shards) == shard)
                .collect();
            prop_assert_eq!(part.timeseries.iter().collect::<Vec<_>>(), want);
            prop_assert_eq!(kept.series, part.timeseries.len() as u64);
            // Metadata, which names no series, goes once, with shard 0.
            if shard == 0 {
                prop_assert_eq!(&part.metadata, &req.metadata);
            } else {
                prop_assert!(part.metadata.is_empty());
            }
            seen += part.timeseries.len();
        }
        prop_assert_eq!(seen, req.timeseries.len());
    }
}

/// A 2.0 request of `series` (each with an exemplar and, for every other
/// one, metadata), its strings interned in order of appearance.
fn v2_request(series: &[Vec<(String, String)>]) -> v2::Request {
    let mut b = common::V2Builder::new();
    for (i, l) in series.iter().enumerate() {
        let refs: Vec<(&str, &str)> = l.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let at = b.series(&refs);
        let trace = b.refs(&[("trace_id", &format!("t{i}"))]);
        let metadata = (i % 2 == 0).then(|| v2::Metadata {
            r#type: 1,
            help_ref: b.sym(&format!("help of {i}")),
            unit_ref: b.sym("seconds"),
        });
        let ts = &mut b.req.timeseries[at];
        ts.exemplars.push(v2::Exemplar {
            labels_refs: trace,
            value: 1.0,
            timestamp: 1000,
        });
        ts.metadata = metadata;
    }
    b.req
}

/// The labels of a 2.0 series, resolved.
fn resolved(req: &v2::Request, ts: &v2::TimeSeries) -> Vec<(String, String)> {
    ts.labels_refs
        .chunks(2)
        .map(|p| {
            (
                req.symbols[p[0] as usize].clone(),
                req.symbols[p[1] as usize].clone(),
            )
        })
        .collect()
}

fn strs(l: &[(String, String)]) -> u64 {
    series_hash(l.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
}

proptest! {
    #[test]
    fn one_2_0_shard_is_the_merge_itself(series in vec(labels(), 0..16)) {
        let body = encode_v2(&v2_request(&series));
        let part = [CheckedV2::new(&body).unwrap()];
        let (mut merged, mut cut) = (Vec::new(), Vec::new());
        let a = merge_v2_into(&part, &mut merged).unwrap();
        let b = shard_v2_into(&part, 0, 1, &mut cut).unwrap();
        prop_assert_eq!(merged, cut);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn the_2_0_shards_hold_every_series_once_with_only_the_symbols_they_use(
        series in vec(labels(), 0..16),
        split in 0usize..16,
        shards in 1u32..7,
    ) {
        // Two records, merged as a shipper merges a batch.
        let split = split.min(series.len());
        let (first, second) = series.split_at(split);
        let bodies = [encode_v2(&v2_request(first)), encode_v2(&v2_request(second))];
        let parts: Vec<CheckedV2<'_>> = bodies.iter().map(|b| CheckedV2::new(b).unwrap()).collect();
        let mut seen = Vec::new();
        for shard in 0..shards {
            let mut out = Vec::new();
            let summary = shard_v2_into(&parts, shard, shards, &mut out).unwrap();
            let req = v2::Request::decode(out.as_slice()).unwrap();
            prop_assert_eq!(req.symbols.first().map(String::as_str), Some(""));
            let mut referred = std::collections::BTreeSet::from([0u32]);
            for ts in &req.timeseries {
                let labels = resolved(&req, ts);
                // The same shard as the same labels in a 1.0 record.
                prop_assert_eq!(shard_of(strs(&labels), shards), shard);
                referred.extend(ts.labels_refs.iter().copied());
                for e in &ts.exemplars {
                    referred.extend(e.labels_refs.iter().copied());
                }
                if let Some(m) = &ts.metadata {
                    referred.extend([m.help_ref, m.unit_ref]);
                }
                seen.push(labels);
            }
            prop_assert_eq!(
                referred.len(),
                req.symbols.len(),
                "every symbol is referred to: {:?}",
                req.symbols
            );
            prop_assert_eq!(summary.series, req.timeseries.len() as u64);
            prop_assert_eq!(summary.samples, req.timeseries.len() as u64);
            prop_assert_eq!(summary.exemplars, req.timeseries.len() as u64);
        }
        // Each series once; in order within its shard.
        let mut want: Vec<Vec<(String, String)>> = series.clone();
        let shard_of_labels = |l: &Vec<(String, String)>| shard_of(strs(l), shards);
        want.sort_by_key(|l| shard_of_labels(l));
        prop_assert_eq!(seen, want);
    }
}

proptest! {
    #[test]
    fn a_2_0_record_translated_for_a_shard_holds_that_shard_s_1_0_series(
        series in vec(labels(), 0..16),
        shards in 1u32..7,
    ) {
        let body = encode_v2(&v2_request(&series));
        let req = CheckedV2::new(&body).unwrap();
        let mut whole = Vec::new();
        let all_dropped = v2_to_v1_into(&req, &mut whole).unwrap();
        let whole = v1::WriteRequest::decode(whole.as_slice()).unwrap();
        let mut seen = 0;
        for shard in 0..shards {
            let mut out = Vec::new();
            let dropped = v2_to_v1_shard_into(&req, shard, shards, &mut out).unwrap();
            let part = v1::WriteRequest::decode(out.as_slice()).unwrap();
            // The series a 1.0 record of the same series would put in
            // this shard, translated alike.
            let want: Vec<&v1::TimeSeries> = whole
                .timeseries
                .iter()
                .filter(|ts| shard_of(hash_of(ts), shards) == shard)
                .collect();
            prop_assert_eq!(part.timeseries.iter().collect::<Vec<_>>(), want);
            // Metadata of this shard's series only (each series here has
            // its own family help).
            let families: Vec<&str> = part
                .timeseries
                .iter()
                .filter_map(|ts| ts.labels.iter().find(|l| l.name == "__name__"))
                .map(|l| l.value.as_str())
                .collect();
            prop_assert!(part
                .metadata
                .iter()
                .all(|m| families.contains(&m.metric_family_name.as_str())));
            prop_assert!(dropped.metadata <= all_dropped.metadata);
            seen += part.timeseries.len();
        }
        prop_assert_eq!(seen, whole.timeseries.len());
        let mut one = Vec::new();
        v2_to_v1_shard_into(&req, 0, 1, &mut one).unwrap();
        let mut again = Vec::new();
        v2_to_v1_into(&req, &mut again).unwrap();
        prop_assert_eq!(one, again);
    }
}
