//! 15008: tunnels from other node proxies. TLS with the pod's certificate
//! (the client must chain to the mesh root and be in its trust domain), then
//! each `CONNECT` follows the inbound plan: the target must be this pod, and
//! policy must admit the peer, whose certificate must not be revoked (a
//! connection made before the revocation carries on to the next `CONNECT`,
//! which is refused). A refused tunnel gets 401 (policy), 400 (wrong
//! target) or 503 (the app cannot be reached), so the client's proxy resets
//! its client.
use std::{net::SocketAddr, sync::Arc};

use http::StatusCode;
use mesh_proxy::{
    error::ProxyError,
    hbone::{self, TunnelHandler, TunnelRequest},
    plan::Arrival,
    telemetry::{ConnInfo, Counted, Direction},
};
use tokio::net::TcpStream;
use tracing::warn;

use super::{PodContext, ProxyContext, inbound::connect_to_app};

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
    let view = ctx.proxy.state.view();
    let Some(me) = pod.local().workload(&view).and_then(|w| ctx.proxy.identities.get(&w.identity)) else {
        warn!(pod = %pod.name, peer = %peer, "HBONE connection dropped: no certificate for this pod yet");
        return;
    };
    let handler = Arc::new(PodTunnels { listener, pod: pod.clone(), ctx: ctx.clone() });
    let timeout = ctx.hbone_handshake_timeout;
    if let Err(e) = hbone::serve(tcp, me.server.clone(), handler, ctx.proxy.draining(), timeout).await {
        let reason = hbone::failure_reason(&e);
        ctx.count_hbone_error(reason);
        warn!(pod = %pod.name, peer = %peer, reason, "HBONE connection refused or failed: {e}");
    }
}

/// The status a refused tunnel is answered with.
fn refusal_status(e: &ProxyError) -> StatusCode {
    match e {
        ProxyError::Denied { .. } => StatusCode::UNAUTHORIZED,
        ProxyError::WrongTarget { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl TunnelHandler for PodTunnels {
    async fn handle(&self, request: TunnelRequest) {
        let (pod, ctx) = (&self.pod, &self.ctx);
        // Each tunnel opens a socket to the app: it counts like a connection.
        let Some(_permit) = ctx.limits.admit(&pod.name, &pod.open) else {
            return request.refuse(StatusCode::SERVICE_UNAVAILABLE);
        };
        let mut info = ConnInfo::new(Direction::Inbound, &pod.name, self.listener, request.peer_addr);
        // Logged by the id the source's proxy logs it by, so the two lines join.
        if let Some(id) = &request.connection_id {
            info.connection_id.clone_from(id);
        }
        let conn = ctx.proxy.connections.track(info);
        let arrival = Arrival::Hbone(request.peer.identity.clone());
        let target = request.target;
        let serial = Some(request.peer.serial.clone());
        // What the peer's CONNECT said of its source (Istio's baggage and forwarded).
        let said = Some((request.baggage.as_ref(), request.service_host.as_deref()));
        let (mut tracked, upstream) =
            // Boxed: connecting takes state the tunnel's task need not keep
            // for its whole life (a task is as large as its largest future).
            match Box::pin(connect_to_app(pod, ctx, conn, arrival.clone(), serial.as_deref(), target, said)).await {
                Ok(admitted) => admitted,
                Err((tracked, e)) => {
                    request.refuse(refusal_status(&e));
                    return tracked.refuse(e);
                }
            };
        let tunnel = match request.accept() {
            Ok(t) => t,
            Err(e) => return tracked.refuse(ProxyError::Relay(e)),
        };
        let admitted = ctx.live.register(pod, tracked.info().src, arrival, serial, target);
        let app = Counted::server(upstream, tracked.relaying());
        let relay = async { hbone::relay(app, tunnel).await.map(drop).map_err(ProxyError::Relay) };
        let result = ctx.relay_while_admitted(&mut tracked, admitted, relay).await;
        tracked.finish(result);
    }
}
