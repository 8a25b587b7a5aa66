//! Security: principals, blessings, caveats, discharges, patterns, credentials.
//!
//! Modelled on Vanadium's `v.io/v23/security`, simplified:
//!
//! - A [`Principal`] is an ed25519 signing key with a [`BlessingStore`] (the
//!   blessings it holds and to whom it presents them) and [`BlessingRoots`]
//!   (the root keys it trusts, and for which names).
//! - [`Blessings`] are one or more chains of [`Certificate`]s granted to one
//!   public key. A chain's name is its certificates' extensions joined by
//!   `:` (`alice:phone:app`). A principal blesses itself
//!   ([`Principal::bless_self`]) or extends its own blessings to another key
//!   ([`Principal::bless`]).
//! - Each certificate may carry [`Caveat`]s: an expiry, a restriction on the
//!   verifier's names ([`BlessingPattern`]s), or a third-party caveat that
//!   holds only with a [`Discharge`] signed by a named discharger.
//! - A verifier calls [`Blessings::validate`] with a [`ValidationContext`]
//!   and gets the names it may believe ([`ValidatedNames`]), and why the
//!   others were rejected.
//! - Blessings and discharges travel in the compact encoding described in
//!   `encoding` (`encode`/`decode` methods on each type); credentials live in
//!   a directory ([`Principal::create_dir`], [`Principal::load_dir`],
//!   [`Principal::save_dir`]).
//!
//! Signatures are domain separated: certificates sign
//! [`CERT_SIGNING_DOMAIN`] followed by the previous certificate's signature
//! and the certificate body; discharges sign [`DISCHARGE_SIGNING_DOMAIN`]
//! followed by the discharge body. Other users of [`Principal::sign`] must
//! prefix their own tag.

mod blessings;
mod caveat;
mod certificate;
#[cfg(unix)]
mod credentials;
mod discharge;
mod encoding;
mod keys;
mod pattern;
mod principal;
mod roots;
mod store;

pub use blessings::{
    Blessings, MAX_CERTIFICATES, MAX_CHAIN_LEN, RejectedBlessing, ValidatedNames, ValidationContext,
};
pub use caveat::{
    CAVEAT_EXPIRY, CAVEAT_ID_LEN, CAVEAT_PEER_BLESSINGS, CAVEAT_THIRD_PARTY, Caveat, CaveatId,
    ThirdPartyCaveat,
};
pub use certificate::{CERT_SIGNING_DOMAIN, Certificate};
#[cfg(unix)]
pub use credentials::{KEY_FILE, ROOTS_FILE, STORE_FILE};
pub use discharge::{DISCHARGE_SIGNING_DOMAIN, Discharge, Discharges};
pub use keys::{PUBLIC_KEY_LEN, PublicKey, SIGNATURE_LEN, Signature};
pub use pattern::{
    ALL_PRINCIPALS, BlessingPattern, CHAIN_SEPARATOR, NO_EXTENSION, RESERVED_CHARS,
    validate_extension, validate_name,
};
pub use principal::{Principal, SECRET_KEY_LEN};
pub use roots::BlessingRoots;
pub use store::BlessingStore;
