//! `/metrics` on 15020: Istio's `istio_tcp_*` (recorded by the proxy as
//! connections open and close) and the agent's own health figures, sampled
//! at each scrape.
use std::sync::{Arc, Mutex};

use axum::{Router, extract::State, routing::get};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::{pods::Pods, proxy::ProxyContext};

/// Installs the process-wide recorder; the handle renders what it holds.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    metrics::describe_counter!("istio_tcp_connections_opened_total", "TCP connections opened");
    metrics::describe_counter!("istio_tcp_connections_closed_total", "TCP connections closed");
    metrics::describe_counter!("istio_tcp_sent_bytes_total", "Bytes sent to the client (the response side)");
    metrics::describe_counter!("istio_tcp_received_bytes_total", "Bytes received from the client (the request side)");
    metrics::describe_counter!("mesh_node_hbone_errors_total", "HBONE connections refused at the handshake or failed");
    Ok(handle)
}

#[derive(Clone)]
struct Sources {
    handle: PrometheusHandle,
    pods: Arc<Mutex<Pods>>,
    proxy: Arc<ProxyContext>,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    pods: Arc<Mutex<Pods>>,
    proxy: Arc<ProxyContext>,
) {
    let router = Router::new().route("/metrics", get(render)).with_state(Sources { handle, pods, proxy });
    let _ = axum::serve(listener, router).await;
}

async fn render(State(s): State<Sources>) -> String {
    let enrolled = s.pods.lock().unwrap_or_else(|e| e.into_inner()).list().len();
    let (pooled, dialed) = s.proxy.pool.stats();
    let (workloads, services, policies) = s.proxy.view().sizes();
    metrics::gauge!("mesh_node_pods_enrolled").set(enrolled as f64);
    metrics::gauge!("mesh_node_connections_active").set(s.proxy.connections.len() as f64);
    metrics::gauge!("mesh_node_hbone_pool_connections").set(pooled as f64);
    metrics::gauge!("mesh_node_hbone_connections_dialed").set(dialed as f64);
    metrics::gauge!("mesh_node_config_workloads").set(workloads as f64);
    metrics::gauge!("mesh_node_config_services").set(services as f64);
    metrics::gauge!("mesh_node_config_policies").set(policies as f64);
    if let Some(rss) = resident_bytes() {
        metrics::gauge!("process_resident_memory_bytes").set(rss as f64);
    }
    s.handle.render()
}

/// The process's resident set, from /proc/self/statm (pages).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}
