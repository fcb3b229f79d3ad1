//! Small encoding helpers used by the shippers and the tests.

use prost::Message;

use crate::{v1, v2};

/// Compresses `buf` as one snappy block (the remote-write body format).
///
/// # Panics
///
/// If `buf` is larger than the snappy block format allows (4 GiB - 1
/// bytes); use [`try_snappy_compress`] where that can happen.
pub fn snappy_compress(buf: &[u8]) -> Vec<u8> {
    match try_snappy_compress(buf) {
        Ok(v) => v,
        Err(e) => panic!("snappy_compress: {e}"),
    }
}

/// Compresses `buf` as one snappy block; fails only for inputs of 4 GiB or
/// more.
pub fn try_snappy_compress(buf: &[u8]) -> Result<Vec<u8>, snap::Error> {
    snap::raw::Encoder::new().compress_vec(buf)
}

/// Encodes a 1.0 request as protobuf (not compressed).
pub fn encode_v1(req: &v1::WriteRequest) -> Vec<u8> {
    req.encode_to_vec()
}

/// Encodes a 2.0 request as protobuf (not compressed).
pub fn encode_v2(req: &v2::Request) -> Vec<u8> {
    req.encode_to_vec()
}

/// Appends the encoded 1.0 `WriteRequest`s in `parts` to `out`.
///
/// A protobuf message is a sequence of fields, and a parser meeting a
/// repeated field several times appends every occurrence (protobuf merge
/// semantics). `WriteRequest` has only repeated fields (`timeseries` = 1,
/// `metadata` = 3), so the concatenation of encoded requests *is* the
/// encoding of one request whose `timeseries` and `metadata` are the
/// concatenation of the parts', in order. This lets a shipper coalesce
/// records from the log into one request without decoding them.
///
/// This does not hold for 2.0 `Request`s: each one's symbol references
/// index its own symbol table.
pub fn concat_v1(parts: &[&[u8]], out: &mut Vec<u8>) {
    out.reserve(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        out.extend_from_slice(p);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::decode::{decode_v1, decompress_snappy};

    fn series(name: &str, ts: i64) -> v1::TimeSeries {
        v1::TimeSeries {
            labels: vec![v1::Label {
                name: "__name__".into(),
                value: name.into(),
            }],
            samples: vec![v1::Sample {
                value: 1.5,
                timestamp: ts,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn snappy_round_trip() {
        let data = b"hello hello hello hello remote write".repeat(100);
        let c = snappy_compress(&data);
        assert!(c.len() < data.len());
        assert_eq!(decompress_snappy(&c, data.len()).unwrap(), data);
        assert_eq!(snappy_compress(&[]), vec![0u8]);
        assert_eq!(decompress_snappy(&[0u8], 0).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn concat_merges_repeated_fields() {
        let a = v1::WriteRequest {
            timeseries: vec![series("a", 1), series("b", 2)],
            metadata: vec![v1::MetricMetadata {
                r#type: v1::MetricType::Counter as i32,
                metric_family_name: "a".into(),
                help: "A".into(),
                unit: String::new(),
            }],
        };
        let b = v1::WriteRequest {
            timeseries: vec![series("c", 3)],
            metadata: vec![],
        };
        let c = v1::WriteRequest::default();
        let d = v1::WriteRequest {
            timeseries: vec![series("d", 4)],
            metadata: vec![v1::MetricMetadata {
                r#type: v1::MetricType::Gauge as i32,
                metric_family_name: "d".into(),
                ..Default::default()
            }],
        };
        let (ea, eb, ec, ed) = (encode_v1(&a), encode_v1(&b), encode_v1(&c), encode_v1(&d));
        let mut out = vec![];
        concat_v1(&[&ea, &eb, &ec, &ed], &mut out);
        let merged = decode_v1(&out).unwrap();
        let mut expect = a.clone();
        expect.timeseries.extend(b.timeseries.clone());
        expect.timeseries.extend(d.timeseries.clone());
        expect.metadata.extend(d.metadata.clone());
        assert_eq!(merged, expect);
        // prost's own merge agrees.
        let mut m = a.clone();
        prost::Message::merge(&mut m, eb.as_slice()).unwrap();
        prost::Message::merge(&mut m, ed.as_slice()).unwrap();
        assert_eq!(m, expect);
        // Appending to a non-empty buffer keeps what was there.
        let mut out2 = ea.clone();
        concat_v1(&[&eb], &mut out2);
        assert_eq!(decode_v1(&out2).unwrap().timeseries.len(), 3);
    }
}
