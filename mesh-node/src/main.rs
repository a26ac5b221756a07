//! `mesh-node`: the per-node agent. It loads mesh's eBPF programs, enrolls pods
//! (redirecting their TCP traffic to itself) and proxies that traffic.
//! See ARCHITECTURE.md for the path of one connection.
mod admin;
mod cni;
mod control;
mod ebpf;
mod handoff;
mod metrics_server;
mod netns;
mod pods;
mod proxy;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    admin::AdminState,
    control::{Control, ControlConfig},
    ebpf::{Dataplane, DataplaneConfig, DataplaneError},
    pods::{Enrolment, Pods},
    proxy::{Ports, ProxyContext, ProxySettings, limits},
};

/// Exit code when the kernel lacks an eBPF feature the agent needs.
const EXIT_UNSUPPORTED: u8 = 3;

#[derive(Parser, Debug)]
#[command(name = "mesh-node", version, about = "mesh node agent: eBPF redirection and the node proxy")]
struct Args {
    /// Name of this agent; several agents on one kernel need distinct names.
    /// Pins live in <bpffs>/mesh/<instance>, state in <state-dir>/<instance>.
    #[arg(long, default_value = "default")]
    instance: String,
    /// Where bpffs is (or will be) mounted.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// The cgroup v2 directory whose sockets are redirected; its root sees every
    /// pod. Default: /sys/fs/cgroup when that is cgroup2, else /sys/fs/cgroup/unified.
    #[arg(long)]
    cgroup_path: Option<PathBuf>,
    /// Directory for the list of enrolled pods, so a restart takes them back.
    #[arg(long, default_value = "/run/mesh-node")]
    state_dir: PathBuf,
    /// The local API and config dump. Bind it to a private address (not
    /// loopback) and it is announced to the controller, so `mesh-ctl` on
    /// another host can read what this node sees.
    /// Changes (`POST`/`PUT`/`DELETE`) are taken only from this node itself;
    /// other hosts may only read, with `--admin-token-file`'s token.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// A file holding the bearer token other hosts (`mesh-ctl
    /// --admin-token-file`) present to read the admin API. Read again at each
    /// such request, so it can be rotated in place. Without it, only this
    /// node may use the admin API.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// `GET /healthz/ready` answers 200 once every listener is bound.
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// Prometheus `/metrics` (Istio's `istio_tcp_*` and the proxy's own).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Mark set on the proxy's own sockets (the redirect skips marked sockets).
    #[arg(long, default_value_t = mesh_common::DEFAULT_PROXY_MARK, value_parser = parse_u32)]
    proxy_mark: u32,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// On exit, detach every program and remove every pin and state file.
    /// Without it the programs stay attached, so enrolled pods fail closed
    /// until the agent is back.
    #[arg(long)]
    cleanup: bool,
    /// The controller's node API (`host:port`). Without it the agent runs
    /// alone and pods are enrolled through the admin API.
    #[arg(long, requires_all = ["node_name", "join_token", "controller_ca"])]
    controller: Option<String>,
    /// This node's name, as pods name it in `spec.nodeName`.
    #[arg(long)]
    node_name: Option<String>,
    /// File holding the join token (used once; the node certificate is kept in the state dir).
    #[arg(long)]
    join_token: Option<PathBuf>,
    /// The mesh root (PEM) that the controller's certificate must chain to.
    #[arg(long)]
    controller_ca: Option<PathBuf>,
    /// The name the controller's certificate must carry.
    #[arg(long, default_value = "mesh-controller")]
    controller_name: String,
    /// On SIGTERM/SIGINT: readiness turns false, the listeners close (new
    /// connections fail closed) and HBONE peers are told to go away; open
    /// connections may finish for this long before the agent exits. Istio's
    /// default drain duration (`500ms`, `5s`, `1m`).
    #[arg(long, default_value = "5s", value_parser = mesh_common::parse_duration)]
    drain_timeout: std::time::Duration,
    /// Connections the node proxy holds at once; more are reset on arrival
    /// (`mesh_node_connections_refused_total`). Default: what the open-file
    /// limit allows (two descriptors each, 1024 kept for the agent).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Connections one pod holds at once (its outbound ones, and the inbound
    /// ones and tunnels to it), so a flood to or from one pod cannot starve
    /// the others. Default: a quarter of --max-connections.
    #[arg(long)]
    max_connections_per_pod: Option<usize>,
    /// Where the container runtime pins pods' network namespaces
    /// (containerd and CRI-O: /run/netns). With it, the agent finds there
    /// the namespaces of pods the controller places on this node that no CNI
    /// ADD reported (pods that predate the CNI plugin), by their addresses.
    #[arg(long, requires = "controller")]
    discover_netns_dir: Option<PathBuf>,
    /// A peer on 15008 must finish TLS and HTTP/2's preface within this, or
    /// it is cut off (a slowloris, a handshake that never finishes).
    #[arg(long, default_value = "10s", value_parser = mesh_common::parse_duration)]
    hbone_handshake_timeout: std::time::Duration,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let unsupported =
                e.downcast_ref::<DataplaneError>().is_some_and(|d| matches!(d, DataplaneError::Unsupported { .. }));
            error!("{}", error_chain(&e));
            if unsupported { ExitCode::from(EXIT_UNSUPPORTED) } else { ExitCode::FAILURE }
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    raise_fd_limit();
    let token = args.admin_token_file.clone().map(admin::access::TokenFile::open).transpose()?;
    let cgroup = args.cgroup_path.clone().unwrap_or_else(default_cgroup_path);
    let dataplane = Dataplane::start(DataplaneConfig {
        pin_dir: args.bpffs.join("mesh").join(&args.instance),
        cgroup,
        proxy_mark: args.proxy_mark,
        outbound_port: mesh_common::OUTBOUND_PORT,
        inbound_bypass_port: mesh_common::HBONE_PORT,
    })?;
    let mut registry = prometheus_client::registry::Registry::default();
    mesh_proxy::telemetry::register_build(&mut registry, "ztunnel");
    let proxy = Arc::new(mesh_proxy::Proxy::new(&mut registry));
    proxy.spawn_reaper();
    let open_files = open_file_limit();
    let max_connections = args.max_connections.unwrap_or_else(|| limits::default_node_max(open_files));
    let settings = ProxySettings {
        mark: args.proxy_mark,
        max_connections,
        max_connections_per_pod: args
            .max_connections_per_pod
            .unwrap_or_else(|| limits::default_pod_max(max_connections)),
        hbone_handshake_timeout: args.hbone_handshake_timeout,
    };
    info!(
        open_files,
        max_connections = settings.max_connections,
        max_connections_per_pod = settings.max_connections_per_pod,
        "connection limits"
    );
    let ctx = Arc::new(ProxyContext::new(proxy.clone(), &settings, dataplane.orig_dst_table(), &mut registry));
    let gauges = metrics_server::NodeGauges::register(&mut registry);
    let ports = Ports {
        outbound: mesh_common::OUTBOUND_PORT,
        inbound: mesh_common::INBOUND_PORT,
        hbone: mesh_common::HBONE_PORT,
    };
    let state_dir = args.state_dir.join(&args.instance);
    let mut enrolment = Enrolment::new(dataplane, ctx.clone(), ports, &state_dir)
        .with_context(|| format!("state directory {}", state_dir.display()))?;
    // The configuration and certificates a previous agent persisted are in
    // force before any pod accepts a connection (a restarted or upgraded
    // agent serves at once, from the first connection).
    let control = match (&args.controller, &args.node_name, &args.join_token, &args.controller_ca) {
        (Some(address), Some(node), Some(token_file), Some(ca_file)) => Some(Control::new(
            ControlConfig {
                address: address.clone(),
                node: node.clone(),
                token_file: token_file.clone(),
                ca_file: ca_file.clone(),
                server_name: args.controller_name.clone(),
                state_dir: state_dir.clone(),
                admin_addr: Some(args.admin_addr).filter(|a| !a.ip().is_loopback()),
                metrics_addr: Some(args.metrics_addr).filter(|a| !a.ip().is_loopback()),
                role: "",
            },
            proxy.clone(),
        )),
        _ => None,
    };
    // An agent of this instance still running hands its listeners over.
    let mut takeover = handoff::take_over(&state_dir).unwrap_or_else(|e| {
        warn!(error = %e, "the running agent did not hand its listeners over; binding afresh");
        None
    });
    if let Some(t) = &mut takeover {
        info!(pods = t.pods.len(), "taking over from the running agent");
        enrolment.inherit(std::mem::take(&mut t.pods));
    }
    let pods = Pods::start(enrolment).await;
    if let Some(t) = takeover {
        // Accepting on the handed sockets now: the old agent may stop, and free its ports.
        match tokio::task::spawn_blocking(move || t.accepting(std::time::Duration::from_secs(10))).await? {
            Ok(()) => info!("the previous agent stopped accepting and released its ports"),
            Err(e) => warn!(error = %e, "the previous agent did not confirm the handoff"),
        }
    }
    if let Some(control) = &control {
        control::spawn(control, pods.clone(), args.discover_netns_dir.clone());
        let socket = cni::serve(&state_dir, pods.clone(), control.clone())
            .with_context(|| format!("the CNI plugin's socket in {}", state_dir.display()))?;
        info!(socket = %socket.display(), "serving the CNI plugin");
    }

    let ready = Arc::new(AtomicBool::new(false));
    let access = admin::access::Access::new(token, &mut registry);
    let admin = bind(args.admin_addr).await.with_context(|| {
        format!("binding the admin port {} (another agent there? use --admin-addr)", args.admin_addr)
    })?;
    let readiness = bind(args.readiness_addr)
        .await
        .with_context(|| format!("binding the readiness port {}", args.readiness_addr))?;
    let metrics_listener =
        bind(args.metrics_addr).await.with_context(|| format!("binding the metrics port {}", args.metrics_addr))?;
    let registry = Arc::new(registry);
    let mut servers =
        vec![tokio::spawn(metrics_server::serve(metrics_listener, registry, gauges, pods.clone(), ctx.clone()))];
    let admin_state = AdminState {
        pods: pods.clone(),
        instance: args.instance.clone(),
        control: control.clone(),
        proxy: ctx.clone(),
    };
    let admin_service =
        admin::admin_router(admin_state, access).into_make_service_with_connect_info::<admin::access::AdminPeer>();
    servers.push(tokio::spawn(async move {
        let _ = axum::serve(admin, admin_service).await;
    }));
    servers.push(tokio::spawn({
        let ready = ready.clone();
        async move {
            let _ = axum::serve(readiness, admin::readiness_router(ready)).await;
        }
    }));
    let mut upgrades = handoff::offer(&state_dir);
    ready.store(true, Ordering::Release);
    info!(
        instance = %args.instance, admin = %args.admin_addr, readiness = %args.readiness_addr,
        metrics = %args.metrics_addr, "mesh-node ready"
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut handed_over = false;
    loop {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
            Some(request) = upgrades.recv() => {
                if !hand_over(request, &pods, &ready, &servers).await {
                    continue;
                }
                handed_over = true;
            }
        }
        break;
    }
    ready.store(false, Ordering::Release);
    drain(&pods, &proxy, args.drain_timeout).await;
    if handed_over {
        info!("exiting: a new agent serves the pods");
    } else if args.cleanup {
        if let Some(control) = &control {
            control.forget_persisted();
        }
        pods.cleanup().await?;
        info!("cleaned up: no programs, links, pins or state of this instance remain");
    } else {
        info!("exiting; programs stay attached so enrolled pods fail closed until an agent is back");
    }
    Ok(())
}

/// Binds `addr`; while a previous agent is letting its ports go (a handoff),
/// tries again for a while.
async fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            result => return result,
        }
    }
}

/// Hands the pods' listeners to the new agent that asked; once it accepts
/// on them, stops accepting and frees the ports. `false` when the handoff
/// failed: this agent goes on serving as before.
async fn hand_over(
    request: handoff::Request,
    pods: &Pods,
    ready: &AtomicBool,
    servers: &[tokio::task::JoinHandle<()>],
) -> bool {
    let handed = pods.hand_off().await;
    let count = handed.len();
    let sent = tokio::task::spawn_blocking(move || request.hand_over(&handed).map(|()| request)).await;
    let request = match sent.map_err(std::io::Error::other).and_then(|r| r) {
        Ok(request) => request,
        Err(e) => {
            pods.resume().await;
            warn!(error = %e, "handoff to a new agent failed; this agent goes on serving");
            return false;
        }
    };
    ready.store(false, Ordering::Release);
    pods.stop_accepting().await;
    for server in servers {
        server.abort();
    }
    // The aborted servers' listeners close as their tasks are dropped.
    tokio::task::yield_now().await;
    if let Err(e) = request.released() {
        warn!(error = %e, "could not tell the new agent the ports are free (it binds them when it can)");
    }
    info!(pods = count, "handed the pods' listeners to a new agent; draining the open connections");
    true
}

/// Stops taking connections and waits (up to `timeout`) for the open ones to end.
async fn drain(pods: &Pods, proxy: &mesh_proxy::Proxy, timeout: std::time::Duration) {
    pods.stop_accepting().await;
    proxy.start_drain();
    let open = proxy.connections.len();
    info!(open, timeout_ms = timeout.as_millis() as u64, "draining: not ready, listeners closed");
    let deadline = tokio::time::Instant::now() + timeout;
    while !proxy.connections.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    match proxy.connections.len() {
        0 => info!("drained: no connection left"),
        n => warn!(open = n, "drain deadline reached: closing the connections still open"),
    }
}

/// A proxy holds two sockets per connection: take the hard limit on open
/// files, as Envoy and ztunnel do, instead of the usual soft 1024.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    // The agent runs privileged: it may go past the hard limit it inherited,
    // up to the kernel's ceiling, as a node proxy carrying every pod's
    // connections should. Else up to the hard limit.
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(ceiling) = ceiling.filter(|c| *c > hard)
        && setrlimit(Resource::RLIMIT_NOFILE, ceiling, ceiling).is_ok()
    {
        return;
    }
    if soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit");
    }
}

/// The open-file limit in force (after [`raise_fd_limit`]).
fn open_file_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// The error and its causes on one line, skipping a cause whose text the
/// message before it already includes.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// The cgroup v2 root: /sys/fs/cgroup on unified hosts (Kubernetes nodes), or
/// /sys/fs/cgroup/unified on hybrid ones (this project's CI machines).
fn default_cgroup_path() -> PathBuf {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let root = PathBuf::from("/sys/fs/cgroup");
    let is_cgroup2 = nix::sys::statfs::statfs(&root).is_ok_and(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC);
    if is_cgroup2 { root } else { root.join("unified") }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_writer(std::io::stdout);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}
