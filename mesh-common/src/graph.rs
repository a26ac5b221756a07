//! The service graph: who talks to whom, as the proxies counted it. One
//! model, three renderings (text, Graphviz DOT, SVG laid out by rust-sugiyama),
//! shared by the controller's `/graph` page and `mesh-ctl graph`.
mod counts;
mod svg;

use std::{collections::BTreeMap, fmt::Write as _};

pub use counts::{Counts, graph};

use serde::{Deserialize, Serialize};

/// Beyond this many edges a layout may take seconds (rust-sugiyama on
/// this machine: 360 densely crossing edges in 50 ms, 1 800 in 2.6 s, 3 600
/// in 34 s; chains of 5 000 in 45 ms): such a graph is drawn a namespace
/// at a time.
pub const MAX_LAYOUT_EDGES: usize = 1000;

/// A workload (`namespace/name`) or a service (its host).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Vertex {
    Workload {
        namespace: String,
        name: String,
    },
    Service {
        namespace: String,
        host: String,
    },
    /// A client the mesh does not know (outside it, or not yet in its configuration).
    Unknown,
}

impl Vertex {
    pub fn label(&self) -> String {
        match self {
            Vertex::Workload { namespace, name } => format!("{name}.{namespace}"),
            Vertex::Service { host, .. } => host.clone(),
            Vertex::Unknown => "unknown".into(),
        }
    }

    pub fn namespace(&self) -> Option<&str> {
        match self {
            Vertex::Workload { namespace, .. } | Vertex::Service { namespace, .. } => Some(namespace),
            Vertex::Unknown => None,
        }
    }

    /// A DOT identifier.
    fn id(&self) -> String {
        let raw = match self {
            Vertex::Workload { namespace, name } => format!("w_{namespace}_{name}"),
            Vertex::Service { host, .. } => format!("s_{host}"),
            Vertex::Unknown => "unknown".into(),
        };
        raw.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
    }
}

/// One edge's traffic over the graph's window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    /// HTTP requests per second (waypoints' counts), and the share of them that failed (5xx).
    pub requests_per_second: f64,
    pub error_ratio: f64,
    /// The 99th percentile of the requests' duration, when there were requests.
    pub p99_ms: Option<f64>,
    /// TCP bytes per second, both ways (node proxies' counts).
    pub bytes_per_second: f64,
    /// Connections opened per second.
    pub connections_per_second: f64,
    /// Every connection or request on it was mutual TLS.
    pub mtls: bool,
    /// Connections or requests a policy denied in the window.
    pub denied: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceGraph {
    /// The window the rates are over, in seconds.
    pub window_seconds: f64,
    /// A list in JSON (`{from, to, ...traffic}`): a map's keys must be strings there.
    #[serde(with = "edge_list")]
    pub edges: BTreeMap<(Vertex, Vertex), Traffic>,
}

/// One edge as JSON has it.
#[derive(Serialize, Deserialize)]
struct Edge<V, T> {
    from: V,
    to: V,
    #[serde(flatten)]
    traffic: T,
}

mod edge_list {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(edges: &BTreeMap<(Vertex, Vertex), Traffic>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(edges.iter().map(|((from, to), traffic)| Edge { from, to, traffic }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<(Vertex, Vertex), Traffic>, D::Error> {
        let list: Vec<Edge<Vertex, Traffic>> = Vec::deserialize(d)?;
        Ok(list.into_iter().map(|e| ((e.from, e.to), e.traffic)).collect())
    }
}

impl ServiceGraph {
    /// The edges with an end in `namespace` (a large mesh is looked at a namespace at a time).
    pub fn in_namespace(&self, namespace: &str) -> ServiceGraph {
        let edges = self
            .edges
            .iter()
            .filter(|((a, b), _)| a.namespace() == Some(namespace) || b.namespace() == Some(namespace))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        ServiceGraph { window_seconds: self.window_seconds, edges }
    }

    pub fn vertices(&self) -> Vec<&Vertex> {
        let mut v: Vec<&Vertex> = self.edges.keys().flat_map(|(a, b)| [a, b]).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Without the hop through waypoints: a waypoint's workload reached from
    /// a service is the TCP the node proxies carried to it, which its own
    /// HTTP edges (service to the workloads that answered) already show.
    pub fn hide_waypoints(&mut self, waypoints: &std::collections::BTreeSet<Vertex>) {
        self.edges.retain(|(from, to), _| !(matches!(from, Vertex::Service { .. }) && waypoints.contains(to)));
    }

    /// One line per edge: `from -> to  rates`.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for ((from, to), t) in &self.edges {
            let _ = writeln!(out, "{} -> {}  {}", from.label(), to.label(), summary(t, true));
        }
        out
    }

    /// Graphviz DOT: services as boxes, workloads as ellipses; an edge is
    /// red and dashed when a policy denied some of its traffic, thick when
    /// all of it was mutual TLS (`penwidth`).
    pub fn to_dot(&self) -> String {
        let mut out = String::from("digraph mesh {\n");
        for v in self.vertices() {
            let shape = match v {
                Vertex::Service { .. } => "box",
                _ => "ellipse",
            };
            let _ = writeln!(out, "  {} [label=\"{}\", shape={shape}];", v.id(), escape(&v.label()));
        }
        for ((from, to), t) in &self.edges {
            let mut attrs = vec![format!("label=\"{}\"", escape(&summary(t, false)))];
            if t.denied > 0 {
                attrs.push("color=\"red\"".into());
                attrs.push("style=\"dashed\"".into());
            }
            if t.mtls {
                attrs.push("penwidth=2".into());
            }
            let _ = writeln!(out, "  {} -> {} [{}];", from.id(), to.id(), attrs.join(", "));
        }
        out.push_str("}\n");
        out
    }

    /// SVG, laid out by rust-sugiyama (`svg.rs`).
    pub fn to_svg(&self) -> Result<String, String> {
        if self.edges.len() > MAX_LAYOUT_EDGES {
            return Err(format!(
                "{} edges are too many to lay out (at most {MAX_LAYOUT_EDGES}): choose a namespace",
                self.edges.len()
            ));
        }
        Ok(svg::draw(self))
    }
}

/// What an edge carries, in a few words (a drawing shows mTLS by the line).
fn summary(t: &Traffic, mtls: bool) -> String {
    let mut parts = Vec::new();
    if t.requests_per_second > 0.0 {
        parts.push(format!("{:.1} rps", t.requests_per_second));
        parts.push(format!("{:.1}% err", t.error_ratio * 100.0));
        if let Some(p99) = t.p99_ms {
            parts.push(format!("p99 {p99:.0} ms"));
        }
    }
    if t.bytes_per_second > 0.0 || t.connections_per_second > 0.0 {
        parts.push(format!("{}/s", bytes(t.bytes_per_second)));
    }
    if t.mtls && mtls {
        parts.push("mTLS".into());
    }
    if t.denied > 0 {
        parts.push(format!("{} denied", t.denied));
    }
    parts.join(", ")
}

fn bytes(b: f64) -> String {
    match b {
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b:.0} B"),
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph() -> ServiceGraph {
        let w = |ns: &str, n: &str| Vertex::Workload { namespace: ns.into(), name: n.into() };
        let s = |h: &str| Vertex::Service { namespace: "demo".into(), host: h.into() };
        let mut g = ServiceGraph { window_seconds: 30.0, ..Default::default() };
        g.edges.insert(
            (w("demo", "frontend"), s("backend.demo.svc.cluster.local")),
            Traffic {
                requests_per_second: 12.5,
                error_ratio: 0.02,
                p99_ms: Some(41.0),
                mtls: true,
                ..Default::default()
            },
        );
        g.edges.insert(
            (w("demo", "backend"), s("redis.demo.svc.cluster.local")),
            Traffic { bytes_per_second: 2048.0, connections_per_second: 0.5, mtls: true, ..Default::default() },
        );
        g.edges.insert(
            (w("demo", "tester"), s("redis.demo.svc.cluster.local")),
            Traffic { connections_per_second: 0.1, mtls: true, denied: 3, ..Default::default() },
        );
        g
    }

    #[test]
    fn renderings_name_every_vertex_and_edge() {
        let g = graph();
        let text = g.to_text();
        assert!(
            text.contains("frontend.demo -> backend.demo.svc.cluster.local  12.5 rps, 2.0% err, p99 41 ms, mTLS"),
            "{text}"
        );
        assert!(text.contains("tester.demo -> redis.demo.svc.cluster.local  0 B/s, mTLS, 3 denied"), "{text}");
        let dot = g.to_dot();
        assert!(dot.contains("w_demo_tester -> s_redis_demo_svc_cluster_local ["), "{dot}");
        assert!(dot.contains("color=\"red\", style=\"dashed\", penwidth=2"), "the denial is marked: {dot}");
        let svg = g.to_svg().expect("laid out");
        assert!(svg.starts_with("<svg") || svg.contains("<svg"), "{svg}");
        for v in g.vertices() {
            assert!(svg.contains(&v.label()), "{} is drawn", v.label());
        }
        assert!(svg.contains("3 denied"), "the denied edge's label is drawn");
        let empty = ServiceGraph::default().to_svg().expect("an empty graph is drawn too");
        assert!(empty.contains("no traffic in the window"), "{empty}");
        if let Ok(path) = std::env::var("MESH_GRAPH_SVG") {
            std::fs::write(path, &svg).unwrap();
        }
    }

    #[test]
    fn json_has_a_list_of_edges_and_reads_back() {
        let g = graph();
        let json = serde_json::to_value(&g).unwrap();
        let first = &json["edges"][0];
        assert_eq!(first["from"], serde_json::json!({"kind": "workload", "namespace": "demo", "name": "backend"}));
        assert_eq!(first["to"]["kind"], "service");
        assert_eq!(first["bytes_per_second"], 2048.0);
        let back: ServiceGraph = serde_json::from_value(json).unwrap();
        assert_eq!(back, g);
        assert_eq!(g.in_namespace("demo").edges.len(), 3);
        assert!(g.in_namespace("other").edges.is_empty());
    }

    #[test]
    fn the_hop_to_a_waypoint_is_hidden() {
        let w = |n: &str| Vertex::Workload { namespace: "demo".into(), name: n.into() };
        let backend = Vertex::Service { namespace: "demo".into(), host: "backend.demo.svc.cluster.local".into() };
        let mut g = ServiceGraph::default();
        for edge in [(w("frontend"), backend.clone()), (backend.clone(), w("waypoint")), (backend, w("backend"))] {
            g.edges.insert(edge, Traffic::default());
        }
        g.hide_waypoints(&[w("waypoint")].into());
        let left: Vec<String> = g.edges.keys().map(|(a, b)| format!("{} -> {}", a.label(), b.label())).collect();
        assert_eq!(
            left,
            ["frontend.demo -> backend.demo.svc.cluster.local", "backend.demo.svc.cluster.local -> backend.demo"]
        );
    }
}
