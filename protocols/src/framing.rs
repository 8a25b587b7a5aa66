//! Length-prefixed framing over any byte stream, shared by tcp, unix and the
//! raw side of wsh.
//!
//! On the wire a frame is a 4-byte big-endian length followed by that many
//! bytes. Reads buffer large chunks into one `BytesMut` and hand out whole
//! frames with `split_to`; writes put every prefix and frame of one call into
//! a single vectored write, continuing after partial writes.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use flow::transport::{FrameReader, FrameWriter, FramedConn};
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

/// Checks every frame of a write against the maximum before anything is
/// written.
pub(crate) fn check_frame_sizes(label: &str, frames: &[Bytes]) -> Result<()> {
    match frames.iter().find(|f| f.len() > MAX_FRAME_SIZE) {
        Some(frame) => Err(Error::bad_arg(format!(
            "{label}: frame of {} bytes exceeds the maximum of {MAX_FRAME_SIZE}",
            frame.len()
        ))),
        None => Ok(()),
    }
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

/// Each frame's length prefix (kept in `prefixes`) then the frame, as the
/// slices of one vectored write.
fn wire_slices<'a>(
    prefixes: &'a mut Vec<[u8; PREFIX_LEN]>,
    frames: &'a [Bytes],
) -> Vec<IoSlice<'a>> {
    prefixes.clear();
    // Lengths fit: every frame is at most MAX_FRAME_SIZE <= u32::MAX.
    prefixes.extend(frames.iter().map(|f| (f.len() as u32).to_be_bytes()));
    let mut slices = Vec::with_capacity(frames.len() * 2);
    for (prefix, frame) in prefixes.iter().zip(frames) {
        slices.push(IoSlice::new(prefix));
        if !frame.is_empty() {
            slices.push(IoSlice::new(frame));
        }
    }
    slices
}

/// The write half of a length-prefixed stream.
pub(crate) struct StreamWriter<W> {
    io: W,
    label: Arc<str>,
    prefixes: Vec<[u8; PREFIX_LEN]>,
    /// The rest of a frame a non-blocking write took only in part: it goes
    /// out before anything else.
    tail: BytesMut,
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
            tail: BytesMut::new(),
            gather: Vec::new(),
        }
    }

    /// Gathers `frames` with their prefixes into `self.gather` when they
    /// are small enough together; whether it did.
    fn gather_small(&mut self, frames: &[Bytes]) -> bool {
        let wire_len: usize = frames.iter().map(|f| PREFIX_LEN + f.len()).sum();
        if wire_len > GATHER_MAX {
            return false;
        }
        self.gather.clear();
        for frame in frames {
            // Fits: the frame is at most GATHER_MAX bytes.
            self.gather
                .extend_from_slice(&(frame.len() as u32).to_be_bytes());
            self.gather.extend_from_slice(frame);
        }
        true
    }

    async fn write_all_frames(&mut self, frames: &[Bytes]) -> Result<()> {
        check_frame_sizes(&self.label, frames)?;
        if !self.tail.is_empty() {
            let tail = std::mem::take(&mut self.tail);
            self.io
                .write_all(&tail)
                .await
                .map_err(|e| io_error(&self.label, "writing", e))?;
        }
        if frames.is_empty() {
            return Ok(());
        }
        if self.gather_small(frames) {
            self.io
                .write_all(&self.gather)
                .await
                .map_err(|e| io_error(&self.label, "writing", e))?;
            return self
                .io
                .flush()
                .await
                .map_err(|e| io_error(&self.label, "flushing", e));
        }
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
                return Err(Error::network(format!(
                    "{label}: connection took no more bytes"
                )));
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        io.flush().await.map_err(|e| io_error(label, "flushing", e))
    }

    /// Writes what the stream takes now of `frames` (after any tail),
    /// without waiting; returns how many frames it took. A frame taken in
    /// part counts as taken: its rest waits in `tail`. Small writes are
    /// gathered and taken all or none: what the stream leaves of them
    /// waits in `tail` too.
    fn try_write_now(&mut self, frames: &[Bytes]) -> Result<usize> {
        check_frame_sizes(&self.label, frames)?;
        let mut cx = Context::from_waker(Waker::noop());
        while !self.tail.is_empty() {
            match Pin::new(&mut self.io).poll_write(&mut cx, &self.tail) {
                Poll::Ready(Ok(0)) => {
                    return Err(Error::network(format!(
                        "{}: connection took no more bytes",
                        self.label
                    )));
                }
                Poll::Ready(Ok(n)) => self.tail.advance(n),
                Poll::Ready(Err(e)) => return Err(io_error(&self.label, "writing", e)),
                Poll::Pending => return Ok(0),
            }
        }
        if frames.is_empty() {
            return Ok(0);
        }
        if self.gather_small(frames) {
            return match Pin::new(&mut self.io).poll_write(&mut cx, &self.gather) {
                Poll::Ready(Ok(0)) => Err(Error::network(format!(
                    "{}: connection took no more bytes",
                    self.label
                ))),
                Poll::Ready(Ok(n)) => {
                    // What the stream did not take goes out first next time.
                    self.tail.extend_from_slice(&self.gather[n..]);
                    Ok(frames.len())
                }
                Poll::Ready(Err(e)) => Err(io_error(&self.label, "writing", e)),
                Poll::Pending => Ok(0),
            };
        }
        let StreamWriter {
            io,
            label,
            prefixes,
            tail,
            ..
        } = self;
        let mut slices = wire_slices(prefixes, frames);
        let mut written = 0;
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            match Pin::new(&mut *io).poll_write_vectored(&mut cx, rest) {
                Poll::Ready(Ok(0)) => {
                    return Err(Error::network(format!(
                        "{label}: connection took no more bytes"
                    )));
                }
                Poll::Ready(Ok(n)) => {
                    written += n;
                    IoSlice::advance_slices(&mut rest, n);
                }
                Poll::Ready(Err(e)) => return Err(io_error(label, "writing", e)),
                Poll::Pending => break,
            }
        }
        if rest.is_empty() {
            return Ok(frames.len());
        }
        // Whole frames written, then perhaps one begun: keep what is left
        // of it.
        let mut at = 0;
        for (i, frame) in frames.iter().enumerate() {
            let end = at + PREFIX_LEN + frame.len();
            if written < end {
                if written == at {
                    return Ok(i);
                }
                let done = written - at;
                tail.clear();
                if done < PREFIX_LEN {
                    tail.extend_from_slice(&prefixes[i][done..]);
                    tail.extend_from_slice(frame);
                } else {
                    tail.extend_from_slice(&frame[done - PREFIX_LEN..]);
                }
                return Ok(i + 1);
            }
            at = end;
        }
        Ok(frames.len())
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
    fn write_frames<'a>(&'a mut self, frames: &'a [Bytes]) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.write_all_frames(frames))
    }

    fn writes_without_waiting(&self) -> bool {
        true
    }

    fn try_write_frames(&mut self, frames: &[Bytes]) -> Result<usize> {
        self.try_write_now(frames)
    }

    fn has_pending(&self) -> bool {
        !self.tail.is_empty()
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
    use super::*;

    /// A writer that takes at most `step` bytes per call, to exercise
    /// partial vectored writes.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut left = self.step;
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
            Poll::Ready(Ok(total))
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

    #[tokio::test]
    async fn partial_vectored_writes_keep_frames_whole() {
        let frames: Vec<Bytes> = (0..50usize)
            .map(|i| Bytes::from(vec![i as u8; (i * 37) % 300]))
            .collect();
        for step in [1, 3, 4, 5, 7, 64, 1000, 1 << 20] {
            let mut writer = StreamWriter::new(
                Trickle {
                    out: Vec::new(),
                    step,
                },
                "test".into(),
            );
            writer.write_all_frames(&frames).await.expect("write");
            let wire = std::mem::take(&mut writer.io.out);
            let mut reader = StreamReader::new(&wire[..], "test".into());
            for frame in &frames {
                let got = reader.next_frame().await.expect("read").expect("frame");
                assert_eq!(&got[..], &frame[..], "step {step}");
            }
            assert!(reader.next_frame().await.expect("eof").is_none());
        }
    }

    /// Takes at most `room` bytes, then answers `Pending` until `room` is
    /// raised.
    struct Choke {
        out: Vec<u8>,
        room: usize,
    }

    impl AsyncWrite for Choke {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.room);
            if n == 0 {
                return Poll::Pending;
            }
            self.room -= n;
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_without_waiting_take_whole_frames_and_finish_a_begun_one_first() {
        let frames: Vec<Bytes> = (0..40usize)
            .map(|i| Bytes::from(vec![i as u8; (i * 53) % 500]))
            .collect();
        for room in [0, 1, 3, 4, 5, 100, 517, 4000, 1 << 20] {
            let mut writer = StreamWriter::new(
                Choke {
                    out: Vec::new(),
                    room,
                },
                "test".into(),
            );
            // Half the frames without waiting, as far as the room goes.
            let taken = writer.try_write_now(&frames[..20]).expect("try");
            let wire_taken: usize = frames[..taken].iter().map(|f| PREFIX_LEN + f.len()).sum();
            assert!(writer.io.out.len() <= wire_taken, "room {room}");
            if taken > 0 {
                let before: usize = frames[..taken - 1]
                    .iter()
                    .map(|f| PREFIX_LEN + f.len())
                    .sum();
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
            let wire = std::mem::take(&mut writer.io.out);
            let mut reader = StreamReader::new(&wire[..], "test".into());
            for frame in &frames {
                let got = reader.next_frame().await.expect("read").expect("frame");
                assert_eq!(&got[..], &frame[..], "room {room}");
            }
            assert!(reader.next_frame().await.expect("eof").is_none());
        }
    }

    #[tokio::test]
    async fn small_writes_go_out_in_one_write_and_a_stream_that_takes_part_keeps_the_rest() {
        let frames: Vec<Bytes> = (0..12usize)
            .map(|i| Bytes::from(vec![i as u8; (i * 29) % 90]))
            .collect();
        let wire_len: usize = frames.iter().map(|f| PREFIX_LEN + f.len()).sum();
        assert!(wire_len <= GATHER_MAX);
        for room in [0, 1, 3, 4, 5, 100, wire_len - 1, wire_len, 1 << 20] {
            let mut writer = StreamWriter::new(
                Choke {
                    out: Vec::new(),
                    room,
                },
                "test".into(),
            );
            let taken = writer.try_write_now(&frames[..6]).expect("try");
            let first_len: usize = frames[..6].iter().map(|f| PREFIX_LEN + f.len()).sum();
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
            let wire = std::mem::take(&mut writer.io.out);
            assert_eq!(wire.len(), wire_len);
            let mut reader = StreamReader::new(&wire[..], "test".into());
            for frame in &frames {
                let got = reader.next_frame().await.expect("read").expect("frame");
                assert_eq!(&got[..], &frame[..], "room {room}");
            }
            assert!(reader.next_frame().await.expect("eof").is_none());
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
        let mut writer = StreamWriter::new(
            Trickle {
                out: Vec::new(),
                step: 1 << 20,
            },
            "w".into(),
        );
        let frames = [
            Bytes::from_static(b"ok"),
            Bytes::from(vec![0u8; MAX_FRAME_SIZE + 1]),
        ];
        let err = writer.write_all_frames(&frames).await.expect_err("too big");
        assert_eq!(err.kind(), ErrorKind::BadArg);
        assert!(writer.io.out.is_empty());
    }
}
