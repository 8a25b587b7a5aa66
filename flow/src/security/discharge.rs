//! Discharges: proofs, minted by a third party, that a third-party caveat
//! holds.

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::BytesMut;

use super::caveat::{CaveatId, ThirdPartyCaveat, format_time};
use super::encoding;
use super::keys::{PublicKey, Signature};
use crate::{Error, Result};

/// Domain separation prefix of the message a discharge signature covers.
pub const DISCHARGE_SIGNING_DOMAIN: &[u8] = b"flow.discharge.v1\0";

/// A discharger's signed statement that the third-party caveat `caveat_id`
/// holds (until `expiry`, if set).
///
/// The signature covers [`DISCHARGE_SIGNING_DOMAIN`] followed by the
/// canonical encoding of `(caveat_id, discharger_key, expiry)` (the wire
/// encoding without the signature). Mint one with
/// [`Principal::mint_discharge`](super::Principal::mint_discharge).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Discharge {
    pub(crate) caveat_id: CaveatId,
    pub(crate) discharger_key: PublicKey,
    pub(crate) expiry: Option<SystemTime>,
    pub(crate) signature: Signature,
}

impl Discharge {
    /// The id of the caveat this discharges.
    pub fn caveat_id(&self) -> CaveatId {
        self.caveat_id
    }

    /// The key of the discharger that signed it.
    pub fn discharger_key(&self) -> &PublicKey {
        &self.discharger_key
    }

    /// When the discharge stops being valid, if ever (whole seconds).
    pub fn expiry(&self) -> Option<SystemTime> {
        self.expiry
    }

    /// The discharger's signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The exact bytes the signature covers.
    pub fn signed_message(&self) -> Vec<u8> {
        signed_message(self.caveat_id, &self.discharger_key, self.expiry)
    }

    /// Checks that this discharge discharges `caveat` at `now`: it names the
    /// caveat's id, is signed by the caveat's discharger key, and has not
    /// expired.
    ///
    /// Fails with [`ErrorKind::Auth`](crate::ErrorKind::Auth) and a
    /// human-readable reason.
    pub fn validate_for(&self, caveat: &ThirdPartyCaveat, now: SystemTime) -> Result<()> {
        if self.caveat_id != caveat.id {
            return Err(Error::auth(format!(
                "discharge is for caveat {}, not third-party caveat {}",
                self.caveat_id, caveat.id
            )));
        }
        if self.discharger_key != caveat.discharger_key {
            return Err(Error::auth(format!(
                "discharge for third-party caveat {} is from key {}, not the discharger {}",
                caveat.id, self.discharger_key, caveat.discharger_key
            )));
        }
        self.discharger_key
            .verify(&self.signed_message(), &self.signature)
            .map_err(|_| {
                Error::auth(format!(
                    "bad signature on discharge for third-party caveat {}",
                    caveat.id
                ))
            })?;
        if let Some(expiry) = self.expiry
            && now >= expiry
        {
            return Err(Error::auth(format!(
                "discharge for third-party caveat {} expired at {}",
                caveat.id,
                format_time(expiry)
            )));
        }
        Ok(())
    }
}

/// The message a discharge signature covers.
pub(crate) fn signed_message(
    caveat_id: CaveatId,
    discharger_key: &PublicKey,
    expiry: Option<SystemTime>,
) -> Vec<u8> {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(DISCHARGE_SIGNING_DOMAIN);
    encoding::put_discharge_body(&mut buf, caveat_id, discharger_key, expiry);
    buf.to_vec()
}

/// A set of discharges, at most one per caveat id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Discharges {
    by_id: BTreeMap<CaveatId, Discharge>,
}

impl Discharges {
    /// An empty set.
    pub const fn new() -> Self {
        Discharges {
            by_id: BTreeMap::new(),
        }
    }

    /// Adds `discharge`, returning the one it replaces for the same caveat.
    pub fn add(&mut self, discharge: Discharge) -> Option<Discharge> {
        self.by_id.insert(discharge.caveat_id, discharge)
    }

    /// The discharge for caveat `id`.
    pub fn get(&self, id: &CaveatId) -> Option<&Discharge> {
        self.by_id.get(id)
    }

    /// Removes and returns the discharge for caveat `id`.
    pub fn remove(&mut self, id: &CaveatId) -> Option<Discharge> {
        self.by_id.remove(id)
    }

    /// How many discharges there are.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The discharges, in caveat id order.
    pub fn iter(&self) -> impl Iterator<Item = &Discharge> {
        self.by_id.values()
    }
}

impl FromIterator<Discharge> for Discharges {
    fn from_iter<I: IntoIterator<Item = Discharge>>(iter: I) -> Self {
        let mut out = Discharges::new();
        for d in iter {
            out.add(d);
        }
        out
    }
}

impl Extend<Discharge> for Discharges {
    fn extend<I: IntoIterator<Item = Discharge>>(&mut self, iter: I) {
        for d in iter {
            self.add(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::security::Principal;
    use std::time::Duration;

    #[test]
    fn mint_and_validate() {
        let discharger = Principal::new();
        let other = Principal::new();
        let tp = ThirdPartyCaveat::new(discharger.public_key(), "/discharger");
        let now = SystemTime::now();

        let good = discharger.mint_discharge(&tp, None).unwrap();
        good.validate_for(&tp, now).unwrap();
        assert_eq!(good.caveat_id(), tp.id);

        let err = other.mint_discharge(&tp, None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadArg);

        let expiring = discharger
            .mint_discharge(&tp, Some(now + Duration::from_secs(60)))
            .unwrap();
        expiring.validate_for(&tp, now).unwrap();
        let err = expiring
            .validate_for(&tp, now + Duration::from_secs(61))
            .unwrap_err();
        assert!(err.message().contains("expired at"), "{err}");

        let mut forged = good.clone();
        forged.expiry = Some(now + Duration::from_secs(5));
        let err = forged.validate_for(&tp, now).unwrap_err();
        assert!(err.message().contains("bad signature"), "{err}");

        let other_tp = ThirdPartyCaveat::new(discharger.public_key(), "/discharger");
        assert!(good.validate_for(&other_tp, now).is_err());
    }

    #[test]
    fn collection_is_keyed_by_id() {
        let discharger = Principal::new();
        let a = ThirdPartyCaveat::new(discharger.public_key(), "x");
        let b = ThirdPartyCaveat::new(discharger.public_key(), "y");
        let da = discharger.mint_discharge(&a, None).unwrap();
        let db = discharger.mint_discharge(&b, None).unwrap();
        let mut set: Discharges = [da.clone(), db.clone()].into_iter().collect();
        assert_eq!(set.len(), 2);
        assert_eq!(set.get(&a.id), Some(&da));
        assert!(set.add(da.clone()).is_some());
        assert_eq!(set.remove(&b.id), Some(db));
        assert_eq!(set.iter().count(), 1);
        assert!(!set.is_empty());
    }
}
