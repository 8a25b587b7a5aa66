//! A flow seen as a framed connection, and the `proxy` protocol built on it.
//!
//! A [`FlowConn`] carries another connection's frames over one flow: every
//! frame is one message (fragmentation off) sent as a passthrough payload,
//! so the carrying connection does not encrypt the already-sealed frames a
//! second time. A proxied connection is a [`FlowConn`] to the proxy with a
//! full, end-to-end handshake run inside it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::BytesMut;
use flow::auth::AllowEveryone;
use flow::conn::{Flow, FlowReader, FlowWriter, MessageSender};
use flow::naming::Endpoint;
use flow::transport::{Frame, FrameReader, FrameSink, FrameWriter, FramedConn, Listener, Protocol};
use flow::{Error, Result};
use futures::future::BoxFuture;

use crate::manager::{Inner, Manager};

/// A flow carrying another connection's frames.
pub struct FlowConn {
    flow: Flow,
    sender: MessageSender,
    local: String,
    remote: String,
    max_frame: usize,
}

impl std::fmt::Debug for FlowConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowConn")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .finish()
    }
}

impl FlowConn {
    /// Wraps `flow`: from now on each write is one whole frame, sent without
    /// a second encryption.
    pub fn new(flow: Flow) -> Result<FlowConn> {
        flow.set_passthrough()?;
        let sender = flow.sender()?;
        let max_frame = flow.conn().max_message();
        let local = format!("{} via flow", flow.conn().local_addr());
        let remote = format!("{} via flow", flow.conn().remote_addr());
        Ok(FlowConn {
            flow,
            sender,
            local,
            remote,
            max_frame,
        })
    }
}

struct FlowFrameReader(FlowReader);
struct FlowFrameWriter {
    writer: FlowWriter,
    /// Writes frames without waiting, checked once to keep them whole.
    sender: MessageSender,
}

impl FrameReader for FlowFrameReader {
    fn read_frame(&mut self) -> BoxFuture<'_, Result<Option<BytesMut>>> {
        Box::pin(async move {
            Ok(self.0.read_msg().await?.map(|b| match b.try_into_mut() {
                Ok(unique) => unique,
                Err(shared) => BytesMut::from(&shared[..]),
            }))
        })
    }

    /// The carrying connection's reading task hands each message (one
    /// frame of the carried connection) straight to `sink`.
    fn attach_sink(&mut self, sink: Arc<dyn FrameSink>) -> bool {
        self.0.attach_frame_sink(sink)
    }
}

impl FrameWriter for FlowFrameWriter {
    fn write_frames<'a>(&'a mut self, frames: &'a [Frame]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            for frame in frames {
                if frame.tail().is_empty() {
                    self.writer.write_bytes(frame.head()).await?;
                } else {
                    self.writer.write_msg(&frame.parts()).await?;
                }
            }
            Ok(())
        })
    }

    fn writes_without_waiting(&self) -> bool {
        true
    }

    fn try_write_frames(&mut self, frames: &[Frame]) -> Result<usize> {
        for (taken, frame) in frames.iter().enumerate() {
            // Held, not copied: a frame is one message, kept whole. (One
            // with a tail — a chained proxy's — is joined first.)
            if !self.sender.try_send_bytes(&frame.to_bytes())? {
                return Ok(taken);
            }
        }
        Ok(frames.len())
    }

    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        self.writer.close_write();
        Box::pin(async { Ok(()) })
    }
}

impl FramedConn for FlowConn {
    fn split(self: Box<Self>) -> (Box<dyn FrameReader>, Box<dyn FrameWriter>) {
        let (r, writer) = self.flow.into_split();
        let sender = self.sender;
        (
            Box::new(FlowFrameReader(r)),
            Box::new(FlowFrameWriter { writer, sender }),
        )
    }

    fn local_addr(&self) -> String {
        self.local.clone()
    }

    fn remote_addr(&self) -> String {
        self.remote.clone()
    }

    fn max_frame_size(&self) -> usize {
        self.max_frame
    }
}

/// The `proxy` protocol: "dialing" an address — a proxy's endpoint —
/// opens a flow to it through the manager and hands the flow back as a
/// framed connection, over which the caller runs its end-to-end handshake.
pub struct ProxyProtocol {
    manager: Weak<Inner>,
}

impl ProxyProtocol {
    /// The protocol, dialing through `manager`.
    pub fn new(manager: &Manager) -> Self {
        ProxyProtocol {
            manager: Arc::downgrade(&manager.inner),
        }
    }
}

impl Protocol for ProxyProtocol {
    fn dial<'a>(
        &'a self,
        _protocol: &'a str,
        address: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn FramedConn>>> {
        Box::pin(async move {
            let inner = self
                .manager
                .upgrade()
                .ok_or_else(|| Error::bad_state("the manager behind the proxy protocol is gone"))?;
            let proxy = Endpoint::parse(address)?;
            let manager = Manager { inner };
            let flow = tokio::time::timeout(
                timeout,
                manager.dial(&proxy, Arc::new(AllowEveryone), Duration::ZERO),
            )
            .await
            .map_err(|_| Error::timeout(format!("dialing proxy {proxy} timed out")))??;
            Ok(Box::new(FlowConn::new(flow)?) as Box<dyn FramedConn>)
        })
    }

    fn listen<'a>(
        &'a self,
        _protocol: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Listener>>> {
        Box::pin(async move {
            Err(Error::bad_arg(format!(
                "cannot listen on proxy {address} with the proxy protocol; use Manager::proxy_listen"
            )))
        })
    }
}
