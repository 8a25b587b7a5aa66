//! Resumption end to end through the sans-I/O handshake: tickets issued,
//! redeemed once, forgotten, stolen and expired.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use flow_message::Message;

use super::handshake::{Acceptor, Dialer, DialerStep, HandshakeDone};
use super::resumption::TicketStore;
use super::*;
use crate::auth::AllowEveryone;
use crate::naming::{Endpoint, RoutingId};
use crate::security::Principal;
use crate::{Error, ErrorKind, Result};

/// One side: its principal and its configuration (and so its ticket store).
struct Side {
    principal: Principal,
    config: ConnConfig,
}

impl Side {
    fn new(name: &str) -> Side {
        Side {
            principal: Principal::with_self_blessing(name).unwrap(),
            config: ConnConfig::default(),
        }
    }

    fn params(&self) -> HandshakeParams {
        HandshakeParams {
            config: self.config.clone(),
            principal: self.principal.clone(),
            authorizer: Arc::new(AllowEveryone),
            local_endpoint: Endpoint::new("test", "local").with_routing_id(RoutingId::random()),
            transport_max_frame: 1 << 20,
        }
    }

    fn store(&self) -> &TicketStore {
        self.config.resumption.as_deref().unwrap()
    }
}

fn remote() -> Endpoint {
    Endpoint::new("test", "acceptor")
}

/// Where `dialer` keeps its tickets for [`remote`].
fn held_key(dialer: &Side) -> String {
    super::handshake::ticket_key(
        &dialer.principal.public_key(),
        &remote(),
        remote().routing_id(),
    )
}

/// Runs a whole handshake at `now`; the dialer's binding frame passes
/// through `tamper` on its way to the acceptor.
fn handshake_with(
    dialer: &Side,
    acceptor: &Side,
    now: Instant,
    tamper: impl FnOnce(&mut Vec<Message>),
) -> (Result<HandshakeDone>, Result<HandshakeDone>) {
    let wall = SystemTime::now();
    let (mut d, hello) = Dialer::start(dialer.params(), remote(), now).unwrap();
    let mut a = Acceptor::new(acceptor.params());
    let [answer, binding] = match a.on_hello(BytesMut::from(&hello[..]), now) {
        Ok(frames) => frames,
        Err(e) => return (Err(Error::network("acceptor failed")), Err(e)),
    };
    d.on_response(BytesMut::from(&answer[..]), now).unwrap();
    let mut done = match d.on_binding(BytesMut::from(&binding[..]), wall) {
        Ok(DialerStep::Done(done)) => *done,
        Ok(DialerStep::Reveal { .. }) => panic!("no acceptor here hides"),
        Err(e) => return (Err(e), Err(Error::network("dialer failed"))),
    };
    let mut messages = std::mem::take(&mut done.initial_messages);
    tamper(&mut messages);
    let frame = seal(&mut done, &messages);
    let accepted = a
        .on_binding(frame, now, wall, "dialer")
        .map_err(|refusal| refusal.error);
    (Ok(done), accepted)
}

/// `messages` in one frame sealed by `done`'s side.
fn seal(done: &mut HandshakeDone, messages: &[Message]) -> BytesMut {
    let mut plain = BytesMut::new();
    flow_message::encode_frame(messages, &mut plain);
    BytesMut::from(&done.sealer.seal_to_bytes(&plain).unwrap()[..])
}

fn handshake(dialer: &Side, acceptor: &Side, now: Instant) -> (HandshakeDone, HandshakeDone) {
    let (d, a) = handshake_with(dialer, acceptor, now, |_| {});
    (d.unwrap(), a.unwrap())
}

/// The proof in the Auth message of a binding: a 64-byte signature or a
/// 32-byte MAC after the 32-byte key.
fn proof_len(messages: &[Message]) -> usize {
    messages
        .iter()
        .find_map(|m| match m {
            Message::Auth(auth) => Some(auth.channel_binding.len() - 32),
            _ => None,
        })
        .unwrap()
}

#[test]
fn a_returning_dialer_resumes_and_each_ticket_is_good_once() {
    let (alice, bob) = (Side::new("alice"), Side::new("bob"));
    let now = Instant::now();
    let (d, a) = handshake(&alice, &bob, now);
    assert!(!d.resumed && !a.resumed, "the first handshake signs");
    assert_eq!(alice.store().len(), (0, 1));
    assert_eq!(bob.store().len(), (1, 0));

    let mut seen = 0;
    let (d, a) = handshake_with(&alice, &bob, now, |m| seen = proof_len(m));
    let (d, a) = (d.unwrap(), a.unwrap());
    assert!(d.resumed && a.resumed, "the second handshake resumes");
    assert_eq!(seen, 32, "the dialer bound the channel with a MAC");
    assert_eq!(
        d.established.remote_blessings,
        a.established.local_blessings
    );
    assert_eq!(
        a.established.remote_blessings,
        d.established.local_blessings
    );
    // The resumed connection issued the next ticket; the used one is gone.
    assert_eq!(alice.store().len(), (0, 1));
    assert_eq!(bob.store().len(), (1, 0));
    let (d, a) = handshake(&alice, &bob, now);
    assert!(
        d.resumed && a.resumed,
        "and so does the third, with a new ticket"
    );
}

#[test]
fn an_acceptor_that_forgot_the_ticket_signs_and_the_dialer_follows() {
    let (alice, bob) = (Side::new("alice"), Side::new("bob"));
    let now = Instant::now();
    handshake(&alice, &bob, now);
    // bob restarts: a new store knows nothing of alice's ticket.
    let bob = Side {
        principal: bob.principal.clone(),
        config: ConnConfig::default(),
    };
    let mut seen = 0;
    let (d, a) = handshake_with(&alice, &bob, now, |m| seen = proof_len(m));
    let (d, a) = (d.unwrap(), a.unwrap());
    assert!(!d.resumed && !a.resumed);
    assert_eq!(seen, 64, "the dialer signed");
    // alice names the forgotten ticket once more (bob might only have been
    // slow to confirm it), then drops it and resumes with a new one.
    assert!(!handshake(&alice, &bob, now).0.resumed);
    assert!(handshake(&alice, &bob, now).0.resumed);
    assert!(handshake(&alice, &bob, now).0.resumed);
}

#[test]
fn a_ticket_named_before_its_connection_confirmed_it_is_named_again() {
    let (alice, bob) = (Side::new("alice"), Side::new("bob"));
    let now = Instant::now();
    // The first connection: alice is done, bob has not yet seen her binding
    // when she dials again.
    let (mut d1, hello) = Dialer::start(alice.params(), remote(), now).unwrap();
    let mut a1 = Acceptor::new(bob.params());
    let [answer, binding] = a1.on_hello(BytesMut::from(&hello[..]), now).unwrap();
    d1.on_response(BytesMut::from(&answer[..]), now).unwrap();
    let Ok(DialerStep::Done(mut done1)) =
        d1.on_binding(BytesMut::from(&binding[..]), SystemTime::now())
    else {
        panic!("first handshake failed at the dialer");
    };
    let (d2, _) = handshake(&alice, &bob, now);
    assert!(!d2.resumed, "bob had not confirmed the ticket");
    // Now bob confirms it.
    let messages = std::mem::take(&mut done1.initial_messages);
    let frame = seal(&mut done1, &messages);
    a1.on_binding(frame, now, SystemTime::now(), "dialer")
        .unwrap();
    let (d3, a3) = handshake(&alice, &bob, now);
    assert!(
        d3.resumed && a3.resumed,
        "alice named it again, and it held"
    );
}

#[test]
fn a_ticket_is_kept_for_the_peer_reached_not_the_one_dialed() {
    // Dialing a proxied endpoint first reaches the proxy (another routing
    // id): its ticket must not be named to the server behind it.
    let (alice, proxy) = (Side::new("alice"), Side::new("proxy"));
    let now = Instant::now();
    let server_rid = RoutingId::random();
    let target = remote().with_routing_id(server_rid);
    let (mut d, hello) = Dialer::start(alice.params(), target.clone(), now).unwrap();
    let mut a = Acceptor::new(proxy.params());
    let [answer, binding] = a.on_hello(BytesMut::from(&hello[..]), now).unwrap();
    d.on_response(BytesMut::from(&answer[..]), now).unwrap();
    let Ok(DialerStep::Done(done)) = d.on_binding(BytesMut::from(&binding[..]), SystemTime::now())
    else {
        panic!("handshake with the proxy failed");
    };
    let reached = done.remote_endpoint.routing_id();
    assert_ne!(reached, server_rid);
    let key = |rid| super::handshake::ticket_key(&alice.principal.public_key(), &target, rid);
    assert!(alice.store().take_held(&key(server_rid), now).is_none());
    assert!(alice.store().take_held(&key(reached), now).is_some());
}

#[test]
fn tickets_expire_at_the_acceptor_whatever_the_dialer_thinks() {
    // alice keeps tickets longer than bob honours them.
    let mut alice = Side::new("alice");
    alice.config.resumption = Some(Arc::new(TicketStore::new(16, Duration::from_secs(7200))));
    let bob = Side::new("bob");
    let now = Instant::now();
    handshake(&alice, &bob, now);
    let later = now + bob.store().lifetime() + Duration::from_secs(1);
    let (d, a) = handshake(&alice, &bob, later);
    assert!(!d.resumed && !a.resumed, "bob no longer honours it");
}

#[test]
fn principals_sharing_a_store_do_not_take_each_others_tickets() {
    let alice = Side::new("alice");
    let carol = Side {
        principal: Principal::with_self_blessing("carol").unwrap(),
        config: alice.config.clone(),
    };
    let bob = Side::new("bob");
    let now = Instant::now();
    handshake(&alice, &bob, now);
    let (d, a) = handshake(&carol, &bob, now);
    assert!(!d.resumed && !a.resumed, "carol has no ticket of her own");
    assert!(handshake(&alice, &bob, now).0.resumed);
    assert!(handshake(&carol, &bob, now).0.resumed);
}

#[test]
fn a_ticket_id_without_its_secret_resumes_nothing_and_is_not_spent() {
    let (alice, bob) = (Side::new("alice"), Side::new("bob"));
    let now = Instant::now();
    handshake(&alice, &bob, now);
    // mallory learns alice's ticket id (it travels in the clear) but not
    // its secret: her hello cannot prove it, so bob neither resumes nor
    // spends the ticket; mallory gets an ordinary, signed handshake.
    let mallory = Side::new("mallory");
    let mut stolen = alice.store().take_held(&held_key(&alice), now).unwrap();
    alice.store().insert_held(held_key(&alice), stolen.clone());
    stolen.secret = [0; 32];
    mallory.store().insert_held(held_key(&mallory), stolen);
    let (d, a) = handshake(&mallory, &bob, now);
    assert!(!d.resumed && !a.resumed);
    assert_eq!(
        a.established.remote_blessings.names(),
        vec!["mallory".to_string()]
    );
    let (d, a) = handshake(&alice, &bob, now);
    assert!(d.resumed && a.resumed, "alice's ticket is still good");
}

#[test]
fn a_proof_is_bound_to_the_hello_that_carries_it() {
    let (alice, bob) = (Side::new("alice"), Side::new("bob"));
    let now = Instant::now();
    handshake(&alice, &bob, now);
    // mallory copies the ticket option (id and proof) of alice's hello into
    // a hello of her own: the proof covers alice's ephemeral key, not hers.
    let (_alices, alice_hello) = Dialer::start(alice.params(), remote(), now).unwrap();
    let option = super::handshake::peek_hello(&alice_hello)
        .unwrap()
        .ticket
        .unwrap();
    assert_eq!(option.len(), 48, "ticket id and proof");
    let mallory = Side::new("mallory");
    let (_hers, hello) = Dialer::start(mallory.params(), remote(), now).unwrap();
    let mut setup = super::handshake::peek_hello(&hello).unwrap();
    setup.ticket = Some(option);
    let mut forged = BytesMut::from(&hello[..35]);
    Message::Setup(Box::new(setup)).encode(&mut forged);
    assert_eq!(bob.store().len().0, 1);
    Acceptor::new(bob.params()).on_hello(forged, now).unwrap();
    assert_eq!(bob.store().len().0, 1, "bob neither redeemed nor spent it");
}

#[test]
fn a_ticket_proves_only_the_key_it_was_issued_for() {
    let (alice, bob) = (Side::new("alice"), Side::new("bob"));
    let now = Instant::now();
    handshake(&alice, &bob, now);
    // Even holding the whole ticket, mallory cannot resume as herself: the
    // ticket names alice's key.
    let mallory = Side::new("mallory");
    let stolen = alice.store().take_held(&held_key(&alice), now).unwrap();
    mallory.store().insert_held(held_key(&mallory), stolen);
    let (d, a) = handshake_with(&mallory, &bob, now, |_| {});
    assert!(d.unwrap().resumed, "bob proved himself with the ticket");
    let err = a.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.message().contains("issued for"), "{err}");
}

#[test]
fn a_damaged_resumption_mac_is_refused() {
    let now = Instant::now();
    // carol's MAC damaged on the way: dave refuses it.
    let (carol, dave) = (Side::new("carol"), Side::new("dave"));
    handshake(&carol, &dave, now);
    let (d, a) = handshake_with(&carol, &dave, now, |messages| {
        for m in messages.iter_mut() {
            if let Message::Auth(auth) = m {
                let mut forged = auth.channel_binding.to_vec();
                if let Some(last) = forged.last_mut() {
                    *last ^= 1;
                }
                auth.channel_binding = forged.into();
            }
        }
    });
    assert!(d.unwrap().resumed);
    let err = a.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.message().contains("MAC"), "{err}");
}

#[test]
fn a_peer_binding_with_a_mac_when_nobody_resumes_is_refused() {
    let now = Instant::now();
    let (erin, frank) = (Side::new("erin"), Side::new("frank"));
    let (_d, a) = handshake_with(&erin, &frank, now, |messages| {
        for m in messages.iter_mut() {
            if let Message::Auth(auth) = m {
                auth.channel_binding = auth.channel_binding.slice(..64);
            }
        }
    });
    let err = a.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.message().contains("ticket"), "{err}");
}

#[test]
fn without_a_store_nothing_is_issued_or_redeemed() {
    let mut alice = Side::new("alice");
    alice.config.resumption = None;
    let bob = Side::new("bob");
    let now = Instant::now();
    handshake(&alice, &bob, now);
    let (d, a) = handshake(&alice, &bob, now);
    assert!(!d.resumed && !a.resumed);
    // alice's hello does not ask for tickets, so bob issues none: a dialer
    // that never redeems them cannot push others' out of his store.
    assert_eq!(bob.store().len().0, 0);
    let carol = Side::new("carol");
    handshake(&carol, &bob, now);
    assert_eq!(bob.store().len().0, 1, "carol keeps tickets: she gets one");
    let (_, hello) = Dialer::start(alice.params(), remote(), now).unwrap();
    let setup = super::handshake::peek_hello(&hello).unwrap();
    assert!(setup.ticket.is_none());
}

#[test]
fn a_hello_naming_a_malformed_ticket_is_refused() {
    let (alice, bob) = (Side::new("alice"), Side::new("bob"));
    let now = Instant::now();
    let (_d, hello) = Dialer::start(alice.params(), remote(), now).unwrap();
    // The hello's Setup travels in the clear after "FL", the suite and the
    // 32-byte ephemeral key: give it a ticket id of 5 bytes.
    let mut setup = super::handshake::peek_hello(&hello).unwrap();
    setup.ticket = Some(bytes::Bytes::from_static(b"short"));
    let mut forged = BytesMut::from(&hello[..35]);
    Message::Setup(Box::new(setup)).encode(&mut forged);
    let err = Acceptor::new(bob.params())
        .on_hello(forged, now)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadArg, "{err}");
    assert!(err.message().contains("ticket has 5 bytes"), "{err}");
}
