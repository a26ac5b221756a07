//! `mesh-waypoint`: one waypoint instance. It joins the controller under
//! `--node-name` (the name its Pod's `spec.nodeName` gives, so the CA issues
//! it the waypoint's identity and nothing else), listens for HBONE on 15008,
//! serves `/metrics` (and `/debug/endpoints`: circuit breakers and outlier
//! detection per cluster and endpoint) on 15020 and `/healthz/ready` on 15021, and on SIGTERM
//! stops taking new tunnels (GOAWAY) and lets open requests finish.
use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use http::{Response, StatusCode, header};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proxy::{
    Proxy,
    control::{Control, ControlConfig},
};
use mesh_waypoint::{Waypoint, body, metrics::RequestMetrics, server};
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::net::TcpListener;
use tracing::info;

#[derive(Parser, Debug)]
#[command(version, about = "mesh's waypoint: L7 routing, retries, timeouts and request metrics over HBONE")]
struct Args {
    /// The controller's node API (`host:port`).
    #[arg(long)]
    controller: String,
    /// The name this instance joins as: its Pod's `spec.nodeName`.
    #[arg(long)]
    node_name: String,
    #[arg(long)]
    join_token: PathBuf,
    /// The mesh root (PEM) the controller's certificate must chain to.
    #[arg(long)]
    controller_ca: PathBuf,
    #[arg(long, default_value = "mesh-controller")]
    controller_name: String,
    /// Where the node certificate is kept across restarts.
    #[arg(long, default_value = "/var/lib/mesh-waypoint")]
    state_dir: PathBuf,
    #[arg(long, default_value = "[::]:15008")]
    hbone_addr: SocketAddr,
    #[arg(long, default_value = "[::]:15020")]
    metrics_addr: SocketAddr,
    /// Where mesh-ctl reaches this waypoint's metrics port (its pod IP and
    /// the metrics port), announced to the controller: `mesh-ctl endpoints`
    /// reads `/debug/endpoints` there.
    #[arg(long)]
    announce_addr: Option<SocketAddr>,
    #[arg(long, default_value = "[::]:15021")]
    ready_addr: SocketAddr,
    /// How long open requests may run on after SIGTERM.
    /// How often key sets named by RequestAuthentication `jwksUri`s are
    /// fetched again (Istio's PILOT_JWT_PUB_KEY_REFRESH_INTERVAL).
    #[arg(long, default_value = "20m", value_parser = |s: &str| mesh_common::parse_duration(s))]
    jwks_refresh: std::time::Duration,
    #[arg(long, default_value = "5s", value_parser = |s: &str| mesh_common::parse_duration(s))]
    drain: Duration,
    /// A plaintext HTTP listener for one service port, `ADDR=NAMESPACE/SERVICE:PORT`
    /// (repeatable): clients outside the mesh get the same routing (no identity).
    #[arg(long = "listen-plain", value_parser = parse_plain)]
    listen_plain: Vec<(SocketAddr, String, u16)>,
    /// Worker threads (Envoy's --concurrency); 0: one per CPU the process may use.
    #[arg(long, default_value_t = 0)]
    concurrency: usize,
    /// `json` for one JSON object per line (the access log too).
    #[arg(long, default_value = "text")]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_format);
    // One worker runs everything on its thread (no work stealing, no cross-thread wakeups).
    let runtime = match args.concurrency {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()?,
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    let mut registry = Registry::default();
    mesh_proxy::telemetry::register_build(&mut registry, "proxy");
    let proxy = Arc::new(Proxy::new(&mut registry));
    proxy.spawn_reaper();
    let wp = Waypoint::new(proxy.clone(), RequestMetrics::register(&mut registry));
    wp.jwks.set_refresh(args.jwks_refresh);
    let control = Control::new(
        ControlConfig {
            address: args.controller.clone(),
            node: args.node_name.clone(),
            token_file: args.join_token.clone(),
            ca_file: args.controller_ca.clone(),
            server_name: args.controller_name.clone(),
            state_dir: args.state_dir.clone(),
            admin_addr: args.announce_addr,
            // The announced address is its metrics port.
            metrics_addr: args.announce_addr.or(Some(args.metrics_addr)),
            role: "waypoint",
        },
        proxy.clone(),
    );
    control.spawn();
    tokio::spawn(keep_identity(control, wp.clone()));

    let hbone = TcpListener::bind(args.hbone_addr).await.with_context(|| format!("binding {}", args.hbone_addr))?;
    let metrics =
        TcpListener::bind(args.metrics_addr).await.with_context(|| format!("binding {}", args.metrics_addr))?;
    let ready = TcpListener::bind(args.ready_addr).await.with_context(|| format!("binding {}", args.ready_addr))?;
    info!(hbone = %args.hbone_addr, metrics = %args.metrics_addr, ready = %args.ready_addr, node = %args.node_name, "waypoint listening");
    tokio::spawn(server::serve_hbone(hbone, wp.clone()));
    for (addr, service, port) in &args.listen_plain {
        let l = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        info!(listen = %addr, service = %service, port, "plaintext listener");
        tokio::spawn(server::serve_plain(l, wp.clone(), service.clone(), *port));
    }
    let registry = Arc::new(registry);
    tokio::spawn(serve_plain(metrics, {
        let (registry, wp) = (registry.clone(), wp.clone());
        move |path: String| {
            if path == "/debug/endpoints" {
                // Circuit breakers and outlier detection, per cluster and endpoint.
                return (StatusCode::OK, "application/json", wp.clusters.describe().to_string());
            }
            let mut text = String::new();
            let _ = encode(&mut text, &registry);
            (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text)
        }
    }));
    tokio::spawn(serve_plain(ready, {
        let wp = wp.clone();
        // The body names the configuration version in force, so a rollout can wait for it.
        move |_path: String| match wp.ready() {
            true => (StatusCode::OK, "text/plain", format!("ready {}\n", wp.proxy.state.view().version)),
            false => {
                (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "no configuration or certificate yet\n".to_owned())
            }
        }
    }));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!(deadline = ?args.drain, in_flight = wp.in_flight(), "draining: no new tunnels, open requests run on");
    wp.start_drain();
    let deadline = tokio::time::Instant::now() + args.drain;
    while wp.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An ended response may still be on its way out: its HBONE connection
    // closes (GOAWAY was sent) once its streams are done and flushed.
    while wp.in_flight() == 0 && wp.hbone_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match (wp.in_flight(), wp.hbone_connections()) {
        (0, 0) => info!("drained: no request left"),
        (0, n) => info!(hbone_connections = n, "drained: no request left; closing idle HBONE connections"),
        (n, _) => tracing::warn!(in_flight = n, "drain deadline reached: cutting the requests still open"),
    }
    // The spans still batched go out (the exports block, off the runtime's threads).
    let flushing = wp.clone();
    let _ = tokio::time::timeout(Duration::from_secs(5), tokio::task::spawn_blocking(move || flushing.tracers.flush()))
        .await;
    Ok(())
}

/// Holds a certificate for the waypoint instance the controller schedules
/// under this node name, renewed at half-life; re-checked on every update.
async fn keep_identity(control: Arc<Control>, wp: Arc<Waypoint>) {
    loop {
        tokio::select! {
            () = control.changed() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let state = &control.proxy().state;
        if state.is_empty() {
            continue;
        }
        let ids: Vec<_> = state.native_tunnels(control.node()).into_iter().map(|p| p.identity).collect();
        if let Err(e) = control.sync_certificates(ids.clone()).await {
            control.set_error(&e, false);
        }
        let me = ids.into_iter().find(|id| control.proxy().identities.get(id).is_some());
        if me != wp.identity() {
            info!(identity = ?me.as_ref().map(ToString::to_string), "serving as");
            wp.set_identity(me);
        }
    }
}

/// A one-route plain HTTP server (metrics, readiness).
async fn serve_plain<F>(listener: TcpListener, answer: F)
where
    F: Fn(String) -> (StatusCode, &'static str, String) + Clone + Send + Sync + 'static,
{
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (status, kind, text) = answer(req.uri().path().to_owned());
                let mut r = Response::new(body::full(text));
                *r.status_mut() = status;
                r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static(kind));
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// `ADDR=NAMESPACE/SERVICE:PORT`.
fn parse_plain(s: &str) -> Result<(SocketAddr, String, u16), String> {
    let bad = || format!("{s:?}: expected ADDR=NAMESPACE/SERVICE:PORT, e.g. 0.0.0.0:8080=demo/backend:80");
    let (addr, target) = s.split_once('=').ok_or_else(bad)?;
    let (service, port) = target.rsplit_once(':').ok_or_else(bad)?;
    if !service.contains('/') {
        return Err(bad());
    }
    Ok((addr.parse().map_err(|_| bad())?, service.to_owned(), port.parse().map_err(|_| bad())?))
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
    if format == "json" {
        builder.json().flatten_event(true).with_current_span(false).init();
    } else {
        builder.with_ansi(false).init();
    }
}
