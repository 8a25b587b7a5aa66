//! Driving a `yamux::Connection` from tokio.
//!
//! A yamux connection makes progress only while someone polls it, so one
//! task owns it (as libp2p's swarm does): it polls for inbound streams and
//! serves requests for outbound ones that arrive on a channel.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::task::Poll;

use futures::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

/// A yamux stream seen through tokio's I/O traits.
pub(crate) type TokioStream = Compat<yamux::Stream>;

type OpenReply = oneshot::Sender<io::Result<yamux::Stream>>;

/// The configuration both sides use: yamux's defaults (those of
/// libp2p-yamux), with room for `max_streams` streams.
pub(crate) fn config(max_streams: usize) -> yamux::Config {
    let mut config = yamux::Config::default();
    if max_streams > 512 {
        // The connection-wide receive window must cover 256 KiB per stream
        // for yamux to accept the stream count; lift it for the idle-memory
        // case (nothing is buffered there).
        config.set_max_connection_receive_window(None);
        config.set_max_num_streams(max_streams);
    }
    config
}

/// The opening side's handle on a driven connection.
pub(crate) struct Handle {
    open: mpsc::UnboundedSender<OpenReply>,
}

impl Handle {
    /// Opens an outbound stream.
    pub(crate) async fn open(&self) -> io::Result<TokioStream> {
        let (reply, answer) = oneshot::channel();
        self.open
            .send(reply)
            .map_err(|_| io::Error::other("yamux connection is gone"))?;
        let stream = answer
            .await
            .map_err(|_| io::Error::other("yamux connection is gone"))??;
        Ok(stream.compat())
    }
}

/// Starts the task that drives a connection over `io`. Inbound streams go to
/// `inbound` (or are dropped when it is `None`). The connection closes when
/// the returned handle is dropped.
pub(crate) fn start<T>(
    io: T,
    mode: yamux::Mode,
    config: yamux::Config,
    inbound: Option<mpsc::UnboundedSender<TokioStream>>,
) -> Handle
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (open, requests) = mpsc::unbounded_channel();
    let connection = yamux::Connection::new(io, config, mode);
    tokio::spawn(drive(connection, requests, inbound));
    Handle { open }
}

async fn drive<T>(
    mut connection: yamux::Connection<T>,
    mut requests: mpsc::UnboundedReceiver<OpenReply>,
    inbound: Option<mpsc::UnboundedSender<TokioStream>>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut waiting: VecDeque<OpenReply> = VecDeque::new();
    let mut handle_dropped = false;
    poll_fn(|cx| {
        while !handle_dropped {
            match requests.poll_recv(cx) {
                Poll::Ready(Some(reply)) => waiting.push_back(reply),
                Poll::Ready(None) => handle_dropped = true,
                Poll::Pending => break,
            }
        }
        while !waiting.is_empty() {
            match connection.poll_new_outbound(cx) {
                Poll::Ready(result) => {
                    if let Some(reply) = waiting.pop_front() {
                        let _ = reply.send(result.map_err(io::Error::other));
                    }
                }
                Poll::Pending => break,
            }
        }
        if handle_dropped && inbound.is_none() {
            // The opening side is done with the connection: close it.
            return connection.poll_close(cx).map(|_| ());
        }
        loop {
            match connection.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    if let Some(inbound) = &inbound {
                        let _ = inbound.send(stream.compat());
                    }
                }
                Poll::Ready(Some(Err(_))) | Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
}
