//! [`Chunk`]: bytes an application wrote, queued on a flow, with room in
//! front for a frame header so a whole chunk can go out as its own frame,
//! encrypted in place, without being copied again.

use bytes::{BufMut, BytesMut};

use super::cipher::FRAME_OVERHEAD;

/// Largest header of a `Data` message (type byte and three varints).
pub(crate) const MAX_DATA_HEADER: usize = 1 + 3 * 9;

/// Room kept in front of every chunk: a sealed frame's overhead and a `Data`
/// header.
pub(crate) const HEADROOM: usize = FRAME_OVERHEAD + MAX_DATA_HEADER;

/// Bytes queued on a flow.
#[derive(Debug)]
pub(crate) struct Chunk {
    /// The allocation: at least [`HEADROOM`] bytes, then the payload.
    buf: BytesMut,
    /// Where the payload starts in `buf`.
    start: usize,
}

impl Chunk {
    /// A chunk holding the first `n` bytes of `bufs`.
    pub(crate) fn copy_from(bufs: &[&[u8]], n: usize) -> Chunk {
        Chunk::copy_into(BytesMut::new(), bufs, n)
    }

    /// Like [`Chunk::copy_from`], reusing `buf`'s allocation when it is big
    /// enough.
    pub(crate) fn copy_into(mut buf: BytesMut, bufs: &[&[u8]], n: usize) -> Chunk {
        buf.clear();
        buf.reserve(HEADROOM + n);
        buf.put_bytes(0, HEADROOM);
        let mut left = n;
        for b in bufs {
            let take = left.min(b.len());
            buf.put_slice(&b[..take]);
            left -= take;
            if left == 0 {
                break;
            }
        }
        Chunk {
            buf,
            start: HEADROOM,
        }
    }

    /// Payload bytes.
    pub(crate) fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The payload.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// The allocation, for reuse.
    pub(crate) fn into_buffer(self) -> BytesMut {
        self.buf
    }

    /// Turns the chunk into a frame body without copying: returns a buffer
    /// of [`FRAME_OVERHEAD`] bytes of space for the sealer, then `header`,
    /// then the payload.
    pub(crate) fn into_frame(mut self, header: &[u8]) -> BytesMut {
        debug_assert!(header.len() <= MAX_DATA_HEADER);
        let at = self.start - header.len() - FRAME_OVERHEAD;
        let mut frame = self.buf.split_off(at);
        frame[FRAME_OVERHEAD..FRAME_OVERHEAD + header.len()].copy_from_slice(header);
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_gather_and_become_frames_in_place() {
        let chunk = Chunk::copy_from(&[b"hello ", b"world", b"!!"], 9);
        assert_eq!(chunk.as_slice(), b"hello wor");
        assert_eq!(chunk.len(), 9);
        let before = chunk.as_slice().as_ptr();
        let frame = chunk.into_frame(&[0xaa, 0xbb]);
        assert_eq!(frame.len(), FRAME_OVERHEAD + 2 + 9);
        assert_eq!(&frame[FRAME_OVERHEAD..FRAME_OVERHEAD + 2], &[0xaa, 0xbb]);
        assert_eq!(&frame[FRAME_OVERHEAD + 2..], b"hello wor");
        // Same memory: no copy.
        assert_eq!(frame[FRAME_OVERHEAD + 2..].as_ptr(), before);
    }
}
