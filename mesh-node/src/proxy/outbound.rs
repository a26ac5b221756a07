//! Outbound: the app's connect was redirected to us; recover where it was
//! going and go there from a marked socket in the app's namespace.
use std::{net::SocketAddr, time::Instant};

use mesh_common::PeerKey;
use tokio::net::TcpStream;

use super::{PodContext, ProxyContext, access::ConnectionRecord, access::Direction};
use crate::dataplane::{ip_from_key, ip_key};

pub async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    listener: SocketAddr,
    pod: &PodContext,
    ctx: &ProxyContext,
) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let mut record = ConnectionRecord {
        direction: Direction::Outbound,
        pod: &pod.name,
        listener,
        src: peer,
        original_dst: None,
        started: Instant::now(),
    };
    let key = PeerKey { netns_cookie: pod.netns.cookie(), ip: ip_key(peer.ip()), port: u32::from(peer.port()) };
    let Some(orig) = ctx.orig_dst.take(&key) else {
        // Only a client that connected to the listener directly gets here.
        record.finish(Err("no original destination recorded for this client".into()));
        return;
    };
    let dst = SocketAddr::new(ip_from_key(&orig.ip), orig.port as u16);
    record.original_dst = Some(dst);
    record.finish(super::connect_and_relay(&mut client, dst, pod, ctx).await);
}
