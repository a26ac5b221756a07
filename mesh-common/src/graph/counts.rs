//! The graph's edges from the proxies' own counters: Istio's metrics as a
//! proxy's `/metrics` gives them (prometheus-parse reads the text), summed
//! over proxies, and two such sums a window apart made into rates.
//!
//! Which reports count, so that no connection counts twice: HTTP is the
//! waypoints' (`reporter="waypoint"`); TCP is the client's node proxy's
//! (`reporter="source"`), or the server's when the client is outside the
//! mesh (`source_workload="unknown"`); denials are the server side's
//! (`response_flags="RBAC"`: node proxies refuse connections, waypoints
//! requests).
use std::collections::BTreeMap;

use prometheus_parse::{Sample, Scrape, Value};

use super::{ServiceGraph, Traffic, Vertex};

/// Cumulative counts per edge.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    edges: BTreeMap<(Vertex, Vertex), EdgeCounts>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct EdgeCounts {
    requests: f64,
    errors: f64,
    /// The request duration histogram's cumulative buckets: (upper bound in ms, count).
    buckets: Vec<(f64, f64)>,
    bytes: f64,
    opened: f64,
    denied: f64,
    /// Requests or connections that were not mutual TLS.
    plaintext: f64,
}

fn label<'a>(s: &'a Sample, name: &str) -> &'a str {
    s.labels.get(name).unwrap_or("unknown")
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Counter(n) | Value::Gauge(n) | Value::Untyped(n) => *n,
        _ => 0.0,
    }
}

fn workload(s: &Sample, side: &str) -> Vertex {
    match (label(s, &format!("{side}_workload")), label(s, &format!("{side}_workload_namespace"))) {
        ("unknown", _) | (_, "unknown") => Vertex::Unknown,
        (name, namespace) => Vertex::Workload { namespace: namespace.into(), name: name.into() },
    }
}

/// The edges a sample is on, as Kiali draws a service graph: its client
/// workload to the service it addressed, and that service to the workload
/// that served it; without a service, client to server.
fn edges(s: &Sample) -> Vec<(Vertex, Vertex)> {
    let (client, server) = (workload(s, "source"), workload(s, "destination"));
    match label(s, "destination_service") {
        "unknown" => vec![(client, server)],
        host => {
            // A report that lacks the service's namespace (a server's node
            // may) names the same service: `name.namespace.svc...`.
            let namespace = match label(s, "destination_service_namespace") {
                "unknown" => host.split('.').nth(1).unwrap_or("unknown"),
                ns => ns,
            };
            let service = Vertex::Service { namespace: namespace.into(), host: host.into() };
            if server == Vertex::Unknown {
                vec![(client, service)]
            } else {
                vec![(client, service.clone()), (service, server)]
            }
        }
    }
}

impl Counts {
    /// One proxy's `/metrics`.
    pub fn from_text(text: &str) -> Result<Counts, String> {
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).map_err(|e| e.to_string())?;
        let mut counts = Counts::default();
        for s in &scrape.samples {
            let reporter = label(s, "reporter");
            let mtls = label(s, "connection_security_policy") == "mutual_tls";
            let denied = label(s, "response_flags") == "RBAC";
            let client_side = reporter == "source";
            let outside_client = reporter == "destination" && label(s, "source_workload") == "unknown";
            for edge in edges(s) {
                counts.count(edge, s, reporter, mtls, denied, client_side || outside_client);
            }
        }
        counts.edges.retain(|_, e| *e != EdgeCounts::default());
        Ok(counts)
    }

    /// One sample's count on one edge; `counted_side`: the TCP counts of this report are the edge's.
    fn count(
        &mut self,
        edge: (Vertex, Vertex),
        s: &Sample,
        reporter: &str,
        mtls: bool,
        denied: bool,
        counted_side: bool,
    ) {
        let e = self.edges.entry(edge).or_default();
        match (s.metric.as_str(), reporter) {
            ("istio_requests_total", "waypoint") => {
                let n = number(&s.value);
                e.requests += n;
                if label(s, "response_code").starts_with('5') {
                    e.errors += n;
                }
                if denied {
                    e.denied += n;
                }
                if !mtls {
                    e.plaintext += n;
                }
            }
            ("istio_request_duration_milliseconds", "waypoint") => {
                if let Value::Histogram(buckets) = &s.value {
                    add_buckets(&mut e.buckets, buckets.iter().map(|b| (b.less_than, b.count)));
                }
            }
            ("istio_tcp_sent_bytes_total" | "istio_tcp_received_bytes_total", _) if counted_side => {
                e.bytes += number(&s.value);
            }
            ("istio_tcp_connections_opened_total", _) if counted_side => {
                e.opened += number(&s.value);
                if !mtls {
                    e.plaintext += number(&s.value);
                }
            }
            ("istio_tcp_connections_closed_total", "destination") if denied => e.denied += number(&s.value),
            _ => {}
        }
    }

    /// Adds another proxy's counts.
    pub fn add(&mut self, other: &Counts) {
        for (k, o) in &other.edges {
            let e = self.edges.entry(k.clone()).or_default();
            e.requests += o.requests;
            e.errors += o.errors;
            e.bytes += o.bytes;
            e.opened += o.opened;
            e.denied += o.denied;
            e.plaintext += o.plaintext;
            add_buckets(&mut e.buckets, o.buckets.iter().copied());
        }
    }
}

fn add_buckets(into: &mut Vec<(f64, f64)>, from: impl Iterator<Item = (f64, f64)>) {
    for (le, n) in from {
        match into.iter_mut().find(|(l, _)| *l == le) {
            Some((_, c)) => *c += n,
            None => into.push((le, n)),
        }
    }
    into.sort_by(|a, b| a.0.total_cmp(&b.0));
}

/// The graph of what happened between `before` and `now`, `window` seconds apart.
pub fn graph(before: &Counts, now: &Counts, window_seconds: f64) -> ServiceGraph {
    let mut g = ServiceGraph { window_seconds, ..Default::default() };
    let per_second = |d: f64| if window_seconds > 0.0 { d.max(0.0) / window_seconds } else { 0.0 };
    for (k, n) in &now.edges {
        let b = before.edges.get(k).cloned().unwrap_or_default();
        let requests = n.requests - b.requests;
        let opened = n.opened - b.opened;
        let denied = n.denied - b.denied;
        let bytes = n.bytes - b.bytes;
        if requests <= 0.0 && opened <= 0.0 && denied <= 0.0 && bytes <= 0.0 {
            continue;
        }
        let deltas: Vec<(f64, f64)> = n
            .buckets
            .iter()
            .map(|(le, c)| (*le, c - b.buckets.iter().find(|(l, _)| l == le).map_or(0.0, |x| x.1)))
            .collect();
        g.edges.insert(
            k.clone(),
            Traffic {
                requests_per_second: per_second(requests),
                error_ratio: if requests > 0.0 { (n.errors - b.errors) / requests } else { 0.0 },
                p99_ms: quantile(&deltas, 0.99),
                bytes_per_second: per_second(bytes),
                connections_per_second: per_second(opened),
                mtls: n.plaintext - b.plaintext <= 0.0,
                denied: denied.max(0.0) as u64,
            },
        );
    }
    g
}

/// Prometheus' `histogram_quantile` over cumulative buckets: linear
/// interpolation within the bucket the rank falls in.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.iter().find(|(le, _)| le.is_infinite()).or(buckets.last())?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if *count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let within = (rank - below) / (count - below).max(f64::MIN_POSITIVE);
            return Some(lower + (le - lower) * within);
        }
        (lower, below) = (*le, *count);
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A waypoint's and two node proxies' metrics, as prometheus-client writes them.
    fn text(requests: u32, fails: u32, bytes: u32, denied: u32) -> [String; 3] {
        let l = |reporter: &str, extra: &str| {
            format!(
                "reporter=\"{reporter}\",source_workload=\"frontend\",source_workload_namespace=\"demo\",\
                 destination_service=\"backend.demo.svc.cluster.local\",destination_service_namespace=\"demo\",destination_workload=\"backend\",\
                 destination_workload_namespace=\"demo\",connection_security_policy=\"mutual_tls\"{extra}"
            )
        };
        let waypoint = format!(
            "# TYPE istio_requests counter\n\
             istio_requests_total{{{ok}}} {requests}\n\
             istio_requests_total{{{fail}}} {fails}\n\
             # TYPE istio_request_duration_milliseconds histogram\n\
             istio_request_duration_milliseconds_bucket{{{ok},le=\"10.0\"}} {fast}\n\
             istio_request_duration_milliseconds_bucket{{{ok},le=\"100.0\"}} {all}\n\
             istio_request_duration_milliseconds_bucket{{{ok},le=\"+Inf\"}} {all}\n\
             istio_request_duration_milliseconds_sum{{{ok}}} 1.0\n\
             istio_request_duration_milliseconds_count{{{ok}}} {all}\n# EOF\n",
            ok = l("waypoint", ",response_code=\"200\",response_flags=\"-\""),
            fail = l("waypoint", ",response_code=\"503\",response_flags=\"UF\""),
            fast = requests / 2,
            all = requests,
        );
        let source = format!(
            "# TYPE istio_tcp_sent_bytes counter\nistio_tcp_sent_bytes_total{{{s}}} {bytes}\n\
             # TYPE istio_tcp_connections_opened counter\nistio_tcp_connections_opened_total{{{s}}} 2\n# EOF\n",
            s = l("source", ",response_flags=\"-\"")
                .replace("backend.demo.svc.cluster.local", "redis.demo.svc.cluster.local")
        );
        // The server's node saw the same bytes (not counted again) and refused
        // some; it does not know the service's namespace.
        let destination = format!(
            "# TYPE istio_tcp_sent_bytes counter\nistio_tcp_sent_bytes_total{{{s}}} {bytes}\n\
             # TYPE istio_tcp_connections_closed counter\nistio_tcp_connections_closed_total{{{d}}} {denied}\n# EOF\n",
            s = l("destination", ",response_flags=\"-\"")
                .replace("backend.demo.svc.cluster.local", "redis.demo.svc.cluster.local"),
            d = l("destination", ",response_flags=\"RBAC\"")
                .replace("backend.demo.svc.cluster.local", "redis.demo.svc.cluster.local")
                .replace("destination_service_namespace=\"demo\",", ""),
        );
        [waypoint, source, destination]
    }

    fn counts(texts: &[String; 3]) -> Counts {
        let mut all = Counts::default();
        for t in texts {
            all.add(&Counts::from_text(t).unwrap());
        }
        all
    }

    #[test]
    fn rates_errors_latency_bytes_and_denials_per_edge() {
        let before = counts(&text(100, 0, 1000, 0));
        let now = counts(&text(400, 30, 61000, 4));
        let g = graph(&before, &now, 30.0);
        let frontend = Vertex::Workload { namespace: "demo".into(), name: "frontend".into() };
        let service = |h: &str| Vertex::Service { namespace: "demo".into(), host: h.into() };
        let (backend, redis) = (service("backend.demo.svc.cluster.local"), service("redis.demo.svc.cluster.local"));
        let backend_pod = Vertex::Workload { namespace: "demo".into(), name: "backend".into() };
        let http = &g.edges[&(frontend.clone(), backend.clone())];
        assert_eq!(http.requests_per_second, 11.0, "300 + 30 requests in 30 s");
        assert!((http.error_ratio - 30.0 / 330.0).abs() < 1e-9);
        let p99 = http.p99_ms.unwrap();
        assert!((10.0..=100.0).contains(&p99), "half the requests under 10 ms, all under 100: {p99}");
        assert!(http.mtls);
        assert_eq!(&g.edges[&(backend, backend_pod)], http, "the service to the workload that served it");
        let tcp = &g.edges[&(frontend, redis)];
        assert_eq!(tcp.bytes_per_second, 2000.0, "the client's node's count only");
        assert_eq!(tcp.denied, 4);
        // Nothing moved: no edge.
        assert!(graph(&now, &now, 30.0).edges.is_empty());
    }

    #[test]
    fn quantiles_as_prometheus_interpolates_them() {
        let b = [(10.0, 50.0), (100.0, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(&b, 0.5), Some(10.0));
        assert_eq!(quantile(&b, 0.99), Some(98.2));
        assert_eq!(quantile(&[(10.0, 0.0), (f64::INFINITY, 0.0)], 0.99), None);
    }
}
