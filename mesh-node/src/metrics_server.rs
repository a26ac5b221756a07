//! `/metrics` on 15020: the process's one registry, in OpenMetrics text.
//! Istio's `istio_tcp_*` are recorded by the proxy as connections open and
//! close; the agent's own health figures are gauges sampled at each scrape.
use std::sync::{Arc, atomic::AtomicU64};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{encoding::text::encode, metrics::gauge::Gauge, registry::Registry};

use crate::{pods::Pods, proxy::ProxyContext};

/// The agent's gauges, owned here and set at each scrape.
#[derive(Clone, Default)]
pub struct NodeGauges {
    pods_enrolled: Gauge,
    connections_active: Gauge,
    pool_connections: Gauge,
    connections_dialed: Gauge,
    pool_broken_attempts: Gauge,
    workloads: Gauge,
    services: Gauge,
    policies: Gauge,
    certificates_expired: Gauge,
    resident_bytes: Gauge<f64, AtomicU64>,
}

impl NodeGauges {
    pub fn register(registry: &mut Registry) -> NodeGauges {
        let g = NodeGauges::default();
        let mut add = |name: &str, help: &str, gauge: Gauge| registry.register(name, help, gauge);
        add("mesh_node_pods_enrolled", "Pods enrolled on this node", g.pods_enrolled.clone());
        add("mesh_node_connections_active", "Connections the proxy carries now", g.connections_active.clone());
        add("mesh_node_hbone_pool_connections", "Pooled HBONE connections", g.pool_connections.clone());
        add("mesh_node_hbone_connections_dialed", "HBONE connections dialed so far", g.connections_dialed.clone());
        add(
            "mesh_node_hbone_pool_broken_attempts",
            "Tunnels tried on a pooled HBONE connection that turned out broken (each retried on a fresh one)",
            g.pool_broken_attempts.clone(),
        );
        add("mesh_node_config_workloads", "Workloads in the configuration in force", g.workloads.clone());
        add("mesh_node_config_services", "Services in the configuration in force", g.services.clone());
        add("mesh_node_config_policies", "Policies in the configuration in force", g.policies.clone());
        add(
            "mesh_node_certificates_expired",
            "Workload certificates held past their expiry (not renewed in time: their connections are refused)",
            g.certificates_expired.clone(),
        );
        registry.register("process_resident_memory_bytes", "Resident memory", g.resident_bytes.clone());
        g
    }
}

#[derive(Clone)]
struct Sources {
    registry: Arc<Registry>,
    gauges: NodeGauges,
    pods: Pods,
    proxy: Arc<ProxyContext>,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    gauges: NodeGauges,
    pods: Pods,
    proxy: Arc<ProxyContext>,
) {
    let router = Router::new().route("/metrics", get(render)).with_state(Sources { registry, gauges, pods, proxy });
    let _ = axum::serve(listener, router).await;
}

async fn render(State(s): State<Sources>) -> impl IntoResponse {
    let enrolled = s.pods.list().len();
    let proxy = &s.proxy.proxy;
    let (pooled, dialed) = proxy.pool.stats();
    let (workloads, services, policies) = proxy.state.view().sizes();
    let g = &s.gauges;
    let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
    g.pods_enrolled.set(n(enrolled));
    g.connections_active.set(n(proxy.connections.len()));
    g.pool_connections.set(n(pooled));
    g.connections_dialed.set(n(dialed));
    g.pool_broken_attempts.set(n(proxy.pool.broken_attempts()));
    g.workloads.set(n(workloads));
    g.services.set(n(services));
    g.policies.set(n(policies));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    g.certificates_expired.set(n(proxy.identities.certs().iter().filter(|(_, c)| c.not_after_unix <= now).count()));
    if let Some(rss) = resident_bytes() {
        g.resident_bytes.set(rss as f64);
    }
    text(&s.registry)
}

/// The registry as an HTTP answer in OpenMetrics text (Prometheus reads it).
pub fn text(registry: &Registry) -> impl IntoResponse + use<> {
    let mut body = String::new();
    let _ = encode(&mut body, registry);
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
}

/// The process's resident set, from /proc/self/statm (pages).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}
