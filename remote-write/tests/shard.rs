//! The shard of a series and a 1.0 request cut to one shard
//! (`src/shard.rs`): the hash pinned to values computed independently from
//! its description, and every request cut into shards that hold each series
//! exactly once, in order, where its hash says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;

use prom_remote_write::encode::encode_v1;
use prom_remote_write::shard::{filter_v1, series_hash, shard_of, Kept};
use prom_remote_write::v1;

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
    // (FNV-1a of name, 0xff, value; summed; SplitMix64's finaliser).
    assert_eq!(
        hash(&[("__name__", "up"), ("job", "node")]),
        0x1167_fc80_f9c2_92dc
    );
    assert_eq!(hash(&[("__name__", "a")]), 0x4967_de3d_8519_9163);
    assert_eq!(hash(&[]), 0);
    assert_eq!(shard_of(0x1167_fc80_f9c2_92dc, 8), 4);
    assert_eq!(shard_of(0x1167_fc80_f9c2_92dc, 3), 1);
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
