//! Feeds arbitrary bytes to the frame decoder. Decoding must never panic, and
//! whatever decodes must re-encode to bytes that decode to the same messages.
#![no_main]

use bytes::{Bytes, BytesMut};
use flow_message::{FrameMessages, decode_frame, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    for msg in FrameMessages::new(frame.clone()) {
        if msg.is_err() {
            break;
        }
    }
    if let Ok(msgs) = decode_frame(frame) {
        let mut buf = BytesMut::new();
        encode_frame(&msgs, &mut buf);
        let again = decode_frame(buf.freeze()).expect("re-encoded frame decodes");
        assert_eq!(again, msgs);
    }
});
