//! Inbound: connections for the pod's app, either plaintext the kernel
//! steered to 15006 (clients outside the mesh) or tunnels arriving on 15008.
//! Both pass PeerAuthentication and AuthorizationPolicy here before the proxy
//! connects to the app from inside the pod.
use std::net::SocketAddr;

use mesh_common::{authz::Connection, identity::SpiffeId};
use tokio::net::TcpStream;
use tracing::info;

use super::{
    PodContext, ProxyContext, connect_from, relay_plain,
    telemetry::{ConnInfo, Counted, Direction, Flag, refused},
};

/// A plaintext connection on 15006; the kernel kept its original local address.
pub async fn handle(client: TcpStream, listener: SocketAddr, peer: SocketAddr, pod: &PodContext, ctx: &ProxyContext) {
    let mut info = ConnInfo::new(Direction::Inbound, &pod.name, listener, peer);
    let target = match client.local_addr() {
        Ok(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
        Err(e) => return refused(&info, Flag::NoRoute, format!("no local address: {e}")),
    };
    info.dst = Some(target);
    info.route = "tcp";
    let mut upstream = match admit(pod, ctx, &mut info, None, target).await {
        Ok(up) => up,
        Err((flag, e)) => return refused(&info, flag, e),
    };
    let tracked = ctx.connections.open(info.clone());
    let mut client = Counted::client(client, tracked.bytes.clone());
    let result = relay_plain(&mut client, &mut upstream).await;
    tracked.finish(&info, result.map_err(|e| (Flag::UpstreamFailure, e)));
}

/// PeerAuthentication (plaintext only), then AuthorizationPolicy, then the
/// connection to the app at `target` from inside the pod. `peer` is the
/// verified identity of an HBONE client, `None` for plaintext.
pub(super) async fn admit(
    pod: &PodContext,
    ctx: &ProxyContext,
    info: &mut ConnInfo,
    peer: Option<&SpiffeId>,
    target: SocketAddr,
) -> Result<TcpStream, (Flag, String)> {
    let view = ctx.view();
    let source = view.workload_by_ip(info.src.ip()).cloned();
    match (peer, &source) {
        // The source's labels only when its verified identity is the workload's.
        (Some(id), Some(w)) if &w.identity == id => info.set_source(w),
        (Some(id), _) => {
            info.src_principal = Some(id.to_string());
            info.src_namespace = Some(id.namespace().to_owned());
        }
        (None, Some(w)) => {
            info.src_workload = Some(w.wire.name.clone());
            info.src_namespace = Some(w.wire.namespace.clone());
        }
        (None, None) => {}
    }
    if let Some(w) = pod.workload(&view) {
        info.set_destination(&w);
        let conn = Connection {
            source: peer.cloned(),
            source_ip: info.src.ip(),
            destination_ip: target.ip(),
            destination_port: target.port(),
        };
        let decision = view.authorize(&w, &conn);
        info.decision = Some(if decision.allowed { "allow" } else { "deny" });
        info.policy = decision.policy.clone();
        if !decision.allowed {
            log_denial(info, &decision.reason);
            return Err((Flag::Denied, format!("denied: {}", decision.reason)));
        }
    }
    info.upstream = Some(target);
    // The app listens in the pod: connecting to the pod's own address from
    // inside it stays in the pod (the steering leaves self-connections alone).
    connect_from(pod, target, ctx.mark).await.map_err(|e| (Flag::UpstreamFailure, e))
}

fn log_denial(info: &ConnInfo, reason: &str) {
    info!(
        target: "authz",
        pod = %info.pod,
        src = %info.src,
        src_identity = info.src_principal.as_deref().unwrap_or(""),
        dst = %info.dst.map(|d| d.to_string()).unwrap_or_default(),
        policy = info.policy.as_deref().unwrap_or(""),
        reason,
        "connection denied"
    );
}
