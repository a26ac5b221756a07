//! The same-node path: a connection from one enrolled pod to another pod
//! enrolled on this node is not encrypted and framed only to arrive back in
//! this process. The proxy decides it as the destination's 15008 would (the
//! inbound plan, with the source's identity: PeerAuthentication and
//! AuthorizationPolicy; the destination pod's connection limit), connects to
//! the app from inside the destination pod, and relays between the two
//! sockets with `splice(2)` (no copy through the proxy: `splice.rs`). Both
//! records are kept as on the HBONE path (the source's outbound one, the
//! destination's inbound one, each with both identities,
//! `connection_security_policy` mutual_tls), with route `local`.
//!
//! Why this is as safe as HBONE. HBONE proves two things: who the client is
//! (its certificate) and that nobody on the wire reads or changes the bytes
//! (TLS). Here the proxy knows the client first-hand: it accepted the
//! connection on its listener inside the source pod's own network
//! namespace, where only that pod's connects are redirected, exactly as it
//! knows it before choosing the certificate to present on HBONE; it still
//! requires the source's certificate to be valid, so a pod the mesh would
//! not let speak HBONE gets nothing here either. And there is no wire: the
//! bytes go from one socket of this process to another, never onto the
//! node's network (tshark on the bridge sees nothing of them). An open
//! connection is re-decided on every configuration like any other.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use mesh_common::identity::SpiffeId;
use mesh_proxy::{
    error::ProxyError,
    plan::Arrival,
    telemetry::{ConnInfo, Counted, Direction, Tracked},
};
use tokio::net::TcpStream;

use super::{PodContext, ProxyContext, inbound::connect_to_app, limits::Permit, live, splice};

/// The route label of the same-node path, in records and `mesh-ctl connections`.
pub const ROUTE: &str = "local";

/// What the destination's 15008 listener would show as its address.
const LISTENER: SocketAddr = SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), mesh_common::HBONE_PORT);

/// A connection admitted to a pod on this node: its record, its socket to
/// the app, its place among the live connections and its slot.
pub struct Delivery {
    tracked: Tracked,
    app: TcpStream,
    admitted: live::Registration,
    _permit: Permit,
}

/// Admits a connection from `source_pod` (as `identity`) to `target`, an
/// address of `dst`, a pod enrolled here; `Err` is the reason it is refused,
/// already recorded on the destination's side.
pub async fn open(
    source_pod: &PodContext,
    identity: &SpiffeId,
    dst: &Arc<PodContext>,
    target: SocketAddr,
    ctx: &ProxyContext,
) -> Result<Delivery, ProxyError> {
    let Some(permit) = ctx.limits.admit(&dst.name, &dst.open) else {
        let over = io::Error::other(format!("pod {} is at its connection limit", dst.name));
        return Err(ProxyError::Connect { addr: target, source: over });
    };
    // The source as HBONE would show it: the pod's address of the target's family.
    let src_ip = source_pod.addresses.iter().find(|ip| ip.is_ipv4() == target.is_ipv4());
    let src = SocketAddr::new(src_ip.copied().unwrap_or(target.ip()), 0);
    let conn = ctx.proxy.connections.track(ConnInfo::new(Direction::Inbound, &dst.name, LISTENER, src));
    // The plan describes the record as a tunnel; `route` is set after it.
    let arrival = Arrival::Hbone(identity.clone());
    match connect_to_app(dst, ctx, conn, arrival.clone(), None, target, None).await {
        Ok((mut tracked, app)) => {
            tracked.info_mut().route = ROUTE;
            let admitted = ctx.live.register(dst, src, arrival, None, target);
            Ok(Delivery { tracked, app, admitted, _permit: permit })
        }
        Err((mut tracked, e)) => {
            tracked.info_mut().route = ROUTE;
            tracked.finish_with(Err(&e));
            Err(e)
        }
    }
}

/// Relays `client` (already counted on the source's record) to the app until
/// both ends close, or until a configuration denies it; ends the
/// destination's record and returns the outcome for the source's.
pub async fn relay(client: Counted<TcpStream>, delivery: Delivery, ctx: &ProxyContext) -> Result<(), ProxyError> {
    let Delivery { mut tracked, app, admitted, _permit } = delivery;
    let app = Counted::server(app, tracked.relaying());
    let relaying = async { splice::both_ways(&client, &app).await.map(drop).map_err(ProxyError::Relay) };
    let result = ctx.relay_while_admitted(&mut tracked, admitted, relaying).await;
    tracked.finish_with(result.as_ref().map(drop));
    result
}
