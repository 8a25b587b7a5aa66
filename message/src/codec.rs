//! The primitive encoding shared by every wire structure: prefix varints,
//! length-prefixed bytes and strings, and a bounds-checked [`Reader`].
//!
//! A varint is one byte for values below 0x80. Larger values are a prefix byte
//! `0x100 - n` (0xff for one byte, ..., 0xf8 for eight) followed by `n`
//! big-endian bytes, so a varint is never longer than 9 bytes. Prefix bytes
//! 0x80..=0xf7 would declare more and are rejected, as are encodings longer
//! than the value needs, so every value has exactly one encoding.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, DecodeErrorKind};

/// Largest number of bytes a varint takes.
pub const MAX_VARINT_LEN: usize = 9;

/// How many bytes `value` takes as a varint.
#[inline]
pub fn varint_len(value: u64) -> usize {
    if value < 0x80 {
        1
    } else {
        1 + (8 - (value.leading_zeros() as usize) / 8)
    }
}

/// Appends `value` as a varint.
#[inline]
pub fn put_varint(buf: &mut impl BufMut, value: u64) {
    if value < 0x80 {
        buf.put_u8(value as u8);
    } else {
        // 1..=8 significant bytes, as `value` is at least 0x80.
        let n = 8 - (value.leading_zeros() as usize) / 8;
        buf.put_u8((0x100 - n) as u8);
        let be = value.to_be_bytes();
        buf.put_slice(be.get(8 - n..).unwrap_or(&be));
    }
}

/// Appends `bytes` prefixed by its length.
#[inline]
pub fn put_bytes(buf: &mut BytesMut, bytes: &[u8]) {
    put_varint(buf, bytes.len() as u64);
    buf.put_slice(bytes);
}

/// Appends `s` prefixed by its length in bytes.
#[inline]
pub fn put_str(buf: &mut BytesMut, s: &str) {
    put_bytes(buf, s.as_bytes());
}

/// How many bytes [`put_bytes`] appends for `len` bytes of content.
#[inline]
pub fn bytes_len(len: usize) -> usize {
    varint_len(len as u64) + len
}

/// A cursor over a [`Bytes`] buffer that checks every read.
///
/// Every error names the structure being decoded (set with [`Reader::new`] or
/// [`Reader::set_context`]) and the field passed to the read.
#[derive(Debug, Clone)]
pub struct Reader {
    buf: Bytes,
    pos: usize,
    context: &'static str,
}

impl Reader {
    /// A reader over all of `buf`, reporting errors against `context`.
    pub fn new(buf: Bytes, context: &'static str) -> Self {
        Reader {
            buf,
            pos: 0,
            context,
        }
    }

    /// Changes the structure named in later errors.
    pub fn set_context(&mut self, context: &'static str) {
        self.context = context;
    }

    /// The structure currently named in errors.
    pub fn context(&self) -> &'static str {
        self.context
    }

    /// Bytes read so far.
    #[inline]
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not yet read.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Whether everything has been read.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// An error at the current context and `field`.
    pub fn error(&self, field: &'static str, kind: DecodeErrorKind) -> DecodeError {
        DecodeError::new(self.context, field, kind)
    }

    /// Fails with [`DecodeErrorKind::TrailingBytes`] unless all input was read.
    pub fn finish(&self, field: &'static str) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(self.error(field, DecodeErrorKind::TrailingBytes(n))),
        }
    }

    /// Reads one byte.
    #[inline]
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        match self.buf.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                Ok(b)
            }
            None => Err(self.error(field, DecodeErrorKind::Truncated)),
        }
    }

    /// Reads a varint.
    #[inline]
    pub fn varint(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let first = self.u8(field)?;
        if first < 0x80 {
            return Ok(u64::from(first));
        }
        if first < 0xf8 {
            return Err(self.error(field, DecodeErrorKind::VarintTooLong));
        }
        let n = 0x100 - usize::from(first);
        let Some(raw) = self.buf.get(self.pos..self.pos + n) else {
            return Err(self.error(field, DecodeErrorKind::Truncated));
        };
        // `n` is 1..=8 (`first` is 0xf8..=0xff), so `raw` fits.
        let mut be = [0u8; 8];
        let Some(low) = be.get_mut(8 - n..) else {
            return Err(self.error(field, DecodeErrorKind::VarintTooLong));
        };
        low.copy_from_slice(raw);
        let value = u64::from_be_bytes(be);
        if varint_len(value) != 1 + n {
            return Err(self.error(field, DecodeErrorKind::NonMinimalVarint));
        }
        self.pos += n;
        Ok(value)
    }

    /// Reads a varint that must be at most `max`.
    #[inline]
    pub fn varint_max(&mut self, field: &'static str, max: u64) -> Result<u64, DecodeError> {
        let value = self.varint(field)?;
        if value > max {
            return Err(self.error(field, DecodeErrorKind::OutOfRange(value)));
        }
        Ok(value)
    }

    /// Reads a varint that must fit in a `u32`.
    #[inline]
    pub fn varint_u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(self.varint_max(field, u64::from(u32::MAX))? as u32)
    }

    /// Reads a count of items each at least `min_item_len` bytes long,
    /// rejecting counts the remaining input could not hold. Use the result to
    /// size allocations: it is bounded by the input.
    #[inline]
    pub fn count(
        &mut self,
        field: &'static str,
        min_item_len: usize,
    ) -> Result<usize, DecodeError> {
        let count = self.varint(field)?;
        let fits = (self.remaining() / min_item_len.max(1)) as u64;
        if count > fits {
            return Err(self.error(field, DecodeErrorKind::OutOfRange(count)));
        }
        Ok(count as usize)
    }

    /// Reads exactly `len` bytes as a slice of the input (no copy).
    #[inline]
    pub fn fixed(&mut self, field: &'static str, len: usize) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(self.error(field, DecodeErrorKind::Truncated));
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    /// Reads exactly `N` bytes into an array.
    #[inline]
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let Some(raw) = self.buf.get(self.pos..self.pos + N) else {
            return Err(self.error(field, DecodeErrorKind::Truncated));
        };
        let mut out = [0u8; N];
        out.copy_from_slice(raw);
        self.pos += N;
        Ok(out)
    }

    /// Reads length-prefixed bytes as a slice of the input (no copy).
    #[inline]
    pub fn bytes(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let declared = self.varint(field)?;
        let available = self.remaining();
        if declared > available as u64 {
            return Err(self.error(
                field,
                DecodeErrorKind::LengthPastEnd {
                    declared,
                    available,
                },
            ));
        }
        self.fixed(field, declared as usize)
    }

    /// Reads a length-prefixed UTF-8 string.
    pub fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let raw = self.bytes(field)?;
        match std::str::from_utf8(&raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(self.error(field, DecodeErrorKind::InvalidUtf8)),
        }
    }

    /// The rest of the input, consumed.
    pub fn rest(&mut self) -> Bytes {
        let out = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(value: u64) -> Bytes {
        let mut buf = BytesMut::new();
        put_varint(&mut buf, value);
        buf.freeze()
    }

    #[test]
    fn varint_boundaries() {
        for (value, len) in [
            (0u64, 1usize),
            (0x7f, 1),
            (0x80, 2),
            (0xff, 2),
            (0x100, 3),
            (0xffff_ffff, 5),
            (u64::MAX, 9),
        ] {
            let enc = encode(value);
            assert_eq!(enc.len(), len, "length of {value:#x}");
            assert_eq!(varint_len(value), len);
            let mut r = Reader::new(enc, "test");
            assert_eq!(r.varint("v").unwrap(), value);
            assert!(r.is_empty());
        }
    }

    #[test]
    fn varint_rejects_bad_prefix_and_non_minimal() {
        let mut r = Reader::new(Bytes::from_static(&[0xf7, 0, 0, 0, 0, 0, 0, 0, 0, 1]), "T");
        let err = r.varint("f").unwrap_err();
        assert_eq!(err.kind, DecodeErrorKind::VarintTooLong);
        assert_eq!((err.message, err.field), ("T", "f"));

        let mut r = Reader::new(Bytes::from_static(&[0xff, 0x05]), "T");
        assert_eq!(
            r.varint("f").unwrap_err().kind,
            DecodeErrorKind::NonMinimalVarint
        );
        let mut r = Reader::new(Bytes::from_static(&[0xfe, 0x00, 0xff]), "T");
        assert_eq!(
            r.varint("f").unwrap_err().kind,
            DecodeErrorKind::NonMinimalVarint
        );
        let mut r = Reader::new(Bytes::from_static(&[0xfd, 0x01]), "T");
        assert_eq!(r.varint("f").unwrap_err().kind, DecodeErrorKind::Truncated);
    }

    #[test]
    fn length_past_end_is_reported() {
        let mut r = Reader::new(Bytes::from_static(&[5, 1, 2]), "Data");
        let err = r.bytes("payload").unwrap_err();
        assert_eq!(
            err.kind,
            DecodeErrorKind::LengthPastEnd {
                declared: 5,
                available: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "decoding Data.payload: length 5 runs past the end (2 bytes left)"
        );
    }

    #[test]
    fn count_is_bounded_by_input() {
        let mut r = Reader::new(
            Bytes::from_static(&[0xfc, 0xff, 0xff, 0xff, 0xff, 1, 1]),
            "R",
        );
        assert!(matches!(
            r.count("n", 2).unwrap_err().kind,
            DecodeErrorKind::OutOfRange(_)
        ));
    }

    proptest! {
        #[test]
        fn varint_round_trips(value: u64) {
            let enc = encode(value);
            prop_assert_eq!(enc.len(), varint_len(value));
            let mut r = Reader::new(enc, "test");
            prop_assert_eq!(r.varint("v").unwrap(), value);
            prop_assert!(r.is_empty());
        }

        #[test]
        fn reader_never_panics(bytes: Vec<u8>) {
            let mut r = Reader::new(Bytes::from(bytes), "fuzz");
            while !r.is_empty() {
                let _ = r.varint("a");
                let _ = r.bytes("b");
                let _ = r.string("c");
                let _ = r.count("d", 3);
                if r.u8("e").is_err() { break; }
            }
        }
    }
}
