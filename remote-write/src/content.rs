//! The HTTP headers of a remote-write request: which protocol the body is
//! (`Content-Type`) and how it is compressed (`Content-Encoding`).
//!
//! Rules, as Prometheus' receiver applies them:
//!
//! * no `Content-Type` (or an empty one) means 1.0: older senders did not set it;
//! * `application/x-protobuf` without a `proto` parameter means 1.0;
//! * `proto=prometheus.WriteRequest` means 1.0, `proto=io.prometheus.write.v2.Request` 2.0;
//! * the media type and parameter names are case-insensitive, spaces around
//!   `;` and `=` are tolerated, values may be quoted; the `proto` value itself
//!   is a message name and compared exactly; other parameters are ignored;
//! * anything else is refused, and the error names what was received. The
//!   2.0 specification asks for `415 Unsupported Media Type` in that case;
//! * `Content-Encoding` must be absent, empty or `snappy` (any case): the
//!   body is a snappy *block* (not the framed format); gzip, deflate, zstd...
//!   are refused (also 415).

use std::borrow::Cow;
use std::fmt;

/// `Content-Type` of a 1.0 request.
pub const CONTENT_TYPE_V1: &str = "application/x-protobuf;proto=prometheus.WriteRequest";
/// `Content-Type` of a 2.0 request.
pub const CONTENT_TYPE_V2: &str = "application/x-protobuf;proto=io.prometheus.write.v2.Request";
/// The media type shared by both protocols.
pub const MEDIA_TYPE_PROTOBUF: &str = "application/x-protobuf";
/// The `proto` parameter value naming the 1.0 message.
pub const PROTO_V1: &str = "prometheus.WriteRequest";
/// The `proto` parameter value naming the 2.0 message.
pub const PROTO_V2: &str = "io.prometheus.write.v2.Request";
/// The only accepted `Content-Encoding`.
pub const CONTENT_ENCODING_SNAPPY: &str = "snappy";

/// Header a sender sets to tell the protocol version it speaks.
pub const HEADER_VERSION: &str = "X-Prometheus-Remote-Write-Version";
/// [`HEADER_VERSION`] value of 1.0 senders.
pub const VERSION_V1: &str = "0.1.0";
/// [`HEADER_VERSION`] value of 2.0 senders.
pub const VERSION_V2: &str = "2.0.0";
/// 2.0 response header: number of float samples written.
pub const HEADER_SAMPLES_WRITTEN: &str = "X-Prometheus-Remote-Write-Samples-Written";
/// 2.0 response header: number of histogram samples written.
pub const HEADER_HISTOGRAMS_WRITTEN: &str = "X-Prometheus-Remote-Write-Histograms-Written";
/// 2.0 response header: number of exemplars written.
pub const HEADER_EXEMPLARS_WRITTEN: &str = "X-Prometheus-Remote-Write-Exemplars-Written";

/// The protocol of a request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Remote-write 1.0: `prometheus.WriteRequest`.
    V1,
    /// Remote-write 2.0: `io.prometheus.write.v2.Request`.
    V2,
}

impl Protocol {
    /// The canonical `Content-Type` of this protocol.
    pub fn content_type(self) -> &'static str {
        match self {
            Protocol::V1 => CONTENT_TYPE_V1,
            Protocol::V2 => CONTENT_TYPE_V2,
        }
    }

    /// The `X-Prometheus-Remote-Write-Version` value of this protocol.
    pub fn version_header(self) -> &'static str {
        match self {
            Protocol::V1 => VERSION_V1,
            Protocol::V2 => VERSION_V2,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::V1 => "remote-write 1.0",
            Protocol::V2 => "remote-write 2.0",
        })
    }
}

/// A refused `Content-Type` or `Content-Encoding`. The messages are short and
/// suitable as the body of the `415` answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContentTypeError {
    /// The media type is not `application/x-protobuf`.
    #[error("unsupported content type {0:?}: expected application/x-protobuf")]
    UnsupportedMediaType(String),
    /// The `proto` parameter names a message this receiver does not know.
    #[error(
        "unsupported proto {0:?}: expected prometheus.WriteRequest or io.prometheus.write.v2.Request"
    )]
    UnsupportedProto(String),
    /// The header could not be parsed (empty parameter, unbalanced quote,
    /// repeated `proto` parameter...).
    #[error("malformed content type {0:?}")]
    Malformed(String),
    /// The `Content-Encoding` is not snappy.
    #[error("unsupported content encoding {0:?}: expected snappy")]
    UnsupportedEncoding(String),
}

impl ContentTypeError {
    /// A stable, machine-friendly name of the cause (for metrics labels).
    pub fn as_error_code(&self) -> &'static str {
        match self {
            ContentTypeError::UnsupportedMediaType(_) => "unsupported_media_type",
            ContentTypeError::UnsupportedProto(_) => "unsupported_proto",
            ContentTypeError::Malformed(_) => "malformed_content_type",
            ContentTypeError::UnsupportedEncoding(_) => "unsupported_content_encoding",
        }
    }
}

/// Decides the protocol from the `Content-Type` header (`None` when absent).
pub fn parse_content_type(ct: Option<&str>) -> Result<Protocol, ContentTypeError> {
    let raw = match ct {
        None => return Ok(Protocol::V1),
        Some(s) if s.trim().is_empty() => return Ok(Protocol::V1),
        Some(s) => s,
    };
    let malformed = || ContentTypeError::Malformed(raw.to_string());
    let mut parts = split_params(raw).ok_or_else(malformed)?.into_iter();
    let media = parts.next().unwrap_or_default();
    if !media.eq_ignore_ascii_case(MEDIA_TYPE_PROTOBUF) {
        return Err(ContentTypeError::UnsupportedMediaType(raw.to_string()));
    }
    let mut proto: Option<Cow<'_, str>> = None;
    for param in parts {
        if param.is_empty() {
            // "application/x-protobuf;" or ";;": tolerated, as mime parsers do.
            continue;
        }
        let (key, value) = param.split_once('=').ok_or_else(malformed)?;
        let key = key.trim();
        if key.is_empty() {
            return Err(malformed());
        }
        let value = unquote(value.trim()).ok_or_else(malformed)?;
        if key.eq_ignore_ascii_case("proto") {
            if proto.is_some() {
                return Err(malformed());
            }
            proto = Some(value);
        }
    }
    match proto.as_deref() {
        None | Some(PROTO_V1) => Ok(Protocol::V1),
        Some(PROTO_V2) => Ok(Protocol::V2),
        Some(other) => Err(ContentTypeError::UnsupportedProto(other.to_string())),
    }
}

/// Checks the `Content-Encoding` header (`None` when absent).
pub fn check_content_encoding(ce: Option<&str>) -> Result<(), ContentTypeError> {
    match ce.map(str::trim) {
        None | Some("") => Ok(()),
        Some(s) if s.eq_ignore_ascii_case(CONTENT_ENCODING_SNAPPY) => Ok(()),
        Some(s) => Err(ContentTypeError::UnsupportedEncoding(s.to_string())),
    }
}

/// Splits on `;` outside quotes and trims each part, as slices of `s` (this
/// runs at every write request: a `String` per part was 0.6 % of the
/// relay's CPU at 64 senders of 100 series, issue 19). `None` on an
/// unbalanced quote.
fn split_params(s: &str) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if in_quotes {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_quotes = false;
            }
            continue;
        }
        match c {
            ';' => {
                parts.push(s[start..i].trim());
                start = i + 1;
            }
            '"' => in_quotes = true,
            _ => {}
        }
    }
    if in_quotes {
        return None;
    }
    parts.push(s[start..].trim());
    Some(parts)
}

/// Removes the quotes of a quoted-string (with `\` escapes), or checks a
/// token. `None` when malformed or empty.
fn unquote(v: &str) -> Option<Cow<'_, str>> {
    if let Some(inner) = v.strip_prefix('"') {
        let inner = inner.strip_suffix('"')?;
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.push(chars.next()?),
                '"' => return None,
                _ => out.push(c),
            }
        }
        if out.is_empty() {
            return None;
        }
        Some(Cow::Owned(out))
    } else if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == '"') {
        None
    } else {
        Some(Cow::Borrowed(v))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn missing_or_empty_content_type_is_v1() {
        assert_eq!(parse_content_type(None), Ok(Protocol::V1));
        assert_eq!(parse_content_type(Some("")), Ok(Protocol::V1));
        assert_eq!(parse_content_type(Some("   ")), Ok(Protocol::V1));
    }

    #[test]
    fn bare_protobuf_is_v1() {
        assert_eq!(
            parse_content_type(Some("application/x-protobuf")),
            Ok(Protocol::V1)
        );
        assert_eq!(
            parse_content_type(Some("Application/X-Protobuf")),
            Ok(Protocol::V1)
        );
        assert_eq!(
            parse_content_type(Some(" application/x-protobuf ; ")),
            Ok(Protocol::V1)
        );
    }

    #[test]
    fn canonical_constants_parse() {
        assert_eq!(parse_content_type(Some(CONTENT_TYPE_V1)), Ok(Protocol::V1));
        assert_eq!(parse_content_type(Some(CONTENT_TYPE_V2)), Ok(Protocol::V2));
        assert_eq!(Protocol::V1.content_type(), CONTENT_TYPE_V1);
        assert_eq!(Protocol::V2.content_type(), CONTENT_TYPE_V2);
        assert_eq!(Protocol::V2.version_header(), "2.0.0");
    }

    #[test]
    fn tolerant_spacing_case_and_quotes() {
        for ct in [
            "application/x-protobuf; proto=io.prometheus.write.v2.Request",
            "application/x-protobuf ;proto = io.prometheus.write.v2.Request",
            "APPLICATION/X-PROTOBUF; PROTO=\"io.prometheus.write.v2.Request\"",
            "application/x-protobuf; charset=utf-8; proto=io.prometheus.write.v2.Request",
            "application/x-protobuf;proto=\"io.prometheus.write.v2.Request\";",
        ] {
            assert_eq!(parse_content_type(Some(ct)), Ok(Protocol::V2), "{ct}");
        }
        assert_eq!(
            parse_content_type(Some(
                "application/x-protobuf ; proto = \"prometheus.WriteRequest\""
            )),
            Ok(Protocol::V1)
        );
    }

    #[test]
    fn other_media_types_are_refused_with_what_was_received() {
        for ct in [
            "application/json",
            "image/png",
            "text/plain; proto=prometheus.WriteRequest",
        ] {
            let err = parse_content_type(Some(ct)).unwrap_err();
            assert!(
                matches!(err, ContentTypeError::UnsupportedMediaType(_)),
                "{ct}"
            );
            assert!(err.to_string().contains(ct), "{err}");
            assert_eq!(err.as_error_code(), "unsupported_media_type");
        }
    }

    #[test]
    fn unknown_proto_is_refused() {
        let err = parse_content_type(Some(
            "application/x-protobuf;proto=io.prometheus.write.v3.Request",
        ))
        .unwrap_err();
        assert_eq!(
            err,
            ContentTypeError::UnsupportedProto("io.prometheus.write.v3.Request".into())
        );
        assert!(err.to_string().contains("io.prometheus.write.v3.Request"));
        // The message name is compared exactly.
        assert!(
            parse_content_type(Some("application/x-protobuf;proto=Prometheus.writerequest"))
                .is_err()
        );
    }

    #[test]
    fn malformed_parameters_are_refused() {
        for ct in [
            "application/x-protobuf;proto",
            "application/x-protobuf;proto=",
            "application/x-protobuf;=x",
            "application/x-protobuf;proto=\"io.prometheus.write.v2.Request",
            "application/x-protobuf;proto=\"\"",
            "application/x-protobuf;proto=a b",
            "application/x-protobuf;proto=prometheus.WriteRequest;proto=io.prometheus.write.v2.Request",
        ] {
            let err = parse_content_type(Some(ct)).unwrap_err();
            assert!(matches!(err, ContentTypeError::Malformed(_)), "{ct}: {err:?}");
            assert_eq!(err.as_error_code(), "malformed_content_type");
        }
    }

    #[test]
    fn quoted_semicolon_does_not_split() {
        let err = parse_content_type(Some("application/x-protobuf;proto=\"a;b\"")).unwrap_err();
        assert_eq!(err, ContentTypeError::UnsupportedProto("a;b".into()));
        let err = parse_content_type(Some("application/x-protobuf;proto=\"a\\\"b\"")).unwrap_err();
        assert_eq!(err, ContentTypeError::UnsupportedProto("a\"b".into()));
    }

    #[test]
    fn content_encoding() {
        assert_eq!(check_content_encoding(None), Ok(()));
        assert_eq!(check_content_encoding(Some("")), Ok(()));
        assert_eq!(check_content_encoding(Some("snappy")), Ok(()));
        assert_eq!(check_content_encoding(Some(" SNAPPY ")), Ok(()));
        for enc in ["gzip", "deflate", "zstd", "snappy, gzip", "x-snappy-framed"] {
            let err = check_content_encoding(Some(enc)).unwrap_err();
            assert_eq!(err, ContentTypeError::UnsupportedEncoding(enc.into()));
            assert!(err.to_string().contains(enc));
            assert_eq!(err.as_error_code(), "unsupported_content_encoding");
        }
    }

    #[test]
    fn header_names() {
        assert_eq!(
            HEADER_SAMPLES_WRITTEN,
            "X-Prometheus-Remote-Write-Samples-Written"
        );
        assert_eq!(
            HEADER_HISTOGRAMS_WRITTEN,
            "X-Prometheus-Remote-Write-Histograms-Written"
        );
        assert_eq!(
            HEADER_EXEMPLARS_WRITTEN,
            "X-Prometheus-Remote-Write-Exemplars-Written"
        );
        assert_eq!(HEADER_VERSION, "X-Prometheus-Remote-Write-Version");
    }
}
