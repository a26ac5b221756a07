//! The node proxy's listeners inside one enrolled pod, and what they do with
//! each accepted connection:
//! - 15001 (outbound, loopback): the app's redirected connects. A mesh
//!   destination (a captured workload, or a service endpoint on one) goes
//!   over HBONE; anything else as plain TCP.
//! - 15008 (HBONE): tunnels from other proxies, authorized, then delivered
//!   to the app.
//! - 15006 (inbound plaintext): connections the kernel steered here from
//!   clients outside the mesh; PeerAuthentication STRICT refuses them.
//!
//! Decisions come from the [`view::MeshView`]; sockets are created in the
//! pod's namespace and marked so the redirect skips them.
mod hbone_in;
pub mod identities;
mod inbound;
mod outbound;
pub mod pool;
pub mod telemetry;
pub mod view;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::warn;

use self::{identities::Identities, pool::Pool, telemetry::Connections, view::MeshView};
use crate::{dataplane::OrigDstTable, netns::Netns};

/// What every connection handler needs, shared by all pods of the agent.
pub struct ProxyContext {
    /// Set on every socket the proxy opens, so the redirect skips it.
    pub mark: u32,
    pub orig_dst: Arc<OrigDstTable>,
    view: RwLock<Arc<MeshView>>,
    pub identities: Identities,
    pub pool: Pool,
    pub connections: Arc<Connections>,
}

impl ProxyContext {
    pub fn new(mark: u32, orig_dst: Arc<OrigDstTable>) -> ProxyContext {
        ProxyContext {
            mark,
            orig_dst,
            view: RwLock::default(),
            identities: Identities::default(),
            pool: Pool::default(),
            connections: Arc::default(),
        }
    }

    /// The configuration in force (a snapshot: later updates do not change it).
    pub fn view(&self) -> Arc<MeshView> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts a new configuration in force for new connections.
    pub fn set_view(&self, view: MeshView) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }

    /// Drops idle pooled connections, every few seconds, for the agent's life.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let ctx = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(ctx) = ctx.upgrade() {
                ctx.pool.reap();
                drop(ctx);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }
}

/// The pod a listener belongs to.
#[derive(Debug)]
pub struct PodContext {
    /// `namespace/name`.
    pub name: String,
    pub netns: Arc<Netns>,
    pub addresses: Vec<IpAddr>,
}

impl PodContext {
    /// The pod's workload in the controller's configuration (key `Pod/<ns>/<name>`).
    fn workload(&self, view: &MeshView) -> Option<Arc<view::WorkloadInfo>> {
        view.workload(&format!("Pod/{}", self.name)).cloned()
    }
}

/// Ports the proxy listens on inside each pod.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub outbound: u16,
    pub inbound: u16,
    pub hbone: u16,
}

#[derive(Clone, Copy, Debug)]
enum Listener {
    Outbound,
    Inbound,
    Hbone,
}

/// The sockets bound inside one pod, before they start accepting.
pub struct PodListeners {
    outbound: Vec<std::net::TcpListener>,
    inbound: std::net::TcpListener,
    hbone: std::net::TcpListener,
}

impl PodListeners {
    /// Binds the outbound listener on the pod's loopback (IPv4 and, where the
    /// pod has IPv6, IPv6), and the dual-stack inbound and HBONE listeners.
    pub fn bind(netns: &Netns, ports: Ports) -> Result<Self, crate::netns::NetnsError> {
        let mut outbound = vec![netns.listen(SocketAddr::from((Ipv4Addr::LOCALHOST, ports.outbound)))?];
        match netns.listen(SocketAddr::from((Ipv6Addr::LOCALHOST, ports.outbound))) {
            Ok(l) => outbound.push(l),
            Err(e) => {
                warn!(netns = %netns.path().display(), error = %e, "no IPv6 outbound listener (IPv6 off in the pod?)")
            }
        }
        let any = |port: u16| {
            netns
                .listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
                .or_else(|_| netns.listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))
        };
        Ok(Self { outbound, inbound: any(ports.inbound)?, hbone: any(ports.hbone)? })
    }

    /// The socket the kernel's inbound steering hands connections to.
    pub fn inbound(&self) -> &std::net::TcpListener {
        &self.inbound
    }

    /// Starts accepting. Aborting the returned tasks closes the listeners;
    /// connections already accepted run to their end.
    pub fn spawn(self, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) -> std::io::Result<Vec<JoinHandle<()>>> {
        let mut tasks = Vec::new();
        let listeners = self
            .outbound
            .into_iter()
            .map(|l| (l, Listener::Outbound))
            .chain([(self.inbound, Listener::Inbound), (self.hbone, Listener::Hbone)]);
        for (l, kind) in listeners {
            let l = TcpListener::from_std(l)?;
            tasks.push(tokio::spawn(accept_loop(l, pod.clone(), ctx.clone(), kind)));
        }
        Ok(tasks)
    }
}

/// Relay buffer per direction for plain TCP. tokio's default (8 KiB) held a
/// two-hop iperf3 stream to 0.24x of direct on the CI machine; 64 KiB gave
/// 0.47x. The price is 128 KiB per proxied connection: a buffer that grows
/// only for bulk streams (as ztunnel's does) is the follow-up.
const RELAY_BUFFER: usize = 64 * 1024;

/// Connects to `dst` from a marked socket in the pod's namespace.
async fn connect_from(pod: &PodContext, dst: SocketAddr, mark: u32) -> Result<tokio::net::TcpStream, String> {
    let socket = pod.netns.tcp_socket(dst, mark).await.map_err(|e| e.to_string())?;
    socket.connect(dst).await.map_err(|e| format!("connect {dst}: {e}"))
}

/// Relays plain TCP both ways until both sides close.
async fn relay_plain<A, B>(client: &mut A, upstream: &mut B) -> Result<(), String>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional_with_sizes(client, upstream, RELAY_BUFFER, RELAY_BUFFER)
        .await
        .map(drop)
        .map_err(|e| format!("relay: {e}"))
}

async fn accept_loop(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>, kind: Listener) {
    let Ok(bound) = listener.local_addr() else {
        return;
    };
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Small writes (TLS records, HTTP/2 frames, request/response
                // traffic) must not wait for the peer's delayed ACK.
                let _ = stream.set_nodelay(true);
                let (pod, ctx) = (pod.clone(), ctx.clone());
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                tokio::spawn(async move {
                    match kind {
                        Listener::Outbound => outbound::handle(stream, bound, peer, &pod, &ctx).await,
                        Listener::Inbound => inbound::handle(stream, bound, peer, &pod, &ctx).await,
                        Listener::Hbone => hbone_in::serve(stream, bound, peer, pod, ctx).await,
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(pod = %pod.name, listener = %bound, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
