//! Frames: one or more messages back to back, the unit that is encrypted and
//! sent.

use bytes::{Bytes, BytesMut};

use crate::codec::Reader;
use crate::error::{DecodeError, DecodeErrorKind};
use crate::message::Message;

/// Appends every message in `messages` to `buf`, forming one frame.
pub fn encode_frame(messages: &[Message], buf: &mut BytesMut) {
    buf.reserve(messages.iter().map(Message::encoded_len).sum());
    for msg in messages {
        msg.encode(buf);
    }
}

/// Iterates over the messages of a frame.
///
/// Stops at the first error, which it yields; payloads are slices of the
/// frame's buffer.
#[derive(Debug, Clone)]
pub struct FrameMessages {
    reader: Reader,
    failed: bool,
}

impl FrameMessages {
    /// A reader over the messages of `frame`. An empty frame yields one
    /// [`DecodeErrorKind::EmptyFrame`] error.
    pub fn new(frame: Bytes) -> Self {
        let failed = false;
        FrameMessages {
            reader: Reader::new(frame, "Frame"),
            failed,
        }
    }
}

impl Iterator for FrameMessages {
    type Item = Result<Message, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.reader.is_empty() {
            return None;
        }
        let result = Message::decode(&mut self.reader);
        self.failed = result.is_err();
        Some(result)
    }
}

/// Decodes every message of `frame`, failing on the first bad one or on an
/// empty frame.
pub fn decode_frame(frame: Bytes) -> Result<Vec<Message>, DecodeError> {
    if frame.is_empty() {
        return Err(DecodeError::new(
            "Frame",
            "messages",
            DecodeErrorKind::EmptyFrame,
        ));
    }
    FrameMessages::new(frame).collect()
}
