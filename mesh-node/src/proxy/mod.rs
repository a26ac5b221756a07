//! The node proxy's listeners inside one enrolled pod, and what they do with
//! each accepted connection. For now both directions forward plain TCP: the
//! outbound side to the original destination, the inbound side to the app.
mod access;
mod inbound;
mod outbound;

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::warn;

use crate::{dataplane::OrigDstTable, netns::Netns};

pub use access::Direction;

/// What every connection handler needs, shared by all pods of the agent.
pub struct ProxyContext {
    /// Set on every socket the proxy opens, so the redirect skips it.
    pub mark: u32,
    pub orig_dst: Arc<OrigDstTable>,
}

/// The pod a listener belongs to.
#[derive(Debug)]
pub struct PodContext {
    /// `namespace/name`.
    pub name: String,
    pub netns: Arc<Netns>,
}

/// Ports the proxy listens on inside each pod.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub outbound: u16,
    pub inbound: u16,
}

/// The sockets bound inside one pod, before they start accepting.
pub struct PodListeners {
    outbound: Vec<std::net::TcpListener>,
    inbound: std::net::TcpListener,
}

impl PodListeners {
    /// Binds the outbound listener on the pod's loopback (IPv4 and, where the
    /// pod has IPv6, IPv6) and the dual-stack inbound listener.
    pub fn bind(netns: &Netns, ports: Ports) -> Result<Self, crate::netns::NetnsError> {
        let mut outbound = vec![netns.listen(SocketAddr::from((Ipv4Addr::LOCALHOST, ports.outbound)))?];
        match netns.listen(SocketAddr::from((Ipv6Addr::LOCALHOST, ports.outbound))) {
            Ok(l) => outbound.push(l),
            Err(e) => {
                warn!(netns = %netns.path().display(), error = %e, "no IPv6 outbound listener (IPv6 off in the pod?)")
            }
        }
        let inbound = netns
            .listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, ports.inbound)))
            .or_else(|_| netns.listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports.inbound))))?;
        Ok(Self { outbound, inbound })
    }

    /// The socket the kernel's inbound steering hands connections to.
    pub fn inbound(&self) -> &std::net::TcpListener {
        &self.inbound
    }

    /// Starts accepting. Aborting the returned tasks closes the listeners;
    /// connections already accepted run to their end.
    pub fn spawn(self, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) -> std::io::Result<Vec<JoinHandle<()>>> {
        let mut tasks = Vec::new();
        for l in self.outbound {
            let l = TcpListener::from_std(l)?;
            tasks.push(tokio::spawn(accept_loop(l, pod.clone(), ctx.clone(), Direction::Outbound)));
        }
        let l = TcpListener::from_std(self.inbound)?;
        tasks.push(tokio::spawn(accept_loop(l, pod, ctx, Direction::Inbound)));
        Ok(tasks)
    }
}

/// Relay buffer per direction. tokio's default (8 KiB) held a two-hop iperf3
/// stream to 0.24x of direct on the CI machine; 64 KiB gave 0.47x. The price
/// is 128 KiB per proxied connection: a buffer that grows only for bulk
/// streams (as ztunnel's does) is the follow-up.
const RELAY_BUFFER: usize = 64 * 1024;

/// Connects to `dst` from a marked socket in the pod's namespace and relays
/// bytes both ways until both sides close. Returns (client->dst, dst->client).
async fn connect_and_relay(
    client: &mut tokio::net::TcpStream,
    dst: SocketAddr,
    pod: &PodContext,
    ctx: &ProxyContext,
) -> Result<(u64, u64), String> {
    let socket = pod.netns.tcp_socket(dst, ctx.mark).await.map_err(|e| e.to_string())?;
    let mut upstream = socket.connect(dst).await.map_err(|e| format!("connect {dst}: {e}"))?;
    tokio::io::copy_bidirectional_with_sizes(client, &mut upstream, RELAY_BUFFER, RELAY_BUFFER)
        .await
        .map_err(|e| format!("relay: {e}"))
}

async fn accept_loop(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>, direction: Direction) {
    let Ok(bound) = listener.local_addr() else {
        return;
    };
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let (pod, ctx) = (pod.clone(), ctx.clone());
                tokio::spawn(async move {
                    match direction {
                        Direction::Outbound => outbound::handle(stream, peer, bound, &pod, &ctx).await,
                        Direction::Inbound => inbound::handle(stream, peer, bound, &pod, &ctx).await,
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(pod = %pod.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
