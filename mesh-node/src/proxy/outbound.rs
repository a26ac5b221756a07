//! Outbound: the app's connect was redirected to us. Recover where it was
//! going, choose the upstream (a service VIP picks an endpoint), and carry
//! the connection: over HBONE to a mesh workload, as plain TCP otherwise.
//! A candidate that cannot be reached gives way to the next endpoint.
use std::net::SocketAddr;

use mesh_common::PeerKey;
use tokio::net::TcpStream;

use super::{
    PodContext, ProxyContext, connect_from,
    pool::{PoolKey, StreamSlot},
    relay_plain,
    telemetry::{ConnInfo, Counted, Direction, Flag, refused},
    view::{Upstream, WorkloadInfo},
};
use crate::{
    dataplane::{ip_from_key, ip_key},
    hbone::{self, PeerConnection, Tunnel},
};

pub async fn handle(client: TcpStream, listener: SocketAddr, peer: SocketAddr, pod: &PodContext, ctx: &ProxyContext) {
    let mut info = ConnInfo::new(Direction::Outbound, &pod.name, listener, peer);
    let key = PeerKey { netns_cookie: pod.netns.cookie(), ip: ip_key(peer.ip()), port: u32::from(peer.port()) };
    let Some(orig) = ctx.orig_dst.take(&key) else {
        // Only a client that connected to the listener directly gets here.
        let error = "no original destination recorded for this client".to_string();
        return refused(&info, Flag::NoRoute, error);
    };
    let dst = SocketAddr::new(ip_from_key(&orig.ip), orig.port as u16);
    info.dst = Some(dst);
    let view = ctx.view();
    let source = pod.workload(&view);
    if let Some(w) = &source {
        info.set_source(w);
    }
    let destination = match view.destination(dst) {
        Ok(d) => d,
        Err(e) => return refused(&info, Flag::NoHealthyUpstream, e),
    };
    if let Some(s) = &destination.service {
        info.set_service(s);
    }
    let mut failure = (Flag::NoHealthyUpstream, String::from("no candidate"));
    for candidate in &destination.candidates {
        describe(&mut info, candidate, destination.service.is_some());
        match open(candidate, source.as_deref(), pod, ctx).await {
            Ok(upstream) => return relay(client, upstream, info, ctx).await,
            // A refusal by the peer or a missing certificate is final; an
            // unreachable endpoint gives way to the next one.
            Err((flag @ (Flag::Denied | Flag::NoRoute), e)) => return refused(&info, flag, e),
            Err(e) => failure = e,
        }
    }
    refused(&info, failure.0, failure.1);
}

fn describe(info: &mut ConnInfo, candidate: &Upstream, via_service: bool) {
    info.upstream = Some(candidate.addr());
    if let Some(w) = candidate.workload() {
        info.set_destination(w);
    }
    (info.route, info.security) = match candidate {
        Upstream::Hbone { .. } => ("hbone", "mutual_tls"),
        Upstream::Plain { workload: None, .. } if !via_service => ("passthrough", "none"),
        Upstream::Plain { .. } => ("tcp", "none"),
    };
}

enum Opened {
    Plain(TcpStream),
    Hbone(Tunnel, StreamSlot),
}

async fn open(
    candidate: &Upstream,
    source: Option<&WorkloadInfo>,
    pod: &PodContext,
    ctx: &ProxyContext,
) -> Result<Opened, (Flag, String)> {
    match candidate {
        Upstream::Plain { addr, .. } => {
            connect_from(pod, *addr, ctx.mark).await.map(Opened::Plain).map_err(|e| (Flag::UpstreamFailure, e))
        }
        Upstream::Hbone { workload, addr } => {
            let source = source.ok_or_else(|| {
                (Flag::NoRoute, format!("pod {} has no workload in the mesh configuration", pod.name))
            })?;
            let me = ctx.identities.get(&source.identity).ok_or_else(|| {
                (Flag::NoRoute, format!("no certificate for {} yet: not sending in plaintext", source.identity))
            })?;
            let src_ip = pod.addresses.iter().copied().find(|ip| ip.is_ipv4() == addr.is_ipv4());
            let key = PoolKey {
                src: source.identity.clone(),
                src_ip: src_ip.unwrap_or(addr.ip()),
                dst: workload.identity.clone(),
                dst_ip: addr.ip(),
            };
            let peer = SocketAddr::new(addr.ip(), mesh_common::HBONE_PORT);
            let dial = || async {
                let config = me.client_config(workload.identity.clone()).map_err(std::io::Error::other)?;
                let tcp = connect_from(pod, peer, ctx.mark).await.map_err(std::io::Error::other)?;
                PeerConnection::handshake(tcp, config).await
            };
            match ctx.pool.tunnel(&key, *addr, dial).await {
                Ok((tunnel, slot)) => Ok(Opened::Hbone(tunnel, slot)),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err((Flag::Denied, e.to_string())),
                Err(e) => Err((Flag::UpstreamFailure, format!("HBONE to {peer} ({}): {e}", workload.identity))),
            }
        }
    }
}

async fn relay(client: TcpStream, upstream: Opened, info: ConnInfo, ctx: &ProxyContext) {
    let tracked = ctx.connections.open(info.clone());
    let mut client = Counted::client(client, tracked.bytes.clone());
    let result = match upstream {
        Opened::Plain(mut up) => relay_plain(&mut client, &mut up).await,
        Opened::Hbone(tunnel, slot) => {
            let r = hbone::relay(client, tunnel).await.map(drop).map_err(|e| format!("relay: {e}"));
            drop(slot);
            r
        }
    };
    tracked.finish(&info, result.map_err(|e| (Flag::UpstreamFailure, e)));
}
