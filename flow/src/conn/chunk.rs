//! [`Chunk`]: bytes an application wrote, queued on a flow, with room in
//! front for a frame header so a whole chunk can go out as its own frame,
//! encrypted in place, without being copied again; or a message held as
//! it came (one being relayed), which a passthrough flow sends as the
//! clear tail of a frame, also without a copy.

use bytes::{BufMut, Bytes, BytesMut};

use super::cipher::FRAME_OVERHEAD;

/// Largest header of a `Data` message (type byte and three varints).
pub(crate) const MAX_DATA_HEADER: usize = 1 + 3 * 9;

/// Room kept in front of every chunk: a sealed frame's overhead and a `Data`
/// header.
pub(crate) const HEADROOM: usize = FRAME_OVERHEAD + MAX_DATA_HEADER;

/// Bytes queued on a flow.
#[derive(Debug)]
pub(crate) enum Chunk {
    /// Copied in, after room for a frame's overhead and header.
    Owned {
        /// The allocation: at least [`HEADROOM`] bytes, then the payload.
        buf: BytesMut,
        /// Where the payload starts in `buf`.
        start: usize,
    },
    /// Held as it was handed over, shared with whoever else holds it.
    Held(Bytes),
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
        Chunk::Owned {
            buf,
            start: HEADROOM,
        }
    }

    /// Payload bytes.
    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// The payload.
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Chunk::Owned { buf, start } => &buf[*start..],
            Chunk::Held(bytes) => bytes,
        }
    }

    /// The allocation, for reuse, if the chunk owns one.
    pub(crate) fn into_buffer(self) -> Option<BytesMut> {
        match self {
            Chunk::Owned { buf, .. } => Some(buf),
            Chunk::Held(_) => None,
        }
    }

    /// Turns the chunk into a frame body: returns a buffer of
    /// [`FRAME_OVERHEAD`] bytes of space for the sealer, then `header`,
    /// then the payload — or, when `clear` (a passthrough payload, sent
    /// unencrypted) and the chunk is held, only the space and `header`,
    /// with the payload to follow it as it is. Copies only a held chunk
    /// that must be encrypted.
    pub(crate) fn into_frame(self, header: &[u8], clear: bool) -> (BytesMut, Bytes) {
        debug_assert!(header.len() <= MAX_DATA_HEADER);
        match self {
            Chunk::Owned { mut buf, start } => {
                let at = start - header.len() - FRAME_OVERHEAD;
                let mut frame = buf.split_off(at);
                frame[FRAME_OVERHEAD..FRAME_OVERHEAD + header.len()].copy_from_slice(header);
                (frame, Bytes::new())
            }
            Chunk::Held(payload) if clear => {
                let mut head = BytesMut::with_capacity(FRAME_OVERHEAD + header.len());
                head.put_bytes(0, FRAME_OVERHEAD);
                head.put_slice(header);
                (head, payload)
            }
            Chunk::Held(payload) => {
                Chunk::copy_from(&[&payload], payload.len()).into_frame(header, clear)
            }
        }
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
        let (frame, tail) = chunk.into_frame(&[0xaa, 0xbb], false);
        assert!(tail.is_empty());
        assert_eq!(frame.len(), FRAME_OVERHEAD + 2 + 9);
        assert_eq!(&frame[FRAME_OVERHEAD..FRAME_OVERHEAD + 2], &[0xaa, 0xbb]);
        assert_eq!(&frame[FRAME_OVERHEAD + 2..], b"hello wor");
        // Same memory: no copy.
        assert_eq!(frame[FRAME_OVERHEAD + 2..].as_ptr(), before);
    }

    #[test]
    fn held_chunks_go_clear_as_they_are_or_are_copied_to_be_sealed() {
        let payload = Bytes::from(vec![7u8; 100]);
        let chunk = Chunk::Held(payload.clone());
        assert_eq!(chunk.len(), 100);
        assert!(chunk.into_buffer().is_none());

        let (head, tail) = Chunk::Held(payload.clone()).into_frame(&[0xaa], true);
        assert_eq!(head.len(), FRAME_OVERHEAD + 1);
        assert_eq!(head[FRAME_OVERHEAD], 0xaa);
        // The very same bytes: no copy.
        assert_eq!(tail.as_ptr(), payload.as_ptr());
        assert_eq!(tail.len(), 100);

        let (frame, tail) = Chunk::Held(payload.clone()).into_frame(&[0xaa], false);
        assert!(tail.is_empty());
        assert_eq!(frame.len(), FRAME_OVERHEAD + 1 + 100);
        assert_eq!(&frame[FRAME_OVERHEAD + 1..], &payload[..]);
        assert_ne!(frame[FRAME_OVERHEAD + 1..].as_ptr(), payload.as_ptr());
    }
}
