//! An in-memory framed pipe for the driver's unit tests (the real
//! transports live in `flow-protocols`, which depends on this crate).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::transport::{Frame, FrameReader, FrameWriter, FramedConn};
use crate::{Error, Result};

pub(crate) struct PipeEnd {
    tx: mpsc::Sender<Bytes>,
    rx: mpsc::Receiver<Bytes>,
    name: &'static str,
    writes_without_waiting: bool,
    /// While set, `try_write_frames` takes nothing (as if full).
    refusing: Arc<AtomicBool>,
    /// Whether `try_write_frames` keeps what it takes for the next
    /// `write_frames` (as a stream transport keeps a frame taken in part).
    holds_taken: bool,
    /// The tails of the frames written (see [`tail_recording_pipe`]).
    tails: Tails,
}

/// The tails of frames written through a pipe, as given to it.
pub(crate) type Tails = Arc<parking_lot::Mutex<Vec<Bytes>>>;

/// Two connected ends.
pub(crate) fn pipe() -> (Box<dyn FramedConn>, Box<dyn FramedConn>) {
    pipe_with(64, false)
}

/// Two connected ends, each direction holding at most `capacity` frames;
/// with `writes_without_waiting`, their writers take frames without
/// waiting while there is room.
pub(crate) fn pipe_with(
    capacity: usize,
    writes_without_waiting: bool,
) -> (Box<dyn FramedConn>, Box<dyn FramedConn>) {
    let (a, b, _) = refusable_pipe(capacity, writes_without_waiting);
    (a, b)
}

/// Two connected ends whose writers take every frame without waiting but
/// keep them (reported by `has_pending`) until the next `write_frames`.
pub(crate) fn holding_pipe() -> (Box<dyn FramedConn>, Box<dyn FramedConn>) {
    let (mut a, mut b, _) = ends(64, true);
    a.holds_taken = true;
    b.holds_taken = true;
    (Box::new(a), Box::new(b))
}

/// Like [`pipe_with`], plus the tails of every frame either end writes
/// (to see which payloads went out from the buffer they were handed over
/// in).
pub(crate) fn tail_recording_pipe(
    writes_without_waiting: bool,
) -> (Box<dyn FramedConn>, Box<dyn FramedConn>, Tails) {
    let (a, b, _) = ends(64, writes_without_waiting);
    let tails = a.tails.clone();
    (Box::new(a), Box::new(b), tails)
}

/// Like [`pipe_with`], plus a switch that makes both ends' non-blocking
/// writes take nothing while it is on.
pub(crate) fn refusable_pipe(
    capacity: usize,
    writes_without_waiting: bool,
) -> (Box<dyn FramedConn>, Box<dyn FramedConn>, Arc<AtomicBool>) {
    let (a, b, refusing) = ends(capacity, writes_without_waiting);
    (Box::new(a), Box::new(b), refusing)
}

/// Two connected ends sharing a refusal switch.
fn ends(capacity: usize, writes_without_waiting: bool) -> (PipeEnd, PipeEnd, Arc<AtomicBool>) {
    let (a_tx, a_rx) = mpsc::channel(capacity);
    let (b_tx, b_rx) = mpsc::channel(capacity);
    let refusing = Arc::new(AtomicBool::new(false));
    let tails = Tails::default();
    let end = |tx, rx, name| PipeEnd {
        tx,
        rx,
        name,
        writes_without_waiting,
        refusing: refusing.clone(),
        holds_taken: false,
        tails: tails.clone(),
    };
    (end(a_tx, b_rx, "a"), end(b_tx, a_rx, "b"), refusing.clone())
}

struct PipeReader(mpsc::Receiver<Bytes>);
struct PipeWriter {
    tx: Option<mpsc::Sender<Bytes>>,
    writes_without_waiting: bool,
    refusing: Arc<AtomicBool>,
    holds_taken: bool,
    /// Frames taken but not yet sent (with `holds_taken`).
    held: Vec<Frame>,
    tails: Tails,
}

impl PipeWriter {
    /// The frame as the peer reads it; its tail, if any, recorded.
    fn wire(&self, frame: &Frame) -> Bytes {
        if !frame.tail().is_empty() {
            self.tails.lock().push(frame.tail().clone());
        }
        frame.to_bytes()
    }
}

impl FrameReader for PipeReader {
    fn read_frame(&mut self) -> BoxFuture<'_, Result<Option<BytesMut>>> {
        Box::pin(async move { Ok(self.0.recv().await.map(|b| BytesMut::from(&b[..]))) })
    }
}

impl FrameWriter for PipeWriter {
    fn write_frames<'a>(&'a mut self, frames: &'a [Frame]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let Some(tx) = &self.tx else {
                return Err(Error::network("pipe closed"));
            };
            for f in std::mem::take(&mut self.held).iter().chain(frames) {
                tx.send(self.wire(f))
                    .await
                    .map_err(|_| Error::network("pipe closed"))?;
            }
            Ok(())
        })
    }

    fn writes_without_waiting(&self) -> bool {
        self.writes_without_waiting
    }

    fn try_write_frames(&mut self, frames: &[Frame]) -> Result<usize> {
        let Some(tx) = &self.tx else {
            return Err(Error::network("pipe closed"));
        };
        if self.refusing.load(Ordering::SeqCst) {
            return Ok(0);
        }
        if self.holds_taken {
            self.held.extend_from_slice(frames);
            return Ok(frames.len());
        }
        for (taken, f) in frames.iter().enumerate() {
            match tx.try_send(self.wire(f)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => return Ok(taken),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err(Error::network("pipe closed"));
                }
            }
        }
        Ok(frames.len())
    }

    fn has_pending(&self) -> bool {
        !self.held.is_empty()
    }

    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        self.tx = None;
        Box::pin(async { Ok(()) })
    }
}

impl FramedConn for PipeEnd {
    fn split(self: Box<Self>) -> (Box<dyn FrameReader>, Box<dyn FrameWriter>) {
        (
            Box::new(PipeReader(self.rx)),
            Box::new(PipeWriter {
                tx: Some(self.tx),
                writes_without_waiting: self.writes_without_waiting,
                refusing: self.refusing,
                holds_taken: self.holds_taken,
                held: Vec::new(),
                tails: self.tails,
            }),
        )
    }
    fn local_addr(&self) -> String {
        self.name.to_string()
    }
    fn remote_addr(&self) -> String {
        if self.name == "a" { "b" } else { "a" }.to_string()
    }
    fn max_frame_size(&self) -> usize {
        1 << 20
    }
}
