//! Outbound: the app's connect was redirected to us. Recover where it was
//! going, ask the plan how to get there (a service VIP lists its endpoints),
//! and carry the connection: over HBONE to a mesh workload, as plain TCP
//! otherwise. A hop that fails in a way another could not (policy, a missing
//! certificate) ends it; an unreachable endpoint gives way to the next. A
//! mesh destination enrolled on this very node takes the same-node path
//! (`local.rs`) instead of HBONE.
use std::{io, net::SocketAddr, sync::Arc};

use mesh_proxy::{
    error::ProxyError,
    hbone::{self, Connect, PeerConnection, Tunnel, headers},
    plan::{self, Hop},
    pool::StreamSlot,
    telemetry::{ConnInfo, Counted, Direction, Tracked},
};
use tokio::net::TcpStream;

use super::{PodContext, ProxyContext, connect_from, local, relay_plain, reset};

pub async fn handle(client: TcpStream, listener: SocketAddr, peer: SocketAddr, pod: &PodContext, ctx: &ProxyContext) {
    // Deciding and opening run on the heap and are freed before the relay:
    // a task is as large as its largest future, kept for the connection's
    // life, and dialing (TLS, HTTP/2) and planning take kilobytes that an
    // idle connection need not hold.
    // The relay is made inside the statement and awaited after it: awaited
    // inside the match, the opened value would be kept beside it.
    let relaying = match Box::pin(open_upstream(client, listener, peer, pod, ctx)).await {
        Ok((client, upstream, conn)) => relay(client, upstream, conn, ctx),
        // Reset whatever the app has sent by then. Only refused connections
        // pay for it: relayed ones close as their peers do.
        Err(refused) => return reset(refused),
    };
    relaying.await
}

/// Opens the upstream the plan chooses, or refuses the connection and
/// hands the client back to be reset.
async fn open_upstream(
    client: TcpStream,
    listener: SocketAddr,
    peer: SocketAddr,
    pod: &PodContext,
    ctx: &ProxyContext,
) -> Result<(TcpStream, Opened, Tracked), TcpStream> {
    // The connection's one record, from here on every way out.
    let mut conn = ctx.proxy.connections.track(ConnInfo::new(Direction::Outbound, &pod.name, listener, peer));
    let Some(dst) = ctx.orig_dst.take(pod.netns.cookie(), peer) else {
        // Only a client that connected to the listener directly gets here.
        conn.refuse(ProxyError::NoOriginalDestination);
        return Err(client);
    };
    let view = ctx.proxy.state.view();
    let mut plan = plan::outbound(&view, pod.local(), dst, |id| ctx.proxy.identities.get(id).is_some());
    let mut failure = None;
    for hop in std::mem::take(&mut plan.hops) {
        let hop = match hop {
            Ok(hop) => hop,
            Err(e) => {
                plan.describe(conn.info_mut(), None);
                conn.refuse(e);
                return Err(client);
            }
        };
        plan.describe(conn.info_mut(), Some(&hop));
        // A mesh destination enrolled on this node: the same-node path.
        let local_dst = hop.mtls.as_ref().and_then(|_| ctx.local_pod(hop.dial.ip()));
        if local_dst.is_some() {
            conn.info_mut().route = local::ROUTE;
        }
        match open(&hop, local_dst, pod, ctx, conn.info()).await {
            Ok(upstream) => return Ok((client, upstream, conn)),
            Err(e) if e.retryable() => failure = Some(e),
            Err(e) => {
                conn.refuse(e);
                return Err(client);
            }
        }
    }
    // Every hop was tried and failed (the plan is never empty); the record
    // describes the last one.
    if let Some(e) = failure {
        conn.refuse(e);
    }
    Err(client)
}

enum Opened {
    Plain(TcpStream),
    Hbone(Tunnel, StreamSlot),
    /// To a pod on this node, without HBONE.
    Local(Box<local::Delivery>),
}

async fn open(
    hop: &Hop,
    local_dst: Option<Arc<PodContext>>,
    pod: &PodContext,
    ctx: &ProxyContext,
    info: &ConnInfo,
) -> Result<Opened, ProxyError> {
    let Some(mtls) = &hop.mtls else {
        return connect_from(&pod.netns, hop.dial, ctx.mark).await.map(Opened::Plain);
    };
    let me = ctx.proxy.identities.get(&mtls.source).ok_or_else(|| ProxyError::NoCertificate(mtls.source.clone()))?;
    if let Some(dst) = local_dst {
        // Boxed: only the same-node path needs room for its opening.
        let opening = Box::pin(local::open(pod, &mtls.source, &dst, hop.target, ctx));
        return opening.await.map(|d| Opened::Local(Box::new(d)));
    }
    // Owns what it needs: the pool may dial a spare connection in the background.
    // Boxed: of a burst of new tunnels, one per hundred dials and the rest
    // wait for it, and a waiting tunnel's future (each one's part of the
    // heap's high-water mark) need not have room for a TLS handshake.
    let dial = || {
        let (me, peer, netns, addr, mark) = (me.clone(), mtls.peer.clone(), pod.netns.clone(), hop.dial, ctx.mark);
        Box::pin(async move {
            let config = me.client_config(peer).map_err(io::Error::other)?;
            let tcp = connect_from(&netns, addr, mark).await.map_err(io::Error::other)?;
            PeerConnection::handshake(tcp, config).await
        })
    };
    // Istio's baggage and forwarded headers: a stock peer (ztunnel, Istio's
    // waypoints) attributes the connection to its source workload and service.
    let target = Connect {
        authority: hop.target,
        baggage: info.source_baggage().to_header(),
        forwarded: headers::forwarded(info.src.ip(), info.dst_service.as_deref()),
        connection_id: http::HeaderValue::from_str(&info.connection_id).ok(),
    };
    match ctx.proxy.pool.tunnel(&mtls.pool, me.cert.not_after_unix, target, dial).await {
        Ok((tunnel, slot)) => Ok(Opened::Hbone(tunnel, slot)),
        Err(e) => {
            Err(ProxyError::Tunnel { peer: hop.dial, identity: Box::new(mtls.peer.clone()), source: Box::new(e) })
        }
    }
}

async fn relay(client: TcpStream, upstream: Opened, mut tracked: Tracked, ctx: &ProxyContext) {
    let mut client = Counted::client(client, tracked.relaying());
    let result = match upstream {
        // Each way boxed: the task is as large as its largest future.
        Opened::Plain(mut up) => Box::pin(relay_plain(&mut client, &mut up)).await,
        Opened::Hbone(tunnel, slot) => {
            let r = hbone::relay(client, tunnel).await.map(drop).map_err(ProxyError::Relay);
            drop(slot);
            r
        }
        Opened::Local(delivery) => Box::pin(local::relay(client, *delivery, ctx)).await,
    };
    tracked.finish(result);
}
