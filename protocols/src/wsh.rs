//! `wsh`, `wsh4`, `wsh6`: one listening port serving raw tcp framing and
//! WebSocket alike; dialing uses raw tcp framing.
//!
//! The listener looks at the first byte of each connection. A raw frame
//! starts with its 4-byte big-endian length, and since no frame exceeds
//! [`crate::MAX_FRAME_SIZE`] (under 16 MiB) that byte is `0x00`. An HTTP
//! request starts with its method, in upper-case ASCII (`GET`). So an
//! upper-case letter means WebSocket (see [`crate::ws`]; a request that is
//! not an upgrade gets an HTTP error response), and anything else is handed
//! to tcp framing, where a garbage length fails the reader with
//! [`flow::ErrorKind::BadArg`]. Sniffing happens off the accept loop under
//! [`crate::HANDSHAKE_TIMEOUT`], so a silent peer holds up nobody.
//!
//! Addresses, resolution and dialing are those of [`crate::tcp`].

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use flow::transport::{FramedConn, Listener, Protocol};
use flow::{Error, Result};
use futures::future::BoxFuture;
use tokio::net::TcpStream;

use crate::accept::Upgrade;
use crate::framing::io_error;
use crate::tcp::{self, TcpProtocol};
use crate::ws;

/// The `wsh`, `wsh4` and `wsh6` protocols.
#[derive(Debug, Default, Clone, Copy)]
pub struct WshProtocol;

impl WshProtocol {
    /// The protocol; one value serves all three names.
    pub fn new() -> Self {
        WshProtocol
    }
}

/// Whether a connection whose first byte is `first` speaks HTTP.
pub(crate) fn looks_like_http(first: u8) -> bool {
    first.is_ascii_uppercase()
}

async fn sniff(protocol: &str, stream: TcpStream) -> Result<Box<dyn FramedConn>> {
    tcp::configure(&stream);
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await.map_err(|e| {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        io_error(
            &format!("{protocol} from {peer}"),
            "reading the first byte",
            e,
        )
    })?;
    if n == 0 {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        return Err(Error::network(format!(
            "{protocol} from {peer}: closed before sending anything"
        )));
    }
    if looks_like_http(first[0]) {
        ws::accept_upgrade(protocol, stream).await
    } else {
        tcp::framed(protocol, stream, BytesMut::new())
    }
}

impl Protocol for WshProtocol {
    fn dial<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn FramedConn>>> {
        TcpProtocol.dial(protocol, address, timeout)
    }

    fn resolve<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<(String, Vec<String>)>> {
        TcpProtocol.resolve(protocol, address)
    }

    fn listen<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Listener>>> {
        let name: Arc<str> = protocol.into();
        let upgrade: Upgrade<TcpStream> = Arc::new(move |stream: TcpStream, _peer: String| {
            let name = name.clone();
            Box::pin(async move { sniff(&name, stream).await })
        });
        Box::pin(tcp::listen_with(protocol, address, upgrade))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_prefixes_never_look_like_http() {
        for len in [0usize, 1, 255, 65_535, crate::MAX_FRAME_SIZE] {
            let prefix = (len as u32).to_be_bytes();
            assert!(!looks_like_http(prefix[0]), "length {len}");
        }
        for method in ["GET", "POST", "HEAD", "OPTIONS", "CONNECT"] {
            assert!(looks_like_http(method.as_bytes()[0]));
        }
    }
}
