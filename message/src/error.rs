//! Decode errors: what was wrong, in which message, in which field.

use std::fmt;

/// What was wrong with the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeErrorKind {
    /// The input ended inside the field.
    Truncated,
    /// A varint declared more than 9 bytes.
    VarintTooLong,
    /// A varint used more bytes than its value needs.
    NonMinimalVarint,
    /// A length prefix pointed past the end of the input.
    LengthPastEnd {
        /// The length the field declared.
        declared: u64,
        /// The bytes that were left.
        available: usize,
    },
    /// A message type byte this version does not know.
    UnknownType(u8),
    /// A string field was not UTF-8.
    InvalidUtf8,
    /// A count or value was outside the range the field allows.
    OutOfRange(u64),
    /// A field that may appear once appeared twice.
    Duplicate,
    /// Bytes were left over after a value that must use the whole input.
    TrailingBytes(usize),
    /// A frame held no message.
    EmptyFrame,
    /// The bytes were well formed but made no sense (explained by the field).
    Invalid,
}

impl fmt::Display for DecodeErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeErrorKind::Truncated => f.write_str("truncated"),
            DecodeErrorKind::VarintTooLong => f.write_str("varint longer than 9 bytes"),
            DecodeErrorKind::NonMinimalVarint => f.write_str("varint not minimally encoded"),
            DecodeErrorKind::LengthPastEnd {
                declared,
                available,
            } => write!(
                f,
                "length {declared} runs past the end ({available} bytes left)"
            ),
            DecodeErrorKind::UnknownType(t) => write!(f, "unknown type {t:#04x}"),
            DecodeErrorKind::InvalidUtf8 => f.write_str("not valid UTF-8"),
            DecodeErrorKind::OutOfRange(v) => write!(f, "value {v} out of range"),
            DecodeErrorKind::Duplicate => f.write_str("appears more than once"),
            DecodeErrorKind::TrailingBytes(n) => write!(f, "{n} trailing bytes"),
            DecodeErrorKind::EmptyFrame => f.write_str("frame holds no message"),
            DecodeErrorKind::Invalid => f.write_str("invalid"),
        }
    }
}

/// A decode failure naming the message (or structure) and field it hit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("decoding {message}.{field}: {kind}")]
pub struct DecodeError {
    /// The message or structure being decoded, e.g. `"OpenFlow"`.
    pub message: &'static str,
    /// The field being decoded, e.g. `"payload"`.
    pub field: &'static str,
    /// What was wrong.
    pub kind: DecodeErrorKind,
}

impl DecodeError {
    /// A new decode error.
    pub fn new(message: &'static str, field: &'static str, kind: DecodeErrorKind) -> Self {
        DecodeError {
            message,
            field,
            kind,
        }
    }
}
