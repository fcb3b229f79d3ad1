//! Why a request body was refused: the one error of validation and
//! decoding, shared by every module of the crate. It imports nothing of the
//! crate, so that every layer can return it.

/// Why a request body was refused. Each message is short and suitable as
/// the body of the HTTP answer: 413 when [`DecodeError::is_too_large`], 400
/// otherwise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The decoded body is (or declares to be) larger than the limit.
    #[error("decoded body of {declared} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Decoded length declared by the snappy header, or actual length.
        declared: u64,
        /// `Limits::max_decoded_bytes`.
        limit: usize,
    },
    /// The protobuf would expand into far more memory than its size
    /// justifies (a bomb of empty elements).
    #[error("request would take about {estimated} bytes in memory, more than the {limit} allowed for its size")]
    ExpandsTooMuch {
        /// Estimated bytes of decoded structures.
        estimated: u64,
        /// Allowed bytes for this body.
        limit: u64,
    },
    /// A 2.0 request whose 1.0 translation would spell out more label bytes
    /// than `Limits::max_translated_bytes`. Checked once the rest of the
    /// request is valid.
    #[error("its remote-write 1.0 translation would hold {bytes} bytes of label names and values, more than the {limit} allowed")]
    TranslationTooLarge {
        /// Label bytes of the translation.
        bytes: u64,
        /// `Limits::max_translated_bytes`.
        limit: usize,
    },
    /// More series than `Limits::max_series`.
    #[error("{count} series exceed the limit of {limit} per request")]
    TooManySeries {
        /// Series in the request.
        count: u64,
        /// `Limits::max_series`.
        limit: usize,
    },
    /// The body is not a valid snappy block.
    #[error("invalid snappy block: {0}")]
    Snappy(String),
    /// The decoded body is not a valid protobuf message of the declared type.
    #[error("invalid protobuf: {0}")]
    Protobuf(String),
    /// 2.0: `symbols` is non-empty and does not start with `""`.
    #[error("symbols[0] must be the empty string")]
    FirstSymbolNotEmpty,
    /// 2.0: a `labels_refs` list has an odd length.
    #[error("series {series}: {field} has odd length {len}")]
    OddLabelRefs {
        /// Series index.
        series: usize,
        /// `labels_refs` or `exemplar labels_refs`.
        field: &'static str,
        /// Length of the list.
        len: usize,
    },
    /// 2.0: a reference points outside `symbols`.
    #[error("series {series}: {field} reference {reference} out of range ({symbols} symbols)")]
    SymbolRefOutOfRange {
        /// Series index.
        series: usize,
        /// `labels_refs`, `exemplar labels_refs`, `help_ref` or `unit_ref`.
        field: &'static str,
        /// The reference.
        reference: u32,
        /// Number of symbols in the request.
        symbols: usize,
    },
    /// A series has no labels at all.
    #[error("series {series}: no labels")]
    NoLabels {
        /// Series index.
        series: usize,
    },
    /// A series has no `__name__` label, or an empty one.
    #[error("series {series}: missing __name__ label")]
    MissingMetricName {
        /// Series index.
        series: usize,
    },
    /// A label has an empty name.
    #[error("series {series}: empty label name")]
    EmptyLabelName {
        /// Series index.
        series: usize,
    },
    /// A label name appears twice in one series.
    #[error("series {series}: duplicate label name {name:?}")]
    DuplicateLabelName {
        /// Series index.
        series: usize,
        /// The repeated name.
        name: String,
    },
    /// A series has more labels than `Limits::max_labels_per_series`.
    #[error("series {series}: {count} labels exceed the limit of {limit}")]
    TooManyLabels {
        /// Series index.
        series: usize,
        /// Labels of the series.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A label name is longer than `Limits::max_label_name_len`.
    #[error("series {series}: label name of {len} bytes exceeds the limit of {limit}")]
    LabelNameTooLong {
        /// Series index.
        series: usize,
        /// Length of the name.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A label value is longer than `Limits::max_label_value_len`.
    #[error("series {series}: value of label {name:?} is {len} bytes, over the limit of {limit}")]
    LabelValueTooLong {
        /// Series index.
        series: usize,
        /// The label's name.
        name: String,
        /// Length of the value.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Integer native histogram whose count differs from the zero count
    /// plus its bucket counts.
    #[error("series {series}: histogram {histogram}: count {count} does not match {buckets} in the zero bucket and buckets")]
    HistogramCountMismatch {
        /// Series index.
        series: usize,
        /// Histogram index in the series.
        histogram: usize,
        /// The declared count.
        count: u64,
        /// Zero count plus bucket counts.
        buckets: u128,
    },
    /// Integer native histogram with a NaN sum whose count is smaller than
    /// the zero count plus its bucket counts.
    #[error("series {series}: histogram {histogram}: count {count} is smaller than {buckets} in the zero bucket and buckets")]
    HistogramCountNotBigEnough {
        /// Series index.
        series: usize,
        /// Histogram index in the series.
        histogram: usize,
        /// The declared count.
        count: u64,
        /// Zero count plus bucket counts.
        buckets: u128,
    },
    /// A native histogram bucket count (decoded from deltas, or absolute for
    /// float histograms) is negative.
    #[error("series {series}: histogram {histogram}: negative count in {side} bucket {bucket}")]
    HistogramNegativeBucketCount {
        /// Series index.
        series: usize,
        /// Histogram index in the series.
        histogram: usize,
        /// `positive` or `negative`.
        side: &'static str,
        /// Bucket index.
        bucket: usize,
    },
    /// A native histogram's spans describe a different number of buckets
    /// than given.
    #[error(
        "series {series}: histogram {histogram}: {side} spans need {spans} buckets, have {buckets}"
    )]
    HistogramSpansMismatch {
        /// Series index.
        series: usize,
        /// Histogram index in the series.
        histogram: usize,
        /// `positive` or `negative`.
        side: &'static str,
        /// Buckets described by the spans.
        spans: u64,
        /// Buckets given.
        buckets: usize,
    },
    /// A native histogram span other than the first has a negative offset.
    #[error(
        "series {series}: histogram {histogram}: {side} span {span} has negative offset {offset}"
    )]
    HistogramNegativeSpanOffset {
        /// Series index.
        series: usize,
        /// Histogram index in the series.
        histogram: usize,
        /// `positive` or `negative`.
        side: &'static str,
        /// Span index.
        span: usize,
        /// The offset.
        offset: i32,
    },
}

impl DecodeError {
    /// A stable, machine-friendly name of the cause (for metric labels and
    /// logs).
    pub fn as_error_code(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::ExpandsTooMuch { .. } => "expands_too_much",
            DecodeError::TooManySeries { .. } => "too_many_series",
            DecodeError::TranslationTooLarge { .. } => "translation_too_large",
            DecodeError::Snappy(_) => "snappy",
            DecodeError::Protobuf(_) => "protobuf",
            DecodeError::FirstSymbolNotEmpty => "first_symbol_not_empty",
            DecodeError::OddLabelRefs { .. } => "odd_labels_refs",
            DecodeError::SymbolRefOutOfRange { .. } => "symbol_ref_out_of_range",
            DecodeError::NoLabels { .. } => "no_labels",
            DecodeError::MissingMetricName { .. } => "missing_metric_name",
            DecodeError::EmptyLabelName { .. } => "empty_label_name",
            DecodeError::DuplicateLabelName { .. } => "duplicate_label_name",
            DecodeError::TooManyLabels { .. } => "too_many_labels",
            DecodeError::LabelNameTooLong { .. } => "label_name_too_long",
            DecodeError::LabelValueTooLong { .. } => "label_value_too_long",
            DecodeError::HistogramCountMismatch { .. } => "histogram_count_mismatch",
            DecodeError::HistogramCountNotBigEnough { .. } => "histogram_count_not_big_enough",
            DecodeError::HistogramNegativeBucketCount { .. } => "histogram_negative_bucket_count",
            DecodeError::HistogramSpansMismatch { .. } => "histogram_spans_mismatch",
            DecodeError::HistogramNegativeSpanOffset { .. } => "histogram_negative_span_offset",
        }
    }

    /// True for the causes answered with 413 (the request as a whole is too
    /// big); all others are 400.
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            DecodeError::TooLarge { .. }
                | DecodeError::ExpandsTooMuch { .. }
                | DecodeError::TooManySeries { .. }
                | DecodeError::TranslationTooLarge { .. }
        )
    }
}
