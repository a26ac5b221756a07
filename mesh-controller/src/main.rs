//! `mesh-controller`: reads the mesh's configuration from a directory of
//! Kubernetes-style YAML or from a Kubernetes API server, validates it, keeps
//! it current as it changes, and serves what it holds. See ARCHITECTURE.md.
mod server;
mod watch;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use mesh_common::{
    api::node_control_server::NodeControlServer,
    istio_ca::istio_certificate_service_server::IstioCertificateServiceServer,
};
use mesh_controller::{
    admission,
    ca::CertificateAuthority,
    config::{ApplyReport, ConfigStore, Document, MeshSettings, ParseCache, Problem, Snapshot, read_dir},
    istio_ca, kubernetes, leader,
    model::MeshModel,
    node_api::{self, Hub, NodeService},
    serving::{self, ServingCert},
    status::{self, StatusWriter},
};
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(name = "mesh-controller", version, about = "mesh control plane")]
struct Args {
    /// Directory of YAML files (several objects per file, `---` separated); watched for changes.
    #[arg(long, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    config_dir: Option<PathBuf>,
    /// Read the configuration from the Kubernetes API server instead: every
    /// kind mesh reads, watched. In a pod it uses its service account;
    /// elsewhere --kubeconfig, $KUBECONFIG or ~/.kube/config.
    #[arg(long)]
    kubernetes: bool,
    /// The kubeconfig file for --kubernetes.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// With --kubernetes: the ConfigMap (NAMESPACE/NAME) where the trust
    /// bundle is published (key `root-cert.pem`) for node agents to mount.
    #[arg(long, default_value = "mesh-system/mesh-ca-root", value_parser = namespaced)]
    trust_bundle_configmap: (String, String),
    /// With --kubernetes: the Lease (NAMESPACE/NAME) controller replicas
    /// elect their leader with; only the leader writes objects' status.
    #[arg(long, default_value = "mesh-system/mesh-controller", value_parser = namespaced)]
    leader_lease: (String, String),
    /// How long a leader's lease holds unrenewed (renewed every third of it).
    #[arg(long, default_value = "15s", value_parser = mesh_common::parse_duration)]
    leader_lease_duration: Duration,
    /// With --kubernetes: the service accounts (NAMESPACE/NAME, comma
    /// separated) of Istio node agents that may ask Istio's certificate API
    /// for the certificates of workloads on their node (ImpersonatedIdentity).
    #[arg(long, default_value = "istio-system/ztunnel", value_parser = namespaced, value_delimiter = ',')]
    istio_ca_impersonators: Vec<(String, String)>,
    /// With --kubernetes: the node agents' service account (NAMESPACE/NAME).
    /// An agent joins with its pod's projected token for audience
    /// `mesh-controller`, and only as the node its pod is scheduled on.
    #[arg(long, default_value = "mesh-system/mesh-node", value_parser = namespaced)]
    node_service_account: (String, String),
    /// With --kubernetes: the validating admission webhook (HTTPS, the
    /// serving certificate of --grpc-san's names), at path /validate.
    #[arg(long, default_value = "0.0.0.0:15017")]
    webhook_addr: SocketAddr,
    /// With --kubernetes: the ValidatingWebhookConfiguration whose CA bundle
    /// the controller sets to the mesh's trust bundle (deploy/controller/).
    #[arg(long, requires = "kubernetes")]
    webhook_config: Option<String>,
    /// With --kubernetes (and no --ca-cert): the Secret (NAMESPACE/NAME)
    /// holding the CA, with Istio's keys (ca-cert.pem, ca-key.pem, and for an
    /// intermediate cert-chain.pem or root-cert.pem); created with a new root
    /// by the first replica to start when missing. Istio's plugged-in CA
    /// Secret (istio-system/cacerts) can be named as it is.
    #[arg(long, default_value = "mesh-system/mesh-ca", value_parser = namespaced)]
    ca_secret: (String, String),
    /// Where the CA root (key mode 0600) is created on first start and found
    /// after, when the configuration is a directory.
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
    /// More roots (PEM) to trust beside the CA's own, sent to every node with
    /// its certificates: for a root rotation (see ARCHITECTURE.md, "Rotating
    /// the root CA").
    #[arg(long)]
    trust_bundle: Option<PathBuf>,
    /// Lifetime of workload certificates (`24h`, `30m`, `90s`); nodes renew at half-life.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// Lifetime of the node API's serving certificate, renewed at half-life
    /// while the controller runs.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    serving_cert_lifetime: Duration,
    /// Lifetime of node certificates, renewed at half-life. A node whose
    /// certificate expires (a controller outage longer than half of it)
    /// needs a new join token, so it is long: a week.
    #[arg(long, default_value = "168h", value_parser = parse_duration)]
    node_cert_lifetime: Duration,
    /// The node API (gRPC over TLS; mTLS after joining). Port 0 picks one.
    #[arg(long, default_value = "0.0.0.0:15012")]
    grpc_addr: SocketAddr,
    /// Extra DNS names for the controller's serving certificate (nodes verify
    /// `mesh-controller` unless told otherwise).
    #[arg(long = "grpc-san")]
    grpc_sans: Vec<String>,
    /// A shared token any node may join with, under any node name (created,
    /// mode 0600, when missing). Without it nodes join with their own
    /// single-use tokens (`mesh-ctl node add NAME`); a <state-dir>/join-token
    /// left by an earlier version is still honoured.
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// How long a token from `mesh-ctl node add` stays valid, unless it says otherwise.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    node_token_ttl: Duration,
    /// Health (`/healthz/ready`), Prometheus `/metrics` and `/debug/*`. Port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:15014")]
    metrics_addr: SocketAddr,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// AuthorizationPolicies and PeerAuthentications here without a selector apply mesh-wide.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// How often the service graph (`/graph`) scrapes the proxies' metrics
    /// while someone looks at it (it does not otherwise).
    #[arg(long, default_value = "5s", value_parser = |s: &str| mesh_common::parse_duration(s))]
    graph_scrape_interval: Duration,
    /// How often the directory is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 100)]
    poll_ms: u64,
}

/// What the controller holds: the configuration in force and the model built from it.
pub struct State {
    /// The configuration directory (`mesh-ctl enroll` edits files there);
    /// `None` when the configuration comes from Kubernetes.
    pub config_dir: Option<PathBuf>,
    pub store: ConfigStore,
    pub model: Arc<MeshModel>,
    /// Times the directory was read (a Prometheus counter: the registry shares it).
    pub reloads: prometheus_client::metrics::counter::Counter,
    pub last_reload_seconds: f64,
    /// On Kubernetes: whether this replica holds the leader lease.
    pub leader: Option<tokio::sync::watch::Receiver<bool>>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    // Each reload builds a new model and frees the old one on a blocking
    // thread's arena: without a trim, glibc keeps every arena at its high water.
    mesh_common::heap::spawn_trimmer();
    let settings =
        MeshSettings { trust_domain: args.trust_domain.clone(), root_namespace: args.root_namespace.clone() };
    let config_dir = match &args.config_dir {
        Some(dir) => {
            anyhow::ensure!(dir.is_dir(), "--config-dir {}: not a directory", dir.display());
            // Absolute, so problems and origins name files the same way wherever the
            // reader (a person, `mesh-ctl`) stands.
            Some(std::fs::canonicalize(dir).with_context(|| format!("--config-dir {}", dir.display()))?)
        }
        None => None,
    };
    // Before anything is served: a controller that cannot reach its API
    // server says so at once instead of serving an empty mesh.
    let kubernetes = match args.kubernetes {
        true => Some(kubernetes::client(args.kubeconfig.as_deref()).await?),
        false => None,
    };

    let lifetime = args.cert_lifetime;
    let ca = match (&args.ca_cert, &args.ca_key, &kubernetes) {
        (Some(cert), Some(key), _) => CertificateAuthority::from_files(cert, key, args.ca_chain.as_deref(), lifetime),
        (_, _, Some(client)) => {
            let (namespace, name) = &args.ca_secret;
            let what = format!("the CA in Secret {namespace}/{name}");
            let td = &settings.trust_domain;
            let files = kubernetes::until_done(&what, || kubernetes::ca_in_secret(client, namespace, name, td)).await;
            files.authority(&what, lifetime)
        }
        _ => CertificateAuthority::load_or_create(&args.state_dir, &settings.trust_domain, lifetime),
    }
    .context("certificate authority")?;
    let mut ca = ca;
    if let Some(file) = &args.trust_bundle {
        let pem = std::fs::read_to_string(file).with_context(|| format!("--trust-bundle {}", file.display()))?;
        ca.trust_also(&pem, file)?;
    }
    let ca = Arc::new(ca);
    info!(state_dir = %args.state_dir.display(), "certificate authority ready");
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("--state-dir {}", args.state_dir.display()))?;
    let legacy = args.state_dir.join("join-token");
    let shared = match &args.join_token_file {
        Some(file) => Some(file.clone()),
        None => legacy.exists().then_some(legacy),
    };
    let shared_token = match &shared {
        Some(file) => {
            warn!(
                file = %file.display(),
                "a shared join token is in use: whoever holds it can join as any node name; \
                 prefer per-node tokens (mesh-ctl node add NAME) and remove the file"
            );
            Some(node_api::join_token(file).with_context(|| format!("join token {}", file.display()))?)
        }
        None => None,
    };
    let registry = node_api::Registry::open(&args.state_dir.join("nodes.json"))?;
    let mut hub = Hub::new(ca.clone(), shared_token, registry, settings.trust_domain.clone(), args.node_cert_lifetime);
    if let Some(client) = &kubernetes {
        let (namespace, service_account) = args.node_service_account.clone();
        hub = hub.with_token_join(node_api::service_account::TokenJoin {
            client: client.clone(),
            namespace,
            service_account,
        });
    }
    let hub = Arc::new(hub);

    let state = Arc::new(RwLock::new(State {
        config_dir: config_dir.clone(),
        store: ConfigStore::default(),
        model: Arc::default(),
        reloads: Default::default(),
        last_reload_seconds: 0.0,
        leader: None,
    }));
    let cache = Arc::new(Mutex::new(ParseCache::default()));
    let root_namespace = settings.root_namespace.clone();
    let reloader = Reloader { settings, state: state.clone(), hub: hub.clone(), cache };
    // Leader election and, for the leader, objects' status.
    let status = match &kubernetes {
        Some(client) => {
            let (namespace, name) = args.leader_lease.clone();
            let (tx, rx) = tokio::sync::watch::channel(false);
            let election =
                leader::run(client.clone(), namespace, name, leader::identity(), args.leader_lease_duration, tx);
            tokio::spawn(election);
            state.write().unwrap_or_else(|e| e.into_inner()).leader = Some(rx.clone());
            let (docs_tx, docs_rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
            let writer = StatusWriter::new(client.clone());
            tokio::spawn(write_status(writer, state.clone(), docs_rx, rx));
            Some(docs_tx)
        }
        None => None,
    };
    let mut source = match (&config_dir, &kubernetes) {
        (Some(dir), _) => {
            let (docs, problems) = read_dir(dir);
            reloader.reload(docs, problems);
            Source::Directory { dir: dir.clone(), seen: watch::fingerprint(dir) }
        }
        (None, Some(client)) => Source::kubernetes(client.clone(), root_namespace, &reloader).await?,
        (None, None) => unreachable!("clap requires --config-dir or --kubernetes"),
    };
    if let (Some(docs), Source::Kubernetes { objects, .. }) = (&status, &source) {
        docs.send_replace(Arc::new(status::marked_documents(&objects.documents())));
    }

    let grpc = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("binding {} (use --grpc-addr)", args.grpc_addr))?;
    let grpc_addr = grpc.local_addr()?;
    let (names, ips) = serving_names(grpc_addr, &args.grpc_sans);
    let serving =
        ServingCert::new(ca.clone(), names, ips, args.serving_cert_lifetime).context("serving certificate")?;
    let tls = Arc::new(serving::server_config(&ca, serving.clone())?);
    if let Some(client) = &kubernetes {
        let listener = tokio::net::TcpListener::bind(args.webhook_addr)
            .await
            .with_context(|| format!("binding {} (use --webhook-addr)", args.webhook_addr))?;
        let addr = admission::serve(listener, serving.clone())?;
        info!(webhook_addr = %addr, path = admission::PATH, "admission webhook serving");
        let bundle = ca.trust_bundle();
        if let Some(name) = args.webhook_config.clone() {
            let (client, bundle) = (client.clone(), bundle.clone());
            tokio::spawn(async move {
                let what = format!("setting the CA bundle of ValidatingWebhookConfiguration {name}");
                kubernetes::until_done(&what, || admission::patch_ca_bundle(&client, &name, &bundle)).await;
            });
        }
        let ((namespace, name), client) = (args.trust_bundle_configmap.clone(), client.clone());
        tokio::spawn(async move {
            let what = format!("publishing the trust bundle in ConfigMap {namespace}/{name}");
            let publish = || kubernetes::publish_trust_bundle(&client, &namespace, &name, &bundle);
            kubernetes::until_done(&what, publish).await;
        });
    }
    tokio::spawn(serving.renew_forever());
    let service = NodeControlServer::new(NodeService(hub.clone()));
    // On Kubernetes, Istio's certificate API beside the node API, as istiod serves it.
    let istio_ca = kubernetes.as_ref().map(|client| {
        IstioCertificateServiceServer::new(istio_ca::IstioCa {
            ca: ca.clone(),
            hub: hub.clone(),
            client: client.clone(),
            trust_domain: args.trust_domain.clone(),
            impersonators: args.istio_ca_impersonators.clone(),
        })
    });
    let server = tonic::transport::Server::builder().add_service(service).add_optional_service(istio_ca);
    tokio::spawn(server.serve_with_incoming(serving::incoming("node API", grpc, tls)));

    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding {} (use --metrics-addr)", args.metrics_addr))?;
    let addr = listener.local_addr()?;
    let graphs = mesh_controller::graph::Collector::new(hub.clone(), args.graph_scrape_interval);
    tokio::spawn(graphs.clone().run());
    let router = server::router(state.clone(), ca, hub.clone(), args.node_token_ttl, graphs);
    let service = router.into_make_service_with_connect_info::<server::Caller>();
    tokio::spawn(async move { axum::serve(listener, service).await });
    info!(metrics_addr = %addr, grpc_addr = %grpc_addr, source = %source, "mesh-controller ready");

    let interval = Duration::from_millis(args.poll_ms.max(10));
    loop {
        tokio::select! {
            reload = source.changed(interval) => {
                // Parsing and building the model is CPU work: off the async workers
                // that serve the nodes' streams.
                let r = reloader.clone();
                let for_status = status.is_some().then(|| source.marked_documents());
                let _ = tokio::task::spawn_blocking(move || match reload {
                    Reload::All(docs, problems) => r.reload(docs, problems),
                    Reload::Changed(delta) => r.reload_changed(delta),
                })
                .await;
                if let (Some(tx), Some(docs)) = (&status, for_status) {
                    tx.send_replace(Arc::new(docs));
                }
            }
            _ = tokio::signal::ctrl_c() => {
                info!("interrupted; exiting");
                return Ok(());
            }
        }
    }
}

/// What a source's change asks of the configuration.
enum Reload {
    /// Every document, read again (a directory, a relist).
    All(Vec<Document>, Vec<Problem>),
    /// Only these documents changed (watch events).
    Changed(kubernetes::Delta),
}

/// Where the configuration comes from, and what it has seen of it.
enum Source {
    Directory { dir: PathBuf, seen: watch::Fingerprint },
    Kubernetes { changes: tokio::sync::mpsc::Receiver<kubernetes::Change>, objects: kubernetes::Objects },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Directory { dir, .. } => write!(f, "directory {}", dir.display()),
            Source::Kubernetes { .. } => f.write_str("Kubernetes API server"),
        }
    }
}

impl Source {
    /// Watches the API server, and applies what it holds once every kind
    /// has been listed completely (a model of part of the cluster would
    /// remove the rest from the nodes).
    async fn kubernetes(client: kube::Client, root_namespace: String, reloader: &Reloader) -> anyhow::Result<Source> {
        let (served, missing) = kubernetes::discover(&client).await.context("discovering the API server's kinds")?;
        if !missing.is_empty() {
            let names: Vec<String> = missing.iter().map(|k| format!("{}.{}", k.plural(), k.group())).collect();
            warn!(
                "the API server does not serve {}: objects of these kinds are not read until their CRDs \
                 are installed (deploy/crds) and the controller restarted",
                names.join(", ")
            );
        }
        let kinds: Vec<mesh_controller::config::Kind> = served.iter().map(|s| s.kind).collect();
        let mut changes = kubernetes::watch(client, served, root_namespace);
        let mut objects = kubernetes::Objects::default();
        while !objects.listed(&kinds) {
            let change = changes.recv().await.context("the API server's watches ended")?;
            objects.apply(change);
        }
        let docs = objects.documents();
        objects.take_delta();
        let r = reloader.clone();
        tokio::task::spawn_blocking(move || r.reload(docs, Vec::new())).await?;
        Ok(Source::Kubernetes { changes, objects })
    }

    /// What changed, once something has.
    async fn changed(&mut self, interval: Duration) -> Reload {
        match self {
            Source::Directory { dir, seen } => {
                *seen = watch::changed(dir, seen, interval).await;
                let (docs, problems) = read_dir(dir);
                Reload::All(docs, problems)
            }
            Source::Kubernetes { changes, objects } => loop {
                let Some(change) = changes.recv().await else { return std::future::pending().await };
                let mut changed = objects.apply(change);
                // A burst (a relist, `kubectl apply` of many objects) is one reload.
                while let Ok(change) = changes.try_recv() {
                    changed |= objects.apply(change);
                }
                if !changed {
                    continue;
                }
                let delta = objects.take_delta();
                return match delta.everything {
                    true => Reload::All(objects.documents(), Vec::new()),
                    false => Reload::Changed(delta),
                };
            },
        }
    }

    /// The documents of the objects whose status the leader writes.
    fn marked_documents(&self) -> Vec<Document> {
        match self {
            Source::Directory { .. } => Vec::new(),
            Source::Kubernetes { objects, .. } => {
                status::marked_documents(&objects.documents_of(|k| !k.group().is_empty()))
            }
        }
    }
}

/// While this replica leads: brings the `Accepted` condition of every Istio
/// object up to date after each reload, and once on gaining leadership.
async fn write_status(
    writer: StatusWriter,
    state: Arc<RwLock<State>>,
    mut docs: tokio::sync::watch::Receiver<Arc<Vec<Document>>>,
    mut leader: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let leads = *leader.borrow_and_update();
        let current = docs.borrow_and_update().clone();
        if leads && !current.is_empty() {
            let (problems, in_force, instances) = {
                let s = state.read().unwrap_or_else(|e| e.into_inner());
                let in_force: std::collections::BTreeSet<PathBuf> =
                    s.store.objects().values().map(|o| o.origin.file.clone()).collect();
                (s.store.problems().to_vec(), in_force, s.model.waypoint_instances())
            };
            writer.update(&current, &problems, &in_force, &instances).await;
        }
        tokio::select! {
            changed = docs.changed() => if changed.is_err() { return },
            changed = leader.changed() => if changed.is_err() { return },
        }
    }
}

/// Everything a reload needs.
#[derive(Clone)]
struct Reloader {
    settings: MeshSettings,
    state: Arc<RwLock<State>>,
    hub: Arc<Hub>,
    cache: Arc<Mutex<ParseCache>>,
}

impl Reloader {
    /// Validates and applies the source's documents on a copy of the store,
    /// and swaps the result in: readers never wait on parsing, and never see a
    /// half-applied or empty configuration. Unchanged documents are not parsed again.
    fn reload(&self, docs: Vec<Document>, read_problems: Vec<Problem>) {
        let started = Instant::now();
        let snapshot = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            Snapshot::from_documents_cached(&docs, read_problems, &mut cache)
        };
        let mut store = self.state.read().unwrap_or_else(|e| e.into_inner()).store.clone();
        let report = store.apply(snapshot);
        self.swap_in(store, report, started);
    }

    /// Like [`Self::reload`], reading only the documents that changed (the
    /// API server's watch events): an edit costs one object's parsing.
    fn reload_changed(&self, delta: kubernetes::Delta) {
        let started = Instant::now();
        let changed: Vec<Document> = delta.changed.into_values().collect();
        let removed: Vec<PathBuf> = delta.removed.into_iter().collect();
        let mut store = self.state.read().unwrap_or_else(|e| e.into_inner()).store.clone();
        let report = store.apply_changed(&changed, &removed);
        self.swap_in(store, report, started);
    }

    /// Builds and publishes the model of `store` when its objects changed,
    /// and makes it the configuration in force.
    fn swap_in(&self, store: ConfigStore, report: ApplyReport, started: Instant) {
        let parsed = started.elapsed();
        // The model is made of the objects in force alone: when none
        // changed (a status written, an object's bookkeeping, a file touched)
        // there is nothing to build or send.
        let (first, in_force) = {
            let s = self.state.read().unwrap_or_else(|e| e.into_inner());
            (s.reloads.get() == 0, s.model.clone())
        };
        let mut built = parsed;
        let mut rebuilt = false;
        let model = if report.changed() || first {
            // Pods alone change their workloads and their services'
            // endpoints; anything else builds the model anew.
            let by_pods = (!first).then(|| in_force.with_pods_changed(&store, &self.settings, &report)).flatten();
            rebuilt = by_pods.is_none();
            let model = Arc::new(by_pods.unwrap_or_else(|| MeshModel::build(&store, &self.settings)));
            built = started.elapsed();
            self.hub.publish(model.clone());
            model
        } else {
            in_force
        };
        let published = started.elapsed();
        // Said once per change of the object, not at every reload.
        for w in report.added.iter().chain(&report.updated).flat_map(|k| store.warnings_of(k)) {
            warn!("warning: {w}");
        }
        let problems = store.problems().to_vec();
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        let old = (std::mem::replace(&mut s.store, store), std::mem::replace(&mut s.model, model));
        s.reloads.inc();
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
            parse_and_store_ms = parsed.as_secs_f64() * 1e3,
            model_ms = (built - parsed).as_secs_f64() * 1e3,
            model_rebuilt = rebuilt,
            publish_ms = (published - built).as_secs_f64() * 1e3,
            "configuration applied"
        );
        drop(s);
        // Said when a problem appears, not again at every reload after it
        // (at scale each edit had repeated every standing rejection).
        let known: std::collections::HashSet<&Problem> = old.0.problems().iter().collect();
        for p in problems.iter().filter(|p| !known.contains(p)) {
            warn!("rejected: {p}");
        }
        drop(old); // freed outside the lock
    }
}

/// TLS for the node API: a serving certificate from the mesh CA; client
/// certificates are checked against the root when presented (they must be,
/// for every call but `Join`).
/// The names and addresses the serving certificate carries.
fn serving_names(addr: SocketAddr, extra: &[String]) -> (Vec<String>, Vec<std::net::IpAddr>) {
    let mut names = vec!["mesh-controller".to_owned(), "localhost".to_owned()];
    names.extend(extra.iter().cloned());
    let mut ips = vec![std::net::IpAddr::from([127, 0, 0, 1]), std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)];
    if !addr.ip().is_unspecified() && !ips.contains(&addr.ip()) {
        ips.push(addr.ip());
    }
    (names, ips)
}

/// A Kubernetes object's `NAMESPACE/NAME`, as flags name them.
fn namespaced(s: &str) -> Result<(String, String), String> {
    match s.trim().split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(format!("{s:?}: expected NAMESPACE/NAME")),
    }
}

/// `24h`, `30m`, `90s` or plain seconds; at least 10 s.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = mesh_common::parse_duration(s)?;
    if d < Duration::from_secs(10) {
        return Err(format!("{s:?}: certificates must last at least 10s"));
    }
    Ok(d)
}
