//! Deciding whom to talk to: the [`PeerAuthorizer`] trait and the standard
//! authorizers.
//!
//! An authorizer answers two questions during a handshake: is the peer's
//! identity acceptable ([`PeerAuthorizer::authorize_peer`]), and which of our
//! blessings should the peer see ([`PeerAuthorizer::blessings_for_peer`]).
//! The dialer authorizes the acceptor before revealing its own blessings.

use std::fmt;
use std::time::SystemTime;

use crate::naming::Endpoint;
use crate::security::{
    BlessingPattern, Blessings, Discharges, Principal, RejectedBlessing, ValidationContext,
};
use crate::{Error, Result};

/// What an authorizer sees of the peer.
#[derive(Clone, Copy, Debug)]
pub struct PeerInfo<'a> {
    /// This side's principal (its roots validate the peer's blessings).
    pub principal: &'a Principal,
    /// This side's endpoint.
    pub local_endpoint: &'a Endpoint,
    /// The peer's endpoint.
    pub remote_endpoint: &'a Endpoint,
    /// The blessings the peer presented (bound to the channel already).
    pub remote_blessings: &'a Blessings,
    /// The discharges the peer presented.
    pub remote_discharges: &'a Discharges,
    /// The time at which caveats are checked.
    pub now: SystemTime,
}

impl PeerInfo<'_> {
    /// Validates the peer's blessings against this side's roots, with this
    /// side's default blessing names as the verifier's names.
    pub fn validate(&self) -> AuthorizedPeer {
        let own_names = self.principal.default_blessings().names();
        let ctx = ValidationContext::new(self.principal.roots())
            .at(self.now)
            .peer_names(&own_names)
            .discharges(self.remote_discharges);
        let validated = self.remote_blessings.validate(&ctx);
        AuthorizedPeer {
            names: validated.valid,
            rejected: validated.rejected,
        }
    }
}

/// The outcome of a successful authorization.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthorizedPeer {
    /// The peer's blessing names this side believes.
    pub names: Vec<String>,
    /// The names it presented that did not validate, and why.
    pub rejected: Vec<RejectedBlessing>,
}

/// Authorizes peers and picks the blessings to present to them.
pub trait PeerAuthorizer: Send + Sync + fmt::Debug {
    /// Accepts or refuses the peer. A refusal is an
    /// [`crate::ErrorKind::NotTrusted`] error saying why.
    fn authorize_peer(&self, peer: &PeerInfo<'_>) -> Result<AuthorizedPeer>;

    /// The blessings and discharges to present to a peer whose names are
    /// `peer_names` (empty when not yet known, as for an acceptor).
    fn blessings_for_peer(
        &self,
        principal: &Principal,
        peer_names: &[String],
    ) -> Result<(Blessings, Discharges)> {
        Ok((
            principal.blessing_store().for_peer(peer_names),
            Discharges::new(),
        ))
    }
}

/// Accepts every peer whose identity is bound to the channel, whatever its
/// names. For tests, proxies, and servers that authorize per request.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowEveryone;

impl PeerAuthorizer for AllowEveryone {
    fn authorize_peer(&self, peer: &PeerInfo<'_>) -> Result<AuthorizedPeer> {
        Ok(peer.validate())
    }
}

/// Accepts a peer that holds a valid blessing name matching one of a list of
/// patterns.
#[derive(Clone, Debug)]
pub struct PatternAuthorizer {
    patterns: Vec<BlessingPattern>,
}

impl PatternAuthorizer {
    /// Accepts names matching any of `patterns`. An empty list accepts
    /// nobody.
    pub fn new(patterns: impl IntoIterator<Item = BlessingPattern>) -> Self {
        PatternAuthorizer {
            patterns: patterns.into_iter().collect(),
        }
    }

    /// Accepts a peer holding one of the blessing names written in
    /// `endpoint`; with no names there, accepts everyone (the endpoint does
    /// not say whom to expect).
    pub fn for_endpoint(endpoint: &Endpoint) -> Result<Self> {
        if endpoint.blessing_names().is_empty() {
            return Ok(PatternAuthorizer::new([BlessingPattern::all()]));
        }
        let patterns = endpoint
            .blessing_names()
            .iter()
            .map(|name| BlessingPattern::exact(name))
            .collect::<Result<Vec<_>>>()?;
        Ok(PatternAuthorizer::new(patterns))
    }

    /// The patterns a peer's name must match.
    pub fn patterns(&self) -> &[BlessingPattern] {
        &self.patterns
    }
}

impl PeerAuthorizer for PatternAuthorizer {
    fn authorize_peer(&self, peer: &PeerInfo<'_>) -> Result<AuthorizedPeer> {
        let authorized = peer.validate();
        if self
            .patterns
            .iter()
            .any(|p| p.matched_by(&authorized.names))
        {
            return Ok(authorized);
        }
        let wanted = self
            .patterns
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let mut message = format!(
            "peer {} has no blessing matching [{wanted}]; valid names: [{}]",
            peer.remote_endpoint,
            authorized.names.join(", ")
        );
        if !authorized.rejected.is_empty() {
            let rejected = authorized
                .rejected
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            message.push_str(&format!("; rejected: {rejected}"));
        }
        Err(Error::not_trusted(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn peer_setup() -> (Principal, Principal, Blessings) {
        let root = Principal::with_self_blessing("acme").unwrap();
        let server = Principal::new();
        let blessings = root
            .bless(
                server.public_key(),
                &root.default_blessings(),
                "server",
                Vec::new(),
            )
            .unwrap();
        let client = Principal::with_self_blessing("client").unwrap();
        client.add_to_roots(&root.default_blessings()).unwrap();
        (client, server, blessings)
    }

    fn info<'a>(
        principal: &'a Principal,
        blessings: &'a Blessings,
        ep: &'a Endpoint,
        discharges: &'a Discharges,
    ) -> PeerInfo<'a> {
        PeerInfo {
            principal,
            local_endpoint: ep,
            remote_endpoint: ep,
            remote_blessings: blessings,
            remote_discharges: discharges,
            now: SystemTime::now(),
        }
    }

    #[test]
    fn pattern_authorizer_accepts_matching_valid_names() {
        let (client, _server, blessings) = peer_setup();
        let ep = Endpoint::new("tcp", "127.0.0.1:1");
        let none = Discharges::new();
        let auth = PatternAuthorizer::new([BlessingPattern::parse("acme").unwrap()]);
        let ok = auth
            .authorize_peer(&info(&client, &blessings, &ep, &none))
            .unwrap();
        assert_eq!(ok.names, vec!["acme:server".to_string()]);
    }

    #[test]
    fn pattern_authorizer_refuses_with_reasons() {
        let (client, _server, blessings) = peer_setup();
        let ep = Endpoint::new("tcp", "127.0.0.1:1");
        let none = Discharges::new();
        let auth = PatternAuthorizer::new([BlessingPattern::parse("other").unwrap()]);
        let err = auth
            .authorize_peer(&info(&client, &blessings, &ep, &none))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotTrusted);
        assert!(err.message().contains("acme:server"), "{err}");

        // A verifier that does not trust the root sees no valid name at all.
        let stranger = Principal::with_self_blessing("stranger").unwrap();
        let auth = PatternAuthorizer::new([BlessingPattern::parse("acme").unwrap()]);
        let err = auth
            .authorize_peer(&info(&stranger, &blessings, &ep, &none))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotTrusted);
        assert!(err.message().contains("rejected"), "{err}");
    }

    #[test]
    fn allow_everyone_accepts_untrusted_peers() {
        let (_, _server, blessings) = peer_setup();
        let stranger = Principal::with_self_blessing("stranger").unwrap();
        let ep = Endpoint::new("tcp", "127.0.0.1:1");
        let none = Discharges::new();
        let ok = AllowEveryone
            .authorize_peer(&info(&stranger, &blessings, &ep, &none))
            .unwrap();
        assert!(ok.names.is_empty());
        assert_eq!(ok.rejected.len(), 1);
    }

    #[test]
    fn endpoint_names_become_exact_patterns() {
        let (client, _server, blessings) = peer_setup();
        let none = Discharges::new();
        let ep = Endpoint::new("tcp", "127.0.0.1:1")
            .with_blessing_names(["acme:server"])
            .unwrap();
        let auth = PatternAuthorizer::for_endpoint(&ep).unwrap();
        assert!(
            auth.authorize_peer(&info(&client, &blessings, &ep, &none))
                .is_ok()
        );
        let ep2 = Endpoint::new("tcp", "127.0.0.1:1")
            .with_blessing_names(["acme"])
            .unwrap();
        let auth = PatternAuthorizer::for_endpoint(&ep2).unwrap();
        assert!(
            auth.authorize_peer(&info(&client, &blessings, &ep, &none))
                .is_err()
        );
    }

    #[test]
    fn blessings_for_peer_uses_the_store() {
        let p = Principal::with_self_blessing("me").unwrap();
        let (b, d) = AllowEveryone.blessings_for_peer(&p, &[]).unwrap();
        assert_eq!(b.names(), vec!["me".to_string()]);
        assert!(d.is_empty());
    }
}
