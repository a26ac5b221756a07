//! HBONE: a TCP connection carried as an HTTP/2 `CONNECT` stream (authority =
//! the original destination `ip:port`) inside mutual TLS to port 15008, in the
//! form Istio's ztunnel speaks. This module is the protocol: dialing a peer
//! and opening a tunnel, serving tunnels, and moving bytes between a tunnel
//! and a socket. Choosing peers and authorizing tunnels is the caller's.
pub mod headers;
mod stream;
pub mod tls;

pub use headers::{Baggage, Connect};
pub use stream::TunnelIo;

use std::{future::Future, io, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use mesh_common::identity::SpiffeId;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::debug;

/// Flow-control windows sized for throughput on fast links (h2's 64 KiB
/// default caps a stream at 64 KiB per round trip).
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 256 << 10;
/// Tunnels one HTTP/2 connection carries at once.
pub const MAX_STREAMS: u32 = 100;
/// How long a client on 15008 has to finish TLS and send HTTP/2's preface:
/// one that stalls (a slowloris, a silent socket) is cut off then, so it
/// cannot hold a connection and its memory for ever. Envoy's default
/// transport socket connect timeout is 15 s.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Each end of an HBONE connection PINGs the other this often, and the
/// answer must come within `KEEPALIVE_TIMEOUT` (gRPC's keepalive timeout): a
/// peer that stopped reading (or vanished without a FIN) is cut off, with
/// its tunnels, so it cannot hold their buffers (h2's send buffer, 400 KiB
/// a stream) for ever.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// An open tunnel: what the peer sends, and what we send it.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
}

/// An HTTP/2 connection to a peer's 15008, over which tunnels are opened.
#[derive(Clone)]
pub struct PeerConnection {
    sender: h2::client::SendRequest<Bytes>,
    id: u64,
    /// Set when the connection's driver ends (the peer closed it, went
    /// away, or failed): it can carry no more tunnels.
    ended: Arc<std::sync::atomic::AtomicBool>,
    /// The serial (hex) of the certificate the peer presented.
    pub peer_serial: Arc<str>,
    driver: tokio::task::AbortHandle,
}

impl PeerConnection {
    /// TLS then HTTP/2 over `tcp` (already connected to the peer's 15008).
    /// The TLS config decides which server identity is acceptable.
    pub async fn handshake(tcp: TcpStream, config: Arc<rustls::ClientConfig>) -> io::Result<PeerConnection> {
        let peer = tcp.peer_addr()?;
        let tls = TlsConnector::from(config).connect(ServerName::IpAddress(peer.ip().into()), tcp).await?;
        let peer_serial = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(tls::serial_of);
        let peer_serial: Arc<str> = peer_serial.unwrap_or_default().into();
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake(tls)
            .await
            .map_err(other)?;
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ended.clone();
        // Pinged like the server's clients: a peer that vanished without a
        // FIN leaves the pool within the keepalive timeout.
        let ping_pong = connection.ping_pong();
        let driver = tokio::spawn(async move {
            let ended = tokio::select! {
                result = connection => result.map_err(other),
                e = keepalive(ping_pong) => Err(e),
            };
            if let Err(e) = ended {
                debug!(peer = %peer, "HBONE connection ended: {e}");
            }
            flag.store(true, std::sync::atomic::Ordering::Release);
        });
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(PeerConnection { sender, id, ended, peer_serial, driver: driver.abort_handle() })
    }

    /// Closes the connection now, with every tunnel on it.
    pub fn close(&self) {
        self.driver.abort();
        self.ended.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether the connection has ended (its driver is done): a pool drops it.
    pub fn has_ended(&self) -> bool {
        self.ended.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether both are handles of one connection.
    pub fn same(&self, other: &PeerConnection) -> bool {
        self.id == other.id
    }

    /// Opens a tunnel with `CONNECT authority` (the original destination, or
    /// a service's address when the peer is a waypoint). A refusal by the
    /// peer is [`TunnelError::Refused`] with its HTTP status.
    /// Istio's `baggage` and `forwarded` go with it when `target` has them.
    pub async fn connect(&self, target: impl Into<Connect>) -> Result<Tunnel, TunnelError> {
        let Connect { authority, baggage, forwarded, connection_id } = target.into();
        let broken = |e: h2::Error| TunnelError::Broken(other(e));
        let mut sender = self.sender.clone().ready().await.map_err(broken)?;
        let mut request = Request::builder().method(Method::CONNECT).uri(authority.to_string());
        if let Some(baggage) = baggage {
            request = request.header("baggage", baggage);
        }
        if let Some(forwarded) = forwarded {
            request = request.header(http::header::FORWARDED, forwarded);
        }
        if let Some(id) = connection_id {
            request = request.header(headers::CONNECTION_ID_HEADER, id);
        }
        let request = request.body(()).map_err(|e| TunnelError::Broken(other(e)))?;
        let (response, send) = sender.send_request(request, false).map_err(broken)?;
        let response = response.await.map_err(broken)?;
        match response.status() {
            StatusCode::OK => Ok(Tunnel { send, recv: response.into_body() }),
            code => Err(TunnelError::Refused { authority, code }),
        }
    }
}

/// The client of a connection on 15008, as its certificate proved it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub identity: SpiffeId,
    /// The certificate's serial (hex), by which the controller revokes it.
    pub serial: Arc<str>,
}

/// A tunnel request that arrived on 15008, from a verified peer. The handler
/// accepts it (and relays) or refuses it with a status.
pub struct TunnelRequest {
    pub peer: Peer,
    /// The peer's TCP address (its pod's IP: it dials from its namespace).
    pub peer_addr: SocketAddr,
    /// The `CONNECT` authority: where the peer's client meant to go.
    pub target: SocketAddr,
    /// What the peer's `baggage` says of the source workload.
    pub baggage: Option<Baggage>,
    /// The service host the peer's client addressed (`forwarded: host=`).
    pub service_host: Option<String>,
    /// The id the peer's access log gives the connection.
    pub connection_id: Option<String>,
    respond: h2::server::SendResponse<Bytes>,
    body: RecvStream,
}

impl TunnelRequest {
    pub fn refuse(mut self, code: StatusCode) {
        let _ = self.respond.send_response(status(code), true);
    }

    /// Answers 200 and returns the tunnel to relay.
    pub fn accept(mut self) -> io::Result<Tunnel> {
        let send = self.respond.send_response(status(StatusCode::OK), false).map_err(other)?;
        Ok(Tunnel { send, recv: self.body })
    }
}

/// Why a tunnel could not be opened on a connection.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The peer answered the `CONNECT` with this status: its decision, final.
    #[error("peer refused the tunnel to {authority}: {code}")]
    Refused { authority: SocketAddr, code: StatusCode },
    /// The HTTP/2 connection failed: another connection may succeed.
    #[error("{0}")]
    Broken(io::Error),
}

impl TunnelError {
    /// The peer's policy refused it (401/403), rather than failing to deliver.
    pub fn is_policy_refusal(&self) -> bool {
        matches!(self, TunnelError::Refused { code: StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, .. })
    }
}

/// What a server does with each tunnel request.
pub trait TunnelHandler: Send + Sync + 'static {
    fn handle(&self, request: TunnelRequest) -> impl Future<Output = ()> + Send;
}

/// Serves one accepted connection on 15008: TLS (the config checks the
/// client), then every `CONNECT` stream on it until the peer closes it or
/// `drain` resolves; then it sends GOAWAY (the peer opens no new tunnel here)
/// and lets the open tunnels finish. TLS and the HTTP/2 preface must be done
/// within `handshake_timeout`.
pub async fn serve<H: TunnelHandler>(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    drain: impl Future<Output = ()>,
    handshake_timeout: std::time::Duration,
) -> io::Result<()> {
    let peer_addr = tcp.peer_addr()?;
    let deadline = tokio::time::Instant::now() + handshake_timeout;
    let tls = tokio::time::timeout_at(deadline, TlsAcceptor::from(config).accept(tcp))
        .await
        .map_err(|_| handshake_timed_out(handshake_timeout, "TLS"))??;
    let leaf =
        tls.get_ref().1.peer_certificates().and_then(|c| c.first()).ok_or_else(|| other("no client certificate"))?;
    let peer = Peer { identity: tls::identity_of(leaf).map_err(other)?, serial: tls::serial_of(leaf).into() };
    serve_streams(tls, peer, peer_addr, handler, drain, deadline).await
}

/// Why serving a connection on 15008 failed, as a metric label: the
/// certificate check that refused the peer at the handshake, or a timeout,
/// or `other` (the connection failed after it).
pub fn failure_reason(e: &io::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    if e.get_ref().is_some_and(|inner| inner.is::<KeepaliveTimeout>()) {
        return "keepalive_timeout";
    }
    if e.kind() == io::ErrorKind::TimedOut {
        return "handshake_timeout";
    }
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) else { return "other" };
    match tls {
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "expired",
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => "not_yet_valid",
        E::InvalidCertificate(C::UnknownIssuer) => "unknown_issuer",
        E::InvalidCertificate(C::BadSignature) => "bad_signature",
        E::InvalidCertificate(C::Revoked) => "revoked",
        E::InvalidCertificate(_) => "bad_certificate",
        E::NoCertificatesPresented => "no_client_certificate",
        // Our own checks (tls.rs): the SPIFFE ID and its trust domain.
        E::General(m) if m.contains("trust domain") => "foreign_trust_domain",
        E::General(_) => "bad_identity",
        _ => "tls",
    }
}

fn handshake_timed_out(timeout: std::time::Duration, what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} handshake not done within {timeout:?}"))
}

/// Serves the `CONNECT` streams of one connection whose TLS handshake proved
/// `peer`: the part of [`serve`] that reads what the peer sends (HTTP/2
/// frames, the request and its headers). Apart so it can be fuzzed from raw
/// bytes. The peer's HTTP/2 preface must arrive by `handshake_deadline`.
pub async fn serve_streams<H: TunnelHandler, IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    peer: Peer,
    peer_addr: SocketAddr,
    handler: Arc<H>,
    drain: impl Future<Output = ()>,
    handshake_deadline: tokio::time::Instant,
) -> io::Result<()> {
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .handshake(io);
    let mut connection = tokio::time::timeout_at(handshake_deadline, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "HTTP/2 preface not received in time"))?
        .map_err(other)?;
    let mut drain = std::pin::pin!(drain);
    let mut draining = false;
    let mut keepalive = std::pin::pin!(keepalive(connection.ping_pong()));
    loop {
        let stream = tokio::select! {
            stream = connection.accept() => stream,
            e = &mut keepalive => return Err(e),
            () = &mut drain, if !draining => {
                connection.graceful_shutdown();
                draining = true;
                continue;
            }
        };
        let Some(stream) = stream else { break };
        let (request, mut respond) = stream.map_err(other)?;
        let target = match (request.method(), request.uri().authority().map(|a| a.as_str().parse())) {
            (&Method::CONNECT, Some(Ok(target))) => target,
            _ => {
                let _ = respond.send_response(status(StatusCode::BAD_REQUEST), true);
                continue;
            }
        };
        let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
        let baggage = header("baggage").map(Baggage::parse);
        let service_host = header("forwarded").and_then(headers::forwarded_host);
        let connection_id = header(headers::CONNECTION_ID_HEADER).and_then(headers::connection_id);
        let request = TunnelRequest {
            peer: peer.clone(),
            peer_addr,
            target,
            baggage,
            service_host,
            connection_id,
            respond,
            body: request.into_body(),
        };
        let handler = handler.clone();
        tokio::spawn(async move { handler.handle(request).await });
    }
    Ok(())
}

/// The peer did not answer a PING in time.
#[derive(Debug, thiserror::Error)]
#[error("no answer to an HTTP/2 PING within {0:?}: the peer stopped reading")]
pub struct KeepaliveTimeout(std::time::Duration);

/// Pings the peer every `KEEPALIVE_INTERVAL`; resolves with the error that
/// ends the connection when an answer does not come in time. (The
/// connection must be polled meanwhile: its answers arrive through it.)
async fn keepalive(ping_pong: Option<h2::PingPong>) -> io::Error {
    let Some(mut ping_pong) = ping_pong else { return std::future::pending().await };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return other(e),
            Err(_) => return io::Error::new(io::ErrorKind::TimedOut, KeepaliveTimeout(KEEPALIVE_TIMEOUT)),
        }
    }
}

fn status(code: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = code;
    r
}

/// Copies both ways between `socket` and `tunnel` until both directions end.
/// Returns bytes (socket → tunnel, tunnel → socket).
pub async fn relay<S>(socket: S, tunnel: Tunnel) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + crate::relay::ReadReady + Unpin,
{
    let socket = crate::relay::Shared::new(socket);
    let Tunnel { mut send, mut recv } = tunnel;
    let up = async {
        let mut total = 0u64;
        // Read buffers sized by the stream (small while it waits), each
        // handed to h2 as it is: no copy.
        let mut sizer = crate::relay::ReadSizer::default();
        loop {
            // The buffer is taken once there is data: an idle tunnel holds none.
            let Some(chunk) = socket.read_chunk(&mut sizer).await? else {
                send.send_data(Bytes::new(), true).map_err(other)?;
                return Ok::<u64, io::Error>(total);
            };
            let n = chunk.len();
            let mut chunk = chunk.freeze();
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .ok_or_else(|| other("tunnel closed"))?
                    .map_err(other)?;
                send.send_data(chunk.split_to(granted.min(chunk.len())), false).map_err(other)?;
            }
            total += n as u64;
        }
    };
    let down = async {
        let mut total = 0u64;
        while let Some(data) = recv.data().await {
            let data = data.map_err(other)?;
            (&socket).write_all(&data).await?;
            let _ = recv.flow_control().release_capacity(data.len());
            total += data.len() as u64;
        }
        (&socket).shutdown().await?;
        Ok::<u64, io::Error>(total)
    };
    tokio::try_join!(up, down)
}

#[cfg(test)]
mod tests;
