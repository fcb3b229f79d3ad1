//! Remote-write encoding for tests: 1.0 for the load generator's hot path,
//! and [`Symbols`], a 2.0 symbol table to write requests by label names.
//!
//! Each series' labels are encoded once; a request is then the labels'
//! bytes plus the samples, written straight into one buffer. The output is
//! byte-for-byte what prost produces for the same `prometheus.WriteRequest`
//! (checked against `prom_remote_write` in the tests):
//!
//! ```text
//! WriteRequest { repeated TimeSeries timeseries = 1; }
//! TimeSeries   { repeated Label labels = 1; repeated Sample samples = 2; }
//! Label        { string name = 1; string value = 2; }
//! Sample       { double value = 1; int64 timestamp = 2; }
//! ```

use anyhow::{Context, Result};

/// Appends `v` as a protobuf varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Length of `v` as a varint.
pub fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

fn put_len_delimited(out: &mut Vec<u8>, tag: u8, payload: &[u8]) {
    out.push(tag);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

/// The encoded `labels` field entries of one TimeSeries. Labels are sorted
/// by name here, as Prometheus expects.
pub fn encode_labels(labels: &[(&str, &str)]) -> Vec<u8> {
    let mut sorted: Vec<(&str, &str)> = labels.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = Vec::new();
    let mut label = Vec::new();
    for (name, value) in sorted {
        label.clear();
        // proto3: empty strings are not written.
        if !name.is_empty() {
            put_len_delimited(&mut label, 0x0A, name.as_bytes());
        }
        if !value.is_empty() {
            put_len_delimited(&mut label, 0x12, value.as_bytes());
        }
        put_len_delimited(&mut out, 0x0A, &label);
    }
    out
}

fn sample_len(value: f64, ts: i64) -> usize {
    // proto3: zero values are not written (prost compares with `!= 0.0`).
    let mut n = 0;
    if value != 0.0 {
        n += 9;
    }
    if ts != 0 {
        n += 1 + varint_len(ts as u64);
    }
    n
}

/// Appends one `timeseries` entry of a WriteRequest: pre-encoded labels
/// (from [`encode_labels`]) and float samples `(value, timestamp_ms)`.
pub fn put_timeseries(out: &mut Vec<u8>, labels: &[u8], samples: &[(f64, i64)]) {
    let mut len = labels.len();
    for &(v, ts) in samples {
        let l = sample_len(v, ts);
        len += 1 + varint_len(l as u64) + l;
    }
    out.push(0x0A);
    put_varint(out, len as u64);
    out.extend_from_slice(labels);
    for &(v, ts) in samples {
        out.push(0x12);
        put_varint(out, sample_len(v, ts) as u64);
        if v != 0.0 {
            out.push(0x09);
            out.extend_from_slice(&v.to_le_bytes());
        }
        if ts != 0 {
            out.push(0x10);
            put_varint(out, ts as u64);
        }
    }
}

/// Snappy block format (what remote-write uses, not the framed format).
pub fn snappy_compress(data: &[u8]) -> Result<Vec<u8>> {
    snap::raw::Encoder::new()
        .compress_vec(data)
        .context("snappy compress")
}

pub fn snappy_decompress(data: &[u8]) -> Result<Vec<u8>> {
    snap::raw::Decoder::new()
        .decompress_vec(data)
        .context("snappy decompress")
}

/// A WriteRequest encoded with prost and snappy-compressed: a request body.
pub fn write_request_body(req: &prom_remote_write::v1::WriteRequest) -> Vec<u8> {
    prom_remote_write::encode::snappy_compress(&prom_remote_write::encode::encode_v1(req))
}

/// POSTs a remote-write 1.0 body with the standard headers; returns the
/// status and the response body. For tests that send hand-made requests.
pub async fn post_remote_write(url: &str, body: Vec<u8>) -> Result<(u16, String)> {
    let client = crate::http::client(std::time::Duration::from_secs(30))?;
    post_remote_write_with(&client, url, body).await
}

/// [`post_remote_write`] on a given client: its kept-alive connections are
/// reused from one request to the next.
pub async fn post_remote_write_with(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
) -> Result<(u16, String)> {
    let resp = client
        .post(url)
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "snappy")
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .body(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await.unwrap_or_default()))
}

/// A 1.0 series with `labels` (in the order given) and float samples
/// `(value, ts)`: what tests build requests from.
pub fn v1_series(
    labels: &[(&str, &str)],
    samples: &[(f64, i64)],
) -> prom_remote_write::v1::TimeSeries {
    use prom_remote_write::v1;
    v1::TimeSeries {
        labels: labels
            .iter()
            .map(|(n, v)| v1::Label {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
        samples: samples
            .iter()
            .map(|&(value, timestamp)| v1::Sample { value, timestamp })
            .collect(),
        ..Default::default()
    }
}

/// A remote-write 2.0 symbol table being built, `""` first: tests write
/// requests with it by label names and values instead of references.
pub struct Symbols(pub Vec<String>);

impl Default for Symbols {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbols {
    pub fn new() -> Self {
        Symbols(vec![String::new()])
    }

    /// The index of `s`, added if new.
    pub fn r(&mut self, s: &str) -> u32 {
        match self.0.iter().position(|x| x == s) {
            Some(i) => i as u32,
            None => {
                self.0.push(s.to_string());
                self.0.len() as u32 - 1
            }
        }
    }

    /// Refs in the order given (not sorted: the suite sends them unsorted).
    pub fn labels(&mut self, pairs: &[(&str, &str)]) -> Vec<u32> {
        pairs
            .iter()
            .flat_map(|(k, v)| [self.r(k), self.r(v)])
            .collect()
    }

    /// A series with float samples `(value, ts)`.
    pub fn series(
        &mut self,
        labels: &[(&str, &str)],
        samples: &[(f64, i64)],
    ) -> prom_remote_write::v2::TimeSeries {
        prom_remote_write::v2::TimeSeries {
            labels_refs: self.labels(labels),
            samples: samples
                .iter()
                .map(|&(value, timestamp)| prom_remote_write::v2::Sample { value, timestamp })
                .collect(),
            ..Default::default()
        }
    }

    /// An exemplar with `labels`.
    pub fn exemplar(
        &mut self,
        labels: &[(&str, &str)],
        value: f64,
        ts: i64,
    ) -> prom_remote_write::v2::Exemplar {
        prom_remote_write::v2::Exemplar {
            labels_refs: self.labels(labels),
            value,
            timestamp: ts,
        }
    }

    /// The request: this symbol table and `timeseries`.
    pub fn request(
        self,
        timeseries: Vec<prom_remote_write::v2::TimeSeries>,
    ) -> prom_remote_write::v2::Request {
        prom_remote_write::v2::Request {
            symbols: self.0,
            timeseries,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use prom_remote_write::v1;
    use prost::Message;

    type Series<'a> = (Vec<(&'a str, &'a str)>, Vec<(f64, i64)>);

    #[test]
    fn matches_prost_encoding() {
        let series: Vec<Series> = vec![
            (
                vec![("job", "x"), ("__name__", "m"), ("a", "")],
                vec![
                    (1.5, 1_700_000_000_123),
                    (0.0, 1_700_000_000_124),
                    (-2.0, 0),
                ],
            ),
            (vec![("__name__", "n")], vec![]),
            (vec![("__name__", "n"), ("k", "v")], vec![(f64::MAX, -5)]),
        ];
        let mut mine = Vec::new();
        let mut req = v1::WriteRequest::default();
        for (labels, samples) in &series {
            put_timeseries(&mut mine, &encode_labels(labels), samples);
            let mut sorted = labels.clone();
            sorted.sort();
            req.timeseries.push(v1_series(&sorted, samples));
        }
        assert_eq!(mine, prom_remote_write::encode::encode_v1(&req));
        assert_eq!(v1::WriteRequest::decode(&mine[..]).unwrap(), req);
        let body = snappy_compress(&mine).unwrap();
        assert_eq!(snappy_decompress(&body).unwrap(), mine);
    }

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16383, 16384, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }
}
