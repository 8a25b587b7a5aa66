//! Control messages on a flow, one per flow message: how a proxy and the
//! managers listening through it exchange `ProxyServerRequest`,
//! `ProxyResponse` and the like.

use bytes::{Bytes, BytesMut};
use flow::Result;
use flow::conn::FlowWriter;
use flow::message::Message;
use flow::message::codec::Reader;

/// Writes `msg` as one flow message.
pub(crate) async fn send(writer: &mut FlowWriter, msg: &Message) -> Result<()> {
    let mut buf = BytesMut::new();
    msg.encode(&mut buf);
    writer.write_msg(&[&buf]).await
}

/// The one message `raw` holds; anything after it is an error. `context`
/// names what is decoded in errors.
pub(crate) fn decode_one(raw: Bytes, context: &'static str) -> Result<Message> {
    let mut r = Reader::new(raw, context);
    let msg = Message::decode(&mut r)?;
    r.finish("message")?;
    Ok(msg)
}
