//! Caveats: conditions a certificate puts on the blessing it grants.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::Rng;

use super::blessings::ValidationContext;
use super::keys::PublicKey;
use super::pattern::BlessingPattern;
use crate::{Error, Result};

/// Wire type of [`Caveat::Expiry`].
pub const CAVEAT_EXPIRY: u64 = 1;
/// Wire type of [`Caveat::PeerBlessings`].
pub const CAVEAT_PEER_BLESSINGS: u64 = 2;
/// Wire type of [`Caveat::ThirdParty`].
pub const CAVEAT_THIRD_PARTY: u64 = 3;

/// Length in bytes of a [`CaveatId`].
pub const CAVEAT_ID_LEN: usize = 16;

/// The unique, random identifier of a [`ThirdPartyCaveat`]; a
/// [`Discharge`](super::Discharge) names the caveat it discharges by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CaveatId(pub [u8; CAVEAT_ID_LEN]);

impl CaveatId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut id = [0u8; CAVEAT_ID_LEN];
        rand::rng().fill_bytes(&mut id);
        CaveatId(id)
    }
}

impl fmt::Display for CaveatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for CaveatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaveatId({self})")
    }
}

impl FromStr for CaveatId {
    type Err = Error;

    /// Parses 32 hex digits.
    fn from_str(s: &str) -> Result<Self> {
        let mut id = [0u8; CAVEAT_ID_LEN];
        hex::decode_to_slice(s, &mut id)
            .map_err(|e| Error::bad_arg(format!("caveat id {s:?} is not 32 hex digits: {e}")))?;
        Ok(CaveatId(id))
    }
}

/// A caveat that holds only when the holder also presents a
/// [`Discharge`](super::Discharge) for it, minted by the principal whose key is
/// `discharger_key` (reachable at `discharger_location`, for whoever fetches
/// discharges).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ThirdPartyCaveat {
    /// Unique random id, named by discharges.
    pub id: CaveatId,
    /// The key whose signature a discharge must carry.
    pub discharger_key: PublicKey,
    /// Where to ask for a discharge (free-form, typically an object name).
    pub discharger_location: String,
}

impl ThirdPartyCaveat {
    /// A caveat with a fresh random id.
    pub fn new(discharger_key: PublicKey, discharger_location: impl Into<String>) -> Self {
        ThirdPartyCaveat {
            id: CaveatId::random(),
            discharger_key,
            discharger_location: discharger_location.into(),
        }
    }
}

/// A condition on a certificate. A blessing name is valid only while every
/// caveat of every certificate of its chain holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Caveat {
    /// Holds before the given time. Encoded as whole seconds since the Unix
    /// epoch (earlier times as 0), so sub-second precision is lost on the
    /// wire; [`Caveat::expiry`] rounds down up front.
    Expiry(SystemTime),
    /// Holds when the verifier (the party the holder presents the blessing
    /// to) has a blessing name matching one of the patterns. An empty list
    /// never holds.
    PeerBlessings(Vec<BlessingPattern>),
    /// Holds when a valid, unexpired discharge for it is presented.
    ThirdParty(ThirdPartyCaveat),
    /// A caveat type this version does not know (from a newer peer). It
    /// decodes and re-encodes unchanged but never holds.
    ///
    /// `kind` should not be one of the known types: such a value encodes as
    /// that type with `bytes` as its payload.
    Unknown {
        /// The wire type.
        kind: u64,
        /// The undecoded payload.
        bytes: Bytes,
    },
}

impl Caveat {
    /// An expiry caveat at `at`, rounded down to a whole second (the wire
    /// precision).
    pub fn expiry(at: SystemTime) -> Self {
        Caveat::Expiry(round_to_secs(at))
    }

    /// An expiry caveat `after` from now.
    pub fn expires_in(after: Duration) -> Self {
        Caveat::expiry(SystemTime::now() + after)
    }

    /// A caveat restricting the blessing to verifiers matching `patterns`.
    pub fn peer_blessings(patterns: impl IntoIterator<Item = BlessingPattern>) -> Self {
        Caveat::PeerBlessings(patterns.into_iter().collect())
    }

    /// A third-party caveat with a fresh id, discharged by `discharger_key`.
    pub fn third_party(discharger_key: PublicKey, location: impl Into<String>) -> Self {
        Caveat::ThirdParty(ThirdPartyCaveat::new(discharger_key, location))
    }

    /// The wire type of this caveat.
    pub fn kind(&self) -> u64 {
        match self {
            Caveat::Expiry(_) => CAVEAT_EXPIRY,
            Caveat::PeerBlessings(_) => CAVEAT_PEER_BLESSINGS,
            Caveat::ThirdParty(_) => CAVEAT_THIRD_PARTY,
            Caveat::Unknown { kind, .. } => *kind,
        }
    }

    /// Checks whether the caveat holds in `ctx`.
    ///
    /// Fails with [`ErrorKind::Auth`](crate::ErrorKind::Auth) and a
    /// human-readable reason, such as `expired at 2026-01-01T00:00:00Z` or
    /// `no discharge for third-party caveat ...`.
    pub fn validate(&self, ctx: &ValidationContext<'_>) -> Result<()> {
        match self {
            Caveat::Expiry(at) => {
                if ctx.now < *at {
                    Ok(())
                } else {
                    Err(Error::auth(format!("expired at {}", format_time(*at))))
                }
            }
            Caveat::PeerBlessings(patterns) => {
                if patterns.iter().any(|p| p.matched_by(ctx.peer_names)) {
                    Ok(())
                } else {
                    Err(Error::auth(format!(
                        "peer names [{}] match none of the caveat patterns [{}]",
                        ctx.peer_names.join(", "),
                        patterns
                            .iter()
                            .map(|p| p.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            }
            Caveat::ThirdParty(tp) => {
                let Some(discharge) = ctx.discharges.get(&tp.id) else {
                    return Err(Error::auth(format!(
                        "no discharge for third-party caveat {} (discharger {:?})",
                        tp.id, tp.discharger_location
                    )));
                };
                discharge
                    .validate_for(tp, ctx.now)
                    .map_err(|e| Error::auth(e.message().to_owned()))
            }
            Caveat::Unknown { kind, .. } => Err(Error::auth(format!("unknown caveat type {kind}"))),
        }
    }
}

impl fmt::Display for Caveat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caveat::Expiry(at) => write!(f, "expires at {}", format_time(*at)),
            Caveat::PeerBlessings(patterns) => {
                f.write_str("peer matches one of [")?;
                for (i, p) in patterns.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(p.as_str())?;
                }
                f.write_str("]")
            }
            Caveat::ThirdParty(tp) => write!(
                f,
                "third-party caveat {} discharged by {} at {:?}",
                tp.id, tp.discharger_key, tp.discharger_location
            ),
            Caveat::Unknown { kind, bytes } => {
                write!(f, "unknown caveat type {kind} ({} bytes)", bytes.len())
            }
        }
    }
}

/// `at` rounded down to a whole second since the epoch (the epoch itself for
/// earlier times).
pub(crate) fn round_to_secs(at: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix_secs(at))
}

/// Whole seconds since the Unix epoch; 0 for earlier times.
pub(crate) fn unix_secs(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The time `secs` seconds after the epoch, if the platform can represent it.
pub(crate) fn from_unix_secs(secs: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Formats a time as UTC `YYYY-MM-DDTHH:MM:SSZ` (whole seconds).
pub(crate) fn format_time(at: SystemTime) -> String {
    let Ok(since) = at.duration_since(UNIX_EPOCH) else {
        return "before 1970-01-01T00:00:00Z".to_owned();
    };
    let secs = since.as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The proleptic Gregorian (year, month, day) of `days` days after
/// 1970-01-01, counting in 400-year eras of 146097 days that start on
/// March 1st (so the leap day is the last day of an era-year).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the origin from 1970-01-01 to 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times() {
        assert_eq!(format_time(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // leap day 2000
        assert_eq!(format_time(t), "2000-02-29T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(format_time(t), "2026-12-31T23:59:59Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        assert_eq!(format_time(t), "2024-02-29T12:34:56Z");
        assert!(format_time(UNIX_EPOCH - Duration::from_secs(1)).starts_with("before"));
    }

    #[test]
    fn expiry_rounds_down() {
        let t = UNIX_EPOCH + Duration::from_millis(10_999);
        assert_eq!(
            Caveat::expiry(t),
            Caveat::Expiry(UNIX_EPOCH + Duration::from_secs(10))
        );
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(5)), 0);
        assert_eq!(from_unix_secs(7), Some(UNIX_EPOCH + Duration::from_secs(7)));
        assert_eq!(from_unix_secs(u64::MAX), None);
    }

    #[test]
    fn caveat_ids_are_random_and_parse() {
        let a = CaveatId::random();
        assert_ne!(a, CaveatId::random());
        assert_eq!(a.to_string().parse::<CaveatId>().unwrap(), a);
        assert!("abc".parse::<CaveatId>().is_err());
    }
}
