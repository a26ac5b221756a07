//! Inbound: the kernel steered a connection for the pod to us, keeping its
//! original local address; deliver it to the app from inside the pod.
use std::{net::SocketAddr, time::Instant};

use tokio::net::TcpStream;

use super::{PodContext, ProxyContext, access::ConnectionRecord, access::Direction};

pub async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    listener: SocketAddr,
    pod: &PodContext,
    ctx: &ProxyContext,
) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let local = client.local_addr().map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()));
    let mut record = ConnectionRecord {
        direction: Direction::Inbound,
        pod: &pod.name,
        listener,
        src: peer,
        original_dst: None,
        started: Instant::now(),
    };
    let dst = match local {
        Ok(dst) => dst,
        Err(e) => return record.finish(Err(format!("no local address: {e}"))),
    };
    record.original_dst = Some(dst);
    // Connecting to the pod's own address from inside the pod: the kernel's
    // steering leaves self-connections alone, so this reaches the app.
    record.finish(super::connect_and_relay(&mut client, dst, pod, ctx).await);
}
