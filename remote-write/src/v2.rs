//! Remote-write 2.0 messages: `io.prometheus.write.v2.Request` and what it
//! contains.
//!
//! Written by hand with `#[derive(prost::Message)]`; the field numbers and
//! wire types are those of Prometheus' `prompb/io/prometheus/write/v2/types.proto`
//! (the Remote-Write 2.0 specification):
//!
//! ```text
//! message Request    { reserved 1 to 3; repeated string symbols = 4; repeated TimeSeries timeseries = 5; }
//! message TimeSeries { repeated uint32 labels_refs = 1; repeated Sample samples = 2;
//!                      repeated Histogram histograms = 3; repeated Exemplar exemplars = 4;
//!                      Metadata metadata = 5; int64 created_timestamp = 6; }
//! message Exemplar   { repeated uint32 labels_refs = 1; double value = 2; int64 timestamp = 3; }
//! message Sample     { double value = 1; int64 timestamp = 2; }
//! message Metadata   { MetricType type = 1; uint32 help_ref = 3; uint32 unit_ref = 4; }
//! message Histogram  { same fields and numbers as 1.0's, custom_values = 16 included }
//! message BucketSpan { sint32 offset = 1; uint32 length = 2; }
//! ```
//!
//! Strings are interned: every `*_ref` is an index into [`Request::symbols`],
//! whose first element must be the empty string.

/// The top-level remote-write 2.0 message
/// (content type `application/x-protobuf;proto=io.prometheus.write.v2.Request`).
///
/// Fields 1 to 3 are reserved so that a 1.0 `WriteRequest` decoded as a 2.0
/// `Request` (or the reverse) comes out empty rather than garbled.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    /// De-duplicated strings referenced by the `*_ref(s)` fields. Must start
    /// with `""` when non-empty.
    #[prost(string, repeated, tag = "4")]
    pub symbols: Vec<String>,
    /// The series.
    #[prost(message, repeated, tag = "5")]
    pub timeseries: Vec<TimeSeries>,
}

/// One series.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    /// Label name/value pairs as indices into [`Request::symbols`]:
    /// name, value, name, value, ... (so always an even number).
    #[prost(uint32, repeated, tag = "1")]
    pub labels_refs: Vec<u32>,
    /// Float samples, oldest first.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
    /// Native histogram samples, oldest first.
    #[prost(message, repeated, tag = "3")]
    pub histograms: Vec<Histogram>,
    /// Exemplars attached to this series' samples.
    #[prost(message, repeated, tag = "4")]
    pub exemplars: Vec<Exemplar>,
    /// Metadata of the series' metric.
    #[prost(message, optional, tag = "5")]
    pub metadata: Option<Metadata>,
    /// Created (start) timestamp in milliseconds; 0 means unset.
    #[prost(int64, tag = "6")]
    pub created_timestamp: i64,
}

/// An exemplar.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Exemplar {
    /// Label name/value pairs as indices into [`Request::symbols`].
    #[prost(uint32, repeated, tag = "1")]
    pub labels_refs: Vec<u32>,
    /// The observed value.
    #[prost(double, tag = "2")]
    pub value: f64,
    /// Milliseconds since the Unix epoch; 0 means unset.
    #[prost(int64, tag = "3")]
    pub timestamp: i64,
}

/// A float sample.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Sample {
    /// The value (any `f64`, NaN payloads included).
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// Metadata of a series' metric.
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct Metadata {
    /// The metric type, see [`MetricType`].
    #[prost(enumeration = "MetricType", tag = "1")]
    pub r#type: i32,
    /// Help text as an index into [`Request::symbols`] (0 = none).
    #[prost(uint32, tag = "3")]
    pub help_ref: u32,
    /// Unit as an index into [`Request::symbols`] (0 = none).
    #[prost(uint32, tag = "4")]
    pub unit_ref: u32,
}

/// Metric type (`io.prometheus.write.v2.Metadata.MetricType`). Same numbers
/// as 1.0's [`crate::v1::MetricType`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MetricType {
    /// `METRIC_TYPE_UNSPECIFIED`.
    Unspecified = 0,
    /// `METRIC_TYPE_COUNTER`.
    Counter = 1,
    /// `METRIC_TYPE_GAUGE`.
    Gauge = 2,
    /// `METRIC_TYPE_HISTOGRAM`.
    Histogram = 3,
    /// `METRIC_TYPE_GAUGEHISTOGRAM`.
    Gaugehistogram = 4,
    /// `METRIC_TYPE_SUMMARY`.
    Summary = 5,
    /// `METRIC_TYPE_INFO`.
    Info = 6,
    /// `METRIC_TYPE_STATESET`.
    Stateset = 7,
}

/// Prost's module path for the enum nested in [`Metadata`].
pub mod metadata {
    pub use super::MetricType;
}

/// A native (sparse) histogram sample, integer or float; same fields and
/// numbers as [`crate::v1::Histogram`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct Histogram {
    /// Count of observations.
    #[prost(oneof = "histogram::Count", tags = "1, 2")]
    pub count: Option<histogram::Count>,
    /// Sum of observations.
    #[prost(double, tag = "3")]
    pub sum: f64,
    /// Bucket schema: -4..=8 exponential, -53 custom buckets.
    #[prost(sint32, tag = "4")]
    pub schema: i32,
    /// Breadth of the zero bucket.
    #[prost(double, tag = "5")]
    pub zero_threshold: f64,
    /// Count in the zero bucket.
    #[prost(oneof = "histogram::ZeroCount", tags = "6, 7")]
    pub zero_count: Option<histogram::ZeroCount>,
    /// Negative bucket spans.
    #[prost(message, repeated, tag = "8")]
    pub negative_spans: Vec<BucketSpan>,
    /// Negative bucket count deltas (integer histograms).
    #[prost(sint64, repeated, tag = "9")]
    pub negative_deltas: Vec<i64>,
    /// Negative bucket absolute counts (float histograms).
    #[prost(double, repeated, tag = "10")]
    pub negative_counts: Vec<f64>,
    /// Positive bucket spans.
    #[prost(message, repeated, tag = "11")]
    pub positive_spans: Vec<BucketSpan>,
    /// Positive bucket count deltas (integer histograms).
    #[prost(sint64, repeated, tag = "12")]
    pub positive_deltas: Vec<i64>,
    /// Positive bucket absolute counts (float histograms).
    #[prost(double, repeated, tag = "13")]
    pub positive_counts: Vec<f64>,
    /// Counter reset hint, see [`histogram::ResetHint`].
    #[prost(enumeration = "histogram::ResetHint", tag = "14")]
    pub reset_hint: i32,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "15")]
    pub timestamp: i64,
    /// Upper bounds of custom buckets (schema -53).
    #[prost(double, repeated, tag = "16")]
    pub custom_values: Vec<f64>,
}

/// The oneofs and enum nested in [`Histogram`] (prost's naming).
pub mod histogram {
    /// Count of observations: integer or float histogram.
    #[derive(Clone, Copy, PartialEq, prost::Oneof)]
    pub enum Count {
        /// Integer histogram count (field 1).
        #[prost(uint64, tag = "1")]
        CountInt(u64),
        /// Float histogram count (field 2).
        #[prost(double, tag = "2")]
        CountFloat(f64),
    }

    /// Count in the zero bucket.
    #[derive(Clone, Copy, PartialEq, prost::Oneof)]
    pub enum ZeroCount {
        /// Integer zero-bucket count (field 6).
        #[prost(uint64, tag = "6")]
        ZeroCountInt(u64),
        /// Float zero-bucket count (field 7).
        #[prost(double, tag = "7")]
        ZeroCountFloat(f64),
    }

    /// Counter reset hint (`io.prometheus.write.v2.Histogram.ResetHint`);
    /// same numbers as 1.0's.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum ResetHint {
        /// `RESET_HINT_UNSPECIFIED`: test for a counter reset explicitly.
        Unspecified = 0,
        /// `RESET_HINT_YES`: first histogram after a counter reset.
        Yes = 1,
        /// `RESET_HINT_NO`: no counter reset since the previous histogram.
        No = 2,
        /// `RESET_HINT_GAUGE`: gauge histogram.
        Gauge = 3,
    }
}

/// A run of consecutive buckets.
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct BucketSpan {
    /// Gap to the previous span, or starting index for the first span.
    #[prost(sint32, tag = "1")]
    pub offset: i32,
    /// Number of consecutive buckets.
    #[prost(uint32, tag = "2")]
    pub length: u32,
}

impl Histogram {
    /// True when this is a float histogram (`count` is `count_float`).
    pub fn is_float(&self) -> bool {
        matches!(self.count, Some(histogram::Count::CountFloat(_)))
    }
}

/// The fields of these messages as [`crate::pb`] reads them (see
/// [`crate::v1`]'s `schema`, whose sample, histogram and span it shares).
pub(crate) mod schema {
    use crate::pb::{field as f, Kind, Schema};
    use crate::v1::schema::{HISTOGRAM, SAMPLE};

    pub(crate) static REQUEST: Schema = Schema {
        name: "Request",
        fields: &[
            f(4, "symbols", Kind::String),
            f(5, "timeseries", Kind::Message(&TIME_SERIES)),
        ],
    };
    static TIME_SERIES: Schema = Schema {
        name: "TimeSeries",
        fields: &[
            f(1, "labels_refs", Kind::RepeatedVarint),
            f(2, "samples", Kind::Message(&SAMPLE)),
            f(3, "histograms", Kind::Message(&HISTOGRAM)),
            f(4, "exemplars", Kind::Message(&EXEMPLAR)),
            f(5, "metadata", Kind::Message(&METADATA)),
            f(6, "created_timestamp", Kind::Varint),
        ],
    };
    static EXEMPLAR: Schema = Schema {
        name: "Exemplar",
        fields: &[
            f(1, "labels_refs", Kind::RepeatedVarint),
            f(2, "value", Kind::Double),
            f(3, "timestamp", Kind::Varint),
        ],
    };
    static METADATA: Schema = Schema {
        name: "Metadata",
        fields: &[
            f(1, "r#type", Kind::Varint),
            f(3, "help_ref", Kind::Varint),
            f(4, "unit_ref", Kind::Varint),
        ],
    };
}
