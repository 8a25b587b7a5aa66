//! The systems compared, behind one shape: a [`Server`] that accepts
//! connections and streams, a [`Dialer`] that makes [`Client`] connections,
//! and streams that are all tokio `AsyncRead + AsyncWrite`.
//!
//! Every stream starts with a one-byte tag telling the server what to do
//! with it (see [`serve_tagged`]), so every case uses the same server code
//! whatever the system.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flow::auth::AllowEveryone;
use flow::conn::{Conn, ConnConfig, FlowOptions, HandshakeParams};
use flow::naming::{Endpoint, RoutingId};
use flow::security::Principal;
use flow_protocols::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::noise;
use crate::quic::{self, Certs, QuicStream};
use crate::yamux_link;

/// Errors of setup and measurement.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Results of setup and measurement.
pub(crate) type Result<T> = std::result::Result<T, BoxError>;

/// How long a dial may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `flow-proxy` has no server or dialer of this shape.
pub(crate) const PROXY_ONLY: &str = "flow-proxy runs only the proxy case";

/// Size of the chunks the server writes and reads.
pub(crate) const CHUNK: usize = 64 * 1024;

/// Tag: echo everything after the tag until end of stream.
pub(crate) const TAG_ECHO: u8 = b'E';
/// Tag: read until end of stream, then answer one byte.
pub(crate) const TAG_SINK: u8 = b'S';
/// Tag: an 8-byte big-endian count follows; send that many bytes back.
pub(crate) const TAG_DOWNLOAD: u8 = b'D';

/// A stream of any system.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}
/// A boxed stream of any system.
pub(crate) type BoxStream = Box<dyn Stream>;

/// A system under comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum System {
    /// flow over the tcp transport.
    FlowTcp,
    /// flow over the unix transport.
    FlowUnix,
    /// TCP, Noise XX with ed25519-signed static keys, yamux (libp2p's stack).
    YamuxNoise,
    /// yamux over plain TCP.
    Yamux,
    /// QUIC (quinn) on loopback.
    Quinn,
    /// Plain TCP, one connection per stream.
    Tcp,
    /// flow over tcp through one proxy (only the `proxy` case).
    FlowProxy,
}

impl System {
    /// Every system, in report order.
    pub(crate) const ALL: [System; 7] = [
        System::FlowTcp,
        System::FlowUnix,
        System::YamuxNoise,
        System::Yamux,
        System::Quinn,
        System::Tcp,
        System::FlowProxy,
    ];

    /// The name used on the command line and in the output.
    pub(crate) fn name(self) -> &'static str {
        match self {
            System::FlowTcp => "flow-tcp",
            System::FlowUnix => "flow-unix",
            System::YamuxNoise => "yamux-noise",
            System::Yamux => "yamux",
            System::Quinn => "quinn",
            System::Tcp => "tcp",
            System::FlowProxy => "flow-proxy",
        }
    }

    /// The system called `name`.
    pub(crate) fn parse(name: &str) -> Option<System> {
        System::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether the system authenticates the peer when connecting.
    pub(crate) fn authenticates(self) -> bool {
        !matches!(self, System::Yamux | System::Tcp)
    }

    /// Whether the system is flow itself (over any transport).
    pub(crate) fn is_flow(self) -> bool {
        matches!(self, System::FlowTcp | System::FlowUnix)
    }

    fn flow_protocol(self) -> &'static str {
        match self {
            System::FlowUnix => "unix",
            _ => "tcp",
        }
    }
}

/// Identities a process uses, made once.
pub(crate) struct Credentials {
    flow_server: Principal,
    flow_client: Principal,
    noise_server: Arc<noise::Identity>,
    noise_client: Arc<noise::Identity>,
    quic: Certs,
}

impl Credentials {
    /// Fresh identities; the QUIC certificates come from the parent process
    /// when there is one, so that both children trust each other.
    pub(crate) fn generate() -> Result<Credentials> {
        Ok(Credentials {
            flow_server: Principal::with_self_blessing("server")?,
            flow_client: Principal::with_self_blessing("client")?,
            noise_server: Arc::new(noise::Identity::generate()?),
            noise_client: Arc::new(noise::Identity::generate()?),
            quic: match Certs::from_env() {
                Some(certs) => certs,
                None => Certs::generate()?,
            },
        })
    }

    /// The QUIC certificates (to hand to child processes).
    pub(crate) fn quic(&self) -> &Certs {
        &self.quic
    }
}

fn flow_params(principal: &Principal, protocol: &str, max_streams: usize) -> HandshakeParams {
    let mut config = ConnConfig::default();
    if max_streams > config.max_flows {
        config.max_flows = max_streams;
    }
    if max_streams > config.max_pending_accepts {
        config.max_pending_accepts = max_streams;
    }
    HandshakeParams {
        config,
        principal: principal.clone(),
        authorizer: Arc::new(AllowEveryone),
        local_endpoint: Endpoint::new(protocol, "x").with_routing_id(RoutingId::random()),
        transport_max_frame: flow_protocols::MAX_FRAME_SIZE,
    }
}

fn unix_socket_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "flow-compare-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// What a [`Holder`] calls with the number of streams held.
type OnHeld = Box<dyn FnMut(usize) + Send>;

/// Streams held open by a server in hold mode (the idle-memory case).
#[derive(Default)]
pub(crate) struct Holder {
    streams: Mutex<Vec<BoxStream>>,
    /// Called with the number held after each new one.
    on_held: Mutex<Option<OnHeld>>,
}

impl Holder {
    /// A holder that calls `on_held` with the count after each stream.
    pub(crate) fn new(on_held: impl FnMut(usize) + Send + 'static) -> Holder {
        Holder {
            streams: Mutex::new(Vec::new()),
            on_held: Mutex::new(Some(Box::new(on_held))),
        }
    }

    /// Makes room for `count` streams up front (so that growing the list
    /// is not counted as memory per stream).
    pub(crate) fn reserve(&self, count: usize) {
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reserve(count);
    }

    fn hold(&self, stream: BoxStream) {
        let count = {
            let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            streams.push(stream);
            streams.len()
        };
        if let Some(callback) = self
            .on_held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            callback(count);
        }
    }
}

/// What a server does with the streams it accepts.
#[derive(Clone)]
pub(crate) enum Behaviour {
    /// Serve each stream by its tag ([`serve_tagged`]).
    Tagged,
    /// Read one byte, answer one byte, then keep the stream open and idle.
    Hold(Arc<Holder>),
}

fn on_stream(stream: BoxStream, behaviour: &Behaviour) {
    match behaviour {
        Behaviour::Tagged => {
            tokio::spawn(serve_tagged(stream));
        }
        Behaviour::Hold(holder) => {
            let holder = holder.clone();
            tokio::spawn(async move {
                let mut stream = stream;
                let mut byte = [0u8; 1];
                if stream.read_exact(&mut byte).await.is_ok()
                    && stream.write_all(&byte).await.is_ok()
                {
                    holder.hold(stream);
                }
            });
        }
    }
}

/// Serves one stream by its first byte: [`TAG_ECHO`], [`TAG_SINK`] or
/// [`TAG_DOWNLOAD`]. Errors end the stream quietly (the client reports).
pub(crate) async fn serve_tagged(mut stream: BoxStream) {
    let _ = serve_tagged_inner(&mut stream).await;
}

async fn serve_tagged_inner(stream: &mut BoxStream) -> std::io::Result<()> {
    let mut tag = [0u8; 1];
    stream.read_exact(&mut tag).await?;
    let mut buf = vec![0u8; CHUNK];
    match tag[0] {
        TAG_ECHO => loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            stream.write_all(&buf[..n]).await?;
        },
        TAG_SINK => {
            while stream.read(&mut buf).await? != 0 {}
            stream.write_all(b"k").await?;
        }
        TAG_DOWNLOAD => {
            let mut len = [0u8; 8];
            stream.read_exact(&mut len).await?;
            let mut left = u64::from_be_bytes(len);
            buf.fill(0x5a);
            while left > 0 {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(CHUNK);
                stream.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            stream.shutdown().await?;
            // Hold on until the client is done reading (it closes then).
            while stream.read(&mut buf).await? != 0 {}
            return Ok(());
        }
        _ => return Ok(()),
    }
    stream.shutdown().await
}

/// A listening server of one system.
pub(crate) struct Server {
    /// Where clients dial.
    pub(crate) addr: String,
    accept_task: JoinHandle<()>,
    quic: Option<quinn::Endpoint>,
    unix_path: Option<PathBuf>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept_task.abort();
        if let Some(endpoint) = &self.quic {
            endpoint.close(0u32.into(), b"done");
        }
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Server {
    /// Starts a server of `system` on loopback that treats streams as
    /// `behaviour` says and admits `max_streams` concurrent streams per
    /// connection (the systems' defaults when that is lower).
    pub(crate) async fn start(
        system: System,
        behaviour: Behaviour,
        creds: &Credentials,
        max_streams: usize,
    ) -> Result<Server> {
        match system {
            System::FlowTcp | System::FlowUnix => {
                let protocol = system.flow_protocol();
                let unix_path = (system == System::FlowUnix).then(unix_socket_path);
                let address = match &unix_path {
                    Some(path) => path.to_string_lossy().into_owned(),
                    None => "127.0.0.1:0".to_string(),
                };
                let listener = Registry::with_defaults().listen(protocol, &address).await?;
                let addr = listener.local_addr();
                let params = flow_params(&creds.flow_server, protocol, max_streams);
                let accept_task = tokio::spawn(async move {
                    while let Ok(transport) = listener.accept().await {
                        let params = params.clone();
                        let behaviour = behaviour.clone();
                        tokio::spawn(async move {
                            let Ok(conn) = Conn::accept(transport, params).await else {
                                return;
                            };
                            while let Ok(flow) = conn.accept_flow().await {
                                on_stream(Box::new(flow), &behaviour);
                            }
                        });
                    }
                });
                Ok(Server {
                    addr,
                    accept_task,
                    quic: None,
                    unix_path,
                })
            }
            System::YamuxNoise | System::Yamux => {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?.to_string();
                let identity = (system == System::YamuxNoise).then(|| creds.noise_server.clone());
                let accept_task = tokio::spawn(async move {
                    while let Ok((tcp, _)) = listener.accept().await {
                        let identity = identity.clone();
                        let behaviour = behaviour.clone();
                        tokio::spawn(async move {
                            let _ = tcp.set_nodelay(true);
                            let (tx, mut rx) = mpsc::unbounded_channel();
                            let config = yamux_link::config(max_streams);
                            let _handle = match identity {
                                Some(identity) => {
                                    let Ok((secure, _peer)) =
                                        noise::handshake(tcp, &identity, false).await
                                    else {
                                        return;
                                    };
                                    yamux_link::start(
                                        secure.compat(),
                                        yamux::Mode::Server,
                                        config,
                                        Some(tx),
                                    )
                                }
                                None => yamux_link::start(
                                    tcp.compat(),
                                    yamux::Mode::Server,
                                    config,
                                    Some(tx),
                                ),
                            };
                            while let Some(stream) = rx.recv().await {
                                on_stream(Box::new(stream), &behaviour);
                            }
                        });
                    }
                });
                Ok(Server {
                    addr,
                    accept_task,
                    quic: None,
                    unix_path: None,
                })
            }
            System::Quinn => {
                let config = creds.quic.server_config(quic_streams(max_streams))?;
                let endpoint =
                    quinn::Endpoint::server(config, SocketAddr::from(([127, 0, 0, 1], 0)))?;
                let addr = endpoint.local_addr()?.to_string();
                let accepting = endpoint.clone();
                let accept_task = tokio::spawn(async move {
                    while let Some(incoming) = accepting.accept().await {
                        let behaviour = behaviour.clone();
                        tokio::spawn(async move {
                            let Ok(conn) = incoming.await else {
                                return;
                            };
                            while let Ok((send, recv)) = conn.accept_bi().await {
                                on_stream(Box::new(QuicStream { send, recv }), &behaviour);
                            }
                        });
                    }
                });
                Ok(Server {
                    addr,
                    accept_task,
                    quic: Some(endpoint),
                    unix_path: None,
                })
            }
            System::FlowProxy => Err(PROXY_ONLY.into()),
            System::Tcp => {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?.to_string();
                let accept_task = tokio::spawn(async move {
                    while let Ok((tcp, _)) = listener.accept().await {
                        let _ = tcp.set_nodelay(true);
                        on_stream(Box::new(tcp), &behaviour);
                    }
                });
                Ok(Server {
                    addr,
                    accept_task,
                    quic: None,
                    unix_path: None,
                })
            }
        }
    }
}

fn quic_streams(max_streams: usize) -> u32 {
    u32::try_from(max_streams).unwrap_or(u32::MAX)
}

/// Makes client connections of one system (reusing what a real client
/// reuses: identities, a QUIC endpoint).
pub(crate) struct Dialer {
    system: System,
    registry: Registry,
    flow_params: HandshakeParams,
    noise: Arc<noise::Identity>,
    quic: Option<quinn::Endpoint>,
    max_streams: usize,
}

impl Dialer {
    /// A dialer for `system`, for connections with up to `max_streams`
    /// concurrent streams.
    pub(crate) fn new(system: System, creds: &Credentials, max_streams: usize) -> Result<Dialer> {
        let quic = match system {
            System::Quinn => Some(quic::client_endpoint(
                &creds.quic,
                quic_streams(max_streams),
            )?),
            _ => None,
        };
        Ok(Dialer {
            system,
            registry: Registry::with_defaults(),
            flow_params: flow_params(&creds.flow_client, system.flow_protocol(), max_streams),
            noise: creds.noise_client.clone(),
            quic,
            max_streams,
        })
    }

    /// The same dialer keeping no resumption tickets (flow): every
    /// handshake signs and verifies, as the first one to a server does.
    pub(crate) fn without_resumption(mut self) -> Dialer {
        self.flow_params.config.resumption = None;
        self
    }

    /// Connects (and authenticates, where the system does) to `addr`.
    pub(crate) async fn connect(&self, addr: &str) -> Result<Client> {
        match self.system {
            System::FlowTcp | System::FlowUnix => {
                let protocol = self.system.flow_protocol();
                let transport = self.registry.dial(protocol, addr, DIAL_TIMEOUT).await?;
                let conn = Conn::dial(
                    transport,
                    self.flow_params.clone(),
                    Endpoint::new(protocol, addr),
                )
                .await?;
                Ok(Client::Flow(conn))
            }
            System::YamuxNoise => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let (secure, _peer) = noise::handshake(tcp, &self.noise, true).await?;
                Ok(Client::Yamux(yamux_link::start(
                    secure.compat(),
                    yamux::Mode::Client,
                    yamux_link::config(self.max_streams),
                    None,
                )))
            }
            System::Yamux => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                Ok(Client::Yamux(yamux_link::start(
                    tcp.compat(),
                    yamux::Mode::Client,
                    yamux_link::config(self.max_streams),
                    None,
                )))
            }
            System::Quinn => {
                let endpoint = self
                    .quic
                    .as_ref()
                    .ok_or("quinn dialer without an endpoint")?;
                let conn = endpoint.connect(addr.parse()?, quic::SERVER_NAME)?.await?;
                Ok(Client::Quinn(conn))
            }
            System::Tcp => {
                let addr: SocketAddr = addr.parse()?;
                Ok(Client::Tcp(addr))
            }
            System::FlowProxy => Err(PROXY_ONLY.into()),
        }
    }
}

/// A client's connection of one system.
pub(crate) enum Client {
    /// A flow connection.
    Flow(Conn),
    /// A yamux connection (over Noise or plain TCP).
    Yamux(yamux_link::Handle),
    /// A QUIC connection.
    Quinn(quinn::Connection),
    /// No connection: every stream is a TCP connection to this address.
    Tcp(SocketAddr),
}

impl Client {
    /// Opens a stream. Nothing may reach the peer before the first write.
    pub(crate) async fn open(&self) -> Result<BoxStream> {
        Ok(match self {
            Client::Flow(conn) => Box::new(conn.open_flow(FlowOptions::default())?),
            Client::Yamux(handle) => Box::new(handle.open().await?),
            Client::Quinn(conn) => {
                let (send, recv) = conn.open_bi().await?;
                Box::new(QuicStream { send, recv })
            }
            Client::Tcp(addr) => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                Box::new(tcp)
            }
        })
    }

    /// Closes the connection.
    pub(crate) fn close(self) {
        match self {
            Client::Flow(conn) => conn.close("done"),
            Client::Yamux(handle) => drop(handle),
            Client::Quinn(conn) => conn.close(0u32.into(), b"done"),
            Client::Tcp(_) => {}
        }
    }
}
