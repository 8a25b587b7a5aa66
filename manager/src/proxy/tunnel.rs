//! Tunnels: a dialer's flow carrying an end-to-end connection, forwarded
//! message by message to the server (or next proxy) it asks for.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use flow::Error;
use flow::conn::handshake::requested_endpoint;
use flow::conn::{Delivery, Flow, FlowOptions, FlowReader, FlowWriter, MessageSender, MessageSink};
use parking_lot::Mutex;

use super::metrics::{Counters, Direction};
use super::registry::FlowSlot;
use super::route::next_hop;
use super::{Cutoff, Inner, Refusal, Refused};

/// Counts a tunnel as active while it lives.
struct Active(Arc<Inner>);

impl Active {
    fn new(inner: Arc<Inner>) -> Active {
        inner.counters.tunnel_opened();
        Active(inner)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.counters.tunnel_closed();
        self.0.tunnel_ended.notify_waiters();
    }
}

/// Routes the tunnel whose first message, the dialer's handshake hello,
/// is `hello`, and relays it until either side ends it.
pub(super) async fn serve(inner: Arc<Inner>, client: Flow, hello: Bytes) {
    let started = Instant::now();
    let conn = client.conn().clone();
    let (server, slot) = match open(&inner, &client, &hello) {
        Ok(opened) => opened,
        Err(refused) => {
            inner.refused(&conn, &refused);
            client.close();
            return;
        }
    };
    let _active = Active::new(inner.clone());
    let mut server = server;
    if let Err(e) = server.write_msg(&[&hello]).await {
        let refused = Refused::new(
            Refusal::TargetUnavailable,
            format!("forwarding the hello failed: {e}"),
        );
        inner.refused(&conn, &refused);
        client.close();
        return;
    }
    inner
        .counters
        .relayed(Direction::ToServer, hello.len() as u64);
    match relay(&inner, client, server, started, hello.len() as u64).await {
        Ok(()) => {}
        Err(End::Cut(why)) => {
            inner.counters.cut(why);
            tracing::info!(peer = %conn.remote_addr(), limit = why.as_str(), "proxied flow cut");
        }
        Err(End::Failed(e)) => {
            tracing::debug!(peer = %conn.remote_addr(), error = %e, "proxied flow failed");
        }
    }
    drop(slot);
}

/// Checks the dialer, finds the next hop, and opens the flow to it.
fn open(
    inner: &Inner,
    client: &Flow,
    hello: &[u8],
) -> std::result::Result<(Flow, FlowSlot), Refused> {
    let conn = client.conn();
    if inner.is_stopping() {
        return Err(Refused::new(
            Refusal::ShuttingDown,
            "the proxy is shutting down",
        ));
    }
    if inner.manager.is_tunneled(conn) {
        return Err(super::tunneled());
    }
    let from_upstream = inner.is_upstream(conn);
    if !from_upstream {
        // An upstream proxy applied its own dial policy; everyone else
        // faces this one.
        let names = &conn.authorized_peer().names;
        if !inner.allow_dial.iter().any(|p| p.matched_by(names)) {
            return Err(Refused::new(
                Refusal::DialNotAllowed,
                format!("blessing names {names:?} match no dial pattern"),
            ));
        }
    }
    let requested = requested_endpoint(hello).map_err(|e| {
        Refused::new(
            Refusal::BadRequest,
            format!("unreadable handshake hello: {e}"),
        )
    })?;
    let hop = next_hop(inner.own_rid, &requested).ok_or_else(|| {
        Refused::new(
            Refusal::UnknownTarget,
            format!("{requested} names nothing beyond this proxy"),
        )
    })?;
    let target = inner.registry.lock().lookup(hop).ok_or_else(|| {
        Refused::new(
            Refusal::UnknownTarget,
            format!("nothing registered for {hop:?} (asked for {requested})"),
        )
    })?;
    let slot =
        FlowSlot::take(&target.flows, inner.limits.max_flows_per_server).ok_or_else(|| {
            Refused::new(
                Refusal::TooManyFlows,
                format!(
                    "{} has {} proxied flows open",
                    target.rid, inner.limits.max_flows_per_server
                ),
            )
        })?;
    let unavailable = |e: Error| {
        Refused::new(
            Refusal::TargetUnavailable,
            format!("cannot open a flow to {}: {e}", target.rid),
        )
    };
    let server = target
        .conn
        .open_flow(FlowOptions::default())
        .map_err(unavailable)?;
    server.set_passthrough().map_err(unavailable)?;
    client.set_passthrough().map_err(unavailable)?;
    Ok((server, slot))
}

/// How a relay ended, when not by both sides closing.
enum End {
    Cut(Cutoff),
    Failed(Error),
}

/// Relays whole messages both ways until both directions are closed, one
/// fails, or a per-flow limit cuts the tunnel. Dropping the halves on the
/// way out closes both flows.
async fn relay(
    inner: &Arc<Inner>,
    client: Flow,
    server: Flow,
    started: Instant,
    already: u64,
) -> std::result::Result<(), End> {
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    let limit = inner
        .limits
        .max_bytes_per_flow
        .map(|max| Arc::new(ByteLimit::new(max, already)));
    let sender = |w: &FlowWriter| w.sender().map_err(End::Failed);
    let up = Forward::new(
        inner,
        sender(&server_w)?,
        Direction::ToServer,
        limit.clone(),
        None,
    );
    let down = Forward::new(
        inner,
        sender(&client_w)?,
        Direction::ToClient,
        limit,
        Some(started),
    );
    // However the relay ends, the sinks stop forwarding: each holds the
    // other flow, and neither may keep it open.
    let _stop = (Stop(up.clone()), Stop(down.clone()));
    let up = pump(client_r, server_w, up);
    let down = pump(server_r, client_w, down);
    tokio::pin!(up, down);
    let deadline = inner
        .limits
        .max_flow_duration
        .map(|d| tokio::time::Instant::from_std(started + d));
    let expired = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => {
                r?;
                up_done = true;
            }
            r = &mut down, if !down_done => {
                r?;
                down_done = true;
            }
            () = &mut expired => return Err(End::Cut(Cutoff::MaxDuration)),
        }
    }
    Ok(())
}

/// The per-flow byte limit of a tunnel: bytes relayed both ways, counted
/// as each message is sent on.
struct ByteLimit {
    max: u64,
    used: Mutex<u64>,
}

impl ByteLimit {
    fn new(max: u64, used: u64) -> ByteLimit {
        ByteLimit {
            max,
            used: Mutex::new(used),
        }
    }

    /// Runs `send` for a message of `n` bytes if the limit allows them,
    /// counting them if it sends (one direction at a time, so neither sees
    /// the other's bytes before they are sent or given up). `None` if the
    /// limit does not allow them.
    fn send_within(&self, n: u64, send: impl FnOnce() -> bool) -> Option<bool> {
        let mut used = self.used.lock();
        if *used + n > self.max {
            return None;
        }
        let sent = send();
        if sent {
            *used += n;
        }
        Some(sent)
    }
}

/// One direction of a tunnel. As the sink of the flow it reads, it
/// forwards each message from the carrying connection's reading task
/// straight into the other flow while that one has credit; a message it
/// cannot forward now goes back to the flow, where [`pump`] writes it,
/// waiting for credit, and then attaches the sink again.
struct Forward {
    counters: Arc<Counters>,
    /// `None` once the relay ended.
    to: Mutex<Option<MessageSender>>,
    direction: Direction,
    limit: Option<Arc<ByteLimit>>,
    /// When the hello arrived, for the direction whose first message
    /// forwarded ends the dial-through latency.
    hello_at: Option<Instant>,
    /// Whether that first message went.
    replied: AtomicBool,
}

impl Forward {
    fn new(
        inner: &Inner,
        to: MessageSender,
        direction: Direction,
        limit: Option<Arc<ByteLimit>>,
        hello_at: Option<Instant>,
    ) -> Arc<Forward> {
        Arc::new(Forward {
            counters: inner.counters.clone(),
            to: Mutex::new(Some(to)),
            direction,
            limit,
            hello_at,
            replied: AtomicBool::new(false),
        })
    }

    /// Sends `msg` on without waiting; false if the other flow cannot take
    /// it now (or failed, or the relay ended: the pump finds out).
    fn try_forward(&self, msg: &Bytes) -> bool {
        self.to
            .lock()
            .as_ref()
            .is_some_and(|to| matches!(to.try_send_bytes(msg), Ok(true)))
    }

    /// `n` bytes went on to the other flow.
    fn forwarded(&self, n: u64) {
        self.counters.relayed(self.direction, n);
        if let Some(at) = self.hello_at
            && !self.replied.load(Ordering::Relaxed)
            && !self.replied.swap(true, Ordering::Relaxed)
        {
            self.counters.dial_through(at.elapsed());
        }
    }
}

impl MessageSink for Forward {
    fn offer(&self, msg: Bytes) -> Delivery {
        let n = msg.len() as u64;
        let sent = match &self.limit {
            // Over the limit: refused, so the pump meets the limit and
            // cuts the tunnel.
            Some(limit) => limit
                .send_within(n, || self.try_forward(&msg))
                .unwrap_or(false),
            None => self.try_forward(&msg),
        };
        if !sent {
            return Delivery::Refused(msg);
        }
        self.forwarded(n);
        Delivery::Taken
    }
}

/// Stops a [`Forward`] when dropped.
struct Stop(Arc<Forward>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.to.lock().take();
    }
}

/// Forwards messages from `from` to `to` until `from` ends; then
/// half-closes `to`. Most go through `forward` as `from`'s sink; this
/// writes those it refused, with backpressure.
async fn pump(
    mut from: FlowReader,
    mut to: FlowWriter,
    forward: Arc<Forward>,
) -> std::result::Result<(), End> {
    loop {
        // Attached, the sink takes everything until it cannot; fails (and
        // changes nothing) while attached already or the flow is not yet
        // open on the wire.
        from.attach_sink(forward.clone());
        match from.read_msg().await {
            Ok(Some(msg)) => {
                let n = msg.len() as u64;
                // Counted before the wait for credit: the message goes
                // unless the tunnel fails, which ends it anyway.
                if let Some(limit) = &forward.limit
                    && limit.send_within(n, || true).is_none()
                {
                    return Err(End::Cut(Cutoff::MaxBytes));
                }
                to.write_bytes(&msg).await.map_err(End::Failed)?;
                forward.forwarded(n);
            }
            Ok(None) => {
                to.close_write();
                return Ok(());
            }
            Err(e) => return Err(End::Failed(e)),
        }
    }
}
