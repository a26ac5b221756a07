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
//! Each handler asks `mesh_proxy::plan` what to do (from state alone), does
//! the I/O, and records the outcome once through a `Tracked` guard. Sockets
//! are created in the pod's namespace and marked so the redirect skips them.
mod hbone_in;
mod inbound;
pub mod limits;
pub mod live;
mod local;
mod outbound;
mod splice;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use mesh_proxy::{Proxy, error::ProxyError, plan::LocalPod};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::warn;

use crate::{ebpf::OrigDstTable, netns::Netns};

/// What every connection handler needs, shared by all pods of the agent: the
/// proxy library's state, plus what only a node has (the kernel's record of
/// original destinations, the socket mark).
pub struct ProxyContext {
    pub proxy: Arc<Proxy>,
    /// Set on every socket the proxy opens, so the redirect skips it.
    pub mark: u32,
    pub orig_dst: Arc<OrigDstTable>,
    /// Connections relaying to pods, re-decided on every configuration.
    pub live: Arc<live::LiveInbound>,
    /// How many connections the node and each pod may hold.
    pub limits: limits::Limits,
    /// For TLS and the HTTP/2 preface on 15008.
    pub hbone_handshake_timeout: std::time::Duration,
    hbone_errors: Family<ReasonLabel, Counter>,
    closed_by_policy: Counter,
    /// The pods accepting here now, by address: a connection between two of
    /// them takes the same-node path.
    local_pods: RwLock<HashMap<IpAddr, Arc<PodContext>>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The node's choices for its proxy.
pub struct ProxySettings {
    pub mark: u32,
    pub max_connections: usize,
    pub max_connections_per_pod: usize,
    pub hbone_handshake_timeout: std::time::Duration,
}

impl ProxyContext {
    pub fn new(
        proxy: Arc<Proxy>,
        settings: &ProxySettings,
        orig_dst: Arc<OrigDstTable>,
        registry: &mut Registry,
    ) -> ProxyContext {
        let hbone_errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "mesh_node_hbone_errors",
            "HBONE connections on 15008 refused at the handshake (expired, not_yet_valid, unknown_issuer, \
             bad_signature, revoked, bad_certificate, no_client_certificate, foreign_trust_domain, bad_identity, \
             handshake_timeout, tls), cut off when a PING went unanswered (keepalive_timeout), or failed after \
             the handshake (other)",
            hbone_errors.clone(),
        );
        let closed_by_policy = Counter::default();
        registry.register(
            "mesh_node_connections_closed_by_policy",
            "Open connections closed because a new configuration denies them",
            closed_by_policy.clone(),
        );
        let live = Arc::new(live::LiveInbound::default());
        tokio::spawn(live::enforce(proxy.clone(), live.clone()));
        let limits = limits::Limits::new(settings.max_connections, settings.max_connections_per_pod, registry);
        ProxyContext {
            proxy,
            mark: settings.mark,
            orig_dst,
            live,
            limits,
            hbone_handshake_timeout: settings.hbone_handshake_timeout,
            hbone_errors,
            closed_by_policy,
            local_pods: RwLock::default(),
        }
    }

    /// The pod enrolled on this node (and accepting) at `ip`.
    fn local_pod(&self, ip: IpAddr) -> Option<Arc<PodContext>> {
        self.local_pods.read().unwrap_or_else(|e| e.into_inner()).get(&ip.to_canonical()).cloned()
    }

    fn serve_locally(&self, pod: &Arc<PodContext>) {
        let mut pods = self.local_pods.write().unwrap_or_else(|e| e.into_inner());
        for ip in &pod.addresses {
            pods.insert(ip.to_canonical(), pod.clone());
        }
    }

    /// A pod stops accepting (unenrolled, or the agent drains): connections
    /// to it no longer take the same-node path.
    pub fn forget_pod(&self, addresses: &[IpAddr]) {
        let mut pods = self.local_pods.write().unwrap_or_else(|e| e.into_inner());
        for ip in addresses {
            pods.remove(&ip.to_canonical());
        }
    }

    fn count_hbone_error(&self, reason: &'static str) {
        self.hbone_errors.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Relays `relay` until it ends, or until a configuration put in force
    /// denies the connection: then it is cut, logged with the policy, counted.
    async fn relay_while_admitted(
        &self,
        conn: &mut mesh_proxy::telemetry::Tracked,
        mut admitted: live::Registration,
        relay: impl std::future::Future<Output = Result<(), ProxyError>>,
    ) -> Result<(), ProxyError> {
        tokio::select! {
            result = relay => result,
            why = admitted.closed() => {
                if let ProxyError::Denied { policy, reason } = &why {
                    let info = conn.info_mut();
                    info.policy = policy.clone();
                    info.decision = Some("deny");
                    inbound::log_denial(info, reason, "open connection closed: the configuration now denies it");
                }
                self.closed_by_policy.inc();
                Err(why)
            }
        }
    }
}

/// The pod a listener belongs to.
#[derive(Debug)]
pub struct PodContext {
    /// `namespace/name`.
    pub name: String,
    pub netns: Arc<Netns>,
    pub addresses: Vec<IpAddr>,
    /// The connections it holds, under the per-pod limit.
    pub open: Arc<limits::Slots>,
}

impl PodContext {
    /// The pod as the plans know it.
    fn local(&self) -> LocalPod<'_> {
        LocalPod { name: &self.name, addresses: &self.addresses }
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

    /// Other handles to the same sockets (kept for a handoff).
    pub fn try_clone(&self) -> std::io::Result<PodListeners> {
        Ok(Self {
            outbound: self.outbound.iter().map(std::net::TcpListener::try_clone).collect::<Result<_, _>>()?,
            inbound: self.inbound.try_clone()?,
            hbone: self.hbone.try_clone()?,
        })
    }

    /// The descriptors, outbound first (how many: the first value), then
    /// inbound and HBONE: what a handoff sends.
    pub fn into_fds(self) -> (usize, Vec<std::os::fd::OwnedFd>) {
        let outbound = self.outbound.len();
        let fds = self.outbound.into_iter().chain([self.inbound, self.hbone]).map(Into::into).collect();
        (outbound, fds)
    }

    /// The listeners a handoff received, in [`Self::into_fds`]'s order.
    pub fn from_fds(outbound: usize, fds: Vec<std::os::fd::OwnedFd>) -> Option<PodListeners> {
        if fds.len() != outbound + 2 || outbound == 0 {
            return None;
        }
        let mut listeners: Vec<std::net::TcpListener> = fds.into_iter().map(Into::into).collect();
        let hbone = listeners.pop()?;
        let inbound = listeners.pop()?;
        for l in listeners.iter().chain([&inbound, &hbone]) {
            l.set_nonblocking(true).ok()?;
        }
        Some(Self { outbound: listeners, inbound, hbone })
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
        ctx.serve_locally(&pod);
        Ok(tasks)
    }
}

/// Connects to `dst` from a marked socket in `netns` (a pod's).
async fn connect_from(netns: &Netns, dst: SocketAddr, mark: u32) -> Result<tokio::net::TcpStream, ProxyError> {
    let connect = async {
        let socket = netns.tcp_socket(dst, mark).map_err(std::io::Error::other)?;
        socket.connect(dst).await
    };
    connect.await.map_err(|source| ProxyError::Connect { addr: dst, source })
}

/// Closes a connection the proxy refuses with a reset (SO_LINGER 0), so the
/// client reads "connection reset", never an orderly end it could take for
/// the server's answer (as ztunnel does).
pub(crate) fn reset(stream: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
}

/// Relays plain TCP both ways until both sides close (holding no read
/// buffer while the connection idles).
async fn relay_plain<A, B>(client: &mut A, upstream: &mut B) -> Result<(), ProxyError>
where
    A: mesh_proxy::relay::ReadReady + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: mesh_proxy::relay::ReadReady + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    mesh_proxy::relay::both_ways_when_ready(client, upstream).await.map(drop).map_err(ProxyError::Relay)
}

async fn accept_loop(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>, kind: Listener) {
    let Ok(bound) = listener.local_addr() else {
        return;
    };
    loop {
        let (stream, peer) = mesh_proxy::accept(&listener).await;
        let Some(permit) = ctx.limits.admit(&pod.name, &pod.open) else {
            reset(stream);
            continue;
        };
        let (pod, ctx) = (pod.clone(), ctx.clone());
        // One task per kind, not one task matching on the kind: a task is as
        // large as its largest future, and it lives as long as the connection.
        match kind {
            Listener::Outbound => tokio::spawn(async move {
                let _permit = permit;
                outbound::handle(stream, bound, peer, &pod, &ctx).await
            }),
            Listener::Inbound => tokio::spawn(async move {
                let _permit = permit;
                inbound::handle(stream, bound, peer, &pod, &ctx).await
            }),
            Listener::Hbone => tokio::spawn(async move {
                let _permit = permit;
                hbone_in::serve(stream, bound, peer, pod, ctx).await
            }),
        };
    }
}
