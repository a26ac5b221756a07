//! The HBONE server from the bytes a peer sends after TLS: the HTTP/2
//! preface and frames, each `CONNECT` request and its headers. Seeds: a real
//! h2 client opening tunnels (captured).
#![no_main]
use std::{net::SocketAddr, sync::Arc, time::Duration};

use libfuzzer_sys::fuzz_target;
use mesh_proxy::hbone::{Peer, TunnelHandler, TunnelRequest, serve_streams};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Accepts tunnels to even ports, refuses the others (both paths run).
struct Handler;

impl TunnelHandler for Handler {
    async fn handle(&self, request: TunnelRequest) {
        if request.target.port() % 2 == 0 {
            if let Ok(mut tunnel) = request.accept() {
                let _ = tunnel.send.send_data(bytes::Bytes::from_static(b"pong"), true);
            }
        } else {
            request.refuse(http::StatusCode::FORBIDDEN);
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// What an h2 client writes to open two tunnels and send through one.
fn captured_client() -> Vec<u8> {
    runtime().block_on(async {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let (mut send, connection) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(connection);
        for target in ["10.0.0.1:8080", "[fd00::1]:9001"] {
            let request = http::Request::builder().method("CONNECT").uri(target).body(()).unwrap();
            let (_, mut stream) = send.send_request(request, false).unwrap();
            stream.send_data(bytes::Bytes::from_static(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n"), true).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut bytes = vec![0; 1 << 16];
        let n = server.read(&mut bytes).await.unwrap();
        bytes.truncate(n);
        bytes
    })
}

fuzz_target!(
    init: {
        mesh_fuzz::write_seeds_if_asked(|| vec![captured_client()]);
    },
    |data: &[u8]| {
        runtime().block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let peer = Peer { identity: "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap(), serial: "01".into() };
            let addr: SocketAddr = "10.0.0.2:41000".parse().unwrap();
            let serving = tokio::spawn(serve_streams(server, peer, addr, Arc::new(Handler), std::future::pending(), tokio::time::Instant::now() + Duration::from_secs(3600)));
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            // Read what the server answers, so it never blocks on a full pipe.
            let mut sink = vec![0; 1 << 16];
            let drained = async { while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {} };
            let _ = tokio::time::timeout(Duration::from_secs(1), async { tokio::join!(drained, serving) }).await;
        });
    }
);
