//! mesh's proxy library, shared by the node proxy (`mesh-node`) and the
//! waypoint: no eBPF, no pod enrolment.
//!
//! - [`hbone`]: the protocol (mutual TLS, HTTP/2 `CONNECT`, relay);
//! - [`pool`]: HBONE connections shared by tunnels;
//! - [`identity`]: the workload certificates this process holds;
//! - [`state`]: the configuration pipeline (store → typed view);
//! - [`plan`]: what to do with one connection, decided from state alone;
//! - [`error`]: what went wrong, classified once (flag, side, retryable);
//! - [`files`]: state files written atomically;
//! - [`telemetry`]: Istio's metrics, the access log and the live connections;
//! - `control` (feature `control`): the controller client.
#[cfg(feature = "control")]
pub mod control;
pub mod error;
pub mod hbone;
pub use mesh_common::heap;
pub mod identity;
pub mod plan;
pub mod pool;
pub mod relay;
pub mod state;
pub mod telemetry;

use std::sync::Arc;

use prometheus_client::registry::Registry;

use self::{identity::Identities, pool::Pool, state::State, telemetry::Connections};

/// The next connection on `listener`, with `TCP_NODELAY` set and the peer's
/// address canonical (IPv4-mapped as IPv4). A failed accept (out of file
/// descriptors and the like) is logged and retried after a pause, instead of
/// spinning.
pub async fn accept(listener: &tokio::net::TcpListener) -> (tokio::net::TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Small writes (TLS records, HTTP/2 frames, request/response
                // traffic) must not wait for the peer's delayed ACK.
                let _ = stream.set_nodelay(true);
                return (stream, std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port()));
            }
            Err(e) => {
                let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
                tracing::warn!(listener = %bound, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// What every connection handler reads, shared by all the listeners of a process.
pub struct Proxy {
    /// Written only by the control client; the data path reads views of it.
    pub state: State,
    pub identities: Identities,
    pub pool: Arc<Pool>,
    pub connections: Arc<Connections>,
    /// Set once the process starts draining.
    drain: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    /// A proxy whose metric families are registered in `registry`.
    pub fn new(registry: &mut Registry) -> Proxy {
        Proxy {
            state: State::default(),
            identities: Identities::default(),
            pool: Arc::default(),
            connections: Arc::new(Connections::new(telemetry::TcpMetrics::register(registry))),
            drain: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Starts draining: servers stop taking new streams on connections they
    /// hold (HTTP/2 GOAWAY); what is open runs on.
    pub fn start_drain(&self) {
        self.drain.send_replace(true);
    }

    /// Resolves once draining has started.
    pub fn draining(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.drain.subscribe();
        async move {
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// Drops idle pooled connections every few seconds, for as long as the
    /// proxy lives, and gives the heap a burst freed back ([`heap`]).
    pub fn spawn_reaper(self: &Arc<Self>) {
        heap::spawn_trimmer();
        let proxy = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(proxy) = proxy.upgrade() {
                proxy.pool.reap();
                drop(proxy);
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        });
    }
}
