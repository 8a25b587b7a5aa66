//! Blessings: the names a principal holds, as certificate chains, and their
//! validation.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use super::caveat::{Caveat, ThirdPartyCaveat};
use super::certificate::{Certificate, verify_chain};
use super::discharge::Discharges;
use super::keys::PublicKey;
use super::pattern::CHAIN_SEPARATOR;
use super::roots::BlessingRoots;
use crate::{Error, Result};

/// Most certificates one chain may have.
pub const MAX_CHAIN_LEN: usize = 32;

/// Most certificates one [`Blessings`] may hold over all its chains. Bounds
/// the signature checks a peer can make us do with one message.
pub const MAX_CERTIFICATES: usize = 256;

/// One or more certificate chains, all granted to the same public key; or
/// none at all (the empty blessings, "no names").
///
/// The name of a chain is the extensions of its certificates joined by `:`.
/// [`names`](Self::names) lists them as claimed; only
/// [`validate`](Self::validate) says which a verifier should believe.
///
/// Cheap to clone (the chains are shared). Chains keep their order and are
/// never duplicated.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Blessings {
    chains: Arc<Vec<Vec<Certificate>>>,
}

impl Blessings {
    /// The empty blessings.
    pub fn empty() -> Self {
        Blessings::default()
    }

    /// Blessings made of `chains`, without checking signatures.
    ///
    /// Identical chains are kept once. Fails with
    /// [`ErrorKind::BadArg`](crate::ErrorKind::BadArg) if a chain is empty,
    /// the chains end in different keys, or a limit ([`MAX_CHAIN_LEN`],
    /// [`MAX_CERTIFICATES`]) is exceeded.
    pub fn from_chains(chains: Vec<Vec<Certificate>>) -> Result<Self> {
        let mut kept: Vec<Vec<Certificate>> = Vec::with_capacity(chains.len());
        let mut key: Option<PublicKey> = None;
        let mut total = 0usize;
        for chain in chains {
            let Some(last) = chain.last() else {
                return Err(Error::bad_arg("blessings hold an empty certificate chain"));
            };
            if chain.len() > MAX_CHAIN_LEN {
                return Err(Error::bad_arg(format!(
                    "certificate chain of {} certificates is longer than {MAX_CHAIN_LEN}",
                    chain.len()
                )));
            }
            match key {
                None => key = Some(last.public_key),
                Some(k) if k != last.public_key => {
                    return Err(Error::bad_arg(format!(
                        "blessings for different keys cannot be combined ({k} and {})",
                        last.public_key
                    )));
                }
                Some(_) => {}
            }
            if kept.contains(&chain) {
                continue;
            }
            total += chain.len();
            if total > MAX_CERTIFICATES {
                return Err(Error::bad_arg(format!(
                    "blessings would hold more than {MAX_CERTIFICATES} certificates"
                )));
            }
            kept.push(chain);
        }
        Ok(Blessings {
            chains: Arc::new(kept),
        })
    }

    /// The union of `blessings`: every distinct chain of each, in order.
    /// Empty blessings contribute nothing.
    ///
    /// Fails with [`ErrorKind::BadArg`](crate::ErrorKind::BadArg) if they are
    /// for different keys.
    pub fn union(blessings: &[Blessings]) -> Result<Blessings> {
        let chains = blessings
            .iter()
            .flat_map(|b| b.chains.iter().cloned())
            .collect();
        Blessings::from_chains(chains)
    }

    /// The key all chains are granted to; `None` for empty blessings.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.chains
            .first()
            .and_then(|c| c.last())
            .map(|c| c.public_key)
    }

    /// The certificate chains, root first.
    pub fn chains(&self) -> &[Vec<Certificate>] {
        &self.chains
    }

    /// Whether there are no chains.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// The names the chains claim, unvalidated, without duplicates.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::with_capacity(self.chains.len());
        for chain in self.chains.iter() {
            let name = chain_name(chain);
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// Validates every chain in `ctx`, sorting its name into
    /// [`ValidatedNames::valid`] or [`ValidatedNames::rejected`] with a
    /// reason.
    ///
    /// A chain's name is valid when every signature verifies, the verifier's
    /// roots recognize the chain's root key for that name, and every caveat
    /// of every certificate holds at `ctx.now`.
    ///
    /// This does not prove the presenter holds the private key: the caller
    /// must check that separately (the handshake does, by a signature over
    /// the channel).
    pub fn validate(&self, ctx: &ValidationContext<'_>) -> ValidatedNames {
        let mut out = ValidatedNames::default();
        for chain in self.chains.iter() {
            let name = chain_name(chain);
            match validate_chain(chain, &name, ctx) {
                Ok(()) => {
                    if !out.valid.contains(&name) {
                        out.valid.push(name);
                    }
                }
                Err(err) => out.rejected.push(RejectedBlessing {
                    name,
                    reason: err.message().to_owned(),
                }),
            }
        }
        out
    }

    /// Checks every certificate signature of every chain, without looking
    /// at roots or caveats. A failure is an [`crate::ErrorKind::Auth`] error:
    /// the blessings were forged or damaged, not merely untrusted.
    pub fn verify_signatures(&self) -> Result<()> {
        for chain in self.chains.iter() {
            verify_chain(chain)?;
        }
        Ok(())
    }

    pub(crate) fn from_chains_unchecked(chains: Vec<Vec<Certificate>>) -> Self {
        Blessings {
            chains: Arc::new(chains),
        }
    }
}

fn validate_chain(chain: &[Certificate], name: &str, ctx: &ValidationContext<'_>) -> Result<()> {
    verify_chain(chain)?;
    let Some(root) = chain.first() else {
        return Err(Error::auth("empty certificate chain"));
    };
    ctx.roots.recognized(&root.public_key, name)?;
    // Each distinct third-party caveat costs a discharge signature check at
    // most once per chain, however often it is repeated.
    let mut discharged: Vec<&ThirdPartyCaveat> = Vec::new();
    for cert in chain {
        for caveat in &cert.caveats {
            if let Caveat::ThirdParty(tp) = caveat {
                if discharged.contains(&tp) {
                    continue;
                }
                caveat.validate(ctx)?;
                discharged.push(tp);
            } else {
                caveat.validate(ctx)?;
            }
        }
    }
    Ok(())
}

/// The name of a chain: its extensions joined by `:`.
pub(crate) fn chain_name(chain: &[Certificate]) -> String {
    let mut name = String::new();
    for (i, cert) in chain.iter().enumerate() {
        if i > 0 {
            name.push(CHAIN_SEPARATOR);
        }
        name.push_str(&cert.extension);
    }
    name
}

impl fmt::Display for Blessings {
    /// The claimed names separated by `,`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

impl fmt::Debug for Blessings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.public_key() {
            None => f.write_str("Blessings(none)"),
            Some(key) => write!(f, "Blessings({:?} for {key})", self.names()),
        }
    }
}

/// What a verifier knows when it validates blessings.
#[derive(Clone, Copy, Debug)]
pub struct ValidationContext<'a> {
    /// The time at which caveats are checked.
    pub now: SystemTime,
    /// The verifier's trusted roots.
    pub roots: &'a BlessingRoots,
    /// The verifier's own blessing names, for
    /// [`Caveat::PeerBlessings`](super::Caveat::PeerBlessings).
    pub peer_names: &'a [String],
    /// Discharges the presenter supplied for third-party caveats.
    pub discharges: &'a Discharges,
}

static NO_DISCHARGES: Discharges = Discharges::new();

impl<'a> ValidationContext<'a> {
    /// A context trusting `roots`, at the current time, with no verifier
    /// names and no discharges.
    pub fn new(roots: &'a BlessingRoots) -> Self {
        ValidationContext {
            now: SystemTime::now(),
            roots,
            peer_names: &[],
            discharges: &NO_DISCHARGES,
        }
    }

    /// The same context at time `now`.
    pub fn at(self, now: SystemTime) -> Self {
        ValidationContext { now, ..self }
    }

    /// The same context with the verifier's own names.
    pub fn peer_names(self, peer_names: &'a [String]) -> Self {
        ValidationContext { peer_names, ..self }
    }

    /// The same context with `discharges`.
    pub fn discharges(self, discharges: &'a Discharges) -> Self {
        ValidationContext { discharges, ..self }
    }
}

/// A name that failed validation, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedBlessing {
    /// The name the chain claimed.
    pub name: String,
    /// Why it was rejected, for humans.
    pub reason: String,
}

impl fmt::Display for RejectedBlessing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}

/// The outcome of [`Blessings::validate`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidatedNames {
    /// Names that validated, without duplicates.
    pub valid: Vec<String>,
    /// Chains that did not, with reasons.
    pub rejected: Vec<RejectedBlessing>,
}

impl ValidatedNames {
    /// Whether no name validated.
    pub fn is_empty(&self) -> bool {
        self.valid.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::security::{BlessingPattern, Principal};
    use std::time::Duration;

    fn ctx(roots: &BlessingRoots) -> ValidationContext<'_> {
        ValidationContext::new(roots)
    }

    #[test]
    fn bless_self_bless_other_and_union() {
        let alice = Principal::new();
        let bob = Principal::new();
        let a = alice.bless_self("alice", vec![]).unwrap();
        assert_eq!(a.names(), ["alice"]);
        assert_eq!(a.public_key(), Some(alice.public_key()));

        let friend = alice
            .bless(bob.public_key(), &a, "friend:bob", vec![])
            .unwrap();
        assert_eq!(friend.names(), ["alice:friend:bob"]);
        assert_eq!(friend.public_key(), Some(bob.public_key()));
        assert_eq!(friend.chains()[0].len(), 2);

        let b = bob.bless_self("bob", vec![]).unwrap();
        let both =
            Blessings::union(&[b.clone(), friend.clone(), Blessings::empty(), b.clone()]).unwrap();
        assert_eq!(both.names(), ["bob", "alice:friend:bob"]);
        assert_eq!(both.chains().len(), 2);
        assert_eq!(both.to_string(), "bob,alice:friend:bob");

        let err = Blessings::union(&[a.clone(), b.clone()]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadArg);

        // Blessing with someone else's blessings is refused.
        let err = alice.bless(bob.public_key(), &b, "x", vec![]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadArg);
        assert!(
            alice
                .bless(bob.public_key(), &Blessings::empty(), "x", vec![])
                .is_err()
        );

        // Blessing with a union extends every chain.
        let alice2 = alice.bless_self("alicia", vec![]).unwrap();
        let alices = Blessings::union(&[a, alice2]).unwrap();
        let ext = alice
            .bless(bob.public_key(), &alices, "pal", vec![])
            .unwrap();
        assert_eq!(ext.names(), ["alice:pal", "alicia:pal"]);
        assert!(Blessings::empty().public_key().is_none());
        assert!(Blessings::empty().is_empty());
    }

    #[test]
    fn validation_success() {
        let alice = Principal::new();
        let bob = Principal::new();
        let a = alice.bless_self("alice", vec![]).unwrap();
        let friend = alice
            .bless(
                bob.public_key(),
                &a,
                "friend",
                vec![Caveat::expires_in(Duration::from_secs(60))],
            )
            .unwrap();
        let verifier = Principal::new();
        verifier.add_to_roots(&a).unwrap();
        let out = friend.validate(&ctx(verifier.roots()));
        assert_eq!(out.valid, ["alice:friend"]);
        assert!(out.rejected.is_empty());
        assert!(!out.is_empty());
    }

    #[test]
    fn rejects_tampered_signature() {
        let alice = Principal::new();
        let bob = Principal::new();
        let a = alice.bless_self("alice", vec![]).unwrap();
        let friend = alice.bless(bob.public_key(), &a, "friend", vec![]).unwrap();
        let roots = BlessingRoots::new();
        roots.add(
            alice.public_key(),
            BlessingPattern::prefix("alice").unwrap(),
        );

        let mut chain = friend.chains()[0].clone();
        chain[1].signature.0[10] ^= 0x40;
        let tampered = Blessings::from_chains(vec![chain]).unwrap();
        let out = tampered.validate(&ctx(&roots));
        assert!(out.valid.is_empty());
        assert_eq!(out.rejected[0].name, "alice:friend");
        assert!(
            out.rejected[0]
                .reason
                .contains("bad signature in certificate 1"),
            "{}",
            out.rejected[0]
        );

        let mut chain = friend.chains()[0].clone();
        chain[0].extension = "alicf".into();
        let tampered = Blessings::from_chains(vec![chain]).unwrap();
        let out = tampered.validate(&ctx(&roots));
        assert!(out.rejected[0].reason.contains("certificate 0"));
    }

    #[test]
    fn rejects_unknown_root() {
        let alice = Principal::new();
        let a = alice.bless_self("alice", vec![]).unwrap();
        let roots = BlessingRoots::new();
        let out = a.validate(&ctx(&roots));
        assert!(out.valid.is_empty());
        let reason = &out.rejected[0].reason;
        assert!(reason.contains("not recognized for alice"), "{reason}");
        assert!(reason.contains(&alice.public_key().to_string()), "{reason}");

        // Trusted for a different name only.
        roots.add(
            alice.public_key(),
            BlessingPattern::prefix("alicia").unwrap(),
        );
        assert!(a.validate(&ctx(&roots)).valid.is_empty());
    }

    #[test]
    fn rejects_expired() {
        let alice = Principal::new();
        let now = SystemTime::now();
        let a = alice
            .bless_self("alice", vec![Caveat::expiry(now + Duration::from_secs(10))])
            .unwrap();
        alice.add_to_roots(&a).unwrap();
        let roots = alice.roots();
        assert_eq!(a.validate(&ctx(roots).at(now)).valid, ["alice"]);
        let out = a.validate(&ctx(roots).at(now + Duration::from_secs(11)));
        assert!(out.valid.is_empty());
        assert!(
            out.rejected[0].reason.starts_with("expired at "),
            "{:?}",
            out
        );
    }

    #[test]
    fn peer_blessings_caveat() {
        let alice = Principal::new();
        let bob = Principal::new();
        let a = alice.bless_self("alice", vec![]).unwrap();
        alice.add_to_roots(&a).unwrap();
        let caveat = Caveat::peer_blessings([BlessingPattern::prefix("server:prod").unwrap()]);
        let limited = alice
            .bless(bob.public_key(), &a, "client", vec![caveat])
            .unwrap();
        let roots = alice.roots();

        let wrong = vec!["server:dev".to_string(), "other".to_string()];
        let out = limited.validate(&ctx(roots).peer_names(&wrong));
        assert!(out.valid.is_empty());
        assert!(out.rejected[0].reason.contains("match none"), "{:?}", out);

        let none: Vec<String> = vec![];
        assert!(
            limited
                .validate(&ctx(roots).peer_names(&none))
                .valid
                .is_empty()
        );

        let right = vec!["other".to_string(), "server:prod:eu".to_string()];
        let out = limited.validate(&ctx(roots).peer_names(&right));
        assert_eq!(out.valid, ["alice:client"]);
    }

    #[test]
    fn third_party_caveat() {
        let alice = Principal::new();
        let bob = Principal::new();
        let discharger = Principal::new();
        let impostor = Principal::new();
        let a = alice.bless_self("alice", vec![]).unwrap();
        alice.add_to_roots(&a).unwrap();
        let Caveat::ThirdParty(tp) = Caveat::third_party(discharger.public_key(), "/d") else {
            unreachable!()
        };
        let blessed = alice
            .bless(
                bob.public_key(),
                &a,
                "tp",
                vec![Caveat::ThirdParty(tp.clone())],
            )
            .unwrap();
        let roots = alice.roots();
        let now = SystemTime::now();

        // Without a discharge.
        let out = blessed.validate(&ctx(roots).at(now));
        assert!(
            out.rejected[0]
                .reason
                .contains("no discharge for third-party caveat")
        );

        // With an expired discharge.
        let expired = discharger
            .mint_discharge(&tp, Some(now - Duration::from_secs(5)))
            .unwrap();
        let set: Discharges = [expired].into_iter().collect();
        let out = blessed.validate(&ctx(roots).at(now).discharges(&set));
        assert!(out.rejected[0].reason.contains("expired at"), "{out:?}");

        // With a discharge signed by the wrong key: forge one by minting for a
        // caveat naming the impostor but with the same id.
        let fake_tp = ThirdPartyCaveat {
            discharger_key: impostor.public_key(),
            ..tp.clone()
        };
        let wrong = impostor.mint_discharge(&fake_tp, None).unwrap();
        let set: Discharges = [wrong].into_iter().collect();
        let out = blessed.validate(&ctx(roots).at(now).discharges(&set));
        assert!(
            out.rejected[0].reason.contains("not the discharger"),
            "{out:?}"
        );

        // With a good discharge.
        let good = discharger
            .mint_discharge(&tp, Some(now + Duration::from_secs(60)))
            .unwrap();
        let set: Discharges = [good].into_iter().collect();
        let out = blessed.validate(&ctx(roots).at(now).discharges(&set));
        assert_eq!(out.valid, ["alice:tp"]);
    }

    #[test]
    fn unknown_caveat_never_holds() {
        let alice = Principal::new();
        let a = alice
            .bless_self(
                "alice",
                vec![Caveat::Unknown {
                    kind: 77,
                    bytes: bytes::Bytes::from_static(b"future"),
                }],
            )
            .unwrap();
        alice.add_to_roots(&a).unwrap();
        let out = a.validate(&ctx(alice.roots()));
        assert!(out.valid.is_empty());
        assert_eq!(out.rejected[0].reason, "unknown caveat type 77");
    }

    #[test]
    fn mixed_valid_and_rejected() {
        let alice = Principal::new();
        let carol = Principal::new();
        let bob = Principal::new();
        let a = alice.bless_self("alice", vec![]).unwrap();
        let c = carol.bless_self("carol", vec![]).unwrap();
        let from_a = alice.bless(bob.public_key(), &a, "bob", vec![]).unwrap();
        let from_c = carol.bless(bob.public_key(), &c, "bob", vec![]).unwrap();
        let both = Blessings::union(&[from_a, from_c]).unwrap();
        let roots = BlessingRoots::new();
        roots.add(alice.public_key(), BlessingPattern::all());
        let out = both.validate(&ctx(&roots));
        assert_eq!(out.valid, ["alice:bob"]);
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(out.rejected[0].name, "carol:bob");
    }

    #[test]
    fn limits_are_enforced() {
        let alice = Principal::new();
        let mut b = alice.bless_self("a", vec![]).unwrap();
        for _ in 1..MAX_CHAIN_LEN {
            b = alice.bless(alice.public_key(), &b, "x", vec![]).unwrap();
        }
        assert_eq!(b.chains()[0].len(), MAX_CHAIN_LEN);
        let err = alice
            .bless(alice.public_key(), &b, "x", vec![])
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadArg);
        assert!(Blessings::from_chains(vec![vec![]]).is_err());
    }
}
