//! The service graph on the controller's HTTP port: `/graph` (a page that
//! refreshes itself), `/graph.json`, `/graph.svg` and `/graph.dot`, each
//! with `?window=30s` and `?namespace=NS`.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use mesh_controller::graph::{Collector, Snapshot};

const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct Graphs {
    collector: Arc<Collector>,
    /// The latest SVG, so that a page refreshing faster than the scrapes
    /// does not lay the same graph out again.
    svg: Arc<Mutex<Option<Drawn>>>,
}

#[derive(Clone)]
struct Drawn {
    scrape: u64,
    query: String,
    svg: Arc<String>,
}

#[derive(serde::Deserialize)]
struct GraphQuery {
    /// `30s`, `1m`: the rates' window.
    window: Option<String>,
    namespace: Option<String>,
}

pub fn routes(collector: Arc<Collector>) -> Router {
    Router::new()
        .route("/graph", get(|| async { Html(include_str!("graph.html")) }))
        .route("/graph.json", get(json))
        .route("/graph.svg", get(svg))
        .route("/graph.dot", get(dot))
        .with_state(Graphs { collector, svg: Arc::default() })
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn snapshot(g: &Graphs, q: &GraphQuery) -> Result<Snapshot, Response> {
    let window = match q.window.as_deref().map(mesh_common::parse_duration).transpose() {
        Ok(w) => w.unwrap_or(DEFAULT_WINDOW),
        Err(e) => return Err(error(StatusCode::BAD_REQUEST, format!("window: {e}"))),
    };
    let mut snapshot = g.collector.graph(window).await;
    if let Some(ns) = q.namespace.as_deref().filter(|ns| !ns.is_empty()) {
        snapshot.graph = snapshot.graph.in_namespace(ns);
    }
    Ok(snapshot)
}

async fn json(State(g): State<Graphs>, Query(q): Query<GraphQuery>) -> Response {
    match snapshot(&g, &q).await {
        Ok(s) => Json(s).into_response(),
        Err(e) => e,
    }
}

async fn dot(State(g): State<Graphs>, Query(q): Query<GraphQuery>) -> Response {
    match snapshot(&g, &q).await {
        Ok(s) => ([(header::CONTENT_TYPE, "text/vnd.graphviz")], s.graph.to_dot()).into_response(),
        Err(e) => e,
    }
}

async fn svg(State(g): State<Graphs>, Query(q): Query<GraphQuery>) -> Response {
    let s = match snapshot(&g, &q).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    let key = format!("{:?}/{:?}", q.namespace, q.window);
    let cached = g.svg.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let svg = match cached {
        Some(d) if d.scrape == s.scrape && d.query == key => d.svg,
        _ => {
            // Laying out is CPU work: off the workers that serve the nodes' streams.
            let graph = s.graph;
            match tokio::task::spawn_blocking(move || graph.to_svg()).await {
                Ok(Ok(svg)) => {
                    let svg = Arc::new(svg);
                    let drawn = Drawn { scrape: s.scrape, query: key, svg: svg.clone() };
                    *g.svg.lock().unwrap_or_else(|e| e.into_inner()) = Some(drawn);
                    svg
                }
                // The one refusal: too many edges to lay out.
                Ok(Err(e)) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("{e} (?namespace=)")),
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("laying the graph out: {e}")),
            }
        }
    };
    ([(header::CONTENT_TYPE, "image/svg+xml")], (*svg).clone()).into_response()
}
