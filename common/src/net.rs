//! QUIC endpoints with the socket and transport settings every Stagehand connection uses:
//! explicit UDP buffers (the defaults drop packets at speed) and large flow-control windows.

use quinn::{ClientConfig, Connection, Endpoint, EndpointConfig, ServerConfig, TransportConfig, VarInt};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

/// UDP send and receive buffer size: the ceiling on this class of machine without sysctl.
pub const UDP_BUFFER: usize = 4 << 20;

/// What can go wrong reaching a peer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The address does not resolve.
    #[error("cannot resolve {addr:?}: {why}")]
    Resolve { addr: String, why: String },
    /// The UDP socket could not be made.
    #[error("socket: {0}")]
    Socket(#[from] std::io::Error),
    /// The QUIC handshake could not start.
    #[error("connect to {addr}: {why}")]
    Connect { addr: String, why: String },
    /// The TLS configuration is not usable with QUIC.
    #[error("tls for quic: {0}")]
    Crypto(String),
}

/// A UDP socket with explicit buffers, bound to `addr`.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = sock.set_recv_buffer_size(UDP_BUFFER) {
        tracing::warn!(error = %e, "Could not set the UDP receive buffer.");
    }
    if let Err(e) = sock.set_send_buffer_size(UDP_BUFFER) {
        tracing::warn!(error = %e, "Could not set the UDP send buffer.");
    }
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// The transport settings of every Stagehand connection: a client's (it keeps the
/// connection alive) or a server's.
fn transport(client: bool) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(VarInt::from_u32(30_000).into()));
    // Clients ping every 5 s; the server only answers. Both sides pinging would double the
    // packets of a fleet at rest (20,000 connections at 10,000 agents) for nothing: a
    // client's ping and its acknowledgement keep both sides' idle timers fresh.
    t.keep_alive_interval(client.then_some(Duration::from_secs(5)));
    t.stream_receive_window(VarInt::from_u32(16 << 20));
    t.receive_window(VarInt::from_u32(64 << 20));
    // What a connection may have written and not yet acknowledged. A server's is smaller:
    // it serves many agents at once (a fan-out holds one window per stream being served),
    // and 16 MiB still fills a 1 Gbit/s link at 130 ms of round trip.
    t.send_window(if client { 64 << 20 } else { 16 << 20 });
    // Enough for every use (an agent fetches on a few, an upload on four); a peer that opens
    // more waits.
    t.max_concurrent_bidi_streams(VarInt::from_u32(32));
    Arc::new(t)
}

/// The key a server signs stateless resets with. A server restarted with the same key
/// answers packets of connections it no longer knows with a reset their peers accept, so
/// they reconnect at once instead of at the idle timeout (a `kill -9` sends no close).
struct ResetKey(blake3::Hash);

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        signature_out.copy_from_slice(blake3::keyed_hash(self.0.as_bytes(), data).as_bytes());
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let expected = blake3::keyed_hash(self.0.as_bytes(), data);
        // blake3::Hash compares in constant time.
        match <[u8; 32]>::try_from(signature) {
            Ok(sig) if blake3::Hash::from(sig) == expected => Ok(()),
            _ => Err(quinn::crypto::CryptoError),
        }
    }
}

/// Random 8-byte connection ids; any id is answered (a stateless reset for unknown ones).
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// A QUIC server endpoint. `reset_secret` must stay the same across restarts (it is
/// derived from a secret the server keeps) and be known to nobody else.
pub fn server_endpoint(addr: SocketAddr, tls: rustls::ServerConfig, reset_secret: &[u8]) -> Result<Endpoint, NetError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| NetError::Crypto(e.to_string()))?;
    let mut config = ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(false));
    // What quinn buffers for connections waiting for the controller to take them (its
    // handshake queue): their first flights, a few datagrams each.
    config.incoming_buffer_size(64 << 10);
    config.incoming_buffer_size_total(16 << 20);
    let key = ResetKey(blake3::Hash::from(blake3::derive_key("stagehand 2026 quic stateless reset key", reset_secret)));
    let mut endpoint_config = EndpointConfig::new(Arc::new(key));
    // quinn's default generator rejects connection ids of an earlier process (its key is
    // random per process), so a restarted server would drop their packets instead of
    // answering them with a reset.
    endpoint_config.cid_generator(|| Box::new(RandomCids));
    // quinn sends at most one stateless reset per 20 ms by default, endpoint-wide. After a
    // restart, agents' keep-alives arrive in bursts (their timers run in step since the last
    // release), and with any interval most of a burst went unanswered: at 300 agents, 1,763
    // packets were ignored at 100 us against 623 resets sent, and the ignored waited for
    // their next keep-alive or the idle timeout. A reset is always smaller than the packet
    // that incites it (no amplification, no reset loop), and costs one keyed hash: no limit.
    endpoint_config.min_reset_interval(Duration::ZERO);
    Ok(Endpoint::new(endpoint_config, Some(config), udp_socket(addr)?, Arc::new(quinn::TokioRuntime))?)
}

/// A client endpoint for peers of `family_of`'s address family.
pub fn client_endpoint(family_of: SocketAddr) -> Result<Endpoint, NetError> {
    let bind: SocketAddr = if family_of.is_ipv6() {
        "[::]:0".parse().expect("literal address")
    } else {
        "0.0.0.0:0".parse().expect("literal address")
    };
    Ok(Endpoint::new(EndpointConfig::default(), None, udp_socket(bind)?, Arc::new(quinn::TokioRuntime))?)
}

/// A quinn client configuration from a rustls one.
pub fn client_config(tls: rustls::ClientConfig) -> Result<ClientConfig, NetError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| NetError::Crypto(e.to_string()))?;
    let mut config = ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(true));
    Ok(config)
}

/// Resolves `host:port`.
pub async fn resolve(addr: &str) -> Result<SocketAddr, NetError> {
    let err = |why: String| NetError::Resolve { addr: addr.to_string(), why };
    tokio::net::lookup_host(addr).await.map_err(|e| err(e.to_string()))?.next().ok_or_else(|| err("no address".into()))
}

/// Dials the controller at `addr`.
pub async fn connect(endpoint: &Endpoint, addr: SocketAddr, config: ClientConfig) -> Result<Connection, NetError> {
    let err = |why: String| NetError::Connect { addr: addr.to_string(), why };
    endpoint
        .connect_with(config, addr, crate::protocol::CONTROLLER_SERVER_NAME)
        .map_err(|e| err(e.to_string()))?
        .await
        .map_err(|e| err(e.to_string()))
}

/// The fingerprint of the certificate the peer presented, if any.
pub fn peer_fingerprint(conn: &Connection) -> Option<String> {
    let certs = conn.peer_identity()?.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| crate::tls::fingerprint(c))
}

/// The ALPN protocol the connection agreed on.
pub fn alpn(conn: &Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}
