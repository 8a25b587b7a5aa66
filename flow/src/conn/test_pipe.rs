//! An in-memory framed pipe for the driver's unit tests (the real
//! transports live in `flow-protocols`, which depends on this crate).

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::transport::{FrameReader, FrameWriter, FramedConn};
use crate::{Error, Result};

pub(crate) struct PipeEnd {
    tx: mpsc::Sender<Bytes>,
    rx: mpsc::Receiver<Bytes>,
    name: &'static str,
}

/// Two connected ends.
pub(crate) fn pipe() -> (Box<dyn FramedConn>, Box<dyn FramedConn>) {
    let (a_tx, a_rx) = mpsc::channel(64);
    let (b_tx, b_rx) = mpsc::channel(64);
    (
        Box::new(PipeEnd {
            tx: a_tx,
            rx: b_rx,
            name: "a",
        }),
        Box::new(PipeEnd {
            tx: b_tx,
            rx: a_rx,
            name: "b",
        }),
    )
}

struct PipeReader(mpsc::Receiver<Bytes>);
struct PipeWriter(Option<mpsc::Sender<Bytes>>);

impl FrameReader for PipeReader {
    fn read_frame(&mut self) -> BoxFuture<'_, Result<Option<BytesMut>>> {
        Box::pin(async move { Ok(self.0.recv().await.map(|b| BytesMut::from(&b[..]))) })
    }
}

impl FrameWriter for PipeWriter {
    fn write_frames<'a>(&'a mut self, frames: &'a [Bytes]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let Some(tx) = &self.0 else {
                return Err(Error::network("pipe closed"));
            };
            for f in frames {
                tx.send(f.clone())
                    .await
                    .map_err(|_| Error::network("pipe closed"))?;
            }
            Ok(())
        })
    }

    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        self.0 = None;
        Box::pin(async { Ok(()) })
    }
}

impl FramedConn for PipeEnd {
    fn split(self: Box<Self>) -> (Box<dyn FrameReader>, Box<dyn FrameWriter>) {
        (
            Box::new(PipeReader(self.rx)),
            Box::new(PipeWriter(Some(self.tx))),
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
