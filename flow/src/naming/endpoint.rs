//! [`Endpoint`]: where and how to reach a manager, and its string form.

use std::fmt;
use std::str::FromStr;

use super::RoutingId;
use crate::{Error, Result};

/// The version this crate writes, and the only one it reads.
const VERSION: &str = "1";

/// The names of the fields after the version, in order.
const FIELDS: [&str; 5] = [
    "protocol",
    "address",
    "route",
    "routing id",
    "blessing names",
];

/// Where and how to reach a manager: a protocol and address to dial, the
/// routing id of the manager to reach there, the proxy hops still to cross
/// on the way, and the blessing names the manager is expected to present.
///
/// # String form
///
/// [`Display`](fmt::Display) writes, and [`Endpoint::parse`] /
/// [`FromStr`] read:
///
/// ```text
/// @1@<protocol>@<address>@<route>@<routing id>@<blessing names>@@
/// ```
///
/// - `<route>` is the hop routing ids in hex, first hop first, joined by `,`;
///   empty when there is no route.
/// - `<routing id>` is always 32 hex characters (all zeros for
///   [`RoutingId::NULL`]).
/// - `<blessing names>` are the names joined by `,`; empty when there are none.
/// - In protocol, address and each name, `%`, `@` and `,` are written as
///   `%25`, `%40` and `%2C`. Reading accepts any `%XX` escape (hex in either
///   case) as long as the result is UTF-8, and rejects a `%` that is not
///   followed by two hex digits.
///
/// Every `Endpoint` value round-trips exactly:
/// `ep.to_string().parse::<Endpoint>() == Ok(ep)`. Protocol and address may be
/// any strings, even empty ones; whether a protocol exists is for the protocol
/// registry to say when dialing.
///
/// Parsing also accepts the shorthand `PROTOCOL/ADDRESS`, for example
/// `tcp/127.0.0.1:8100` or `unix//tmp/sock` (path `/tmp/sock`): any input not
/// starting with `@` is split at its first `/`. The protocol must be non-empty
/// and free of `@`; the address must be non-empty and is taken literally (no
/// `%` decoding). The routing id is [`RoutingId::NULL`] (learned in the
/// handshake), and route and blessing names are empty.
///
/// # Blessing names are never empty
///
/// An empty name could not be told apart from "no names" in the string form,
/// so an `Endpoint` never holds one: [`Endpoint::with_blessing_names`] refuses
/// it and parsing rejects an empty component such as the middle of `a,,b`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Endpoint {
    protocol: String,
    address: String,
    routing_id: RoutingId,
    route: Vec<RoutingId>,
    blessing_names: Vec<String>,
}

impl Endpoint {
    /// An endpoint for `address` over `protocol`, with a null routing id (to
    /// be learned in the handshake), no route and no blessing names.
    pub fn new(protocol: impl Into<String>, address: impl Into<String>) -> Endpoint {
        Endpoint {
            protocol: protocol.into(),
            address: address.into(),
            routing_id: RoutingId::NULL,
            route: Vec::new(),
            blessing_names: Vec::new(),
        }
    }

    /// The same endpoint with its routing id replaced.
    pub fn with_routing_id(mut self, routing_id: RoutingId) -> Endpoint {
        self.routing_id = routing_id;
        self
    }

    /// The same endpoint with its address replaced.
    pub fn with_address(mut self, address: impl Into<String>) -> Endpoint {
        self.address = address.into();
        self
    }

    /// The same endpoint with its route replaced: the routing ids of the
    /// proxies still to cross, first hop first.
    pub fn with_route(mut self, route: impl IntoIterator<Item = RoutingId>) -> Endpoint {
        self.route = route.into_iter().collect();
        self
    }

    /// The same endpoint with its blessing names replaced.
    ///
    /// Fails with [`ErrorKind::BadArg`](crate::ErrorKind::BadArg) if any name
    /// is empty (see the type's documentation for why).
    pub fn with_blessing_names<I>(mut self, names: I) -> Result<Endpoint>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        if let Some(index) = names.iter().position(String::is_empty) {
            return Err(Error::bad_arg(format!(
                "blessing name {} of {} is empty",
                index + 1,
                names.len()
            )));
        }
        self.blessing_names = names;
        Ok(self)
    }

    /// The protocol to dial with, such as `tcp` or `unix`.
    pub fn protocol(&self) -> &str {
        &self.protocol
    }

    /// The address to dial, in the protocol's own syntax.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The routing id of the manager to reach; [`RoutingId::NULL`] when it is
    /// to be learned in the handshake.
    pub fn routing_id(&self) -> RoutingId {
        self.routing_id
    }

    /// The routing ids of the proxies still to cross after the one at
    /// [`address`](Self::address), first hop first.
    pub fn route(&self) -> &[RoutingId] {
        &self.route
    }

    /// The blessing names the manager is expected to present; never empty
    /// strings.
    pub fn blessing_names(&self) -> &[String] {
        &self.blessing_names
    }

    /// Whether the route is non-empty, so reaching the manager means crossing
    /// more proxy hops.
    pub fn is_proxied(&self) -> bool {
        !self.route.is_empty()
    }

    /// The first hop of the route, if any.
    pub fn next_hop(&self) -> Option<RoutingId> {
        self.route.first().copied()
    }

    /// What a proxy hop does with the endpoint: returns the first route
    /// element (the routing id of the next hop to forward to) and the endpoint
    /// to forward, which is this one without that element. `None` when the
    /// route is empty.
    pub fn pop_route(&self) -> Option<(RoutingId, Endpoint)> {
        let (&first, rest) = self.route.split_first()?;
        let forwarded = Endpoint {
            route: rest.to_vec(),
            ..self.clone()
        };
        Some((first, forwarded))
    }

    /// Reads either string form described on [`Endpoint`].
    ///
    /// Malformed input is an [`ErrorKind::BadArg`](crate::ErrorKind::BadArg)
    /// error whose message quotes the input and says what is wrong.
    pub fn parse(s: &str) -> Result<Endpoint> {
        if s.starts_with('@') {
            parse_full(s)
        } else {
            parse_shorthand(s)
        }
    }
}

impl fmt::Display for Endpoint {
    /// The `@1@...@@` form described on [`Endpoint`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{VERSION}@")?;
        write_escaped(f, &self.protocol)?;
        f.write_str("@")?;
        write_escaped(f, &self.address)?;
        f.write_str("@")?;
        for (index, hop) in self.route.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{hop}")?;
        }
        write!(f, "@{}@", self.routing_id)?;
        for (index, name) in self.blessing_names.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write_escaped(f, name)?;
        }
        f.write_str("@@")
    }
}

impl FromStr for Endpoint {
    type Err = Error;

    /// Same as [`Endpoint::parse`].
    fn from_str(s: &str) -> Result<Endpoint> {
        Endpoint::parse(s)
    }
}

/// Writes `s` with `%`, `@` and `,` percent-encoded (uppercase hex).
fn write_escaped(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    let mut rest = s;
    while let Some(at) = rest.find(['%', '@', ',']) {
        f.write_str(&rest[..at])?;
        let escape = match rest.as_bytes()[at] {
            b'%' => "%25",
            b'@' => "%40",
            _ => "%2C",
        };
        f.write_str(escape)?;
        // The special characters are all one byte long.
        rest = &rest[at + 1..];
    }
    f.write_str(rest)
}

/// Reads `PROTOCOL/ADDRESS`.
fn parse_shorthand(s: &str) -> Result<Endpoint> {
    if s.is_empty() {
        return Err(Error::bad_arg("endpoint \"\" is empty"));
    }
    let Some((protocol, address)) = s.split_once('/') else {
        return Err(Error::bad_arg(format!(
            "endpoint {s:?} has no \"/\": want \"PROTOCOL/ADDRESS\" or \"@{VERSION}@...@@\""
        )));
    };
    if protocol.is_empty() {
        return Err(Error::bad_arg(format!(
            "endpoint {s:?} has an empty protocol"
        )));
    }
    if protocol.contains('@') {
        return Err(Error::bad_arg(format!(
            "endpoint {s:?} has \"@\" in its protocol {protocol:?}"
        )));
    }
    if address.is_empty() {
        return Err(Error::bad_arg(format!(
            "endpoint {s:?} has an empty address"
        )));
    }
    Ok(Endpoint::new(protocol, address))
}

/// Reads `@1@<protocol>@<address>@<route>@<routing id>@<blessing names>@@`;
/// `s` starts with `@`.
fn parse_full(s: &str) -> Result<Endpoint> {
    let after_at = &s[1..];
    let Some((version, rest)) = after_at.split_once('@') else {
        return Err(Error::bad_arg(format!(
            "endpoint {s:?} has no \"@\" after its version"
        )));
    };
    if version != VERSION {
        return Err(Error::bad_arg(format!(
            "endpoint {s:?} has unsupported version {version:?}, want \"{VERSION}\""
        )));
    }
    let Some(body) = rest.strip_suffix("@@") else {
        return Err(Error::bad_arg(format!(
            "endpoint {s:?} is missing the trailing \"@@\""
        )));
    };
    // Byte offset of `body` in `s`: "@", the version, "@".
    let body_offset = 1 + version.len() + 1;

    let fields: Vec<&str> = body.split('@').collect();
    let [protocol, address, route, routing_id, names] = fields[..] else {
        return Err(Error::bad_arg(format!(
            "endpoint {s:?} has {} fields after the version, want {} ({})",
            fields.len(),
            FIELDS.len(),
            FIELDS.join(", ")
        )));
    };
    let protocol_at = body_offset;
    let address_at = protocol_at + protocol.len() + 1;
    let names_at = address_at + address.len() + 1 + route.len() + 1 + routing_id.len() + 1;

    let protocol = unescape(s, protocol, protocol_at, "protocol")?;
    let address = unescape(s, address, address_at, "address")?;

    let route = if route.is_empty() {
        Vec::new()
    } else {
        let count = route.split(',').count();
        route
            .split(',')
            .enumerate()
            .map(|(index, hop)| {
                hop.parse::<RoutingId>().map_err(|err| {
                    Error::bad_arg(format!(
                        "endpoint {s:?} has a bad routing id in route element {} of {count}: {}",
                        index + 1,
                        err.message()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?
    };

    let routing_id = routing_id.parse::<RoutingId>().map_err(|err| {
        Error::bad_arg(format!(
            "endpoint {s:?} has a bad routing id: {}",
            err.message()
        ))
    })?;

    let mut blessing_names = Vec::new();
    if !names.is_empty() {
        let count = names.split(',').count();
        let mut at = names_at;
        for (index, name) in names.split(',').enumerate() {
            if name.is_empty() {
                return Err(Error::bad_arg(format!(
                    "endpoint {s:?} has an empty blessing name (element {} of {count})",
                    index + 1
                )));
            }
            blessing_names.push(unescape(s, name, at, "blessing name")?);
            at += name.len() + 1;
        }
    }

    Ok(Endpoint {
        protocol,
        address,
        routing_id,
        route,
        blessing_names,
    })
}

/// Decodes the `%XX` escapes of `field`, which starts at byte `offset` of the
/// whole input `s`; `what` names the field in errors.
fn unescape(s: &str, field: &str, offset: usize, what: &str) -> Result<String> {
    if !field.contains('%') {
        return Ok(field.to_owned());
    }
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let digits = (
            bytes.get(i + 1).copied().and_then(hex_value),
            bytes.get(i + 2).copied().and_then(hex_value),
        );
        let (Some(high), Some(low)) = digits else {
            return Err(Error::bad_arg(format!(
                "endpoint {s:?} has a bad escape in its {what} at byte {}: \"%\" must be followed by two hex digits",
                offset + i
            )));
        };
        out.push((high << 4) | low);
        i += 3;
    }
    String::from_utf8(out).map_err(|_| {
        Error::bad_arg(format!(
            "endpoint {s:?} has escapes in its {what} (at byte {offset}) that decode to invalid UTF-8"
        ))
    })
}

/// The value of one ASCII hex digit.
fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use proptest::prelude::*;

    const RID: &str = "0123456789abcdeffedcba9876543210";
    const HOP1: &str = "11111111111111111111111111111111";
    const HOP2: &str = "22222222222222222222222222222222";

    fn rid(s: &str) -> RoutingId {
        s.parse().unwrap()
    }

    /// Asserts that parsing `input` fails with BadArg, quoting the input and
    /// mentioning every one of `needles`.
    fn assert_rejected(input: &str, needles: &[&str]) {
        let err = match Endpoint::parse(input) {
            Ok(ep) => panic!("{input:?} parsed as {ep:?}"),
            Err(err) => err,
        };
        assert_eq!(err.kind(), ErrorKind::BadArg, "{err}");
        assert!(
            err.message().contains(&format!("{input:?}")),
            "{err} does not quote the input"
        );
        for needle in needles {
            assert!(err.message().contains(needle), "{err} lacks {needle:?}");
        }
        // FromStr agrees.
        assert!(input.parse::<Endpoint>().is_err());
    }

    #[test]
    fn display_of_a_full_endpoint() -> Result<()> {
        let ep = Endpoint::new("tcp", "127.0.0.1:8100")
            .with_routing_id(rid(RID))
            .with_route([rid(HOP1), rid(HOP2)])
            .with_blessing_names(["root:alice", "root:bob"])?;
        let text = format!("@1@tcp@127.0.0.1:8100@{HOP1},{HOP2}@{RID}@root:alice,root:bob@@");
        assert_eq!(ep.to_string(), text);
        assert_eq!(Endpoint::parse(&text)?, ep);
        assert_eq!(text.parse::<Endpoint>()?, ep);
        assert!(ep.is_proxied());
        assert_eq!(ep.protocol(), "tcp");
        assert_eq!(ep.address(), "127.0.0.1:8100");
        assert_eq!(ep.routing_id(), rid(RID));
        assert_eq!(ep.route(), &[rid(HOP1), rid(HOP2)]);
        assert_eq!(ep.blessing_names(), &["root:alice", "root:bob"]);
        Ok(())
    }

    #[test]
    fn display_of_a_bare_endpoint_has_empty_fields() -> Result<()> {
        let ep = Endpoint::new("tcp", "h:1");
        let text = "@1@tcp@h:1@@00000000000000000000000000000000@@@";
        assert_eq!(ep.to_string(), text);
        let back = Endpoint::parse(text)?;
        assert_eq!(back, ep);
        assert!(back.routing_id().is_null());
        assert!(back.route().is_empty());
        assert!(back.blessing_names().is_empty());
        assert!(!back.is_proxied());
        Ok(())
    }

    #[test]
    fn empty_protocol_and_address_round_trip_in_full_form() -> Result<()> {
        let ep = Endpoint::new("", "");
        assert_eq!(ep.to_string(), "@1@@@@00000000000000000000000000000000@@@");
        assert_eq!(Endpoint::parse(&ep.to_string())?, ep);
        Ok(())
    }

    #[test]
    fn escapes_separators_in_address_and_names() -> Result<()> {
        let ep =
            Endpoint::new("unix", "/tmp/a@b,c%d").with_blessing_names(["alice:phone", "a,b@c%"])?;
        let text = ep.to_string();
        assert_eq!(
            text,
            "@1@unix@/tmp/a%40b%2Cc%25d@@00000000000000000000000000000000@alice:phone,a%2Cb%40c%25@@"
        );
        assert_eq!(Endpoint::parse(&text)?, ep);

        let v6 = Endpoint::new("tcp", "[::1]:80");
        assert_eq!(
            v6.to_string(),
            "@1@tcp@[::1]:80@@00000000000000000000000000000000@@@"
        );
        assert_eq!(Endpoint::parse(&v6.to_string())?, v6);

        let proto = Endpoint::new("we@rd,%", "x");
        assert!(proto.to_string().starts_with("@1@we%40rd%2C%25@x@"));
        assert_eq!(Endpoint::parse(&proto.to_string())?, proto);
        Ok(())
    }

    #[test]
    fn decoding_accepts_lowercase_and_unneeded_escapes() -> Result<()> {
        let text = format!("@1@t%63p@a%2cb%40%2Fc@@{RID}@x%3ay,%e2%82%ac@@");
        let ep = Endpoint::parse(&text)?;
        assert_eq!(ep.protocol(), "tcp");
        assert_eq!(ep.address(), "a,b@/c");
        assert_eq!(ep.blessing_names(), &["x:y", "€"]);
        // Writing it back uses only the needed escapes, in uppercase.
        assert_eq!(ep.to_string(), format!("@1@tcp@a%2Cb%40/c@@{RID}@x:y,€@@"));
        Ok(())
    }

    #[test]
    fn shorthand_form() -> Result<()> {
        let tcp = Endpoint::parse("tcp/127.0.0.1:8100")?;
        assert_eq!(tcp, Endpoint::new("tcp", "127.0.0.1:8100"));
        assert!(tcp.routing_id().is_null());

        let unix: Endpoint = "unix//tmp/sock".parse()?;
        assert_eq!(unix.protocol(), "unix");
        assert_eq!(unix.address(), "/tmp/sock");

        // The address is literal: no escapes, and may hold "@" and "/".
        let odd = Endpoint::parse("unix//tmp/a@b%zz/c")?;
        assert_eq!(odd.address(), "/tmp/a@b%zz/c");
        assert_eq!(Endpoint::parse(&odd.to_string())?, odd);
        Ok(())
    }

    #[test]
    fn shorthand_rejections() {
        assert_rejected("", &["empty"]);
        assert_rejected("tcp", &["no \"/\"", "PROTOCOL/ADDRESS"]);
        assert_rejected("/127.0.0.1:80", &["empty protocol"]);
        assert_rejected("tcp/", &["empty address"]);
        assert_rejected("t@cp/x", &["\"@\" in its protocol"]);
    }

    #[test]
    fn rejects_unsupported_version() {
        let input = format!("@2@tcp@h:1@@{RID}@@@");
        assert_rejected(&input, &["unsupported version \"2\""]);
        assert_rejected("@@tcp@h:1@@@@", &["unsupported version \"\""]);
        assert_rejected("@", &["no \"@\" after its version"]);
        assert_rejected("@1", &["no \"@\" after its version"]);
    }

    #[test]
    fn rejects_missing_trailing_double_at() {
        let input = format!("@1@tcp@h:1@@{RID}@");
        assert_rejected(&input, &["missing the trailing \"@@\""]);
        assert_rejected("@1@", &["missing the trailing \"@@\""]);
        assert_rejected("@1@@", &["missing the trailing \"@@\""]);
    }

    #[test]
    fn rejects_wrong_number_of_fields() {
        assert_rejected("@1@@@", &["1 fields", "want 5"]);
        let short = format!("@1@tcp@h:1@{RID}@@@");
        assert_rejected(&short, &["4 fields", "want 5"]);
        let long = format!("@1@tcp@h:1@@{RID}@@x@@");
        assert_rejected(&long, &["6 fields", "want 5"]);
    }

    #[test]
    fn rejects_bad_routing_ids() {
        let input = "@1@tcp@h:1@@0123@@@";
        assert_rejected(input, &["bad routing id", "4 characters, want 32"]);
        let input = format!("@1@tcp@h:1@@{}@@@", "x".repeat(32));
        assert_rejected(&input, &["bad routing id", "'x' at position 0"]);
        // An empty routing id is not a shorthand for the null one.
        assert_rejected("@1@tcp@h:1@@@@@", &["bad routing id", "0 characters"]);
    }

    #[test]
    fn rejects_bad_route_elements() {
        let input = format!("@1@tcp@h:1@{HOP1},{HOP2},{}@{RID}@@@", &HOP1[1..]);
        assert_rejected(&input, &["route element 3 of 3", "31 characters"]);
        let input = format!("@1@tcp@h:1@{HOP1},,{HOP2}@{RID}@@@");
        assert_rejected(&input, &["route element 2 of 3", "0 characters"]);
        let input = format!("@1@tcp@h:1@{HOP1},@{RID}@@@");
        assert_rejected(&input, &["route element 2 of 2"]);
    }

    #[test]
    fn rejects_empty_blessing_names() {
        let input = format!("@1@tcp@h:1@@{RID}@a,,b@@");
        assert_rejected(&input, &["empty blessing name", "element 2 of 3"]);
        let input = format!("@1@tcp@h:1@@{RID}@a,@@");
        assert_rejected(&input, &["empty blessing name", "element 2 of 2"]);
        let input = format!("@1@tcp@h:1@@{RID}@,@@");
        assert_rejected(&input, &["empty blessing name", "element 1 of 2"]);
    }

    #[test]
    fn with_blessing_names_refuses_empty_names() {
        let err = Endpoint::new("tcp", "h:1")
            .with_blessing_names(["a", ""])
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadArg);
        assert!(
            err.message().contains("blessing name 2 of 2 is empty"),
            "{err}"
        );

        // No names at all is fine.
        let none: [&str; 0] = [];
        let ep = Endpoint::new("tcp", "h:1")
            .with_blessing_names(none)
            .unwrap();
        assert!(ep.blessing_names().is_empty());
    }

    #[test]
    fn rejects_bad_escapes() {
        // Offsets count bytes from the start of the input.
        let input = format!("@1@tcp@h%zz:1@@{RID}@@@");
        assert_rejected(&input, &["bad escape in its address at byte 8"]);
        let input = format!("@1@tc%4@h:1@@{RID}@@@");
        assert_rejected(&input, &["bad escape in its protocol at byte 5"]);
        let input = format!("@1@tcp@h:1%@@{RID}@@@");
        assert_rejected(&input, &["bad escape in its address at byte 10"]);
        let input = format!("@1@tcp@h:1@@{RID}@ok,b%g0@@");
        let at = input.find("%g0").unwrap();
        assert_rejected(
            &input,
            &[&format!("bad escape in its blessing name at byte {at}")],
        );
        // "%é" must not slice through the multi-byte character.
        let input = format!("@1@tcp@h%é@@{RID}@@@");
        assert_rejected(&input, &["bad escape in its address at byte 8"]);
        // Escapes decoding to invalid UTF-8.
        let input = format!("@1@tcp@h%FF@@{RID}@@@");
        assert_rejected(&input, &["address", "invalid UTF-8"]);
    }

    #[test]
    fn pop_route_forwards_to_the_next_hop() -> Result<()> {
        let ep = Endpoint::new("tcp", "proxy:1")
            .with_routing_id(rid(RID))
            .with_route([rid(HOP1), rid(HOP2)])
            .with_blessing_names(["root:server"])?;
        assert_eq!(ep.next_hop(), Some(rid(HOP1)));

        let (hop, forwarded) = ep.pop_route().unwrap();
        assert_eq!(hop, rid(HOP1));
        assert_eq!(forwarded.route(), &[rid(HOP2)]);
        assert_eq!(forwarded.routing_id(), ep.routing_id());
        assert_eq!(forwarded.address(), ep.address());
        assert_eq!(forwarded.blessing_names(), ep.blessing_names());

        let (hop, last) = forwarded.pop_route().unwrap();
        assert_eq!(hop, rid(HOP2));
        assert!(!last.is_proxied());
        assert_eq!(last.next_hop(), None);
        assert!(last.pop_route().is_none());
        Ok(())
    }

    #[test]
    fn with_address_replaces_only_the_address() {
        let ep = Endpoint::new("tcp", "a:1").with_routing_id(rid(RID));
        let moved = ep.clone().with_address("b:2");
        assert_eq!(moved.address(), "b:2");
        assert_eq!(moved, Endpoint::new("tcp", "b:2").with_routing_id(rid(RID)));
    }

    fn arb_routing_id() -> impl Strategy<Value = RoutingId> {
        prop_oneof![
            1 => Just(RoutingId::NULL),
            4 => any::<[u8; 16]>().prop_map(RoutingId::from_bytes),
        ]
    }

    /// Strings heavy in the characters the string form treats specially.
    fn tricky_string() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[@,%/a-fA-F0-9é:]{0,12}",]
    }

    fn arb_endpoint() -> impl Strategy<Value = Endpoint> {
        (
            tricky_string(),
            tricky_string(),
            arb_routing_id(),
            prop::collection::vec(arb_routing_id(), 0..4),
            prop::collection::vec(
                tricky_string().prop_filter("non-empty", |s| !s.is_empty()),
                0..4,
            ),
        )
            .prop_map(|(protocol, address, routing_id, route, names)| Endpoint {
                protocol,
                address,
                routing_id,
                route,
                blessing_names: names,
            })
    }

    /// Inputs near the grammar, to reach the deeper error paths.
    fn near_endpoint_string() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[@1,%/0-9a-fA-Fgé]{0,80}",
            arb_endpoint()
                .prop_flat_map(|ep| {
                    let text = ep.to_string();
                    let len = text.len();
                    (Just(text), 0..=len, 0..=len, "[@,%0-9g]{0,3}")
                })
                .prop_map(|(text, a, b, insert)| {
                    // Splice `insert` over a range of the valid form, on char
                    // boundaries.
                    let (lo, hi) = (a.min(b), a.max(b));
                    let lo = (0..=lo)
                        .rev()
                        .find(|&i| text.is_char_boundary(i))
                        .unwrap_or(0);
                    let hi = (hi..=text.len())
                        .find(|&i| text.is_char_boundary(i))
                        .unwrap_or(text.len());
                    format!("{}{}{}", &text[..lo], insert, &text[hi..])
                }),
        ]
    }

    proptest! {
        #[test]
        fn every_endpoint_round_trips(ep in arb_endpoint()) {
            let text = ep.to_string();
            let back = Endpoint::parse(&text);
            prop_assert_eq!(back.as_ref().ok(), Some(&ep), "{:?} -> {:?}", text, back);
            // And the text is canonical.
            prop_assert_eq!(back.map(|b| b.to_string()).ok(), Some(text));
        }

        #[test]
        fn built_endpoints_round_trip(
            protocol in tricky_string(),
            address in tricky_string(),
            routing_id in arb_routing_id(),
            route in prop::collection::vec(arb_routing_id(), 0..4),
            names in prop::collection::vec(tricky_string(), 0..4),
        ) {
            let built = Endpoint::new(protocol, address)
                .with_routing_id(routing_id)
                .with_route(route)
                .with_blessing_names(names.clone());
            match built {
                Ok(ep) => {
                    prop_assert!(names.iter().all(|n| !n.is_empty()));
                    prop_assert_eq!(Endpoint::parse(&ep.to_string()).ok(), Some(ep));
                }
                Err(err) => {
                    prop_assert_eq!(err.kind(), ErrorKind::BadArg);
                    prop_assert!(names.iter().any(String::is_empty));
                }
            }
        }

        #[test]
        fn parse_never_panics(s in near_endpoint_string()) {
            match Endpoint::parse(&s) {
                // Whatever parses prints back to something that parses to it.
                Ok(ep) => prop_assert_eq!(Endpoint::parse(&ep.to_string()).ok(), Some(ep)),
                Err(err) => prop_assert_eq!(err.kind(), ErrorKind::BadArg),
            }
        }
    }
}
