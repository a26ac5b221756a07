//! `mesh-controller`: reads the mesh's configuration from a directory of
//! Kubernetes-style YAML, validates it, keeps it current as files change, and
//! serves what it holds. See ARCHITECTURE.md.
mod server;
mod watch;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use mesh_controller::{
    ca::CertificateAuthority,
    config::{ConfigStore, MeshSettings, Snapshot, read_dir},
    model::MeshModel,
};
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(name = "mesh-controller", version, about = "mesh control plane")]
struct Args {
    /// Directory of YAML files (several objects per file, `---` separated); watched for changes.
    #[arg(long)]
    config_dir: PathBuf,
    /// Where the CA root (key mode 0600) is created on first start and found after.
    #[arg(long, default_value = "/var/lib/mesh-controller")]
    state_dir: PathBuf,
    /// An operator-supplied CA certificate (root or intermediate) instead of the generated root.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The key of --ca-cert (PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// For an intermediate --ca-cert: the chain up to the root (PEM, intermediates first).
    #[arg(long, requires = "ca_cert")]
    ca_chain: Option<PathBuf>,
    /// Lifetime of workload certificates, in hours (nodes renew at half-life).
    #[arg(long, default_value_t = 24)]
    cert_lifetime_hours: u64,
    /// Health (`/healthz/ready`), Prometheus `/metrics` and `/debug/*`. Port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:15014")]
    metrics_addr: SocketAddr,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// AuthorizationPolicies and PeerAuthentications here without a selector apply mesh-wide.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// How often the directory is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 100)]
    poll_ms: u64,
}

/// What the controller holds: the configuration in force and the model built from it.
pub struct State {
    pub store: ConfigStore,
    pub model: MeshModel,
    pub reloads: u64,
    pub last_reload_seconds: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let settings =
        MeshSettings { trust_domain: args.trust_domain.clone(), root_namespace: args.root_namespace.clone() };
    anyhow::ensure!(args.config_dir.is_dir(), "--config-dir {}: not a directory", args.config_dir.display());

    let lifetime = Duration::from_secs(args.cert_lifetime_hours.max(1) * 3600);
    let ca = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => CertificateAuthority::from_files(cert, key, args.ca_chain.as_deref(), lifetime),
        _ => CertificateAuthority::load_or_create(&args.state_dir, &settings.trust_domain, lifetime),
    }
    .context("certificate authority")?;
    info!(state_dir = %args.state_dir.display(), "certificate authority ready");

    let state = Arc::new(RwLock::new(State {
        store: ConfigStore::default(),
        model: MeshModel::default(),
        reloads: 0,
        last_reload_seconds: 0.0,
    }));
    let mut seen = watch::fingerprint(&args.config_dir);
    reload(&args.config_dir, &settings, &state);

    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding {} (use --metrics-addr)", args.metrics_addr))?;
    let addr = listener.local_addr()?;
    let router = server::router(state.clone(), Arc::new(ca));
    tokio::spawn(async move { axum::serve(listener, router).await });
    info!(metrics_addr = %addr, config_dir = %args.config_dir.display(), "mesh-controller ready");

    let interval = Duration::from_millis(args.poll_ms.max(10));
    loop {
        tokio::select! {
            now = watch::changed(&args.config_dir, &seen, interval) => {
                seen = now;
                reload(&args.config_dir, &settings, &state);
            }
            _ = tokio::signal::ctrl_c() => {
                info!("interrupted; exiting");
                return Ok(());
            }
        }
    }
}

/// Reads, validates and applies the directory on a copy of the store, and
/// swaps the result in: readers never wait on parsing, and never see a
/// half-applied or empty configuration.
fn reload(dir: &std::path::Path, settings: &MeshSettings, state: &RwLock<State>) {
    let started = Instant::now();
    let (docs, read_problems) = read_dir(dir);
    let snapshot = Snapshot::from_documents(&docs, read_problems);
    let mut store = state.read().unwrap_or_else(|e| e.into_inner()).store.clone();
    let report = store.apply(snapshot);
    let model = MeshModel::build(&store, settings);
    for p in store.problems() {
        warn!("rejected: {p}");
    }
    let mut s = state.write().unwrap_or_else(|e| e.into_inner());
    s.store = store;
    s.model = model;
    s.reloads += 1;
    s.last_reload_seconds = started.elapsed().as_secs_f64();
    info!(
        generation = s.store.generation(),
        objects = s.store.objects().len(),
        rejected = s.store.problems().len(),
        added = report.added.len(),
        updated = report.updated.len(),
        removed = report.removed.len(),
        kept_last_good = report.kept.len(),
        ms = s.last_reload_seconds * 1e3,
        "configuration applied"
    );
}
