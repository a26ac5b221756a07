//! HTTP connections from the waypoint to endpoints: over HBONE (a tunnel
//! on the shared pool, to the endpoint's 15008, accepting only the
//! endpoint's identity) for workloads in the mesh, plain TCP otherwise; then
//! HTTP/1.1 or HTTP/2 over it with hyper. HTTP/2 connections are shared by
//! every request to an endpoint; idle HTTP/1.1 connections are kept for reuse.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_common::{HBONE_PORT, api, identity::SpiffeId};
use mesh_proxy::{
    Proxy,
    hbone::{self, TunnelIo},
    pool::PoolKey,
    state::view::{MeshView, Upstream},
};
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tracing::debug;

use crate::{
    body::HttpBody,
    breaker::{Cluster, Permit},
    lock,
};

/// Idle HTTP/1.1 connections kept per endpoint.
const IDLE_PER_ENDPOINT: usize = 64;
/// Istio's `connectTimeout` where a DestinationRule sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection an attempt can send its request on.
pub enum Sender {
    /// With the requests it has carried (`maxRequestsPerConnection`) and its
    /// place among the cluster's connections (given back when it is dropped).
    H1(http1::SendRequest<HttpBody>, u32, Permit),
    H2(http2::SendRequest<HttpBody>),
}

/// An idle HTTP/1.1 connection: its sender, requests carried, its place
/// among the cluster's connections, idle since.
type Idle = (http1::SendRequest<HttpBody>, u32, Permit, Instant);

#[derive(Default)]
pub struct Upstreams {
    /// By cluster (its connections are counted against its limits) and endpoint.
    idle: Mutex<HashMap<(u64, SocketAddr), Vec<Idle>>>,
    /// With the requests each has carried.
    shared: Mutex<HashMap<SocketAddr, (http2::SendRequest<HttpBody>, u32)>>,
}

/// Why no connection could be had: Envoy's `connect-failure`, or the
/// cluster's circuit breaker (`overflow`).
#[derive(Debug, thiserror::Error)]
#[error("connect to {addr}: {reason}")]
pub struct ConnectError {
    pub addr: SocketAddr,
    pub reason: String,
    pub overflow: bool,
}

impl Upstreams {
    /// A connection to `up` speaking HTTP/2 (`h2`) or HTTP/1.1, from the
    /// waypoint's identity `me`, within `cluster`'s limits (`pool`).
    pub async fn connect(
        &self,
        proxy: &Proxy,
        me: &SpiffeId,
        up: &Upstream,
        h2: bool,
        cluster: &Arc<Cluster>,
        pool: Option<&api::ConnectionPool>,
    ) -> Result<Sender, ConnectError> {
        let addr = up.addr();
        let fail = |reason: String| ConnectError { addr, reason, overflow: false };
        let timeout =
            pool.map(|p| p.connect_timeout_ms).filter(|t| *t > 0).map_or(CONNECT_TIMEOUT, Duration::from_millis);
        if h2 {
            let max = pool.map_or(0, |p| p.max_requests_per_connection);
            if let Some(s) = self.shared_h2(addr, max) {
                return Ok(Sender::H2(s));
            }
            let io = tokio::time::timeout(timeout, open(proxy, me, up))
                .await
                .map_err(|_| fail("connect timeout".into()))?
                .map_err(|e| fail(e.to_string()))?;
            let (sender, conn) =
                http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.map_err(|e| fail(e.to_string()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(upstream = %addr, "HTTP/2 upstream connection ended: {e}");
                }
            });
            cluster.connection_opened();
            lock(&self.shared).insert(addr, (sender.clone(), 1));
            return Ok(Sender::H2(sender));
        }
        let idle_timeout = pool.map(|p| p.idle_timeout_ms).filter(|t| *t > 0).map(Duration::from_millis);
        // Fewer connections allowed than are open (the limit was lowered): idle ones go.
        while cluster.connections_over(pool) && self.evict_idle(cluster.id) {}
        loop {
            if let Some(s) = self.take_idle((cluster.id, addr), idle_timeout) {
                return Ok(s);
            }
            if let Some(permit) = cluster.connection(pool) {
                let io = tokio::time::timeout(timeout, open(proxy, me, up))
                    .await
                    .map_err(|_| fail("connect timeout".into()))?
                    .map_err(|e| fail(e.to_string()))?;
                let (sender, conn) = http1::handshake(TokioIo::new(io)).await.map_err(|e| fail(e.to_string()))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(upstream = %addr, "HTTP/1.1 upstream connection ended: {e}");
                    }
                });
                cluster.connection_opened();
                // The permit goes with the sender: when the last is dropped the connection closes.
                return Ok(Sender::H1(sender, 0, permit));
            }
            // At maxConnections: an idle connection of this cluster to another
            // endpoint makes way; else wait (within http1MaxPendingRequests).
            if self.evict_idle(cluster.id) {
                continue;
            }
            if !cluster.wait_for_connection(pool).await {
                return Err(ConnectError {
                    addr,
                    reason: "circuit breaker: too many pending requests".into(),
                    overflow: true,
                });
            }
        }
    }

    /// The shared HTTP/2 connection to `addr`, counting one more request on
    /// it, unless it is closed or has carried `max` (`maxRequestsPerConnection`;
    /// 0: no limit): then it is let go (its requests in flight finish on it,
    /// and it closes once they have) and the caller makes a new one.
    fn shared_h2(&self, addr: SocketAddr, max: u32) -> Option<http2::SendRequest<HttpBody>> {
        let mut shared = lock(&self.shared);
        match shared.get_mut(&addr) {
            Some((s, uses)) if !s.is_closed() && (max == 0 || *uses < max) => {
                *uses += 1;
                Some(s.clone())
            }
            Some(_) => {
                shared.remove(&addr);
                None
            }
            None => None,
        }
    }

    fn take_idle(&self, key: (u64, SocketAddr), idle_timeout: Option<Duration>) -> Option<Sender> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(&key)?;
        list.retain(|(s, _, _, since)| !s.is_closed() && idle_timeout.is_none_or(|t| since.elapsed() < t));
        let i = list.iter().position(|(s, ..)| s.is_ready())?;
        let (s, uses, permit, _) = list.swap_remove(i);
        Some(Sender::H1(s, uses, permit))
    }

    /// Closes one idle connection of cluster `id`, releasing its place;
    /// `false` when it has none.
    fn evict_idle(&self, id: u64) -> bool {
        let mut idle = lock(&self.idle);
        let Some(list) = idle.iter_mut().find(|((c, _), l)| *c == id && !l.is_empty()).map(|(_, l)| l) else {
            return false;
        };
        drop(list.pop());
        true
    }

    /// Keeps an HTTP/1.1 connection for the next request to `addr` in
    /// `cluster`, unless it has carried `maxRequestsPerConnection`.
    pub fn release(&self, addr: SocketAddr, sender: Sender, cluster: &Cluster, pool: Option<&api::ConnectionPool>) {
        let Sender::H1(s, uses, permit) = sender else { return };
        let max = pool.map_or(0, |p| p.max_requests_per_connection);
        if s.is_closed() || (max > 0 && uses >= max) || cluster.connections_over(pool) {
            cluster.idle_released(); // dropped: the connection closes and its place is free
            return;
        }
        let mut idle = lock(&self.idle);
        let list = idle.entry((cluster.id, addr)).or_default();
        if list.len() < IDLE_PER_ENDPOINT {
            list.push((s, uses, permit, Instant::now()));
        }
        drop(idle);
        cluster.idle_released();
    }
}

/// The endpoints `host:port` is reached through in the mesh: a service's
/// (by host name), or what is at an address (a workload, a service's VIP);
/// empty when it is outside the mesh. For occasional callers (JWKS
/// fetches, external authorizers); requests go by the tunnel's VIP.
pub fn in_mesh(view: &MeshView, host: &str, port: u16) -> Result<Vec<Upstream>, String> {
    let candidates = if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        view.destination(SocketAddr::new(ip, port)).map_err(|e| e.to_string())?.candidates
    } else if let Some(svc) = view.service_by_host(host) {
        view.endpoints(svc, port, |_| true).map_err(|e| e.to_string())?
    } else {
        return Ok(Vec::new());
    };
    Ok(candidates.into_iter().filter(|c| !matches!(c, Upstream::Plain { workload: None, .. })).collect())
}

/// A connection to a service the waypoint itself calls (an external
/// authorizer, a trace collector): one of its endpoints in the mesh (over
/// HBONE), else the host itself (an address, or a name DNS resolves),
/// pooled in `cluster`.
pub async fn connect_host(
    wp: &crate::Waypoint,
    cluster: &str,
    host: &str,
    port: u32,
    h2: bool,
) -> Result<(Upstream, Sender, Arc<Cluster>), String> {
    let up = resolve_host(wp, host, port).await?;
    let me = wp.identity().ok_or("this waypoint has no identity yet")?;
    let cluster = wp.clusters.get(cluster, "", u16::try_from(port).unwrap_or_default());
    let sender = wp.upstreams.connect(&wp.proxy, &me, &up, h2, &cluster, None).await.map_err(|e| e.to_string())?;
    Ok((up, sender, cluster))
}

/// Where a service the waypoint itself calls is: one of its endpoints in
/// the mesh, else the host itself (an address, or a name DNS resolves).
pub async fn resolve_host(wp: &crate::Waypoint, host: &str, port: u32) -> Result<Upstream, String> {
    let port = u16::try_from(port).map_err(|_| "bad port")?;
    let candidates = in_mesh(&wp.proxy.state.view(), host, port)?;
    Ok(match candidates.len() {
        0 => {
            let addr = tokio::net::lookup_host(format!("{host}:{port}"))
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?
                .next()
                .ok_or_else(|| format!("{host} has no address"))?;
            Upstream::Plain { workload: None, addr }
        }
        n => candidates[fastrand::usize(..n)].clone(),
    })
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
    let (tunnel, slot) =
        proxy.pool.tunnel(&key, local.cert.not_after_unix, target, dial).await.map_err(io::Error::other)?;
    Ok(Either::Right(TunnelIo::pooled(tunnel, slot)))
}
