//! The controller's HTTP port: readiness (with rejected objects), Prometheus
//! metrics, and JSON dumps of the configuration and the model.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, RwLock},
};

use axum::{Json, Router, extract::State as AxState, http::header, response::IntoResponse, routing::get};
use serde_json::json;

use mesh_controller::{
    ca::CertificateAuthority,
    node_api::{Hub, LATENCY_BUCKETS},
};

use crate::State;

type Shared = Arc<RwLock<State>>;

pub fn router(state: Shared, ca: Arc<CertificateAuthority>, hub: Arc<Hub>) -> Router {
    let nodes_hub = hub.clone();
    Router::new()
        .route("/healthz/ready", get(ready))
        .route("/metrics", get(move |s| metrics(s, hub)))
        .route("/debug/config", get(config))
        .route("/debug/model", get(model))
        .with_state(state)
        // The trust anchor is public; issuing goes over the authenticated node channel.
        .route("/debug/ca", get(move || async move { ca.root_pem().to_string() }))
        .route("/debug/nodes", get(move || nodes(nodes_hub)))
}

fn read(s: &Shared) -> std::sync::RwLockReadGuard<'_, State> {
    s.read().unwrap_or_else(|e| e.into_inner())
}

/// Ready once the configuration is loaded; says which objects are rejected.
async fn ready(AxState(s): AxState<Shared>) -> impl IntoResponse {
    let s = read(&s);
    let rejected: Vec<String> = s.store.problems().iter().map(ToString::to_string).collect();
    Json(json!({ "ready": true, "generation": s.store.generation(), "rejected": rejected }))
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
    Json(json!({ "version": version, "nodes": nodes }))
}

async fn metrics(AxState(s): AxState<Shared>, hub: Arc<Hub>) -> impl IntoResponse {
    let s = read(&s);
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for key in s.store.objects().keys() {
        *by_kind.entry(format!("{:?}", key.kind)).or_default() += 1;
    }
    let mut out = String::new();
    let _ = writeln!(out, "# HELP mesh_controller_config_objects Objects in force, by kind.");
    let _ = writeln!(out, "# TYPE mesh_controller_config_objects gauge");
    for (kind, n) in by_kind {
        let _ = writeln!(out, "mesh_controller_config_objects{{kind=\"{kind}\"}} {n}");
    }
    let metric = |out: &mut String, name: &str, kind: &str, help: &str, v: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    metric(
        &mut out,
        "mesh_controller_config_problems",
        "gauge",
        "Problems in the latest configuration (rejected objects, unreadable files, duplicates).",
        s.store.problems().len() as f64,
    );
    metric(
        &mut out,
        "mesh_controller_config_generation",
        "gauge",
        "Generation of the configuration in force.",
        s.store.generation() as f64,
    );
    metric(
        &mut out,
        "mesh_controller_config_reloads_total",
        "counter",
        "Times the configuration directory was read.",
        s.reloads as f64,
    );
    metric(
        &mut out,
        "mesh_controller_config_reload_seconds",
        "gauge",
        "Duration of the latest read, validation and model build.",
        s.last_reload_seconds,
    );
    metric(&mut out, "mesh_controller_workloads", "gauge", "Workloads in the model.", s.model.workloads.len() as f64);
    let connected = hub.nodes.lock().unwrap_or_else(|e| e.into_inner()).values().filter(|n| n.connected).count();
    metric(&mut out, "mesh_controller_nodes_connected", "gauge", "Nodes with an open stream.", connected as f64);
    let c = hub.counters.lock().unwrap_or_else(|e| e.into_inner());
    metric(&mut out, "mesh_controller_pushes_total", "counter", "Updates sent to nodes.", c.pushes as f64);
    metric(
        &mut out,
        "mesh_controller_resync_resources_total",
        "counter",
        "Resources sent in the first update of node streams (0 when nodes resume in sync).",
        c.resync_resources as f64,
    );
    metric(&mut out, "mesh_controller_nacks_total", "counter", "Updates nodes rejected.", c.nacks as f64);
    metric(
        &mut out,
        "mesh_controller_certificates_issued_total",
        "counter",
        "Certificates issued.",
        c.certificates as f64,
    );
    metric(
        &mut out,
        "mesh_controller_node_requests_refused_total",
        "counter",
        "Node requests refused (bad token, not a node certificate, identity not on the node).",
        c.refused as f64,
    );
    let name = "mesh_controller_push_latency_seconds";
    let _ = writeln!(out, "# HELP {name} From a configuration change to its update sent on a node's stream.");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (le, n) in LATENCY_BUCKETS.iter().zip(c.push_latency.buckets) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", c.push_latency.count);
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", c.push_latency.sum, c.push_latency.count);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
