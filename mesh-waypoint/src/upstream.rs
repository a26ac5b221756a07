//! HTTP connections from the waypoint to endpoints: over HBONE (a tunnel
//! on the shared pool, to the endpoint's 15008, accepting only the
//! endpoint's identity) for workloads in the mesh, plain TCP otherwise; then
//! HTTP/1.1 or HTTP/2 over it with hyper. HTTP/2 connections are shared by
//! every request to an endpoint; idle HTTP/1.1 connections are kept for reuse.
use std::{collections::HashMap, io, net::SocketAddr, sync::Mutex};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_common::{HBONE_PORT, identity::SpiffeId};
use mesh_proxy::{
    Proxy,
    hbone::{self, TunnelIo},
    pool::PoolKey,
    state::view::Upstream,
};
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tracing::debug;

use crate::body::HttpBody;

/// Idle HTTP/1.1 connections kept per endpoint.
const IDLE_PER_ENDPOINT: usize = 64;

/// A connection an attempt can send its request on.
pub enum Sender {
    H1(http1::SendRequest<HttpBody>),
    H2(http2::SendRequest<HttpBody>),
}

#[derive(Default)]
pub struct Upstreams {
    idle: Mutex<HashMap<SocketAddr, Vec<http1::SendRequest<HttpBody>>>>,
    shared: Mutex<HashMap<SocketAddr, http2::SendRequest<HttpBody>>>,
}

/// Why no connection could be had (Envoy's `connect-failure`).
#[derive(Debug, thiserror::Error)]
#[error("connect to {addr}: {reason}")]
pub struct ConnectError {
    pub addr: SocketAddr,
    pub reason: String,
}

impl Upstreams {
    /// A connection to `up` speaking HTTP/2 (`h2`) or HTTP/1.1, from the
    /// waypoint's identity `me`.
    pub async fn connect(&self, proxy: &Proxy, me: &SpiffeId, up: &Upstream, h2: bool) -> Result<Sender, ConnectError> {
        let addr = up.addr();
        if h2 {
            if let Some(s) = lock(&self.shared).get(&addr).filter(|s| !s.is_closed()).cloned() {
                return Ok(Sender::H2(s));
            }
        } else {
            let mut idle = lock(&self.idle);
            if let Some(list) = idle.get_mut(&addr) {
                list.retain(|s| !s.is_closed());
                if let Some(i) = list.iter().position(|s| s.is_ready()) {
                    return Ok(Sender::H1(list.swap_remove(i)));
                }
            }
        }
        let fail = |reason: String| ConnectError { addr, reason };
        let io = TokioIo::new(open(proxy, me, up).await.map_err(|e| fail(e.to_string()))?);
        if h2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await.map_err(|e| fail(e.to_string()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(upstream = %addr, "HTTP/2 upstream connection ended: {e}");
                }
            });
            lock(&self.shared).insert(addr, sender.clone());
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = http1::handshake(io).await.map_err(|e| fail(e.to_string()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(upstream = %addr, "HTTP/1.1 upstream connection ended: {e}");
                }
            });
            Ok(Sender::H1(sender))
        }
    }

    /// Keeps an HTTP/1.1 connection for the next request to `addr`.
    pub fn release(&self, addr: SocketAddr, sender: Sender) {
        if let Sender::H1(s) = sender
            && !s.is_closed()
        {
            let mut idle = lock(&self.idle);
            let list = idle.entry(addr).or_default();
            if list.len() < IDLE_PER_ENDPOINT {
                list.push(s);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A byte stream to `up`: an HBONE tunnel (CONNECT the endpoint's address
/// to its 15008), or plain TCP.
pub async fn open(proxy: &Proxy, me: &SpiffeId, up: &Upstream) -> io::Result<Either<TcpStream, TunnelIo>> {
    let (workload, target) = match up {
        Upstream::Plain { addr, .. } => {
            let tcp = TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            return Ok(Either::Left(tcp));
        }
        Upstream::Hbone { workload, addr } => (workload, *addr),
        Upstream::Waypoint { workload, authority, .. } => (workload, *authority),
    };
    let local = proxy.identities.get(me).ok_or_else(|| io::Error::other(format!("no certificate for {me} yet")))?;
    let dial_addr = SocketAddr::new(up.addr().ip(), HBONE_PORT);
    let key = PoolKey {
        src: me.clone(),
        src_ip: std::net::IpAddr::from([0, 0, 0, 0]),
        dst: workload.identity.clone(),
        dst_ip: dial_addr.ip(),
    };
    let peer = workload.identity.clone();
    let dial = || {
        let config = local.client_config(peer.clone());
        async move {
            let config = config.map_err(io::Error::other)?;
            let tcp = TcpStream::connect(dial_addr).await?;
            let _ = tcp.set_nodelay(true);
            hbone::PeerConnection::handshake(tcp, config).await
        }
    };
    let (tunnel, slot) = proxy.pool.tunnel(&key, target, dial).await.map_err(io::Error::other)?;
    Ok(Either::Right(TunnelIo::pooled(tunnel, slot)))
}
