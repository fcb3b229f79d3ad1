//! A stored record cut into the parts each delivery shard sends.
//!
//! A replica delivered by N shards ([`super::shards`]) gets each record's
//! series through the shard their labels hash to
//! ([`prom_remote_write::shard`]). The record is cut once, when it is read,
//! into N parts: part i is a record of the same sequence number and kind
//! holding only shard i's series, in their order (a 1.0 record's series
//! byte for byte and its metadata in part 0; a 2.0 record's series with a
//! symbol table of only the strings they use). A part with nothing of its
//! shard is empty: it carries only its sequence number, so that the shard
//! knows it is past it.
//!
//! Cutting is a function of the record and N alone. After a crash a shard
//! re-sends its range in flight by cutting the same records again with the
//! N stored beside it ([`crate::checkpoint`]), so it re-sends exactly what
//! it had sent.
//!
//! A record that cannot be cut (it passed its checksum but does not decode)
//! goes whole to shard 0, whose delivery finds it undecodable and counts it
//! as skipped, as an unsharded replica does; the other parts are empty.

use bytes::Bytes;
use prom_remote_write::{encode, shard, translate::CheckedV2};
use wal_format::{PayloadEncoding, PayloadKind, Record, RecordMeta};

use super::payload;

/// The `of` parts of `record`, part i for shard i (see the module
/// documentation). With one shard, the record itself.
pub fn cut(record: &Record, of: u32) -> Vec<Record> {
    if of <= 1 {
        return vec![record.clone()];
    }
    let n = of as usize;
    let cut = payload::protobuf(record)
        .ok()
        .and_then(|bytes| match record.meta.kind {
            PayloadKind::RemoteWriteV1 => Some(cut_v1(&bytes, n)),
            PayloadKind::RemoteWriteV2 => cut_v2(&bytes, of),
        });
    match cut {
        Some(parts) => parts
            .into_iter()
            .map(|(payload, samples)| part(record, payload, samples))
            .collect(),
        None => (0..n)
            .map(|i| {
                if i == 0 {
                    record.clone()
                } else {
                    part(record, Vec::new(), 0)
                }
            })
            .collect(),
    }
}

/// Whether a part carries nothing for its shard.
pub fn is_empty(part: &Record) -> bool {
    part.payload.is_empty()
}

/// Each shard's parts of `records`, empty ones left out: `of` lists.
pub fn split(records: &[Record], of: u32) -> Vec<Vec<Record>> {
    let mut shards = vec![Vec::new(); of.max(1) as usize];
    for r in records {
        for (shard, part) in shards.iter_mut().zip(cut(r, of)) {
            if !is_empty(&part) {
                shard.push(part);
            }
        }
    }
    shards
}

/// Shard `index`'s parts of `records`, empty ones left out.
pub fn parts_of(records: Vec<Record>, index: u32, of: u32) -> Vec<Record> {
    if of <= 1 {
        return records;
    }
    records
        .iter()
        .filter_map(|r| cut(r, of).into_iter().nth(index as usize))
        .filter(|p| !is_empty(p))
        .collect()
}

fn part(record: &Record, payload: Vec<u8>, samples: u64) -> Record {
    Record {
        seq: record.seq,
        meta: RecordMeta {
            samples: u32::try_from(samples).unwrap_or(u32::MAX),
            encoding: PayloadEncoding::Identity,
            ..record.meta
        },
        payload: Bytes::from(payload),
    }
}

/// A 1.0 body's parts, with their samples.
fn cut_v1(body: &[u8], n: usize) -> Vec<(Vec<u8>, u64)> {
    // Each part's share and a margin: fewer reallocations as they grow.
    let share = body.len() / n + body.len() / 64;
    let mut outs: Vec<Vec<u8>> = (0..n).map(|_| Vec::with_capacity(share)).collect();
    let kept = shard::split_v1(body, &mut outs);
    outs.into_iter()
        .zip(kept)
        .map(|(out, k)| (out, k.samples))
        .collect()
}

/// A 2.0 body's parts, with their samples; `None` when it does not decode.
fn cut_v2(body: &[u8], of: u32) -> Option<Vec<(Vec<u8>, u64)>> {
    let req = CheckedV2::new(body).ok()?;
    let parts = [req];
    (0..of)
        .map(|index| {
            let mut out = Vec::new();
            let summary = encode::shard_v2_into(&parts, index, of, &mut out).ok()?;
            if summary.series == 0 {
                out.clear();
            }
            Some((out, summary.samples + summary.histograms))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use prom_remote_write::v1;
    use prost::Message;

    #[test]
    fn a_record_that_does_not_decode_goes_whole_to_the_first_shard() {
        let r = super::super::test_record(7, PayloadKind::RemoteWriteV2, 3, vec![0xff; 9]);
        let parts = cut(&r, 4);
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0].payload, r.payload);
        assert_eq!(parts[0].meta.samples, 3);
        assert!(parts[1..].iter().all(|p| is_empty(p) && p.seq == 7));
    }

    #[test]
    fn metadata_goes_with_the_first_shard_and_one_shard_is_the_record_itself() {
        let req = v1::WriteRequest {
            timeseries: vec![],
            metadata: vec![v1::MetricMetadata {
                metric_family_name: "up".into(),
                ..Default::default()
            }],
        };
        let r = super::super::test_record(1, PayloadKind::RemoteWriteV1, 0, req.encode_to_vec());
        let parts = cut(&r, 3);
        assert_eq!(parts[0].payload, r.payload);
        assert!(parts[1..].iter().all(is_empty));
        let whole = cut(&r, 1);
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].payload, r.payload);
        assert_eq!(whole[0].meta, r.meta);
    }
}
