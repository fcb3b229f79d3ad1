//! Prometheus remote-write 1.0 and 2.0 for walrelay: the protobuf messages,
//! the checks a request passes before the relay stores it, and the 2.0 to
//! 1.0 translation.
//!
//! # Why the relay validates
//!
//! walrelay answers the sender as soon as a request is durable in its log,
//! before any replica has seen it. From then on the sender considers the
//! data delivered. A request that a replica would refuse (a series without
//! `__name__`, duplicate label names, a native histogram whose count does
//! not add up, a body that is not snappy or not protobuf) must therefore be
//! refused by the relay itself, with the 4xx the replica would have given,
//! so that the sender learns about it; once in the log it would be refused
//! by every replica, and it could drag good records down with it when a
//! shipper coalesces records into one request (Prometheus refuses a request
//! whole).
//!
//! The relay also protects itself: the decoded size is checked against the
//! snappy header before allocating, and a request is never decoded into
//! owned structs, which take up to 47 bytes of memory per byte of some
//! bodies (millions of tiny 2.0 series): it is validated where it lies, by a
//! reader that accepts and refuses exactly what prost would, and the
//! shippers translate and merge records from their bytes into the request
//! they build. Validation needs no memory that grows with the body for
//! every shape whose label names are sorted, and less than one byte per
//! byte for any body ([`decode::validate`]; `benches/hotpath.rs` measures
//! it per shape).
//!
//! # Modules
//!
//! * [`v1`], [`v2`]: the messages, derived by hand with `prost::Message`
//!   (no protoc, no build script), field numbers as in Prometheus' `prompb`.
//! * [`content`]: `Content-Type` and `Content-Encoding` of a request.
//! * [`decode`]: snappy decompression with a size limit, and [`decode::validate`].
//! * [`translate`]: 2.0 to 1.0 ([`translate::v2_to_v1_bytes`] on the bytes,
//!   [`translate::v2_to_v1`] on a decoded request), and counting helpers.
//! * [`encode`]: snappy compression, encoding, [`encode::concat_v1`] and
//!   [`encode::merge_v2_bytes`].
//! * [`sink`]: where a request goes as it is built, and
//!   [`sink::SnappyWriter`], which compresses it as it comes.
//! * Inside: `pb` (the prost-compatible reader), `stream` (the rules on the
//!   bytes), `symbols` (the 2.0 symbol table as an index), `canon` (prost's
//!   encoding of what was read), `wire` (the pre-scan and the 1.0 fast path).
//!
//! # Typical ingest path
//!
//! ```
//! use prom_remote_write::{content, decode, encode, v1};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let req = v1::WriteRequest {
//!     timeseries: vec![v1::TimeSeries {
//!         labels: vec![v1::Label { name: "__name__".into(), value: "up".into() }],
//!         samples: vec![v1::Sample { value: 1.0, timestamp: 1_700_000_000_000 }],
//!         ..Default::default()
//!     }],
//!     metadata: vec![],
//! };
//! let body = encode::snappy_compress(&encode::encode_v1(&req));
//!
//! let protocol = content::parse_content_type(Some(content::CONTENT_TYPE_V1))?;
//! content::check_content_encoding(Some("snappy"))?;
//! let limits = decode::Limits::default();
//! let decoded = decode::decompress_snappy(&body, limits.max_decoded_bytes)?;
//! let summary = decode::validate(protocol, &decoded, &limits)?;
//! assert_eq!(summary.samples, 1);
//! // ... append `body` to the log, fsync, answer 204.
//! # Ok(())
//! # }
//! ```

mod canon;
pub mod content;
pub mod decode;
pub mod encode;
mod error;
mod limits;
mod pb;
mod rules;
pub mod shard;
pub mod sink;
mod stream;
mod symbols;
pub mod translate;
pub mod v1;
pub mod v2;
mod varint;
mod wire;

pub use content::{ContentTypeError, Protocol};
pub use decode::{DecodeError, Limits, Summary};
pub use translate::Dropped;

/// The label holding the metric name.
pub const METRIC_NAME_LABEL: &str = "__name__";
