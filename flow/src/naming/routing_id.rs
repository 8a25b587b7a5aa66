//! [`RoutingId`]: the 16-byte identifier of a connection manager.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// The identifier of a connection manager: 16 bytes, written as 32 lowercase
/// hex characters.
///
/// A manager that can accept connections picks a random id with
/// [`RoutingId::random`]. The all-zero id, [`RoutingId::NULL`], has two uses:
/// it is the id of a dial-only manager (one that never accepts), and in an
/// [`Endpoint`](super::Endpoint) it means "the id is unknown; learn it in the
/// handshake". [`Default`] gives [`RoutingId::NULL`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RoutingId([u8; 16]);

impl RoutingId {
    /// The number of bytes in a routing id.
    pub const LEN: usize = 16;

    /// The all-zero id: a dial-only manager, or "unknown, learn it in the
    /// handshake".
    pub const NULL: RoutingId = RoutingId([0; 16]);

    /// A fresh random id from the thread-local cryptographic generator.
    ///
    /// Never returns [`RoutingId::NULL`].
    pub fn random() -> RoutingId {
        loop {
            let id = RoutingId(rand::random::<[u8; 16]>());
            if !id.is_null() {
                return id;
            }
        }
    }

    /// Whether this is [`RoutingId::NULL`].
    pub fn is_null(&self) -> bool {
        *self == RoutingId::NULL
    }

    /// The id made of exactly these bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> RoutingId {
        RoutingId(bytes)
    }

    /// The id's bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl From<[u8; 16]> for RoutingId {
    fn from(bytes: [u8; 16]) -> Self {
        RoutingId(bytes)
    }
}

impl TryFrom<&[u8]> for RoutingId {
    type Error = Error;

    /// The id made of `bytes`, which must be exactly 16 bytes long
    /// ([`ErrorKind::BadArg`](crate::ErrorKind::BadArg) otherwise).
    fn try_from(bytes: &[u8]) -> Result<Self> {
        let array: [u8; 16] = bytes.try_into().map_err(|_| {
            Error::bad_arg(format!(
                "routing id has {} bytes, want {}",
                bytes.len(),
                RoutingId::LEN
            ))
        })?;
        Ok(RoutingId(array))
    }
}

impl fmt::Display for RoutingId {
    /// 32 lowercase hex characters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for RoutingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoutingId({self})")
    }
}

impl FromStr for RoutingId {
    type Err = Error;

    /// Parses exactly 32 hex characters, in either case.
    ///
    /// Anything else is an [`ErrorKind::BadArg`](crate::ErrorKind::BadArg)
    /// error saying whether the length is wrong or which character (by 0-based
    /// character index) is not a hex digit.
    fn from_str(s: &str) -> Result<Self> {
        let count = s.chars().count();
        if count != 2 * RoutingId::LEN {
            return Err(Error::bad_arg(format!(
                "routing id {s:?} has {count} characters, want {}",
                2 * RoutingId::LEN
            )));
        }
        let mut bytes = [0u8; 16];
        let mut high = 0u8;
        for (index, c) in s.chars().enumerate() {
            let Some(digit) = c.to_digit(16) else {
                return Err(Error::bad_arg(format!(
                    "routing id {s:?} has a bad character {c:?} at position {index}, want a hex digit"
                )));
            };
            // `to_digit(16)` is always below 16, so this cast keeps every bit.
            let digit = digit as u8;
            if index % 2 == 0 {
                high = digit;
            } else {
                bytes[index / 2] = (high << 4) | digit;
            }
        }
        Ok(RoutingId(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use proptest::prelude::*;

    #[test]
    fn null_is_default_and_all_zero() {
        assert_eq!(RoutingId::default(), RoutingId::NULL);
        assert!(RoutingId::NULL.is_null());
        assert_eq!(RoutingId::NULL.as_bytes(), &[0u8; 16]);
        assert_eq!(
            RoutingId::NULL.to_string(),
            "00000000000000000000000000000000"
        );
    }

    #[test]
    fn random_ids_are_not_null_and_differ() {
        let a = RoutingId::random();
        let b = RoutingId::random();
        assert!(!a.is_null());
        assert!(!b.is_null());
        assert_ne!(a, b);
    }

    #[test]
    fn display_is_lowercase_hex() {
        let id = RoutingId::from_bytes([
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54,
            0x32, 0x10,
        ]);
        assert_eq!(id.to_string(), "0123456789abcdeffedcba9876543210");
        assert_eq!(
            format!("{id:?}"),
            "RoutingId(0123456789abcdeffedcba9876543210)"
        );
    }

    #[test]
    fn parse_accepts_either_case() -> Result<()> {
        let lower: RoutingId = "0123456789abcdeffedcba9876543210".parse()?;
        let upper: RoutingId = "0123456789ABCDEFFEDCBA9876543210".parse()?;
        assert_eq!(lower, upper);
        assert_eq!(lower.as_bytes()[7], 0xef);
        assert_eq!(lower.to_string(), "0123456789abcdeffedcba9876543210");
        Ok(())
    }

    #[test]
    fn parse_rejects_wrong_length() {
        for input in [
            "",
            "abc",
            "0123456789abcdeffedcba987654321",
            "0".repeat(33).as_str(),
        ] {
            let err = input.parse::<RoutingId>().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::BadArg);
            assert!(err.message().contains("characters, want 32"), "{err}");
            assert!(err.message().contains(&format!("{input:?}")), "{err}");
        }
    }

    #[test]
    fn parse_rejects_bad_character() {
        let err = "0123456789abcdefgedcba9876543210"
            .parse::<RoutingId>()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadArg);
        assert!(err.message().contains("'g' at position 16"), "{err}");

        // A multi-byte character counts as one character.
        let err = "é123456789abcdeffedcba9876543210"
            .parse::<RoutingId>()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadArg);
        assert!(err.message().contains("'é' at position 0"), "{err}");

        let err = "+123456789abcdeffedcba9876543210"
            .parse::<RoutingId>()
            .unwrap_err();
        assert!(err.message().contains("'+' at position 0"), "{err}");
    }

    #[test]
    fn try_from_slice_checks_length() -> Result<()> {
        let id = RoutingId::try_from(&[7u8; 16][..])?;
        assert_eq!(id, RoutingId::from([7u8; 16]));
        let err = RoutingId::try_from(&[7u8; 15][..]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadArg);
        assert!(err.message().contains("15 bytes"), "{err}");
        Ok(())
    }

    proptest! {
        #[test]
        fn hex_round_trips(bytes in any::<[u8; 16]>()) {
            let id = RoutingId::from_bytes(bytes);
            let text = id.to_string();
            prop_assert_eq!(text.len(), 32);
            prop_assert_eq!(&text, &text.to_ascii_lowercase());
            prop_assert_eq!(text.parse::<RoutingId>().ok(), Some(id));
            prop_assert_eq!(text.to_ascii_uppercase().parse::<RoutingId>().ok(), Some(id));
        }

        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = s.parse::<RoutingId>();
        }
    }
}
