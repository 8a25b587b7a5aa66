//! Where a tunnel goes next, and which endpoints a registrant is given.
//!
//! Endpoints name the proxies still to cross in their route, first hop
//! first. A proxy registered through another one (`MultiProxyRequest`) is
//! given the upstream proxy's endpoints with its own routing id appended to
//! the route; a server is given them with its routing id in place. So a
//! dialer of `A's address, route [B], routing id S` reaches A, A forwards to
//! B (the first hop that is not A), B finds no hop left but itself and
//! forwards to the server S.
//!
//! The hello a proxy routes by is part of the end-to-end handshake (its
//! hash covers it), so no hop can pop the route it carries: every hop sees
//! the whole route and goes on from the hop after its own last mention.
//! The position only moves forward, so a route cannot make proxies loop.

use flow::naming::{Endpoint, RoutingId};

/// What registered through a control flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// A server (`ProxyServerRequest`): tunnels for its routing id end there.
    Server,
    /// Another proxy (`MultiProxyRequest`): tunnels whose route names it go
    /// there, for it to route further.
    Proxy,
}

/// The next hop of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hop {
    /// A downstream proxy, by routing id.
    Proxy(RoutingId),
    /// The server with this routing id.
    Server(RoutingId),
}

/// Where a dialer asking for `requested` goes from the proxy `own`: the
/// route from the hop after `own`'s last mention in it (from the start if
/// it is not mentioned) names the next downstream proxy; with no hop left,
/// the endpoint's routing id is the server. `None` when the endpoint names
/// nothing but this proxy (or null ids): there is nowhere to forward to.
pub(crate) fn next_hop(own: RoutingId, requested: &Endpoint) -> Option<Hop> {
    let route = requested.route();
    let from = route
        .iter()
        .rposition(|hop| *hop == own)
        .map_or(0, |i| i + 1);
    match route.get(from) {
        Some(hop) if hop.is_null() => None,
        Some(hop) => Some(Hop::Proxy(*hop)),
        None => {
            let rid = requested.routing_id();
            if rid.is_null() || rid == own {
                None
            } else {
                Some(Hop::Server(rid))
            }
        }
    }
}

/// The endpoints to give a registrant: this proxy's own endpoints `own`
/// with the registrant's routing id `rid` and blessing `names` in place,
/// and, for a downstream proxy, `rid` appended to the route.
pub(crate) fn endpoints_for(
    own: &[Endpoint],
    kind: Kind,
    rid: RoutingId,
    names: &[String],
) -> Vec<Endpoint> {
    own.iter()
        .map(|ep| {
            let mut ep = ep.clone().with_routing_id(rid);
            if kind == Kind::Proxy {
                let route: Vec<RoutingId> = ep.route().iter().copied().chain([rid]).collect();
                ep = ep.with_route(route);
            }
            // Names come from validated blessings, which are never empty;
            // should one be, the endpoint goes without names rather than
            // not at all.
            match ep.clone().with_blessing_names(names.iter().cloned()) {
                Ok(named) => named,
                Err(_) => ep,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(route: &[RoutingId], rid: RoutingId) -> Endpoint {
        Endpoint::new("tcp", "127.0.0.1:1")
            .with_route(route.iter().copied())
            .with_routing_id(rid)
    }

    #[test]
    fn a_server_endpoint_goes_to_the_server() {
        let (a, s) = (RoutingId::random(), RoutingId::random());
        assert_eq!(next_hop(a, &ep(&[], s)), Some(Hop::Server(s)));
        // A client that names this proxy in the route gets the same.
        assert_eq!(next_hop(a, &ep(&[a], s)), Some(Hop::Server(s)));
        assert_eq!(next_hop(a, &ep(&[a, a], s)), Some(Hop::Server(s)));
    }

    #[test]
    fn remaining_hops_go_to_the_downstream_proxy() {
        let (a, b, c, s) = (
            RoutingId::random(),
            RoutingId::random(),
            RoutingId::random(),
            RoutingId::random(),
        );
        assert_eq!(next_hop(a, &ep(&[b], s)), Some(Hop::Proxy(b)));
        assert_eq!(next_hop(a, &ep(&[b, c], s)), Some(Hop::Proxy(b)));
        assert_eq!(next_hop(b, &ep(&[b, c], s)), Some(Hop::Proxy(c)));
        assert_eq!(next_hop(c, &ep(&[b, c], s)), Some(Hop::Server(s)));
        assert_eq!(next_hop(a, &ep(&[a, b], s)), Some(Hop::Proxy(b)));
    }

    #[test]
    fn every_hop_moves_forward_so_routes_cannot_loop() {
        let ids: Vec<RoutingId> = (0..4).map(|_| RoutingId::random()).collect();
        let s = RoutingId::random();
        // Routes that mention hops again, in any order, still end.
        for route in [
            vec![ids[1], ids[0], ids[1]],
            vec![ids[1], ids[2], ids[1], ids[2]],
            vec![ids[0], ids[0], ids[3], ids[0]],
        ] {
            let target = ep(&route, s);
            let mut at = ids[0];
            let mut hops = 0;
            while let Some(Hop::Proxy(next)) = next_hop(at, &target) {
                at = next;
                hops += 1;
                assert!(hops <= route.len(), "{route:?} loops");
            }
        }
    }

    #[test]
    fn nothing_to_forward_to() {
        let a = RoutingId::random();
        assert_eq!(next_hop(a, &ep(&[], a)), None);
        assert_eq!(next_hop(a, &ep(&[a], RoutingId::NULL)), None);
        assert_eq!(
            next_hop(a, &ep(&[RoutingId::NULL], RoutingId::random())),
            None
        );
    }

    #[test]
    fn registrants_get_own_endpoints_rewritten() {
        let (a, b, s) = (
            RoutingId::random(),
            RoutingId::random(),
            RoutingId::random(),
        );
        let own = vec![
            Endpoint::new("tcp", "127.0.0.1:1")
                .with_routing_id(a)
                .with_blessing_names(["proxy".to_string()])
                .unwrap(),
        ];
        let names = vec!["server".to_string()];
        let for_server = endpoints_for(&own, Kind::Server, s, &names);
        assert_eq!(for_server.len(), 1);
        assert_eq!(for_server[0].routing_id(), s);
        assert!(for_server[0].route().is_empty());
        assert_eq!(for_server[0].blessing_names(), &names[..]);
        assert_eq!(for_server[0].address(), "127.0.0.1:1");

        let for_proxy = endpoints_for(&own, Kind::Proxy, b, &["b".to_string()]);
        assert_eq!(for_proxy[0].route(), &[b]);
        assert_eq!(for_proxy[0].routing_id(), b);

        // B re-exports A's endpoint to its server S: route stays [b], the
        // routing id becomes S, and A routes it to B, B to S.
        let via_a = endpoints_for(&for_proxy, Kind::Server, s, &names);
        assert_eq!(via_a[0].route(), &[b]);
        assert_eq!(via_a[0].routing_id(), s);
        assert_eq!(next_hop(a, &via_a[0]), Some(Hop::Proxy(b)));
        assert_eq!(next_hop(b, &via_a[0]), Some(Hop::Server(s)));
    }
}
