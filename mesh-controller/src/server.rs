//! The controller's HTTP port: readiness (with rejected objects), Prometheus
//! metrics, JSON dumps of the configuration and the model, and the node
//! registry (`/nodes`: adding a node and removing one only from this host),
//! and the live service graph (`/graph`).
mod graph;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, RwLock, atomic::AtomicU64},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{ConnectInfo, Path, Query, State as AxState, connect_info::Connected},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::IncomingStream,
};
use serde_json::json;

use mesh_controller::{
    ca::CertificateAuthority,
    node_api::{Hub, IstiodCounter},
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::State;

type Shared = Arc<RwLock<State>>;

pub fn router(
    state: Shared,
    ca: Arc<CertificateAuthority>,
    hub: Arc<Hub>,
    token_ttl: Duration,
    graphs: Arc<mesh_controller::graph::Collector>,
) -> Router {
    let nodes_hub = hub.clone();
    let registry_routes = Router::new()
        .route("/nodes", get(registered))
        .route("/nodes/{name}", post(add_node).delete(remove_node))
        .with_state(Registrar { hub: hub.clone(), token_ttl });
    let reloads = read(&state).reloads.clone();
    let registry = Arc::new(registry(&hub, &reloads));
    Router::new()
        .route("/healthz/ready", get(ready))
        .route("/metrics", get(move |s| metrics(s, hub, registry)))
        .route("/debug/config", get(config))
        .route("/debug/model", get(model))
        .with_state(state)
        // The trust anchor is public; issuing goes over the authenticated node channel.
        .route("/debug/ca", get(move || async move { ca.trust_bundle() }))
        .route("/debug/nodes", get(move || nodes(nodes_hub)))
        .merge(registry_routes)
        .merge(graph::routes(graphs))
}

/// Both ends of a connection to this port.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    remote: SocketAddr,
    local: Option<SocketAddr>,
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Caller { remote: *stream.remote_addr(), local: stream.io().local_addr().ok() }
    }
}

#[derive(Clone)]
struct Registrar {
    hub: Arc<Hub>,
    token_ttl: Duration,
}

#[derive(serde::Deserialize)]
struct AddQuery {
    /// `30m`, `1h`, ...: how long the token may be used.
    ttl: Option<String>,
}

/// The refusal of a change from another host: registering and revoking nodes is
/// done on the controller's host (as `mesh-ctl node add` run there).
fn local_only(caller: Caller) -> Option<Response> {
    if mesh_common::admin::is_local_caller(caller.remote.ip(), caller.local.map(|l| l.ip())) {
        return None;
    }
    tracing::warn!(peer = %caller.remote, "node registry change refused: not from this host");
    Some(error(StatusCode::FORBIDDEN, "nodes are added and removed only from the controller's host".into()))
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// `POST /nodes/NAME[?ttl=1h]`: registers a node; answers its single-use join token.
async fn add_node(
    AxState(r): AxState<Registrar>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Path(name): Path<String>,
    Query(q): Query<AddQuery>,
) -> Response {
    if let Some(refusal) = local_only(caller) {
        return refusal;
    }
    let ttl = match q.ttl.as_deref().map(mesh_common::parse_duration).transpose() {
        Ok(ttl) => ttl.unwrap_or(r.token_ttl),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("ttl: {e}")),
    };
    match r.hub.add_node(&name, ttl) {
        Ok(added) => (StatusCode::CREATED, Json(added)).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

/// `DELETE /nodes/NAME`: revokes a node at once.
async fn remove_node(
    AxState(r): AxState<Registrar>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Path(name): Path<String>,
) -> Response {
    if let Some(refusal) = local_only(caller) {
        return refusal;
    }
    match r.hub.revoke(&name) {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("node {name:?} is not registered")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("saving the node registry: {e}")),
    }
}

/// `GET /nodes`: the registry (no token hashes: `pending` while unused).
async fn registered(AxState(r): AxState<Registrar>) -> impl IntoResponse {
    Json(r.hub.registry.list())
}

fn read(s: &Shared) -> std::sync::RwLockReadGuard<'_, State> {
    s.read().unwrap_or_else(|e| e.into_inner())
}

/// Ready once the configuration is loaded; says which objects are rejected.
async fn ready(AxState(s): AxState<Shared>) -> impl IntoResponse {
    let s = read(&s);
    let rejected: Vec<String> = s.store.problems().iter().map(ToString::to_string).collect();
    let warnings: Vec<String> = s.store.warnings().iter().map(ToString::to_string).collect();
    // On Kubernetes: whether this replica leads (writes objects' status).
    let leader = s.leader.as_ref().map(|l| *l.borrow());
    Json(json!({
        "ready": true,
        "generation": s.store.generation(),
        "rejected": rejected,
        "warnings": warnings,
        "leader": leader,
    }))
}

async fn config(AxState(s): AxState<Shared>) -> impl IntoResponse {
    let s = read(&s);
    let objects: Vec<_> = s
        .store
        .objects()
        .iter()
        .map(|(k, v)| json!({ "key": k.to_string(), "origin": v.origin, "object": v.resource }))
        .collect();
    Json(json!({
        "config_dir": s.config_dir,
        "source": if s.config_dir.is_some() { "directory" } else { "kubernetes" },
        "generation": s.store.generation(),
        "objects": objects,
        "problems": s.store.problems(),
    }))
}

async fn model(AxState(s): AxState<Shared>) -> impl IntoResponse {
    Json(serde_json::to_value(&read(&s).model).unwrap_or_default())
}

/// Every node that has connected: stream state, versions sent and acknowledged, NACKs.
async fn nodes(hub: Arc<Hub>) -> impl IntoResponse {
    let version = hub.current().wire.version.clone();
    let nodes = hub.nodes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Json(mesh_common::admin::NodeList { version, nodes })
}

/// The controller's own figures about its configuration, sampled from the
/// state at each scrape; the node API's families are registered by the hub.
#[derive(Clone, Default)]
struct ConfigGauges {
    objects: Family<KindLabel, Gauge>,
    problems: Gauge,
    generation: Gauge,
    reload_seconds: Gauge<f64, AtomicU64>,
    workloads: Gauge,
    nodes_connected: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// Istio's `istio_build` labels: which component, which version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub component: &'static str,
    pub tag: &'static str,
}

/// The process's one registry: the hub's families, the reload counter and
/// the configuration gauges.
fn registry(hub: &Hub, reloads: &Counter) -> (Registry, ConfigGauges) {
    let mut registry = Registry::default();
    let g = ConfigGauges::default();
    registry.register("mesh_controller_config_objects", "Objects in force, by kind.", g.objects.clone());
    registry.register(
        "mesh_controller_config_problems",
        "Problems in the latest configuration (rejected objects, unreadable files, duplicates).",
        g.problems.clone(),
    );
    registry.register(
        "mesh_controller_config_generation",
        "Generation of the configuration in force.",
        g.generation.clone(),
    );
    registry.register("mesh_controller_config_reloads", "Times the configuration directory was read.", reloads.clone());
    registry.register(
        "mesh_controller_config_reload_seconds",
        "Duration of the latest read, validation and model build.",
        g.reload_seconds.clone(),
    );
    registry.register("mesh_controller_workloads", "Workloads in the model.", g.workloads.clone());
    registry.register("mesh_controller_nodes_connected", "Nodes with an open stream.", g.nodes_connected.clone());
    // istiod's names for what Istio's Control Plane and Mesh dashboards read.
    registry.register("pilot_xds", "Nodes with an open stream (istiod's name).", g.nodes_connected.clone());
    let build = Family::<BuildLabels, Gauge>::default();
    build.get_or_create(&BuildLabels { component: "pilot", tag: env!("CARGO_PKG_VERSION") }).set(1);
    registry.register("istio_build", "The running build (Istio's istio_build, component pilot).", build);
    let (passed, failed) = &*mesh_controller::admission::VALIDATIONS;
    registry.register("galley_validation_passed", "Admission reviews that admitted.", IstiodCounter(passed.clone()));
    registry.register("galley_validation_failed", "Admission reviews that refused.", IstiodCounter(failed.clone()));
    hub.metrics.register(&mut registry);
    (registry, g)
}

async fn metrics(
    AxState(s): AxState<Shared>,
    hub: Arc<Hub>,
    metrics: Arc<(Registry, ConfigGauges)>,
) -> impl IntoResponse {
    let (registry, g) = &*metrics;
    {
        let s = read(&s);
        let mut by_kind: BTreeMap<String, i64> = BTreeMap::new();
        for key in s.store.objects().keys() {
            *by_kind.entry(format!("{:?}", key.kind)).or_default() += 1;
        }
        g.objects.clear();
        for (kind, n) in by_kind {
            g.objects.get_or_create(&KindLabel { kind }).set(n);
        }
        g.problems.set(s.store.problems().len() as i64);
        g.generation.set(s.store.generation() as i64);
        g.reload_seconds.set(s.last_reload_seconds);
        g.workloads.set(s.model.workloads.len() as i64);
    }
    let connected = hub.nodes.lock().unwrap_or_else(|e| e.into_inner()).values().filter(|n| n.connected).count();
    g.nodes_connected.set(connected as i64);
    let mut body = String::new();
    let _ = encode(&mut body, registry);
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
}
