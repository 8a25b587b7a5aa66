//! QUIC with quinn on loopback: self-signed certificates made with rcgen,
//! TLS 1.3 through rustls on ring, and both sides authenticated (the client
//! presents a certificate too, so a handshake proves both identities, as the
//! other stacks' handshakes do). Session resumption is off so that every
//! connection runs the full handshake.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The name the server's certificate is for.
pub(crate) const SERVER_NAME: &str = "localhost";

/// Environment variable carrying [`Certs`] to child processes.
const ENV: &str = "FLOW_COMPARE_QUIC_CERTS";

/// Certificates and keys of both sides (each trusts the other's
/// certificate as its root).
#[derive(Clone)]
pub(crate) struct Certs {
    server_cert: Vec<u8>,
    server_key: Vec<u8>,
    client_cert: Vec<u8>,
    client_key: Vec<u8>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Certs {
    /// Fresh self-signed certificates for both sides.
    pub(crate) fn generate() -> Result<Certs, BoxError> {
        let server = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])?;
        let client = rcgen::generate_simple_self_signed(vec!["client".to_string()])?;
        Ok(Certs {
            server_cert: server.cert.der().to_vec(),
            server_key: server.signing_key.serialize_der(),
            client_cert: client.cert.der().to_vec(),
            client_key: client.signing_key.serialize_der(),
        })
    }

    /// Puts the certificates where a child process finds them.
    pub(crate) fn to_env(&self) -> (&'static str, String) {
        let parts = [
            &self.server_cert,
            &self.server_key,
            &self.client_cert,
            &self.client_key,
        ];
        let text: Vec<String> = parts.iter().map(hex::encode).collect();
        (ENV, text.join(":"))
    }

    /// The certificates a parent process handed down, if any.
    pub(crate) fn from_env() -> Option<Certs> {
        let text = std::env::var(ENV).ok()?;
        let parts: Vec<Vec<u8>> = text
            .split(':')
            .map(hex::decode)
            .collect::<Result<_, _>>()
            .ok()?;
        let [server_cert, server_key, client_cert, client_key] =
            <[Vec<u8>; 4]>::try_from(parts).ok()?;
        Some(Certs {
            server_cert,
            server_key,
            client_cert,
            client_key,
        })
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(cert: &[u8]) -> Result<Arc<rustls::RootCertStore>, BoxError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(cert.to_vec()))?;
        Ok(Arc::new(roots))
    }

    fn key(der: &[u8]) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec()))
    }

    fn transport(max_streams: u32) -> Arc<quinn::TransportConfig> {
        let mut transport = quinn::TransportConfig::default();
        if max_streams > 100 {
            transport.max_concurrent_bidi_streams(max_streams.into());
        }
        Arc::new(transport)
    }

    /// The server's configuration, admitting `max_streams` concurrent
    /// streams (quinn's default of 100 below that).
    pub(crate) fn server_config(&self, max_streams: u32) -> Result<quinn::ServerConfig, BoxError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Self::roots(&self.client_cert)?,
            Self::provider(),
        )
        .build()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(self.server_cert.clone())],
                Self::key(&self.server_key),
            )?;
        tls.max_early_data_size = u32::MAX;
        let mut config =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(Arc::new(tls))?));
        config.transport_config(Self::transport(max_streams));
        Ok(config)
    }

    /// The client's configuration.
    pub(crate) fn client_config(&self, max_streams: u32) -> Result<quinn::ClientConfig, BoxError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(Self::roots(&self.server_cert)?)
            .with_client_auth_cert(
                vec![CertificateDer::from(self.client_cert.clone())],
                Self::key(&self.client_key),
            )?;
        tls.resumption = rustls::client::Resumption::disabled();
        let mut config =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(Arc::new(tls))?));
        config.transport_config(Self::transport(max_streams));
        Ok(config)
    }
}

/// A client endpoint on an ephemeral loopback port.
pub(crate) fn client_endpoint(
    certs: &Certs,
    max_streams: u32,
) -> Result<quinn::Endpoint, BoxError> {
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    endpoint.set_default_client_config(certs.client_config(max_streams)?);
    Ok(endpoint)
}

/// A QUIC stream (both directions) as one tokio `AsyncRead + AsyncWrite`.
pub(crate) struct QuicStream {
    /// The sending half.
    pub(crate) send: quinn::SendStream,
    /// The receiving half.
    pub(crate) recv: quinn::RecvStream,
}

impl AsyncRead for QuicStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.get_mut().recv), cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.get_mut().send), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().send), cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.get_mut().send), cx)
    }
}
