//! `ws`, `ws4`, `ws6`: frames as binary WebSocket messages (RFC 6455, via
//! tokio-tungstenite), one message per frame, no TLS.
//!
//! A dial address is `host:port` optionally followed by a path
//! (`example.com:80/flow`; the path defaults to `/`). The dialer connects
//! with tcp, then requests `ws://host:port/path` with `Host: host:port`, so an
//! HTTP reverse proxy in front of the listener can route on either. A
//! listener takes `host:port` (a path, if given, is ignored) and accepts the
//! upgrade on any path.
//!
//! The listener parses the HTTP request itself: a request that is not a
//! WebSocket upgrade gets an HTTP error response (`400`, `405`, `426` or
//! `431`) and closes that one connection with [`ErrorKind::BadArg`]; it never
//! affects the listener.
//!
//! Received text messages are an error ([`ErrorKind::BadArg`]); pings and
//! pongs are answered by tungstenite and skipped. Messages over
//! [`crate::MAX_FRAME_SIZE`] are refused ([`ErrorKind::BadArg`]).
//!
//! Closing the writer sends a WebSocket Close: the peer's reader sees a clean
//! end of stream after the last frame. Unlike TCP, this is not a half-close:
//! once the peer's reader has seen the Close, the peer can no longer write.
//! Reads and writes share tungstenite's connection state behind a short
//! lock, taken only while a read or write is being polled.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use flow::transport::{Frame, FrameReader, FrameWriter, FramedConn, Listener, Protocol};
use flow::{Error, ErrorKind, Result};
use futures::future::BoxFuture;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::machine::TryParse;
use tokio_tungstenite::tungstenite::handshake::server::{Request, create_response, write_response};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::MAX_FRAME_SIZE;
use crate::accept::Upgrade;
use crate::framing::{check_frame_sizes, io_error};
use crate::tcp;

/// The longest HTTP request head a listener reads before answering `431`.
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_SIZE))
        .max_frame_size(Some(MAX_FRAME_SIZE))
}

/// Splits `host:port/path` into `host:port` and `/path` (`/` if absent).
pub(crate) fn split_path(address: &str) -> (&str, &str) {
    match address.find('/') {
        Some(i) => (&address[..i], &address[i..]),
        None => (address, "/"),
    }
}

fn ws_error(label: &str, what: &str, err: WsError) -> Error {
    match err {
        WsError::Io(err) => io_error(label, what, err),
        WsError::Capacity(_) | WsError::Utf8(_) => {
            Error::with_source(ErrorKind::BadArg, format!("{label}: {what}: {err}"), err)
        }
        _ => Error::with_source(ErrorKind::Network, format!("{label}: {what}: {err}"), err),
    }
}

/// A connection carrying one frame per binary WebSocket message.
pub(crate) struct WsConn<S> {
    ws: WebSocketStream<S>,
    local: String,
    remote: String,
    label: Arc<str>,
}

impl WsConn<TcpStream> {
    fn new(protocol: &str, ws: WebSocketStream<TcpStream>) -> Result<Self> {
        let stream = ws.get_ref();
        let local = stream
            .local_addr()
            .map_err(|e| io_error(protocol, "local address", e))?
            .to_string();
        let remote = stream
            .peer_addr()
            .map_err(|e| io_error(protocol, "peer address", e))?
            .to_string();
        let label = format!("{protocol} {local}<->{remote}").into();
        Ok(WsConn {
            ws,
            local,
            remote,
            label,
        })
    }
}

impl FramedConn for WsConn<TcpStream> {
    fn split(self: Box<Self>) -> (Box<dyn FrameReader>, Box<dyn FrameWriter>) {
        let this = *self;
        let (sink, stream) = this.ws.split();
        (
            Box::new(WsReader {
                stream,
                label: this.label.clone(),
                ended: false,
            }),
            Box::new(WsWriter {
                sink,
                label: this.label,
            }),
        )
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

struct WsReader<S> {
    stream: SplitStream<WebSocketStream<S>>,
    label: Arc<str>,
    ended: bool,
}

impl WsReader<TcpStream> {
    async fn next_frame(&mut self) -> Result<Option<BytesMut>> {
        while !self.ended {
            match self.stream.next().await {
                None | Some(Ok(Message::Close(_))) => self.ended = true,
                Some(Ok(Message::Binary(frame))) => return Ok(Some(BytesMut::from(frame))),
                Some(Ok(Message::Text(_))) => {
                    return Err(Error::bad_arg(format!(
                        "{}: peer sent a text message; frames travel as binary messages",
                        self.label
                    )));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(err)) => return Err(ws_error(&self.label, "reading", err)),
            }
        }
        Ok(None)
    }
}

impl FrameReader for WsReader<TcpStream> {
    fn read_frame(&mut self) -> BoxFuture<'_, Result<Option<BytesMut>>> {
        Box::pin(self.next_frame())
    }
}

struct WsWriter<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    label: Arc<str>,
}

impl WsWriter<TcpStream> {
    async fn send_all(&mut self, frames: &[Frame]) -> Result<()> {
        check_frame_sizes(&self.label, frames)?;
        for frame in frames {
            // One message per frame: a frame with a tail is copied whole.
            self.sink
                .feed(Message::Binary(frame.to_bytes()))
                .await
                .map_err(|e| ws_error(&self.label, "writing", e))?;
        }
        self.sink
            .flush()
            .await
            .map_err(|e| ws_error(&self.label, "flushing", e))
    }

    async fn close_sink(&mut self) -> Result<()> {
        match self.sink.close().await {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Ok(()),
            Err(err) => Err(ws_error(&self.label, "closing", err)),
        }
    }
}

impl FrameWriter for WsWriter<TcpStream> {
    fn write_frames<'a>(&'a mut self, frames: &'a [Frame]) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.send_all(frames))
    }

    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.close_sink())
    }
}

/// Dials `address` (`host:port[/path]`) over WebSocket. No timeout: the
/// caller wraps it.
async fn connect(protocol: &str, address: &str) -> Result<Box<dyn FramedConn>> {
    let (host_port, path) = split_path(address);
    let stream = tcp::connect(protocol, host_port).await?;
    let url = format!("ws://{host_port}{path}");
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(config()))
            .await
            .map_err(|err| {
                let why = match &err {
                    WsError::Http(response) => {
                        format!("server refused the upgrade with {}", response.status())
                    }
                    other => other.to_string(),
                };
                let kind = match err {
                    WsError::Url(_) | WsError::HttpFormat(_) => ErrorKind::BadArg,
                    _ => ErrorKind::DialFailed,
                };
                Error::with_source(kind, format!("{protocol}: dial {url}: {why}"), err)
            })?;
    Ok(Box::new(WsConn::new(protocol, ws)?))
}

/// Writes a short HTTP error response and closes the connection; errors are
/// ignored, the connection is being dropped anyway.
async fn refuse(stream: &mut TcpStream, status: &str, extra_headers: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The server side of the WebSocket upgrade on an accepted tcp stream. The
/// caller bounds it with the handshake timeout.
pub(crate) async fn accept_upgrade(
    protocol: &str,
    mut stream: TcpStream,
) -> Result<Box<dyn FramedConn>> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "(unknown peer)".into());
    let label = format!("{protocol} from {peer}");
    let mut head = BytesMut::with_capacity(1024);
    let (request, head_len) = loop {
        match Request::try_parse(&head) {
            Ok(Some((len, request))) => break (request, len),
            Ok(None) => {}
            Err(WsError::Protocol(ProtocolError::WrongHttpMethod)) => {
                refuse(
                    &mut stream,
                    "405 Method Not Allowed",
                    "Allow: GET\r\n",
                    "only GET\n",
                )
                .await;
                return Err(Error::bad_arg(format!(
                    "{label}: HTTP request with a method other than GET"
                )));
            }
            Err(err) => {
                refuse(&mut stream, "400 Bad Request", "", "malformed request\n").await;
                return Err(Error::with_source(
                    ErrorKind::BadArg,
                    format!("{label}: malformed HTTP request: {err}"),
                    err,
                ));
            }
        }
        if head.len() >= MAX_REQUEST_HEAD {
            refuse(&mut stream, "431 Request Header Fields Too Large", "", "").await;
            return Err(Error::bad_arg(format!(
                "{label}: HTTP request head over {MAX_REQUEST_HEAD} bytes"
            )));
        }
        let n = stream
            .read_buf(&mut head)
            .await
            .map_err(|e| io_error(&label, "reading the HTTP request", e))?;
        if n == 0 {
            return Err(Error::network(format!(
                "{label}: connection closed inside the HTTP request"
            )));
        }
    };
    let response = match create_response(&request) {
        Ok(response) => response,
        Err(err) => {
            let upgrade_missing = matches!(
                err,
                WsError::Protocol(
                    ProtocolError::MissingConnectionUpgradeHeader
                        | ProtocolError::MissingUpgradeWebSocketHeader
                )
            );
            if upgrade_missing {
                refuse(
                    &mut stream,
                    "426 Upgrade Required",
                    "Upgrade: websocket\r\n",
                    "this endpoint speaks WebSocket only\n",
                )
                .await;
            } else {
                refuse(
                    &mut stream,
                    "400 Bad Request",
                    "",
                    "bad WebSocket upgrade\n",
                )
                .await;
            }
            return Err(Error::with_source(
                ErrorKind::BadArg,
                format!(
                    "{label}: HTTP request for {} is not a WebSocket upgrade: {err}",
                    request.uri()
                ),
                err,
            ));
        }
    };
    let mut out = Vec::with_capacity(256);
    write_response(&mut out, &response)
        .map_err(|e| ws_error(&label, "encoding the upgrade response", e))?;
    stream
        .write_all(&out)
        .await
        .map_err(|e| io_error(&label, "writing the upgrade response", e))?;
    // Whatever the client sent after its request already belongs to the
    // WebSocket stream.
    let tail = head.split_off(head_len).to_vec();
    let ws = WebSocketStream::from_partially_read(stream, tail, Role::Server, Some(config())).await;
    Ok(Box::new(WsConn::new(protocol, ws)?))
}

/// The `ws`, `ws4` and `ws6` protocols.
#[derive(Debug, Default, Clone, Copy)]
pub struct WsProtocol;

impl WsProtocol {
    /// The protocol; one value serves all three names.
    pub fn new() -> Self {
        WsProtocol
    }
}

impl Protocol for WsProtocol {
    fn dial<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn FramedConn>>> {
        Box::pin(tcp::with_timeout(
            protocol,
            address,
            timeout,
            connect(protocol, address),
        ))
    }

    fn resolve<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<(String, Vec<String>)>> {
        Box::pin(async move {
            let (host_port, path) = split_path(address);
            let addrs = tcp::resolve_addrs(protocol, tcp::Family::of(protocol), host_port).await?;
            let path = if path == "/" { "" } else { path };
            Ok((
                protocol.to_string(),
                addrs.iter().map(|a| format!("{a}{path}")).collect(),
            ))
        })
    }

    fn listen<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Listener>>> {
        let name: Arc<str> = protocol.into();
        let upgrade: Upgrade<TcpStream> = Arc::new(move |stream: TcpStream, _peer: String| {
            let name = name.clone();
            Box::pin(async move {
                tcp::configure(&stream);
                accept_upgrade(&name, stream).await
            })
        });
        let (host_port, _path) = split_path(address);
        Box::pin(tcp::listen_with(protocol, host_port, upgrade))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_off() {
        assert_eq!(split_path("h:80"), ("h:80", "/"));
        assert_eq!(split_path("h:80/flow/x"), ("h:80", "/flow/x"));
        assert_eq!(split_path("[::1]:80/"), ("[::1]:80", "/"));
    }

    #[test]
    fn limits_follow_the_frame_maximum() {
        let c = config();
        assert_eq!(c.max_message_size, Some(MAX_FRAME_SIZE));
        assert_eq!(c.max_frame_size, Some(MAX_FRAME_SIZE));
    }
}
