//! Controller at scale (`cargo xtask bench`): 10 000 pods, 2 000 services,
//! 1 000 policies, 100 simulated nodes joined over mTLS. Records the time to
//! load the configuration, the time for every node to receive its snapshot,
//! the latency from an edit to the update on every node (p50/p99), and the
//! controller's memory; once from a directory of YAML, once from a real
//! kube-apiserver (the same objects created through its API, the edit a
//! PATCH of a pod's labels), where it also counts the requests the
//! controller makes of the API server per edit. From the directory, also
//! the service graph: the controller's CPU and memory with nobody looking,
//! then while `/graph.json` is polled over the 100 nodes' metrics
//! (`scale/graph.rs`). Writes a JSON report; asserts nothing on time.
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_common::api::{self, NodeMessage, node_control_client::NodeControlClient, node_message::Kind as Msg};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use tokio::sync::{Barrier, mpsc};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[path = "scale/graph.rs"]
mod graph;
#[path = "scale/kubernetes.rs"]
mod kubernetes;

const NAMESPACES: usize = 100;
const PODS: usize = 10_000;
const SERVICES: usize = 2_000;
const POLICIES: usize = 1_000;
const NODES: usize = 100;
const EDITS: usize = 20;

fn main() -> anyhow::Result<()> {
    let mut report = directory()?;
    let kubernetes = match kubernetes::measure() {
        Ok(r) => serde_json::Value::Object(r),
        Err(e) => format!("not measured: {e:#}").into(),
    };
    report.insert("kubernetes".into(), kubernetes);
    let text = serde_json::to_string_pretty(&report)?;
    let out = bench_dir();
    fs::write(out.join("controller.json"), &text)?;
    println!("{text}\nreport: {}", out.join("controller.json").display());
    Ok(())
}

/// Where reports (and the controllers' logs) go.
fn bench_dir() -> PathBuf {
    let dir = PathBuf::from(std::env::var("MESH_BENCH_DIR").unwrap_or_else(|_| "/var/tmp/mesh-bench".into()));
    let _ = fs::create_dir_all(&dir);
    dir
}

/// The configuration from a directory of YAML; an edit rewrites a file.
fn directory() -> anyhow::Result<Report> {
    let dir = std::env::temp_dir().join(format!("mesh-bench-controller-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let config = dir.join("config");
    fs::create_dir_all(&config)?;
    let started = Instant::now();
    write_config(&config, 0)?;
    eprintln!("wrote {PODS} pods, {SERVICES} services, {POLICIES} policies in {:?}", started.elapsed());
    let mut controller = Started::spawn(&["--config-dir", config.to_str().unwrap()], &dir.join("state"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let state = dir.join("state");
    let result = runtime.block_on(async {
        let node_metrics = graph::serve_nodes().await?;
        let mut report = run(&state, &controller, &Edits::Directory(config.clone()), &node_metrics).await?;
        let graph = graph::measure(controller.metrics, controller.pid()).await?;
        report.insert("graph".into(), serde_json::Value::Object(graph));
        anyhow::Ok(report)
    });
    controller.stop();
    let _ = fs::remove_dir_all(&dir);
    let mut report = result?;
    report.insert("controller_ready_seconds".into(), controller.ready.as_secs_f64().into());
    Ok(report)
}

/// A running controller: its addresses and how long it took to be ready.
struct Started {
    child: std::process::Child,
    metrics: SocketAddr,
    grpc: SocketAddr,
    ready: Duration,
}

impl Started {
    /// `mesh-controller` with `source` arguments, its state in `state`;
    /// returns once it says it is ready (its configuration loaded).
    fn spawn(source: &[&str], state: &Path) -> anyhow::Result<Started> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-controller"))
            .args(source)
            .args(["--state-dir", state.to_str().unwrap()])
            .args(["--grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--poll-ms", "20"])
            // Simulated nodes join with one shared token (the older way).
            .args(["--join-token-file", state.join("join-token").to_str().unwrap()])
            .env("RUST_LOG", "warn,mesh_controller=info")
            .stdout(Stdio::piped())
            .spawn()?;
        let launched = Instant::now();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let field = |line: &str, name: &str| -> Option<SocketAddr> {
            line.split(name).nth(1)?.split_whitespace().next()?.parse().ok()
        };
        let (metrics, grpc) = loop {
            let line = lines.next().ok_or_else(|| anyhow::anyhow!("controller exited"))??;
            if let (Some(m), Some(g)) = (field(&line, "metrics_addr="), field(&line, "grpc_addr=")) {
                break (m, g);
            }
        };
        let ready = launched.elapsed();
        // Its log beside the report, for where the time of a reload goes.
        let log_name = if source.contains(&"--kubernetes") { "kubernetes" } else { "directory" };
        let log = bench_dir().join(format!("controller-{log_name}.log"));
        let mut log = std::io::LineWriter::new(fs::File::create(log)?);
        std::thread::spawn(move || {
            use std::io::Write as _;
            for line in lines.map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
            }
        });
        Ok(Started { child, metrics, grpc, ready })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the bench makes its edit: one pod of namespace ns0 relabelled.
enum Edits {
    Directory(PathBuf),
    Kubernetes(kube::Client),
}

impl Edits {
    async fn make(&self, round: usize) -> anyhow::Result<()> {
        match self {
            Edits::Directory(config) => write_namespace_pods(config, 0, round),
            Edits::Kubernetes(client) => kubernetes::relabel(client, round).await,
        }
    }
}

type Report = serde_json::Map<String, serde_json::Value>;

/// `node_metrics`: where each simulated node's `/metrics` is (announced in its Hello), if anywhere.
async fn run(
    state: &Path,
    controller: &Started,
    editor: &Edits,
    node_metrics: &[SocketAddr],
) -> anyhow::Result<Report> {
    let (grpc, metrics, pid) = (controller.grpc, controller.metrics, controller.pid());
    // The trust bundle it serves (on Kubernetes its CA is in a Secret).
    let root = http_get(metrics, "/debug/ca").await?;
    let token = fs::read_to_string(state.join("join-token"))?.trim().to_owned();
    let reload_seconds = metric(metrics, "mesh_controller_config_reload_seconds").await?;
    let rss_loaded = rss_kib(pid);

    // 100 nodes join, open their streams at once, and time their snapshots.
    let barrier = Arc::new(Barrier::new(NODES + 1));
    let (edits_tx, _) = tokio::sync::broadcast::channel::<Instant>(4);
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(usize, Duration)>();
    let mut snapshots = Vec::new();
    for n in 0..NODES {
        let (root, token, barrier) = (root.clone(), token.clone(), barrier.clone());
        let mut edits = edits_tx.subscribe();
        let seen = seen_tx.clone();
        let metrics_addr = node_metrics.get(n).map(ToString::to_string).unwrap_or_default();
        snapshots.push(tokio::spawn(async move {
            let tls =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&root)).domain_name("mesh-controller");
            let endpoint = Endpoint::from_shared(format!("https://{grpc}"))?;
            let (key, csr) = key_and_csr()?;
            let join = api::JoinRequest { token, node: format!("node{n}"), csr_pem: csr };
            let channel = endpoint.clone().tls_config(tls.clone())?.connect().await?;
            let cert = NodeControlClient::new(channel).join(join).await?.into_inner().cert_pem;
            let channel = endpoint.tls_config(tls.identity(Identity::from_pem(cert, key)))?.connect().await?;
            barrier.wait().await;
            let t = Instant::now();
            let (tx, rx) = mpsc::channel(4);
            tx.send(NodeMessage {
                kind: Some(Msg::Hello(api::Hello { known: BTreeMap::new(), metrics_addr, ..Default::default() })),
            })
            .await?;
            let mut updates = NodeControlClient::new(channel)
                .max_decoding_message_size(256 << 20)
                .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            let mut received = 0;
            loop {
                let part = updates.message().await?.ok_or_else(|| anyhow::anyhow!("no snapshot"))?;
                received += part.resources.len();
                tx.send(ack(&part)).await?;
                if !part.more {
                    break;
                }
            }
            let took = t.elapsed();
            // An API server adds its own `kubernetes` Service.
            anyhow::ensure!(received >= PODS + SERVICES + POLICIES, "snapshot of {received} resources");
            tokio::spawn(async move {
                while let Ok(Some(update)) = updates.message().await {
                    if let Ok(edited) = edits.try_recv() {
                        let _ = seen.send((n, edited.elapsed()));
                    }
                    let _ = tx.send(ack(&update)).await;
                }
            });
            anyhow::Ok(took)
        }));
    }
    barrier.wait().await;
    let all = Instant::now();
    let mut snapshot_times = Vec::new();
    for s in snapshots {
        snapshot_times.push(s.await??);
    }
    let all_snapshots = all.elapsed();
    let rss_connected = rss_kib(pid);

    // One pod changes per edit; every node must receive it.
    let mut push = Vec::new();
    for round in 1..=EDITS {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let t = Instant::now();
        let _ = edits_tx.send(t);
        editor.make(round).await?;
        for _ in 0..NODES {
            let (_, d) = tokio::time::timeout(Duration::from_secs(30), seen_rx.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("clients gone"))?;
            push.push(d);
        }
    }
    let rss_edited = rss_kib(pid);
    // As a user would see it: the heap trim follows a quiet second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_settled = rss_kib(pid);
    let server_push_p50 = metric(metrics, "mesh_controller_push_latency_seconds_sum").await?
        / metric(metrics, "mesh_controller_push_latency_seconds_count").await?;

    let mut report = Report::new();
    let ms = |d: Duration| serde_json::Value::from((d.as_secs_f64() * 1e4).round() / 10.0);
    report.insert("pods".into(), PODS.into());
    report.insert("services".into(), SERVICES.into());
    report.insert("policies".into(), POLICIES.into());
    report.insert("nodes".into(), NODES.into());
    report.insert("config_load_and_model_ms".into(), ms(Duration::from_secs_f64(reload_seconds)));
    report.insert("snapshot_ms_p50".into(), ms(pct(&mut snapshot_times, 50)));
    report.insert("snapshot_ms_p99".into(), ms(pct(&mut snapshot_times, 99)));
    report.insert("all_snapshots_to_100_nodes_ms".into(), ms(all_snapshots));
    report.insert("edit_to_node_ms_p50".into(), ms(pct(&mut push, 50)));
    report.insert("edit_to_node_ms_p99".into(), ms(pct(&mut push, 99)));
    report.insert("push_after_reload_ms_mean".into(), ms(Duration::from_secs_f64(server_push_p50)));
    report.insert("edit_samples".into(), push.len().into());
    report.insert("rss_mib_loaded".into(), (rss_loaded / 1024).into());
    report.insert("rss_mib_100_nodes".into(), (rss_connected / 1024).into());
    report.insert("rss_mib_after_edits".into(), (rss_edited / 1024).into());
    report.insert("rss_mib_end".into(), (rss_settled / 1024).into());
    Ok(report)
}

fn ack(u: &api::Update) -> NodeMessage {
    NodeMessage { kind: Some(Msg::Ack(api::Ack { nonce: u.nonce, version: u.version.clone() })) }
}

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[((v.len() * p) / 100).min(v.len() - 1)]
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix(" kB")?.parse().ok()))
        .unwrap_or(0)
}

/// The body of `GET path` on the controller's HTTP port.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    let (_, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("GET {path}: no body"))?;
    Ok(body.to_owned())
}

async fn metric(addr: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let text = http_get(addr, "/metrics").await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no metric {name}"))
}

fn key_and_csr() -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// One file per namespace: the namespace, its pods (spread over the nodes),
/// services selecting pairs of pods, and policies.
fn write_config(dir: &Path, round: usize) -> anyhow::Result<()> {
    for ns in 0..NAMESPACES {
        write_namespace_pods(dir, ns, round)?;
    }
    Ok(())
}

fn write_namespace_pods(dir: &Path, ns: usize, round: usize) -> anyhow::Result<()> {
    let mut y = String::new();
    for object in namespace_objects(ns, round) {
        y.push_str("---\n");
        y.push_str(&serde_yaml_ng::to_string(&object)?);
    }
    let path = dir.join(format!("ns{ns}.yaml"));
    let tmp = dir.join(format!(".ns{ns}.yaml.tmp"));
    fs::write(&tmp, y)?;
    fs::rename(tmp, path)?;
    Ok(())
}

/// The objects of namespace `ns`, the Namespace first: the same for both
/// sources. In round `round` of the edits, its first pod's `rev` label is
/// `r<round>`.
fn namespace_objects(ns: usize, round: usize) -> Vec<serde_json::Value> {
    use serde_json::json;
    let per_ns = PODS / NAMESPACES;
    let name = format!("ns{ns}");
    let mut out = vec![json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"istio.io/dataplane-mode": "ambient"}}})];
    for p in 0..per_ns {
        let i = ns * per_ns + p;
        let rev = if p == 0 { round } else { 0 };
        let ip = format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256);
        out.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("pod{p}"), "namespace": name,
                "labels": {"app": format!("app{}", p / 5), "rev": format!("r{rev}")}},
            "spec": {"nodeName": format!("node{}", i % NODES), "serviceAccountName": format!("sa{}", p % 10),
                "containers": [{"name": "app", "image": "app"}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}));
    }
    for s in 0..SERVICES / NAMESPACES {
        let vip = ns * (SERVICES / NAMESPACES) + s;
        // 10.96.0.x is left to the API server's own `kubernetes` Service.
        out.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc{s}"), "namespace": name},
            "spec": {"selector": {"app": format!("app{}", s % (per_ns / 5))},
                "clusterIP": format!("10.96.{}.{}", 1 + vip / 256, vip % 256),
                "ports": [{"port": 80, "targetPort": 8080}]}}));
    }
    for p in 0..POLICIES / NAMESPACES {
        out.push(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": format!("pol{p}"), "namespace": name},
            "spec": {"selector": {"matchLabels": {"app": format!("app{p}")}},
                "rules": [{"from": [{"source": {"principals": [format!("cluster.local/ns/{name}/sa/sa{p}")]}}],
                    "to": [{"operation": {"ports": ["8080"]}}]}]}}));
    }
    out
}
