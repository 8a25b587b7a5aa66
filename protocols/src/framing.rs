//! Length-prefixed framing over any byte stream, shared by tcp, unix and the
//! raw side of wsh.
//!
//! On the wire a frame is a 4-byte big-endian length followed by that many
//! bytes: a [`Frame`]'s head then its tail, as one frame. Reads buffer large
//! chunks into one `BytesMut` and hand out whole frames with `split_to`;
//! writes put every prefix, head and tail of one call into a single vectored
//! write, continuing after partial writes.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use flow::transport::{Frame, FrameReader, FrameWriter, FramedConn};
use flow::{Error, ErrorKind, Result};
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::MAX_FRAME_SIZE;

/// Bytes in a frame's length prefix.
pub(crate) const PREFIX_LEN: usize = 4;

/// How much a reader asks the kernel for at least, per read.
const READ_CHUNK: usize = 128 * 1024;

/// Frames up to this size are copied out of the read buffer rather than
/// split off it: a split-off frame shares the buffer, so while the
/// application holds it the next read needs a new buffer; for small frames
/// (one per read, as in request/response traffic) a fresh 128 KiB
/// allocation per frame costs far more than the copy.
const COPY_MAX: usize = 4 * 1024;

/// Writes up to this many bytes on the wire (prefixes included) are
/// copied into one buffer and sent with a plain write: for small frames
/// the copy costs less than the kernel's vectored-write path.
const GATHER_MAX: usize = 4 * 1024;

/// Checks every frame of a write (head and tail together) against the
/// maximum before anything is written.
pub(crate) fn check_frame_sizes(label: &str, frames: &[Frame]) -> Result<()> {
    match frames.iter().find(|f| f.len() > MAX_FRAME_SIZE) {
        Some(frame) => Err(Error::bad_arg(format!(
            "{label}: frame of {} bytes exceeds the maximum of {MAX_FRAME_SIZE}",
            frame.len()
        ))),
        None => Ok(()),
    }
}

/// A frame's length prefix: its head and tail together.
fn prefix_of(frame: &Frame) -> [u8; PREFIX_LEN] {
    // Fits: every frame is checked to be at most MAX_FRAME_SIZE <= u32::MAX.
    (frame.len() as u32).to_be_bytes()
}

/// A frame's bytes on the wire, in order: its prefix, head and tail.
fn wire_parts<'a>(prefix: &'a [u8; PREFIX_LEN], frame: &'a Frame) -> [&'a [u8]; 3] {
    let [head, tail] = frame.parts();
    [prefix, head, tail]
}

/// Bytes a frame takes on the wire, prefix included.
fn wire_len(frame: &Frame) -> usize {
    PREFIX_LEN + frame.len()
}

/// Wraps an i/o error of an established connection, naming the connection.
pub(crate) fn io_error(label: &str, what: &str, err: std::io::Error) -> Error {
    let kind = match err.kind() {
        std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Network,
    };
    Error::with_source(kind, format!("{label}: {what}: {err}"), err)
}

/// The read half of a length-prefixed stream.
pub(crate) struct StreamReader<R> {
    io: R,
    buf: BytesMut,
    label: Arc<str>,
}

impl<R: AsyncRead + Unpin> StreamReader<R> {
    /// A reader over `io`, naming the connection `label` in errors.
    #[cfg(test)]
    pub(crate) fn new(io: R, label: Arc<str>) -> Self {
        Self::with_buffered(io, BytesMut::new(), label)
    }

    /// A reader over `io` whose first bytes were already read into `buf`.
    pub(crate) fn with_buffered(io: R, buf: BytesMut, label: Arc<str>) -> Self {
        StreamReader { io, buf, label }
    }

    async fn next_frame(&mut self) -> Result<Option<BytesMut>> {
        loop {
            let wanted = if self.buf.len() >= PREFIX_LEN {
                let mut prefix = [0u8; PREFIX_LEN];
                prefix.copy_from_slice(&self.buf[..PREFIX_LEN]);
                let len = u32::from_be_bytes(prefix) as usize;
                if len > MAX_FRAME_SIZE {
                    return Err(Error::bad_arg(format!(
                        "{}: peer sent a frame of {len} bytes, over the maximum of {MAX_FRAME_SIZE}",
                        self.label
                    )));
                }
                let total = PREFIX_LEN + len;
                if self.buf.len() >= total {
                    self.buf.advance(PREFIX_LEN);
                    if len <= COPY_MAX {
                        let frame = BytesMut::from(&self.buf[..len]);
                        self.buf.advance(len);
                        return Ok(Some(frame));
                    }
                    return Ok(Some(self.buf.split_to(len)));
                }
                total - self.buf.len()
            } else {
                PREFIX_LEN - self.buf.len()
            };
            self.buf.reserve(wanted.max(READ_CHUNK));
            let n = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| io_error(&self.label, "reading", e))?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(Error::network(format!(
                    "{}: stream ended inside a frame ({} bytes of it received)",
                    self.label,
                    self.buf.len()
                )));
            }
        }
    }
}

impl<R: AsyncRead + Unpin + Send + 'static> FrameReader for StreamReader<R> {
    fn read_frame(&mut self) -> BoxFuture<'_, Result<Option<BytesMut>>> {
        Box::pin(self.next_frame())
    }
}

/// Each frame's length prefix (kept in `prefixes`), head and tail, as the
/// slices of one vectored write; empty slices are left out.
fn wire_slices<'a>(
    prefixes: &'a mut Vec<[u8; PREFIX_LEN]>,
    frames: &'a [Frame],
) -> Vec<IoSlice<'a>> {
    prefixes.clear();
    prefixes.extend(frames.iter().map(prefix_of));
    let mut slices = Vec::with_capacity(frames.len() * 3);
    for (prefix, frame) in prefixes.iter().zip(frames) {
        let parts = wire_parts(prefix, frame);
        slices.extend(
            parts
                .into_iter()
                .filter(|p| !p.is_empty())
                .map(IoSlice::new),
        );
    }
    slices
}

/// Appends to `unsent` the bytes of `parts`, taken as one run, from
/// offset `skip` on.
fn keep_from(unsent: &mut BytesMut, parts: [&[u8]; 3], mut skip: usize) {
    for part in parts {
        let from = skip.min(part.len());
        unsent.extend_from_slice(&part[from..]);
        skip -= from;
    }
}

/// After a write took the first `written` wire bytes of `frames`, keeps
/// in `unsent` what is left of the frame it stopped inside, if any;
/// returns how many frames were taken, counting that one.
fn keep_rest_of_begun(unsent: &mut BytesMut, frames: &[Frame], written: usize) -> usize {
    let mut at = 0;
    for (i, frame) in frames.iter().enumerate() {
        let end = at + wire_len(frame);
        if written < end {
            if written == at {
                return i;
            }
            keep_from(unsent, wire_parts(&prefix_of(frame), frame), written - at);
            return i + 1;
        }
        at = end;
    }
    frames.len()
}

/// The error of a stream that took no bytes of a write.
fn took_no_more(label: &str) -> Error {
    Error::network(format!("{label}: connection took no more bytes"))
}

/// Writes what `io` takes now of `slices`, without waiting; returns how
/// many bytes it took.
fn poll_write_slices<W: AsyncWrite + Unpin>(
    io: &mut W,
    cx: &mut Context<'_>,
    slices: &mut [IoSlice<'_>],
    label: &str,
) -> Result<usize> {
    let mut written = 0;
    let mut rest = slices;
    while !rest.is_empty() {
        match Pin::new(&mut *io).poll_write_vectored(cx, rest) {
            Poll::Ready(Ok(0)) => return Err(took_no_more(label)),
            Poll::Ready(Ok(n)) => {
                written += n;
                IoSlice::advance_slices(&mut rest, n);
            }
            Poll::Ready(Err(e)) => return Err(io_error(label, "writing", e)),
            Poll::Pending => break,
        }
    }
    Ok(written)
}

/// The write half of a length-prefixed stream.
pub(crate) struct StreamWriter<W> {
    io: W,
    label: Arc<str>,
    prefixes: Vec<[u8; PREFIX_LEN]>,
    /// The wire bytes not yet written of frames a non-blocking write took
    /// only in part: they go out before anything else.
    unsent: BytesMut,
    /// Where a small write's prefixes and frames are gathered.
    gather: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> StreamWriter<W> {
    /// A writer over `io`, naming the connection `label` in errors.
    pub(crate) fn new(io: W, label: Arc<str>) -> Self {
        StreamWriter {
            io,
            label,
            prefixes: Vec::new(),
            unsent: BytesMut::new(),
            gather: Vec::new(),
        }
    }

    /// Gathers `frames` with their prefixes into `self.gather` when they
    /// are small enough together; whether it did.
    fn gather_small(&mut self, frames: &[Frame]) -> bool {
        let total: usize = frames.iter().map(wire_len).sum();
        if total > GATHER_MAX {
            return false;
        }
        self.gather.clear();
        for frame in frames {
            for part in wire_parts(&prefix_of(frame), frame) {
                self.gather.extend_from_slice(part);
            }
        }
        true
    }

    /// Writes the bytes kept from a frame taken in part, if any.
    async fn write_unsent(&mut self) -> Result<()> {
        while !self.unsent.is_empty() {
            let n = self
                .io
                .write(&self.unsent)
                .await
                .map_err(|e| io_error(&self.label, "writing", e))?;
            if n == 0 {
                return Err(took_no_more(&self.label));
            }
            self.unsent.advance(n);
        }
        Ok(())
    }

    /// Writes every slice of `frames` with vectored writes.
    async fn write_all_vectored(&mut self, frames: &[Frame]) -> Result<()> {
        let StreamWriter {
            io,
            label,
            prefixes,
            ..
        } = self;
        let mut slices = wire_slices(prefixes, frames);
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            let n = io
                .write_vectored(rest)
                .await
                .map_err(|e| io_error(label, "writing", e))?;
            if n == 0 {
                return Err(took_no_more(label));
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }

    /// Writes what is unsent, then `frames`, waiting as long as it takes.
    async fn write_all_frames(&mut self, frames: &[Frame]) -> Result<()> {
        check_frame_sizes(&self.label, frames)?;
        self.write_unsent().await?;
        if frames.is_empty() {
            return Ok(());
        }
        if self.gather_small(frames) {
            self.io
                .write_all(&self.gather)
                .await
                .map_err(|e| io_error(&self.label, "writing", e))?;
        } else {
            self.write_all_vectored(frames).await?;
        }
        self.io
            .flush()
            .await
            .map_err(|e| io_error(&self.label, "flushing", e))
    }

    /// Writes what the stream takes now of `frames` (after anything
    /// unsent), without waiting; returns how many frames it took. A frame
    /// taken in part counts as taken: its rest waits in `unsent`. Small
    /// writes are gathered and taken all or none: what the stream leaves
    /// of them waits in `unsent` too.
    fn try_write_now(&mut self, frames: &[Frame]) -> Result<usize> {
        check_frame_sizes(&self.label, frames)?;
        let mut cx = Context::from_waker(Waker::noop());
        if !self.try_write_unsent(&mut cx)? || frames.is_empty() {
            return Ok(0);
        }
        if self.gather_small(frames) {
            return self.try_write_gathered(&mut cx, frames.len());
        }
        self.try_write_vectored(&mut cx, frames)
    }

    /// Writes what the stream takes now of the unsent bytes; whether it
    /// took them all.
    fn try_write_unsent(&mut self, cx: &mut Context<'_>) -> Result<bool> {
        while !self.unsent.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.unsent) {
                Poll::Ready(Ok(0)) => return Err(took_no_more(&self.label)),
                Poll::Ready(Ok(n)) => self.unsent.advance(n),
                Poll::Ready(Err(e)) => return Err(io_error(&self.label, "writing", e)),
                Poll::Pending => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Offers the gathered `count` frames in one write: all are taken if
    /// the stream takes any byte, and what it leaves waits in `unsent`.
    fn try_write_gathered(&mut self, cx: &mut Context<'_>, count: usize) -> Result<usize> {
        match Pin::new(&mut self.io).poll_write(cx, &self.gather) {
            Poll::Ready(Ok(0)) => Err(took_no_more(&self.label)),
            Poll::Ready(Ok(n)) => {
                self.unsent.extend_from_slice(&self.gather[n..]);
                Ok(count)
            }
            Poll::Ready(Err(e)) => Err(io_error(&self.label, "writing", e)),
            Poll::Pending => Ok(0),
        }
    }

    /// Writes what the stream takes now of `frames` with vectored writes;
    /// returns how many frames it took, a frame begun included.
    fn try_write_vectored(&mut self, cx: &mut Context<'_>, frames: &[Frame]) -> Result<usize> {
        let StreamWriter {
            io,
            label,
            prefixes,
            unsent,
            ..
        } = self;
        let mut slices = wire_slices(prefixes, frames);
        let written = poll_write_slices(io, cx, &mut slices, label)?;
        Ok(keep_rest_of_begun(unsent, frames, written))
    }

    async fn shutdown(&mut self) -> Result<()> {
        match self.io.shutdown().await {
            Ok(()) => Ok(()),
            // The peer is already gone: the write direction is closed either way.
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => Ok(()),
            Err(e) => Err(io_error(&self.label, "closing", e)),
        }
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> FrameWriter for StreamWriter<W> {
    fn write_frames<'a>(&'a mut self, frames: &'a [Frame]) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.write_all_frames(frames))
    }

    fn writes_without_waiting(&self) -> bool {
        true
    }

    fn try_write_frames(&mut self, frames: &[Frame]) -> Result<usize> {
        self.try_write_now(frames)
    }

    fn has_pending(&self) -> bool {
        !self.unsent.is_empty()
    }

    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.shutdown())
    }
}

/// A length-prefixed connection over separate read and write halves.
pub(crate) struct StreamConn<R, W> {
    reader: StreamReader<R>,
    writer: StreamWriter<W>,
    local: String,
    remote: String,
}

impl<R, W> StreamConn<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// A connection over the halves `read` and `write`; `protocol` and the
    /// addresses name it in errors.
    pub(crate) fn new(protocol: &str, read: R, write: W, local: String, remote: String) -> Self {
        Self::with_buffered(protocol, read, BytesMut::new(), write, local, remote)
    }

    /// As [`StreamConn::new`], with bytes already read from `read` in `buf`.
    pub(crate) fn with_buffered(
        protocol: &str,
        read: R,
        buf: BytesMut,
        write: W,
        local: String,
        remote: String,
    ) -> Self {
        let label: Arc<str> = format!("{protocol} {local}<->{remote}").into();
        StreamConn {
            reader: StreamReader::with_buffered(read, buf, label.clone()),
            writer: StreamWriter::new(write, label),
            local,
            remote,
        }
    }
}

impl<R, W> FramedConn for StreamConn<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    fn split(self: Box<Self>) -> (Box<dyn FrameReader>, Box<dyn FrameWriter>) {
        let this = *self;
        (Box::new(this.reader), Box::new(this.writer))
    }

    fn local_addr(&self) -> String {
        self.local.clone()
    }

    fn remote_addr(&self) -> String {
        self.remote.clone()
    }

    fn max_frame_size(&self) -> usize {
        MAX_FRAME_SIZE
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use bytes::Bytes;

    use super::*;

    /// A stream that takes at most `step` bytes per write call (across
    /// the slices of a vectored one) and `room` bytes in all; once `room`
    /// is used up it answers `Pending` until `room` is raised.
    struct Budget {
        out: Vec<u8>,
        room: usize,
        step: usize,
    }

    impl Budget {
        fn take(&mut self, bufs: &[IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
            let mut left = self.room.min(self.step);
            if left == 0 {
                return Poll::Pending;
            }
            let mut total = 0;
            for buf in bufs {
                let n = buf.len().min(left);
                self.out.extend_from_slice(&buf[..n]);
                left -= n;
                total += n;
                if left == 0 {
                    break;
                }
            }
            self.room -= total;
            Poll::Ready(Ok(total))
        }
    }

    impl AsyncWrite for Budget {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.take(&[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            self.take(bufs)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A writer over a [`Budget`] stream.
    fn budget(room: usize, step: usize) -> StreamWriter<Budget> {
        let io = Budget {
            out: Vec::new(),
            room,
            step,
        };
        StreamWriter::new(io, "test".into())
    }

    /// `len` bytes that differ with `seed`.
    fn pattern(seed: u8, len: usize) -> Bytes {
        let base = seed.wrapping_mul(71);
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(base))
            .collect::<Vec<u8>>()
            .into()
    }

    /// Frames without tails, of lengths cycling below `modulus`.
    fn plain_frames(count: usize, factor: usize, modulus: usize) -> Vec<Frame> {
        (0..count)
            .map(|i| Bytes::from(vec![i as u8; (i * factor) % modulus]).into())
            .collect()
    }

    /// Frames of every shape: head and tail, head only, an empty tail
    /// given, tail only, empty; part lengths scaled by `scale`.
    fn mixed_frames(scale: usize) -> Vec<Frame> {
        let part = |seed: u8, len: usize| pattern(seed, len * scale);
        vec![
            Frame::with_tail(part(1, 5), part(2, 9)),
            Frame::from(part(3, 12)),
            Frame::with_tail(part(4, 6), Bytes::new()),
            Frame::with_tail(Bytes::new(), part(5, 11)),
            Frame::default(),
            Frame::with_tail(part(6, 1), part(7, 1)),
            Frame::with_tail(part(8, 3), part(9, 4)),
        ]
    }

    /// A frame's bytes: its head, then its tail.
    fn whole(frame: &Frame) -> Vec<u8> {
        let mut bytes = frame.head().to_vec();
        bytes.extend_from_slice(frame.tail());
        bytes
    }

    /// What `frames` must look like on the wire.
    fn encode(frames: &[Frame]) -> Vec<u8> {
        let mut wire = Vec::new();
        for frame in frames {
            let bytes = whole(frame);
            wire.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            wire.extend_from_slice(&bytes);
        }
        wire
    }

    /// Wire bytes of `frames`, prefixes included.
    fn encoded_len(frames: &[Frame]) -> usize {
        frames.iter().map(|f| PREFIX_LEN + f.len()).sum()
    }

    /// Checks `wire` is exactly `frames`, and that a reader returns each
    /// whole, head and tail as one frame, then the end.
    async fn assert_wire(wire: &[u8], frames: &[Frame], what: &str) {
        assert!(wire == encode(frames), "{what}: wire bytes");
        let mut reader = StreamReader::new(wire, "test".into());
        for (i, frame) in frames.iter().enumerate() {
            let got = reader.next_frame().await.expect("read").expect("frame");
            assert_eq!(got[..], whole(frame)[..], "{what}: frame {i}");
        }
        assert!(reader.next_frame().await.expect("eof").is_none(), "{what}");
    }

    /// Where in a frame a write stopped.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    enum Stop {
        /// Between two frames (or before the first, or after the last).
        Boundary,
        /// Inside a length prefix.
        Prefix,
        /// After the prefix, before the end of the head.
        Head,
        /// After the head, before the end of the tail.
        Tail,
    }

    /// Where a write of `frames` that took `sent` wire bytes stopped.
    fn stop_at(frames: &[Frame], sent: usize) -> Stop {
        let mut at = 0;
        for frame in frames {
            if sent == at {
                return Stop::Boundary;
            }
            let head_at = at + PREFIX_LEN;
            let tail_at = head_at + frame.head().len();
            let end = tail_at + frame.tail().len();
            if sent < head_at {
                return Stop::Prefix;
            }
            if sent < tail_at {
                return Stop::Head;
            }
            if sent < end {
                return Stop::Tail;
            }
            at = end;
        }
        Stop::Boundary
    }

    /// How many of `frames` the first `sent` wire bytes begin.
    fn frames_begun(frames: &[Frame], sent: usize) -> usize {
        let mut at = 0;
        frames
            .iter()
            .take_while(|frame| {
                let begun = at < sent;
                at += PREFIX_LEN + frame.len();
                begun
            })
            .count()
    }

    /// Offers `frames` without waiting to a stream that takes `room`
    /// bytes, `step` at most per call; checks what it took and what it
    /// kept, then lets the rest out (the kept bytes first, by
    /// `write_frames(&[])` or by another try) and checks the whole wire.
    /// Returns where the first write stopped.
    async fn partial_then_rest(frames: &[Frame], room: usize, step: usize, by_try: bool) -> Stop {
        let what = format!("room {room} step {step} by_try {by_try}");
        let wire = encode(frames);
        let gathered = wire.len() <= GATHER_MAX;
        let mut writer = budget(room, step);
        let taken = FrameWriter::try_write_frames(&mut writer, frames).expect("try");
        // A gathered write is one call; a vectored one goes on until the
        // stream is full.
        let sent = match gathered {
            true => room.min(step).min(wire.len()),
            false => room.min(wire.len()),
        };
        assert!(writer.io.out == wire[..sent], "{what}: bytes written");
        let expected_taken = match gathered {
            true if sent > 0 => frames.len(),
            true => 0,
            false => frames_begun(frames, sent),
        };
        assert_eq!(taken, expected_taken, "{what}: frames taken");
        let taken_end = encoded_len(&frames[..taken]);
        assert_eq!(writer.has_pending(), sent < taken_end, "{what}: pending");
        // Nothing more goes while the stream is full.
        writer.io.room = 0;
        let more = writer.try_write_now(&frames[taken..]).expect("try");
        assert_eq!(more, 0, "{what}: taken while full");
        assert_eq!(writer.io.out.len(), sent, "{what}: written while full");
        writer.io.room = usize::MAX;
        let mut taken = taken;
        if by_try {
            taken += writer.try_write_now(&frames[taken..]).expect("try again");
        } else {
            FrameWriter::write_frames(&mut writer, &[])
                .await
                .expect("flush");
            assert!(!writer.has_pending(), "{what}: still pending");
            assert!(writer.io.out == wire[..taken_end], "{what}: flushed rest");
        }
        writer
            .write_all_frames(&frames[taken..])
            .await
            .expect("write");
        assert!(!writer.has_pending(), "{what}: pending at the end");
        assert_wire(&writer.io.out, frames, &what).await;
        stop_at(frames, sent)
    }

    #[tokio::test]
    async fn a_frame_taken_in_part_keeps_exactly_its_unwritten_rest() {
        // Scale 1 is gathered, scale 100 (over 4 KiB) vectored.
        for scale in [1, 100] {
            let frames = mixed_frames(scale);
            let total = encoded_len(&frames);
            assert_eq!(total <= GATHER_MAX, scale == 1);
            let mut stops = HashSet::new();
            for room in 0..=total {
                for step in [usize::MAX, 7] {
                    for by_try in [false, true] {
                        stops.insert(partial_then_rest(&frames, room, step, by_try).await);
                    }
                }
            }
            // Every place a write can stop was tried.
            assert_eq!(stops.len(), 4, "scale {scale}: {stops:?}");
        }
    }

    #[tokio::test]
    async fn a_two_part_frame_is_one_frame_on_the_wire() {
        let frame = Frame::with_tail(Bytes::from_static(b"head"), Bytes::from_static(b"tail!"));
        let mut writer = budget(usize::MAX, usize::MAX);
        FrameWriter::write_frames(&mut writer, std::slice::from_ref(&frame))
            .await
            .expect("write");
        assert_eq!(writer.io.out, b"\0\0\0\x09headtail!");
        let mut reader = StreamReader::new(&writer.io.out[..], "test".into());
        let got = reader.next_frame().await.expect("read").expect("frame");
        assert_eq!(&got[..], b"headtail!");
        assert!(reader.next_frame().await.expect("eof").is_none());
    }

    #[tokio::test]
    async fn mixed_batches_round_trip_through_write_frames() {
        for scale in [1, 100] {
            let frames = mixed_frames(scale);
            for step in [1, 3, 4, 5, 7, 64, 1000, usize::MAX] {
                let mut writer = budget(usize::MAX, step);
                FrameWriter::write_frames(&mut writer, &frames)
                    .await
                    .expect("write");
                assert_wire(
                    &writer.io.out,
                    &frames,
                    &format!("scale {scale} step {step}"),
                )
                .await;
            }
        }
    }

    #[tokio::test]
    async fn mixed_batches_round_trip_through_try_write_frames() {
        for scale in [1, 100] {
            let frames = mixed_frames(scale);
            let mut writer = budget(usize::MAX, usize::MAX);
            let taken = FrameWriter::try_write_frames(&mut writer, &frames).expect("try");
            assert_eq!(taken, frames.len(), "scale {scale}");
            assert!(!writer.has_pending(), "scale {scale}");
            assert_wire(&writer.io.out, &frames, &format!("scale {scale}")).await;
        }
    }

    #[tokio::test]
    async fn partial_vectored_writes_keep_frames_whole() {
        let frames = plain_frames(50, 37, 300);
        for step in [1, 3, 4, 5, 7, 64, 1000, 1 << 20] {
            let mut writer = budget(usize::MAX, step);
            writer.write_all_frames(&frames).await.expect("write");
            assert_wire(&writer.io.out, &frames, &format!("step {step}")).await;
        }
    }

    #[tokio::test]
    async fn writes_without_waiting_take_whole_frames_and_finish_a_begun_one_first() {
        let frames = plain_frames(40, 53, 500);
        for room in [0, 1, 3, 4, 5, 100, 517, 4000, 1 << 20] {
            let mut writer = budget(room, usize::MAX);
            // Half the frames without waiting, as far as the room goes.
            let taken = writer.try_write_now(&frames[..20]).expect("try");
            assert!(writer.io.out.len() <= encoded_len(&frames[..taken]));
            if taken > 0 {
                let before = encoded_len(&frames[..taken - 1]);
                assert!(writer.io.out.len() > before, "room {room}: took too many");
            }
            // A second try with no room takes nothing.
            if writer.io.room == 0 {
                assert_eq!(writer.try_write_now(&frames[taken..20]).expect("try"), 0);
            }
            // The writer task then sends the rest, after the begun frame.
            writer.io.room = usize::MAX;
            writer
                .write_all_frames(&frames[taken..])
                .await
                .expect("write");
            assert_wire(&writer.io.out, &frames, &format!("room {room}")).await;
        }
    }

    #[tokio::test]
    async fn small_writes_go_out_in_one_write_and_a_stream_that_takes_part_keeps_the_rest() {
        let frames = plain_frames(12, 29, 90);
        let wire_len = encoded_len(&frames);
        assert!(wire_len <= GATHER_MAX);
        for room in [0, 1, 3, 4, 5, 100, wire_len - 1, wire_len, 1 << 20] {
            let mut writer = budget(room, usize::MAX);
            let taken = writer.try_write_now(&frames[..6]).expect("try");
            let first_len = encoded_len(&frames[..6]);
            // All or nothing: anything the stream took counts every frame.
            assert_eq!(taken, if room == 0 { 0 } else { 6 }, "room {room}");
            let pending = taken > 0 && room < first_len;
            assert_eq!(writer.has_pending(), pending, "room {room}");
            writer.io.room = usize::MAX;
            if pending {
                // Writing nothing still sends what was kept.
                writer.write_all_frames(&[]).await.expect("flush");
                assert!(!writer.has_pending());
                assert_eq!(writer.io.out.len(), first_len, "room {room}");
            }
            writer
                .write_all_frames(&frames[taken..])
                .await
                .expect("write");
            assert_wire(&writer.io.out, &frames, &format!("room {room}")).await;
        }
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_typed() {
        let too_long = ((MAX_FRAME_SIZE + 1) as u32).to_be_bytes();
        let mut reader = StreamReader::new(&too_long[..], "peer-x".into());
        let err = reader.next_frame().await.expect_err("too long");
        assert_eq!(err.kind(), ErrorKind::BadArg);
        assert!(err.message().contains("peer-x"));

        let half = [0u8, 0, 0, 10, 1, 2, 3];
        let mut reader = StreamReader::new(&half[..], "peer-y".into());
        let err = reader.next_frame().await.expect_err("truncated");
        assert_eq!(err.kind(), ErrorKind::Network);
        assert!(err.message().contains("peer-y"));

        let half_prefix = [0u8, 0];
        let mut reader = StreamReader::new(&half_prefix[..], "peer-z".into());
        let err = reader.next_frame().await.expect_err("truncated prefix");
        assert_eq!(err.kind(), ErrorKind::Network);
    }

    #[tokio::test]
    async fn oversized_write_is_refused_before_writing() {
        let half = MAX_FRAME_SIZE / 2 + 1;
        let too_big = [
            Frame::from(Bytes::from(vec![0u8; MAX_FRAME_SIZE + 1])),
            // Each part fits; the frame does not.
            Frame::with_tail(Bytes::from(vec![1u8; half]), Bytes::from(vec![2u8; half])),
        ];
        for frame in too_big {
            let frames = [Frame::from(&b"ok"[..]), frame];
            let mut writer = budget(usize::MAX, usize::MAX);
            let err = writer.write_all_frames(&frames).await.expect_err("too big");
            assert_eq!(err.kind(), ErrorKind::BadArg);
            let err = writer.try_write_now(&frames).expect_err("too big");
            assert_eq!(err.kind(), ErrorKind::BadArg);
            assert!(writer.io.out.is_empty());
        }
    }

    #[tokio::test]
    async fn a_frame_of_the_maximum_in_two_parts_is_written() {
        let half = MAX_FRAME_SIZE / 2;
        let frame = Frame::with_tail(pattern(1, half), pattern(2, MAX_FRAME_SIZE - half));
        let frames = [frame, Frame::from(&b"after"[..])];
        let mut writer = budget(usize::MAX, 1 << 16);
        writer.write_all_frames(&frames).await.expect("write");
        assert_wire(&writer.io.out, &frames, "maximum").await;
    }
}
