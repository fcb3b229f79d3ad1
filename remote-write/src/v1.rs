//! Remote-write 1.0 messages: `prometheus.WriteRequest` and what it contains.
//!
//! Written by hand with `#[derive(prost::Message)]`; the field numbers and
//! wire types are those of Prometheus' `prompb/remote.proto` and
//! `prompb/types.proto`:
//!
//! ```text
//! message WriteRequest   { repeated TimeSeries timeseries = 1; reserved 2; repeated MetricMetadata metadata = 3; }
//! message TimeSeries     { repeated Label labels = 1; repeated Sample samples = 2;
//!                          repeated Exemplar exemplars = 3; repeated Histogram histograms = 4; }
//! message Label          { string name = 1; string value = 2; }
//! message Sample         { double value = 1; int64 timestamp = 2; }
//! message Exemplar       { repeated Label labels = 1; double value = 2; int64 timestamp = 3; }
//! message MetricMetadata { MetricType type = 1; string metric_family_name = 2; string help = 4; string unit = 5; }
//! message Histogram      { oneof count { uint64 count_int = 1; double count_float = 2; }
//!                          double sum = 3; sint32 schema = 4; double zero_threshold = 5;
//!                          oneof zero_count { uint64 zero_count_int = 6; double zero_count_float = 7; }
//!                          repeated BucketSpan negative_spans = 8; repeated sint64 negative_deltas = 9;
//!                          repeated double negative_counts = 10; repeated BucketSpan positive_spans = 11;
//!                          repeated sint64 positive_deltas = 12; repeated double positive_counts = 13;
//!                          ResetHint reset_hint = 14; int64 timestamp = 15; repeated double custom_values = 16; }
//! message BucketSpan     { sint32 offset = 1; uint32 length = 2; }
//! ```
//!
//! Repeated scalars are packed on encode (proto3 default) and accepted packed
//! or unpacked on decode.
//!
//! Every `f64` travels bit for bit (NaN payloads such as the stale marker
//! `0x7ff0000000000002`, ±Inf, subnormals), with one proto3 exception shared
//! with Prometheus' own Go encoding: a singular field equal to its default is
//! not written, and `-0.0 == 0.0`, so a singular `-0.0` (a sample value, a
//! histogram sum) arrives as `+0.0`. Repeated doubles keep `-0.0`.

/// The top-level remote-write 1.0 message
/// (content type `application/x-protobuf;proto=prometheus.WriteRequest`).
///
/// Concatenating encoded `WriteRequest`s yields one valid `WriteRequest`
/// whose `timeseries` and `metadata` are the concatenation of the parts'
/// (see [`crate::encode::concat_v1`]).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    /// The series, each with its labels and samples.
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
    /// Metric metadata (type, help, unit) per metric family. Field 2 is
    /// reserved (Cortex used it for the request source).
    #[prost(message, repeated, tag = "3")]
    pub metadata: Vec<MetricMetadata>,
}

/// One series: its labels and any number of samples, exemplars and native
/// histogram samples.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    /// The series' labels, `__name__` included. Should be sorted by name.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// Float samples, oldest first.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
    /// Exemplars attached to this series.
    #[prost(message, repeated, tag = "3")]
    pub exemplars: Vec<Exemplar>,
    /// Native histogram samples, oldest first.
    #[prost(message, repeated, tag = "4")]
    pub histograms: Vec<Histogram>,
}

/// A label name/value pair.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Label {
    /// Label name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Label value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// A float sample.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Sample {
    /// The value (any `f64`, including NaN payloads such as the stale marker).
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// An exemplar: an example observation (often with a trace id).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Exemplar {
    /// Optional labels, e.g. `trace_id`.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// The observed value.
    #[prost(double, tag = "2")]
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "3")]
    pub timestamp: i64,
}

/// A native (sparse) histogram sample, integer or float.
///
/// It is an integer histogram unless `count` is
/// [`histogram::Count::CountFloat`]; integer histograms carry their buckets
/// as deltas (`*_deltas`), float histograms as absolute counts (`*_counts`).
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

    /// Counter reset hint (`prometheus.Histogram.ResetHint`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum ResetHint {
        /// Need to test for a counter reset explicitly.
        Unknown = 0,
        /// First histogram after a counter reset.
        Yes = 1,
        /// No counter reset since the previous histogram.
        No = 2,
        /// Gauge histogram: counter resets do not happen.
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

/// Metadata of one metric family.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct MetricMetadata {
    /// The metric type, see [`MetricType`].
    #[prost(enumeration = "MetricType", tag = "1")]
    pub r#type: i32,
    /// The family name (e.g. `http_requests_total`).
    #[prost(string, tag = "2")]
    pub metric_family_name: String,
    /// Help text.
    #[prost(string, tag = "4")]
    pub help: String,
    /// Unit.
    #[prost(string, tag = "5")]
    pub unit: String,
}

/// Metric type (`prometheus.MetricMetadata.MetricType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MetricType {
    /// Unknown / untyped.
    Unknown = 0,
    /// Counter.
    Counter = 1,
    /// Gauge.
    Gauge = 2,
    /// Histogram (classic or native).
    Histogram = 3,
    /// Gauge histogram.
    Gaugehistogram = 4,
    /// Summary.
    Summary = 5,
    /// Info.
    Info = 6,
    /// State set.
    Stateset = 7,
}

/// Prost's module path for the enum nested in [`MetricMetadata`].
pub mod metric_metadata {
    pub use super::MetricType;
}

impl Histogram {
    /// True when this is a float histogram (`count` is `count_float`), as
    /// Prometheus decides.
    pub fn is_float(&self) -> bool {
        matches!(self.count, Some(histogram::Count::CountFloat(_)))
    }
}

impl TimeSeries {
    /// The value of the `__name__` label, if present.
    pub fn metric_name(&self) -> Option<&str> {
        self.labels
            .iter()
            .find(|l| l.name == crate::METRIC_NAME_LABEL)
            .map(|l| l.value.as_str())
    }
}

/// The fields of these messages as [`crate::pb`] reads them: the same tags,
/// wire types and (for error messages) names as the derives above. 2.0
/// shares [`SAMPLE`], [`HISTOGRAM`] and [`BUCKET_SPAN`].
pub(crate) mod schema {
    use crate::pb::{field as f, Kind, Schema};

    pub(crate) static WRITE_REQUEST: Schema = Schema {
        name: "WriteRequest",
        fields: &[
            f(1, "timeseries", Kind::Message(&TIME_SERIES)),
            f(3, "metadata", Kind::Message(&METRIC_METADATA)),
        ],
    };
    static TIME_SERIES: Schema = Schema {
        name: "TimeSeries",
        fields: &[
            f(1, "labels", Kind::Message(&LABEL)),
            f(2, "samples", Kind::Message(&SAMPLE)),
            f(3, "exemplars", Kind::Message(&EXEMPLAR)),
            f(4, "histograms", Kind::Message(&HISTOGRAM)),
        ],
    };
    static LABEL: Schema = Schema {
        name: "Label",
        fields: &[f(1, "name", Kind::String), f(2, "value", Kind::String)],
    };
    pub(crate) static SAMPLE: Schema = Schema {
        name: "Sample",
        fields: &[f(1, "value", Kind::Double), f(2, "timestamp", Kind::Varint)],
    };
    static EXEMPLAR: Schema = Schema {
        name: "Exemplar",
        fields: &[
            f(1, "labels", Kind::Message(&LABEL)),
            f(2, "value", Kind::Double),
            f(3, "timestamp", Kind::Varint),
        ],
    };
    pub(crate) static HISTOGRAM: Schema = Schema {
        name: "Histogram",
        fields: &[
            f(1, "count", Kind::Varint),
            f(2, "count", Kind::Double),
            f(3, "sum", Kind::Double),
            f(4, "schema", Kind::Varint),
            f(5, "zero_threshold", Kind::Double),
            f(6, "zero_count", Kind::Varint),
            f(7, "zero_count", Kind::Double),
            f(8, "negative_spans", Kind::Message(&BUCKET_SPAN)),
            f(9, "negative_deltas", Kind::RepeatedVarint),
            f(10, "negative_counts", Kind::RepeatedDouble),
            f(11, "positive_spans", Kind::Message(&BUCKET_SPAN)),
            f(12, "positive_deltas", Kind::RepeatedVarint),
            f(13, "positive_counts", Kind::RepeatedDouble),
            f(14, "reset_hint", Kind::Varint),
            f(15, "timestamp", Kind::Varint),
            f(16, "custom_values", Kind::RepeatedDouble),
        ],
    };
    pub(crate) static BUCKET_SPAN: Schema = Schema {
        name: "BucketSpan",
        fields: &[f(1, "offset", Kind::Varint), f(2, "length", Kind::Varint)],
    };
    static METRIC_METADATA: Schema = Schema {
        name: "MetricMetadata",
        fields: &[
            f(1, "r#type", Kind::Varint),
            f(2, "metric_family_name", Kind::String),
            f(4, "help", Kind::String),
            f(5, "unit", Kind::String),
        ],
    };
}
