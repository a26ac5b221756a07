//! The waypoint's HBONE listener (15008). A tunnel's CONNECT authority must
//! be the address of a service (VIP and port); its port's declared protocol
//! decides what happens: `tcp` is relayed to one of the service's
//! endpoints; `http`, `http2` and `grpc` are served by hyper (HTTP/1.1 or
//! HTTP/2 by the client's first bytes) with every request through the
//! engine; an undeclared port is sniffed: HTTP if its first bytes are an
//! HTTP/1 request line or the HTTP/2 preface, else TCP. A client that sends
//! nothing first (a server-first protocol) is relayed as TCP after a short
//! wait, not stalled.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::StatusCode;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use mesh_proxy::hbone::{self, TunnelHandler, TunnelIo, TunnelRequest};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{
    Waypoint,
    engine::{self, Downstream},
    upstream,
};

/// How long an undeclared port waits for the client's first bytes.
const SNIFF: Duration = Duration::from_millis(200);

pub async fn serve_hbone(listener: TcpListener, wp: Arc<Waypoint>) {
    let handler = Arc::new(Tunnels { wp: wp.clone() });
    loop {
        let (tcp, peer) = mesh_proxy::accept(&listener).await;
        let (wp, handler) = (wp.clone(), handler.clone());
        tokio::spawn(async move {
            let _serving = wp.serving();
            let Some(local) = wp.identity().and_then(|id| wp.proxy.identities.get(&id)) else {
                warn!(peer = %peer, "HBONE connection dropped: no certificate for this waypoint yet");
                return;
            };
            if let Err(e) =
                hbone::serve(tcp, local.server.clone(), handler, wp.proxy.draining(), hbone::HANDSHAKE_TIMEOUT).await
            {
                debug!(peer = %peer, "HBONE connection refused or failed: {e}");
            }
        });
    }
}

struct Tunnels {
    wp: Arc<Waypoint>,
}

impl TunnelHandler for Tunnels {
    async fn handle(&self, request: TunnelRequest) {
        let view = self.wp.proxy.state.view();
        let target = request.target;
        let Some(service) = view.service_by_vip(target.ip()).cloned() else {
            debug!(target = %target, "tunnel refused: not a service address");
            return request.refuse(StatusCode::BAD_REQUEST);
        };
        let Ok(port) = service.port(target.port()).map(|p| p.protocol.clone()) else {
            return request.refuse(StatusCode::BAD_REQUEST);
        };
        let ds = Arc::new(Downstream {
            service,
            port: target.port(),
            destination: target,
            protocol: port,
            peer: Some(request.peer.identity.clone()),
            peer_addr: request.peer_addr,
            connection_id: request.connection_id.clone(),
            series: Default::default(),
        });
        let Ok(mut tunnel) = request.accept() else { return };
        let mut first = None;
        let http = match ds.protocol.as_str() {
            "http" | "http2" | "grpc" => true,
            "tcp" => false,
            _ => match tokio::time::timeout(SNIFF, tunnel.recv.data()).await {
                Ok(Some(Ok(bytes))) => {
                    let _ = tunnel.recv.flow_control().release_capacity(bytes.len());
                    let http = looks_like_http(&bytes);
                    first = Some(bytes);
                    http
                }
                Ok(_) => return, // closed before a byte
                Err(_) => false, // the client waits for the server: TCP
            },
        };
        // The tunnel is the connection: hyper (or the TCP relay) reads and writes it directly.
        let io = TunnelIo::new(tunnel, first.unwrap_or_default());
        if http {
            serve_http(io, self.wp.clone(), ds).await;
        } else {
            relay_tcp(io, &self.wp, &ds, target).await;
        }
    }
}

/// A plaintext HTTP listener for one service port (`--listen-plain`):
/// clients outside the mesh (an ingress, a benchmark's load generator) get
/// the same per-request engine, without an identity.
pub async fn serve_plain(listener: TcpListener, wp: Arc<Waypoint>, service: String, port: u16) {
    loop {
        let (tcp, peer_addr) = mesh_proxy::accept(&listener).await;
        let Some(svc) = wp.proxy.state.view().service(&service).cloned() else {
            debug!(service = %service, "plaintext connection dropped: no such service (yet)");
            continue;
        };
        let protocol = svc.port(port).map(|p| p.protocol.clone()).unwrap_or_default();
        let destination = tcp.local_addr().unwrap_or(peer_addr);
        let ds = Arc::new(Downstream {
            service: svc,
            port,
            destination,
            protocol,
            peer: None,
            peer_addr,
            connection_id: None,
            series: Default::default(),
        });
        tokio::spawn(serve_http(tcp, wp.clone(), ds));
    }
}

/// HTTP/1.1 or HTTP/2 (prior knowledge) on one client connection.
async fn serve_http<I>(io: I, wp: Arc<Waypoint>, ds: Arc<Downstream>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let draining = wp.proxy.draining();
    let service = service_fn(move |req| {
        let (wp, ds) = (wp.clone(), ds.clone());
        // Boxed: hyper keeps a connection's request future inline, so an
        // unboxed one (several KiB) would be held by every idle connection.
        Box::pin(async move { Ok::<_, Infallible>(engine::handle(wp, ds, req).await) })
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1000);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut draining = std::pin::pin!(draining);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = &mut draining => {
            // Answer what is in flight, then close (HTTP/1: Connection: close; HTTP/2: GOAWAY).
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!("client connection ended: {e}");
    }
}

/// A connection that is not HTTP: to one endpoint of the service, whole.
async fn relay_tcp<I>(mut io: I, wp: &Waypoint, ds: &Downstream, target: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let view = wp.proxy.state.view();
    let (Some(me), Ok(endpoints)) = (wp.identity(), view.endpoints(&ds.service, target.port(), |_| true)) else {
        return;
    };
    for up in &endpoints {
        match upstream::open(&wp.proxy, &me, up).await {
            Ok(mut upstream) => {
                // Buffers as the node proxy's: growing to 64 KiB for bulk
                // (tokio's fixed 8 KiB made small DATA frames), small while idle.
                let _ = mesh_proxy::relay::both_ways(&mut io, &mut upstream).await;
                return;
            }
            Err(e) => debug!(upstream = %up.addr(), "TCP upstream failed: {e}"),
        }
    }
}

/// An HTTP/1 request line (`METHOD SP`) or the start of the HTTP/2 preface.
pub fn looks_like_http(b: &Bytes) -> bool {
    const METHODS: [&[u8]; 9] =
        [b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"CONNECT "];
    b.starts_with(b"PRI * HTTP/2.0") || METHODS.iter().any(|m| b.starts_with(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing() {
        for (bytes, want) in [
            (&b"GET / HTTP/1.1\r\n"[..], true),
            (b"POST /x HTTP/1.1\r\n", true),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", true),
            (b"\x16\x03\x01\x02\x00", false),             // a TLS ClientHello
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", false), // PostgreSQL's SSLRequest
            (b"GETX", false),
        ] {
            assert_eq!(looks_like_http(&Bytes::copy_from_slice(bytes)), want, "{bytes:?}");
        }
    }
}
