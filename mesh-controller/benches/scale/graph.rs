//! The service graph at scale: each simulated node serves `/metrics` as a
//! node proxy would for its 100 pods (Istio's `istio_tcp_*` with the whole
//! standard label set, encoded by prometheus-client with mesh-proxy's own
//! label struct): every pod connects to a service of its namespace, and is
//! the server of one such connection. The controller's CPU and memory are
//! measured with nobody looking at the graph (it does not scrape), then
//! while a client polls `/graph.json` as the page does, every 3 s.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mesh_proxy::telemetry::IstioLabels;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::{NAMESPACES, NODES, PODS, Report, http_get, rss_kib};

const PER_NS: usize = PODS / NAMESPACES;
/// Services per namespace; service `s` selects the 5 pods `5s..5s+4`.
const SERVICES_PER_NS: usize = 20;

/// One node's families, counting up at each scrape as traffic would.
struct NodeMetrics {
    registry: Registry,
    families: [Family<IstioLabels, Counter>; 4],
    series: Vec<IstioLabels>,
}

fn labels(reporter: &str, ns: usize, client: usize, server: usize, service: usize) -> IstioLabels {
    let name = format!("ns{ns}");
    let pod = |p: usize| format!("pod{p}");
    let principal = |p: usize| format!("spiffe://cluster.local/ns/{name}/sa/sa{}", p % 10);
    IstioLabels {
        reporter: reporter.into(),
        source_workload: pod(client),
        source_workload_namespace: name.clone(),
        source_principal: principal(client),
        source_canonical_service: format!("app{}", client / 5),
        source_canonical_revision: "latest".into(),
        source_app: format!("app{}", client / 5),
        source_version: "unknown".into(),
        source_cluster: "Kubernetes".into(),
        destination_workload: pod(server),
        destination_workload_namespace: name.clone(),
        destination_principal: principal(server),
        destination_canonical_service: format!("app{}", server / 5),
        destination_canonical_revision: "latest".into(),
        destination_app: format!("app{}", server / 5),
        destination_version: "unknown".into(),
        destination_cluster: "Kubernetes".into(),
        destination_service: format!("svc{service}.{name}.svc.cluster.local"),
        destination_service_name: format!("svc{service}"),
        destination_service_namespace: name,
        request_protocol: "tcp".into(),
        response_flags: "-".into(),
        connection_security_policy: "mutual_tls".into(),
    }
}

impl NodeMetrics {
    /// Node `node`'s pods as clients (`source`) and as servers (`destination`).
    fn new(node: usize) -> NodeMetrics {
        let mut registry = Registry::default();
        let families: [Family<IstioLabels, Counter>; 4] = Default::default();
        for (family, name) in families.iter().zip([
            "istio_tcp_connections_opened",
            "istio_tcp_connections_closed",
            "istio_tcp_received_bytes",
            "istio_tcp_sent_bytes",
        ]) {
            registry.register(name, "as a node proxy counts it", family.clone());
        }
        let mut series = Vec::new();
        for i in (node..PODS).step_by(NODES) {
            let (ns, p) = (i / PER_NS, i % PER_NS);
            // p calls the next service; p is also the server of the one pod calling its service.
            let service = (p / 5 + 1) % SERVICES_PER_NS;
            series.push(labels("source", ns, p, 5 * service + p % 5, service));
            let own = p / 5;
            let caller = 5 * ((own + SERVICES_PER_NS - 1) % SERVICES_PER_NS) + p % 5;
            series.push(labels("destination", ns, caller, p, own));
        }
        NodeMetrics { registry, families, series }
    }

    fn scrape(&self) -> String {
        for l in &self.series {
            for (f, n) in self.families.iter().zip([2, 2, 300, 1200]) {
                f.get_or_create(l).inc_by(n);
            }
        }
        let mut text = String::new();
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Starts the simulated nodes' metrics servers; their addresses, by node.
pub async fn serve_nodes() -> anyhow::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::new();
    for node in 0..NODES {
        let metrics = Arc::new(Mutex::new(NodeMetrics::new(node)));
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move { metrics.lock().unwrap().scrape() }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    Ok(addrs)
}

/// The controller's CPU time so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

const PHASE: Duration = Duration::from_secs(30);

/// Idle, then looked at: CPU (cores), RSS, and what a look costs and gives.
pub async fn measure(metrics: SocketAddr, pid: u32) -> anyhow::Result<Report> {
    let (cpu, t) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(PHASE).await;
    let idle_cores = (cpu_seconds(pid) - cpu) / t.elapsed().as_secs_f64();
    let rss_idle = rss_kib(pid);

    let (cpu, t) = (cpu_seconds(pid), Instant::now());
    let mut latencies = Vec::new();
    let (mut edges, mut bytes, mut proxies) = (0, 0, 0);
    while t.elapsed() < PHASE {
        let asked = Instant::now();
        let body = http_get(metrics, "/graph.json?window=30s").await?;
        latencies.push(asked.elapsed());
        let graph: serde_json::Value = serde_json::from_str(&body)?;
        edges = graph["edges"].as_array().map_or(0, Vec::len);
        proxies = graph["proxies"].as_u64().unwrap_or(0);
        bytes = body.len();
        tokio::time::sleep(Duration::from_secs(3).saturating_sub(asked.elapsed())).await;
    }
    let looked_cores = (cpu_seconds(pid) - cpu) / t.elapsed().as_secs_f64();
    let rss_looked = rss_kib(pid);
    anyhow::ensure!(proxies as usize == NODES, "the graph read {proxies} of {NODES} proxies");
    anyhow::ensure!(edges >= PODS, "the graph has {edges} edges for {PODS} pods");

    let asked = Instant::now();
    let svg = http_get(metrics, "/graph.svg?namespace=ns0&window=30s").await?;
    let svg_ms = asked.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(svg.contains("<svg"), "no SVG for one namespace: {}", &svg[..svg.len().min(300)]);

    let first = latencies[0];
    let mut later = latencies[1..].to_vec();
    later.sort();
    let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    let mut r = Report::new();
    r.insert("edges".into(), edges.into());
    r.insert("proxies_scraped".into(), proxies.into());
    r.insert("json_bytes".into(), bytes.into());
    r.insert("cpu_cores_not_looked_at".into(), ((idle_cores * 1e3).round() / 1e3).into());
    r.insert("cpu_cores_looked_at_every_3s".into(), ((looked_cores * 1e3).round() / 1e3).into());
    r.insert("rss_mib_not_looked_at".into(), (rss_idle / 1024).into());
    r.insert("rss_mib_looked_at".into(), (rss_looked / 1024).into());
    r.insert("first_look_ms".into(), ms(first).into());
    r.insert("look_ms_p50".into(), ms(later[later.len() / 2]).into());
    r.insert("svg_one_namespace_ms".into(), svg_ms.into());
    Ok(r)
}
