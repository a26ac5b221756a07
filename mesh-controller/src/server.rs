//! The controller's HTTP port: readiness (with rejected objects), Prometheus
//! metrics, and JSON dumps of the configuration and the model.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, RwLock},
};

use axum::{Json, Router, extract::State as AxState, http::header, response::IntoResponse, routing::get};
use serde_json::json;

use mesh_controller::ca::CertificateAuthority;

use crate::State;

type Shared = Arc<RwLock<State>>;

pub fn router(state: Shared, ca: Arc<CertificateAuthority>) -> Router {
    Router::new()
        .route("/healthz/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/debug/config", get(config))
        .route("/debug/model", get(model))
        .with_state(state)
        // The trust anchor is public; issuing goes over the authenticated node channel.
        .route("/debug/ca", get(move || async move { ca.root_pem().to_string() }))
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
    Json(json!({ "generation": s.store.generation(), "objects": objects, "problems": s.store.problems() }))
}

async fn model(AxState(s): AxState<Shared>) -> impl IntoResponse {
    Json(serde_json::to_value(&read(&s).model).unwrap_or_default())
}

async fn metrics(AxState(s): AxState<Shared>) -> impl IntoResponse {
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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
