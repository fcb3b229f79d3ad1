//! The limits a request is validated against, and the summary of a valid
//! request. Shared by the validation entry points (`decode`), the rules on
//! the bytes (`stream`, `wire`) and the encoders; it imports nothing of the
//! crate.

/// Default [`Limits::max_decoded_bytes`]: 32 MiB.
pub const DEFAULT_MAX_DECODED_BYTES: usize = 32 << 20;

/// A decoded body may need at most this many times its size in Rust structs
/// (string contents not counted), or [`MIN_EXPANSION_ALLOWANCE`] if larger.
///
/// Typical requests need 3 to 6 times. The densest legitimate shapes stay
/// under about 22: series with only a one-letter `__name__` (8.5), and
/// series carrying many empty native histograms that have nothing but a
/// schema and a timestamp (232 bytes of struct for 11 on the wire). Bombs
/// made of empty elements need more: empty series 48 times (60 in 2.0),
/// empty metadata 40, empty histograms over 100. With the default 32 MiB
/// body limit, the structures of an accepted body thus stay under 1 GiB;
/// lower [`Limits::max_decoded_bytes`] for a tighter bound.
pub const MAX_EXPANSION: u64 = 32;

/// Small bodies may always expand to this many bytes.
pub const MIN_EXPANSION_ALLOWANCE: u64 = 1 << 20;

/// Limits applied by `decode::validate`.
///
/// All the count and length limits default to 0, meaning unlimited: the
/// relay must not be stricter than the replicas behind it, and Prometheus'
/// own limits (`label_limit`, `label_name_length_limit`,
/// `label_value_length_limit`) default to unlimited too. Set them to match
/// the replicas' if those are configured stricter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Largest accepted decoded (decompressed) body, in bytes. Default 32 MiB.
    pub max_decoded_bytes: usize,
    /// Largest number of series in one request; 0 = unlimited (default).
    pub max_series: usize,
    /// Largest number of labels of one series; 0 = unlimited (default).
    pub max_labels_per_series: usize,
    /// Longest label name, in bytes; 0 = unlimited (default).
    pub max_label_name_len: usize,
    /// Longest label value, in bytes; 0 = unlimited (default).
    pub max_label_value_len: usize,
    /// Most bytes of label names and values a 2.0 request may expand to
    /// when translated to 1.0 (each series and exemplar spells out the
    /// strings its references name); 0 = unlimited (default). A 2.0 request
    /// is small however often it references one long symbol, its 1.0
    /// translation is not: the relay keeps such a record from ever reaching
    /// a 1.0 replica's shipper (see [`crate::error::DecodeError::TranslationTooLarge`]).
    pub max_translated_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_decoded_bytes: DEFAULT_MAX_DECODED_BYTES,
            max_series: 0,
            max_labels_per_series: 0,
            max_label_name_len: 0,
            max_label_value_len: 0,
            max_translated_bytes: 0,
        }
    }
}

/// What a valid request contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Summary {
    /// Float samples.
    pub samples: u64,
    /// Native histogram samples.
    pub histograms: u64,
    /// Exemplars.
    pub exemplars: u64,
    /// Series (top-level `timeseries` entries).
    pub series: u64,
    /// Smallest timestamp of a float sample or histogram; `i64::MAX` if none.
    pub min_ts: i64,
    /// Largest timestamp of a float sample or histogram; `i64::MIN` if none.
    pub max_ts: i64,
}

impl Default for Summary {
    fn default() -> Self {
        Summary {
            samples: 0,
            histograms: 0,
            exemplars: 0,
            series: 0,
            min_ts: i64::MAX,
            max_ts: i64::MIN,
        }
    }
}

impl Summary {
    /// Takes a sample or histogram timestamp into account.
    pub fn observe_ts(&mut self, ts: i64) {
        self.min_ts = self.min_ts.min(ts);
        self.max_ts = self.max_ts.max(ts);
    }

    /// True when at least one float sample or histogram was seen.
    pub fn has_timestamps(&self) -> bool {
        self.min_ts <= self.max_ts
    }

    /// Adds `other` into `self` (counts summed, time range widened).
    pub fn merge(&mut self, other: &Summary) {
        self.samples += other.samples;
        self.histograms += other.histograms;
        self.exemplars += other.exemplars;
        self.series += other.series;
        self.min_ts = self.min_ts.min(other.min_ts);
        self.max_ts = self.max_ts.max(other.max_ts);
    }
}
