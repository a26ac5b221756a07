//! The agent's local API on the admin port (a config dump; the pods'
//! network namespaces as a CNI hook reports them; enrolment by hand when no
//! controller runs) and its readiness endpoint. Who may call what is
//! [`access`]'s decision.
pub mod access;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use mesh_common::admin::{ConfigDump, PoolStats, ProxyStatus};
use serde::Deserialize;
use serde_json::json;

use crate::{
    control::Control,
    pods::{EnrollError, PodSpec, Pods},
    proxy::ProxyContext,
};

#[derive(Clone)]
pub struct AdminState {
    pub pods: Pods,
    pub instance: String,
    /// Set when a controller decides which pods are enrolled.
    pub control: Option<Arc<Control>>,
    pub proxy: Arc<ProxyContext>,
}

pub fn admin_router(state: AdminState, access: access::Access) -> Router {
    Router::new()
        .route("/config_dump", get(config_dump))
        .route("/pods", get(list_pods).post(enroll).delete(unenroll))
        .route("/netns", get(reported).put(report).delete(forget))
        .route("/connections", get(connections))
        .layer(axum::middleware::from_fn_with_state(access, access::guard))
        .with_state(state)
}

/// `GET /healthz/ready`: 200 once every listener of the agent is bound.
pub fn readiness_router(ready: Arc<AtomicBool>) -> Router {
    Router::new().route(
        "/healthz/ready",
        get(move || async move {
            if ready.load(Ordering::Acquire) {
                (StatusCode::OK, "ready\n")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
            }
        }),
    )
}

async fn config_dump(State(s): State<AdminState>) -> Response {
    let (pods, dataplane) = (s.pods.list().to_vec(), s.pods.dataplane_status().await);
    let proxy = &s.proxy.proxy;
    let (connections, dialed) = proxy.pool.stats();
    let mut dump = ConfigDump {
        instance: s.instance.clone(),
        pods,
        dataplane,
        hbone_pool: PoolStats { connections, dialed },
        proxy: ProxyStatus { version: proxy.state.view().version.clone() },
        ..ConfigDump::default()
    };
    if let Some(c) = &s.control {
        let store = proxy.state.dump();
        dump.controller = Some(c.status().clone());
        dump.version = Some(store.version);
        dump.workloads = Some(store.workloads);
        dump.services = Some(store.services);
        dump.policies = Some(store.policies);
        dump.routes = Some(store.routes);
        dump.certificates = Some(proxy.identities.views());
        dump.node_certificate = c.node_certificate();
    }
    Json(dump).into_response()
}

/// `GET /connections`: the connections the proxy carries now, with bytes so far.
async fn connections(State(s): State<AdminState>) -> Response {
    Json(s.proxy.proxy.connections.list()).into_response()
}

async fn list_pods(State(s): State<AdminState>) -> Response {
    Json(s.pods.list().to_vec()).into_response()
}

async fn enroll(State(s): State<AdminState>, body: axum::body::Bytes) -> Response {
    if let Some(refusal) = managed(&s) {
        return refusal;
    }
    let spec: PodSpec = match serde_json::from_slice(&body) {
        Ok(spec) => spec,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("request body: {e}")),
    };
    match s.pods.enroll(spec).await {
        Ok(view) => (StatusCode::CREATED, Json(view)).into_response(),
        Err(e) => enroll_error(e),
    }
}

/// `PUT /netns {"name":"ns/pod","netns":"/run/netns/x"}`: where a pod's
/// network namespace is on this node, as a CNI plugin reports it. With a
/// controller, the pod is enrolled once the controller schedules it here in
/// an ambient namespace; without one, `POST /pods` enrolls.
async fn report(State(s): State<AdminState>, body: axum::body::Bytes) -> Response {
    let spec: PodSpec = match serde_json::from_slice(&body) {
        Ok(spec) => spec,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("request body: {e}")),
    };
    match s.pods.report(spec).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => enroll_error(e),
    }
}

async fn forget(State(s): State<AdminState>, Query(q): Query<NameQuery>) -> Response {
    match s.pods.forget(q.name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => enroll_error(e),
    }
}

async fn reported(State(s): State<AdminState>) -> Response {
    Json(s.pods.reported().await).into_response()
}

#[derive(Deserialize)]
struct NameQuery {
    name: String,
}

async fn unenroll(State(s): State<AdminState>, Query(q): Query<NameQuery>) -> Response {
    if let Some(refusal) = managed(&s) {
        return refusal;
    }
    match s.pods.unenroll(q.name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => enroll_error(e),
    }
}

/// With a controller, the controller's configuration decides which pods are enrolled.
fn managed(s: &AdminState) -> Option<Response> {
    s.control.as_ref().map(|_| {
        error(
            StatusCode::CONFLICT,
            "this agent's pods are managed by the controller: report the pod's network namespace \
             (PUT /netns) and label its namespace istio.io/dataplane-mode=ambient in the configuration"
                .into(),
        )
    })
}

fn enroll_error(e: EnrollError) -> Response {
    let status = match e {
        EnrollError::AlreadyEnrolled(_) | EnrollError::NetnsTaken { .. } => StatusCode::CONFLICT,
        EnrollError::NotEnrolled(_) | EnrollError::NotReported(_) => StatusCode::NOT_FOUND,
        EnrollError::InvalidName(_)
        | EnrollError::NoAddresses(_)
        | EnrollError::Netns(_)
        | EnrollError::RelativeNetns(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}
