//! The traits a transport implements to carry flow connections: a
//! [`Protocol`] dials, resolves and listens; a [`Listener`] accepts; a
//! [`FramedConn`] carries whole frames and splits into a [`FrameReader`] and a
//! [`FrameWriter`] so a connection's reader and writer tasks never contend.
//!
//! The registry of protocols and the transports themselves live in the
//! `flow-protocols` crate.

use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;

use crate::Result;

/// Reads whole frames from a transport.
pub trait FrameReader: Send + 'static {
    /// The next frame, whole; `Ok(None)` when the peer closed cleanly between
    /// frames. A stream that ends inside a frame is an error
    /// ([`crate::ErrorKind::Network`]), as is a frame longer than the
    /// transport's maximum ([`crate::ErrorKind::BadArg`]).
    ///
    /// The frame is returned mutable and uniquely owned so the caller can
    /// decrypt it in place. Not cancel safe: drop the reader after dropping a
    /// pending read.
    fn read_frame(&mut self) -> BoxFuture<'_, Result<Option<BytesMut>>>;

    /// Asks the transport to push every later frame to `sink` from the
    /// task that receives it, sparing a hand-off to a task reading this
    /// reader. Returns whether it will; if so, [`FrameReader::read_frame`]
    /// from then on returns only the end of the stream (after the last
    /// frame was delivered) or an error. By default a transport does not.
    fn attach_sink(&mut self, sink: std::sync::Arc<dyn FrameSink>) -> bool {
        let _ = sink;
        false
    }
}

/// Takes frames pushed to it by the task that receives them (see
/// [`FrameReader::attach_sink`]). It takes every frame.
pub trait FrameSink: Send + Sync + 'static {
    /// The next frame, whole and in order.
    fn deliver(&self, frame: Bytes);
}

/// A frame to write: a head and a tail that follows it on the wire, as
/// one frame. The tail lets a frame carry a payload held elsewhere (a
/// message being relayed, say) without copying it next to the head.
/// Equality compares the parts, not only the bytes they make together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    head: Bytes,
    tail: Bytes,
}

impl Frame {
    /// A frame of `head`, then `tail`.
    pub fn with_tail(head: Bytes, tail: Bytes) -> Frame {
        Frame { head, tail }
    }

    /// Its length on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Whether it has no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first part.
    pub fn head(&self) -> &Bytes {
        &self.head
    }

    /// The part after the head; empty for most frames.
    pub fn tail(&self) -> &Bytes {
        &self.tail
    }

    /// Both parts, in order.
    pub fn parts(&self) -> [&[u8]; 2] {
        [&self.head, &self.tail]
    }

    /// The frame as one buffer: one part itself when the other is
    /// empty, else a copy of both.
    pub fn to_bytes(&self) -> Bytes {
        if self.tail.is_empty() {
            return self.head.clone();
        }
        if self.head.is_empty() {
            return self.tail.clone();
        }
        let mut whole = BytesMut::with_capacity(self.len());
        whole.extend_from_slice(&self.head);
        whole.extend_from_slice(&self.tail);
        whole.freeze()
    }

    /// The parts, for whoever takes the frame apart.
    pub fn into_parts(self) -> (Bytes, Bytes) {
        (self.head, self.tail)
    }
}

impl From<Bytes> for Frame {
    fn from(head: Bytes) -> Frame {
        Frame {
            head,
            tail: Bytes::new(),
        }
    }
}

impl From<&'static [u8]> for Frame {
    fn from(head: &'static [u8]) -> Frame {
        Frame::from(Bytes::from_static(head))
    }
}

/// Writes whole frames to a transport.
pub trait FrameWriter: Send + 'static {
    /// Writes `frames` in order, each whole, in as few system calls as the
    /// transport allows. Completes when the transport has taken every byte.
    /// Frames longer than the transport's maximum fail with
    /// [`crate::ErrorKind::BadArg`] before anything is written.
    fn write_frames<'a>(&'a mut self, frames: &'a [Frame]) -> BoxFuture<'a, Result<()>>;

    /// Whether [`FrameWriter::try_write_frames`] can take frames without
    /// waiting. A connection over such a transport lets the task that
    /// writes to a flow send the frames itself, sparing a hand-off to the
    /// connection's writer task. Asked once, when the connection starts.
    fn writes_without_waiting(&self) -> bool {
        false
    }

    /// Takes as many of `frames`, in order, as the transport can take right
    /// now without waiting; returns how many it took. The rest go through
    /// [`FrameWriter::write_frames`] later. A transport may take a frame in
    /// part: it keeps the rest, reports it with
    /// [`FrameWriter::has_pending`], and writes it first on the next call.
    fn try_write_frames(&mut self, frames: &[Frame]) -> Result<usize> {
        let _ = frames;
        Ok(0)
    }

    /// Whether bytes of frames already taken wait to be written: a
    /// [`FrameWriter::write_frames`] call, even with no frames, writes them.
    fn has_pending(&self) -> bool {
        false
    }

    /// Flushes and closes the write direction: the peer's reader sees a clean
    /// end of stream after the last frame.
    fn close(&mut self) -> BoxFuture<'_, Result<()>>;
}

/// A connection that carries whole frames, before any encryption.
pub trait FramedConn: Send + 'static {
    /// Splits into independent read and write halves.
    fn split(self: Box<Self>) -> (Box<dyn FrameReader>, Box<dyn FrameWriter>);

    /// The local address, in the protocol's own notation.
    fn local_addr(&self) -> String;

    /// The remote address, in the protocol's own notation.
    fn remote_addr(&self) -> String;

    /// The largest frame this transport carries, in bytes.
    fn max_frame_size(&self) -> usize;
}

impl fmt::Debug for dyn FramedConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FramedConn")
            .field("local", &self.local_addr())
            .field("remote", &self.remote_addr())
            .finish()
    }
}

/// Accepts framed connections.
pub trait Listener: Send + Sync + 'static {
    /// The next connection. Transient failures (a peer that goes away during
    /// a handshake, running out of file descriptors) are retried inside, not
    /// returned; an error means the listener is closed or broken for good.
    fn accept(&self) -> BoxFuture<'_, Result<Box<dyn FramedConn>>>;

    /// The address actually listened on (a port of 0 is replaced by the real
    /// port).
    fn local_addr(&self) -> String;

    /// Stops listening. Pending and later [`Listener::accept`] calls fail with
    /// [`crate::ErrorKind::BadState`].
    fn close(&self);
}

/// A way to make framed connections: tcp, ws, unix, memory, ...
pub trait Protocol: Send + Sync + 'static {
    /// Connects to `address` using `protocol` (one of the names this protocol
    /// was registered for), failing with [`crate::ErrorKind::Timeout`] after
    /// `timeout`.
    fn dial<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn FramedConn>>>;

    /// Normalizes `address` (for tcp: DNS) into the protocol to dial and every
    /// address it stands for. By default, `address` stands for itself.
    fn resolve<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<(String, Vec<String>)>> {
        Box::pin(async move { Ok((protocol.to_string(), vec![address.to_string()])) })
    }

    /// Starts listening on `address`.
    fn listen<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Listener>>>;
}
