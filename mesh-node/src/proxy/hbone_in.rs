//! 15008: tunnels from other node proxies. TLS with the pod's certificate
//! (the client must chain to the mesh root and be in its trust domain), then
//! each `CONNECT` is checked: the target must be this pod, and policy must
//! admit the peer. A refused tunnel gets 401 (policy) or 400 (wrong target),
//! so the client's proxy resets its client.
use std::{net::SocketAddr, sync::Arc};

use http::StatusCode;
use tokio::net::TcpStream;
use tracing::warn;

use super::{
    PodContext, ProxyContext,
    inbound::admit,
    telemetry::{ConnInfo, Counted, Direction, Flag, refused},
};
use crate::hbone::{self, TunnelHandler, TunnelRequest};

struct PodTunnels {
    listener: SocketAddr,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
}

pub async fn serve(
    tcp: TcpStream,
    listener: SocketAddr,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
) {
    let view = ctx.view();
    let Some(me) = pod.workload(&view).and_then(|w| ctx.identities.get(&w.identity)) else {
        warn!(pod = %pod.name, peer = %peer, "HBONE connection dropped: no certificate for this pod yet");
        return;
    };
    let handler = Arc::new(PodTunnels { listener, pod: pod.clone(), ctx: ctx.clone() });
    if let Err(e) = hbone::serve(tcp, me.server.clone(), handler).await {
        metrics::counter!("mesh_node_hbone_errors_total").increment(1);
        warn!(pod = %pod.name, peer = %peer, "HBONE connection refused or failed: {e}");
    }
}

impl TunnelHandler for PodTunnels {
    async fn handle(&self, request: TunnelRequest) {
        let (pod, ctx) = (&self.pod, &self.ctx);
        let mut info = ConnInfo::new(Direction::Inbound, &pod.name, self.listener, request.peer_addr);
        info.dst = Some(request.target);
        (info.route, info.security) = ("hbone", "mutual_tls");
        let target = SocketAddr::new(request.target.ip().to_canonical(), request.target.port());
        if !pod.addresses.contains(&target.ip()) {
            request.refuse(StatusCode::BAD_REQUEST);
            let e = format!("tunnel target {target} is not an address of pod {}", pod.name);
            return refused(&info, Flag::NoRoute, e);
        }
        let upstream = match admit(pod, ctx, &mut info, Some(&request.peer), target).await {
            Ok(up) => up,
            Err((flag, e)) => {
                let code =
                    if flag == Flag::Denied { StatusCode::UNAUTHORIZED } else { StatusCode::SERVICE_UNAVAILABLE };
                request.refuse(code);
                return refused(&info, flag, e);
            }
        };
        let tunnel = match request.accept() {
            Ok(t) => t,
            Err(e) => return refused(&info, Flag::UpstreamFailure, e.to_string()),
        };
        let tracked = ctx.connections.open(info.clone());
        let app = Counted::server(upstream, tracked.bytes.clone());
        let result =
            hbone::relay(app, tunnel).await.map(drop).map_err(|e| (Flag::UpstreamFailure, format!("relay: {e}")));
        tracked.finish(&info, result);
    }
}
