//! Inbound: connections for the pod's app, either plaintext the kernel
//! steered to 15006 (clients outside the mesh) or tunnels arriving on 15008.
//! Both follow the inbound plan (PeerAuthentication, then
//! AuthorizationPolicy) before the proxy connects to the app from inside the pod.
use std::{net::SocketAddr, sync::Arc};

use mesh_proxy::{
    error::ProxyError,
    hbone::Baggage,
    plan::{self, Arrival},
    telemetry::{ConnInfo, Counted, Direction, Tracked},
};
use tokio::net::TcpStream;
use tracing::info;

use super::{PodContext, ProxyContext, connect_from, live, relay_plain};

/// A plaintext connection on 15006; the kernel kept its original local address.
pub async fn handle(
    client: TcpStream,
    listener: SocketAddr,
    peer: SocketAddr,
    pod: &Arc<PodContext>,
    ctx: &ProxyContext,
) {
    let mut conn = ctx.proxy.connections.track(ConnInfo::new(Direction::Inbound, &pod.name, listener, peer));
    let target = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            conn.info_mut().route = "tcp";
            return conn.refuse(ProxyError::NoLocalAddress(e));
        }
    };
    let (mut tracked, mut upstream) = match connect_to_app(pod, ctx, conn, Arrival::Plaintext, None, target, None).await
    {
        Ok(admitted) => admitted,
        Err((tracked, e)) => return tracked.refuse(e),
    };
    let admitted = ctx.live.register(pod, tracked.info().src, Arrival::Plaintext, None, target);
    let mut client = Counted::client(client, tracked.relaying());
    let result = ctx.relay_while_admitted(&mut tracked, admitted, relay_plain(&mut client, &mut upstream)).await;
    tracked.finish(result);
}

/// Follows the inbound plan for the connection `conn` (from its source to
/// `target`; a tunnel's peer certificate has `serial`): refused (with the
/// reason, for the caller to answer and record) or admitted, with the
/// connection to the app made from inside the pod.
pub(super) async fn connect_to_app(
    pod: &PodContext,
    ctx: &ProxyContext,
    mut conn: Tracked,
    arrival: Arrival,
    serial: Option<&str>,
    target: SocketAddr,
    peer_said: Option<(Option<&Baggage>, Option<&str>)>,
) -> Result<(Tracked, TcpStream), (Tracked, ProxyError)> {
    let view = ctx.proxy.state.view();
    let plan = plan::inbound(&view, pod.local(), conn.info().src, arrival, target);
    plan.describe(conn.info_mut());
    if let Some((baggage, service_host)) = peer_said {
        conn.info_mut().complete_from_peer(baggage, service_host);
    }
    let verdict = live::unrevoked(&ctx.proxy.state.revocations, serial).and(plan.verdict);
    if let Err(e) = verdict {
        if let ProxyError::Denied { reason, .. } = &e {
            log_denial(conn.info(), reason, "connection denied");
        }
        return Err((conn, e));
    }
    // The app listens in the pod: connecting to the pod's own address from
    // inside it stays in the pod (the steering leaves self-connections alone).
    match connect_from(&pod.netns, plan.target, ctx.mark).await {
        Ok(up) => Ok((conn, up)),
        Err(e) => Err((conn, e)),
    }
}

/// The node's line for a connection policy refused (`what`: at its
/// arrival, or while open), with the policy and the reason.
pub(super) fn log_denial(info: &ConnInfo, reason: &str, what: &str) {
    info!(
        target: "authz",
        pod = %info.pod,
        src = %info.src,
        src_identity = info.src_principal.as_deref().unwrap_or(""),
        dst = %info.dst.map(|d| d.to_string()).unwrap_or_default(),
        policy = info.policy.as_deref().unwrap_or(""),
        reason,
        "{what}"
    );
}
