//! Istio's Grafana dashboards on the quickstart's data: the panel queries of
//! Istio's Service, Workload and Mesh dashboards, and the Control Plane
//! dashboard's panels about what the controller does as istiod
//! (manifests/addons/dashboards in istio/istio), their variables filled in as Grafana would, asked of the
//! real Prometheus the quickstart started while traffic runs. Each query
//! must return series, with the labels its legend reads.
//!
//! Which panels apply to ambient: in Istio's ambient mode (and here) HTTP
//! metrics come from waypoints, with `reporter="waypoint"`, and TCP metrics
//! from the node proxies (ztunnel in Istio), as `source` and `destination`.
//! So the panels on the `$qrep` variable are checked with `waypoint` for
//! HTTP and `source`/`destination` for TCP; the HTTP panels fixed to
//! `reporter="destination"` or `"source"` (sidecars' reports) are empty in
//! Istio's ambient mode too and are not checked; the `!= mutual_tls`
//! variants are checked to be empty (the demo's traffic is all mTLS).
use std::{
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{Pod, Proc};
use serde_json::Value;

const PROMETHEUS: &str = "127.0.0.1:19090";
/// The demo's services: `backend` behind the waypoint (HTTP), `redis` (TCP).
const BACKEND: &str = "backend.demo.svc.cluster.local";
const REDIS: &str = "redis.demo.svc.cluster.local";

/// A panel's query and the labels one of its series must have.
struct Panel {
    title: &'static str,
    query: String,
    labels: &'static [(&'static str, &'static str)],
}

fn panel(title: &'static str, query: String, labels: &'static [(&'static str, &'static str)]) -> Panel {
    Panel { title, query, labels }
}

/// The Service dashboard's queries (`$__rate_interval` is 1m at a 5 s scrape).
fn service_dashboard() -> Vec<Panel> {
    let (http, tcp) = (format!("reporter=~\"waypoint\",destination_service=\"{BACKEND}\""), REDIS);
    let src = "source_workload=~\".*\", source_workload_namespace=~\".*\"";
    let mut out = vec![
        panel(
            "Client Request Volume",
            format!("round(sum(irate(istio_requests_total{{{http}}}[1m])), 0.001)"),
            &[],
        ),
        panel(
            "Client Success Rate (non-5xx responses)",
            format!(
                "sum(irate(istio_requests_total{{{http},response_code!~\"5.*\"}}[1m])) / \
                 (sum(irate(istio_requests_total{{{http}}}[1m])) or on () vector(1))"
            ),
            &[],
        ),
        panel(
            "TCP Received Bytes",
            format!("sum(irate(istio_tcp_received_bytes_total{{reporter=~\"destination\", destination_service=\"{tcp}\"}}[1m]))"),
            &[],
        ),
        panel(
            "TCP Sent Bytes",
            format!("sum(irate(istio_tcp_sent_bytes_total{{reporter=~\"destination\", destination_service=\"{tcp}\"}}[1m]))"),
            &[],
        ),
        panel(
            "Incoming Requests By Source And Response Code (mTLS)",
            format!(
                "round(sum(irate(istio_requests_total{{connection_security_policy=\"mutual_tls\",destination_service=\"{BACKEND}\",\
                 reporter=~\"waypoint\",{src}}}[1m])) by (source_workload, source_workload_namespace, response_code), 0.001)"
            ),
            &[("source_workload", "frontend"), ("source_workload_namespace", "demo"), ("response_code", "200")],
        ),
        panel(
            "Incoming Success Rate (non-5xx responses) By Source (mTLS)",
            format!(
                "sum(irate(istio_requests_total{{reporter=~\"waypoint\", connection_security_policy=\"mutual_tls\", \
                 destination_service=\"{BACKEND}\",response_code!~\"5.*\", {src}}}[1m])) by (source_workload, source_workload_namespace) / \
                 sum(irate(istio_requests_total{{reporter=~\"waypoint\", connection_security_policy=\"mutual_tls\", \
                 destination_service=\"{BACKEND}\", {src}}}[1m])) by (source_workload, source_workload_namespace)"
            ),
            &[("source_workload", "frontend"), ("source_workload_namespace", "demo")],
        ),
        panel(
            "Bytes Received from Incoming TCP Connection (mTLS)",
            format!(
                "round(sum(irate(istio_tcp_received_bytes_total{{reporter=~\"destination\", connection_security_policy=\"mutual_tls\", \
                 destination_service=\"{tcp}\", {src}}}[1m])) by (source_workload, source_workload_namespace), 0.001)"
            ),
            &[("source_workload_namespace", "demo")],
        ),
        panel(
            "Bytes Sent to Incoming TCP Connection (mTLS)",
            format!(
                "round(sum(irate(istio_tcp_sent_bytes_total{{reporter=~\"destination\", connection_security_policy=\"mutual_tls\", \
                 destination_service=\"{tcp}\", {src}}}[1m])) by (source_workload, source_workload_namespace), 0.001)"
            ),
            &[("source_workload_namespace", "demo")],
        ),
        panel(
            "Service Workloads: Bytes Received from Incoming TCP Connection (mTLS)",
            format!(
                "round(sum(irate(istio_tcp_received_bytes_total{{connection_security_policy=\"mutual_tls\", reporter=\"destination\", \
                 destination_service=\"{tcp}\", destination_workload=~\".*\", destination_workload_namespace=~\".*\"}}[1m])) \
                 by (destination_workload, destination_workload_namespace), 0.001)"
            ),
            &[("destination_workload", "redis"), ("destination_workload_namespace", "demo")],
        ),
        panel(
            "Service Workloads: Bytes Sent to Incoming TCP Connection (mTLS)",
            format!(
                "round(sum(irate(istio_tcp_sent_bytes_total{{connection_security_policy=\"mutual_tls\", reporter=\"destination\", \
                 destination_service=\"{tcp}\", destination_workload=~\".*\", destination_workload_namespace=~\".*\"}}[1m])) \
                 by (destination_workload, destination_workload_namespace), 0.001)"
            ),
            &[("destination_workload", "redis"), ("destination_workload_namespace", "demo")],
        ),
        // The variables' queries.
        panel(
            "variable service",
            "sum(istio_requests_total{}) by (destination_service) or sum(istio_tcp_sent_bytes_total{}) by (destination_service)".into(),
            &[("destination_service", BACKEND)],
        ),
        panel(
            "variable service (TCP)",
            "sum(istio_requests_total{}) by (destination_service) or sum(istio_tcp_sent_bytes_total{}) by (destination_service)".into(),
            &[("destination_service", REDIS)],
        ),
        panel(
            "variable srccluster",
            format!(
                "sum(istio_requests_total{{{http}}}) by (source_cluster) or sum(istio_tcp_sent_bytes_total{{{http}}}) by (source_cluster)"
            ),
            &[("source_cluster", "Kubernetes")],
        ),
        panel(
            "variable srcwl",
            format!(
                "sum(istio_requests_total{{{http}, source_workload_namespace=~\".*\"}}) by (source_workload) or \
                 sum(istio_tcp_sent_bytes_total{{{http}, source_workload_namespace=~\".*\"}}) by (source_workload)"
            ),
            &[("source_workload", "frontend")],
        ),
        panel(
            "variable dstcluster",
            format!(
                "sum(istio_requests_total{{reporter=\"destination\", destination_service=\"{tcp}\"}}) by (destination_cluster) or \
                 sum(istio_tcp_sent_bytes_total{{reporter=\"destination\", destination_service=\"{tcp}\"}}) by (destination_cluster)"
            ),
            &[("destination_cluster", "Kubernetes")],
        ),
        panel(
            "variable dstwl",
            format!(
                "sum(istio_requests_total{{reporter=\"destination\", destination_service=\"{tcp}\", destination_cluster=~\".*\", \
                 destination_workload_namespace=~\".*\"}}) by (destination_workload) or sum(istio_tcp_sent_bytes_total{{reporter=\"destination\", \
                 destination_service=\"{tcp}\", destination_cluster=~\".*\", destination_workload_namespace=~\".*\"}}) by (destination_workload)"
            ),
            &[("destination_workload", "redis")],
        ),
    ];
    for q in ["0.50", "0.90", "0.99"] {
        out.push(panel(
            "Client Request Duration",
            format!(
                "(histogram_quantile({q}, sum(irate(istio_request_duration_milliseconds_bucket{{{http}}}[1m])) by (le)) / 1000) or \
                 histogram_quantile({q}, sum(irate(istio_request_duration_seconds_bucket{{{http}}}[1m])) by (le))"
            ),
            &[],
        ));
        let by_source = format!(
            "reporter=~\"waypoint\", connection_security_policy=\"mutual_tls\", destination_service=\"{BACKEND}\", {src}"
        );
        out.push(panel(
            "Incoming Request Duration By Source (mTLS)",
            format!(
                "(histogram_quantile({q}, sum(irate(istio_request_duration_milliseconds_bucket{{{by_source}}}[1m])) \
                 by (source_workload, source_workload_namespace, le)) / 1000) or histogram_quantile({q}, \
                 sum(irate(istio_request_duration_seconds_bucket{{{by_source}}}[1m])) by (source_workload, source_workload_namespace, le))"
            ),
            &[("source_workload", "frontend")],
        ));
        for (title, family) in [
            ("Incoming Request Size By Source (mTLS)", "istio_request_bytes_bucket"),
            ("Response Size By Source (mTLS)", "istio_response_bytes_bucket"),
        ] {
            out.push(panel(
                title,
                format!(
                    "histogram_quantile({q}, sum(irate({family}{{{by_source}}}[1m])) by (source_workload, source_workload_namespace, le))"
                ),
                &[("source_workload", "frontend"), ("source_workload_namespace", "demo")],
            ));
        }
    }
    out
}

/// The Workload dashboard's queries, for workloads `backend-1` (HTTP, at
/// the waypoint; TCP as a client of redis) and `redis` (TCP server).
fn workload_dashboard() -> Vec<Panel> {
    let (ns, wl) = ("destination_workload_namespace=~\"demo\"", "destination_workload=~\"backend-1\"");
    let http = format!("reporter=~\"waypoint\",{ns},{wl}");
    let redis = "reporter=~\"destination\", destination_workload_namespace=~\"demo\", destination_workload=~\"redis\"";
    let client = "reporter=~\"source\", source_workload_namespace=~\"demo\", source_workload=~\"backend-1\"";
    let src = "source_workload=~\".*\", source_workload_namespace=~\".*\"";
    let outgoing = "reporter=\"source\", connection_security_policy=\"mutual_tls\", source_workload_namespace=~\"demo\", \
                    source_workload=~\"backend-1\", destination_service=~\".*\"";
    let mut out = vec![
        panel("Incoming Request Volume", format!("round(sum(irate(istio_requests_total{{{http}}}[5m])), 0.001)"), &[]),
        panel(
            "Incoming Success Rate (non-5xx responses)",
            format!(
                "sum(irate(istio_requests_total{{{http},response_code!~\"5.*\"}}[5m])) / sum(irate(istio_requests_total{{{http}}}[5m]))"
            ),
            &[],
        ),
        panel(
            "TCP Server Traffic",
            format!("sum(irate(istio_tcp_sent_bytes_total{{{redis}}}[1m])) + sum(irate(istio_tcp_received_bytes_total{{{redis}}}[1m]))"),
            &[],
        ),
        panel(
            "TCP Client Traffic",
            format!(
                "sum(irate(istio_tcp_sent_bytes_total{{{client}}}[1m])) + sum(irate(istio_tcp_received_bytes_total{{{client}}}[1m]))"
            ),
            &[],
        ),
        panel(
            "Inbound Workloads: Incoming Requests By Source And Response Code (mTLS)",
            format!(
                "round(sum(irate(istio_requests_total{{connection_security_policy=\"mutual_tls\", {ns}, {wl}, reporter=~\"waypoint\", {src}}}[5m])) \
                 by (source_workload, source_workload_namespace, response_code), 0.001)"
            ),
            &[("source_workload", "frontend"), ("response_code", "200")],
        ),
        panel(
            "Inbound Workloads: Bytes Received from Incoming TCP Connection (mTLS)",
            format!(
                "round(sum(irate(istio_tcp_received_bytes_total{{{redis}, connection_security_policy=\"mutual_tls\", {src}}}[5m])) \
                 by (source_workload, source_workload_namespace), 0.001)"
            ),
            &[("source_workload_namespace", "demo")],
        ),
        panel(
            "Outbound Services: Bytes Sent on Outgoing TCP Connection (mTLS)",
            format!(
                "round(sum(irate(istio_tcp_sent_bytes_total{{{outgoing}}}[5m])) by (destination_service), 0.001)"
            ),
            &[("destination_service", REDIS)],
        ),
        panel(
            "Outbound Services: Bytes Received from Outgoing TCP Connection (mTLS)",
            format!(
                "round(sum(irate(istio_tcp_received_bytes_total{{{outgoing}}}[5m])) by (destination_service), 0.001)"
            ),
            &[("destination_service", REDIS)],
        ),
        panel(
            "variable namespace",
            "sum(istio_requests_total) by (destination_workload_namespace) or sum(istio_tcp_sent_bytes_total) by (destination_workload_namespace)".into(),
            &[("destination_workload_namespace", "demo")],
        ),
        panel(
            "variable workload",
            "(sum(istio_requests_total{destination_workload_namespace=~\"demo\"}) by (destination_workload) or \
             sum(istio_requests_total{source_workload_namespace=~\"demo\"}) by (source_workload)) or \
             (sum(istio_tcp_sent_bytes_total{destination_workload_namespace=~\"demo\"}) by (destination_workload) or \
             sum(istio_tcp_sent_bytes_total{source_workload_namespace=~\"demo\"}) by (source_workload))"
                .into(),
            &[("destination_workload", "backend-1")],
        ),
    ];
    for q in ["0.50", "0.90", "0.99"] {
        let b = format!("reporter=~\"waypoint\",{wl}, {ns}");
        out.push(panel(
            "Request Duration",
            format!(
                "(histogram_quantile({q}, sum(irate(istio_request_duration_milliseconds_bucket{{{b}}}[1m])) by (le)) / 1000) or \
                 histogram_quantile({q}, sum(irate(istio_request_duration_seconds_bucket{{{b}}}[1m])) by (le))"
            ),
            &[],
        ));
    }
    out
}

/// The Mesh dashboard's queries (`reporter=~"source|waypoint"` is its own
/// choice: it reads waypoints in ambient), as its tables ask them.
fn mesh_dashboard() -> Vec<Panel> {
    let r = "reporter=~\"source|waypoint\"";
    let join = |q: String| {
        format!(
            "label_join({q}, \"destination_workload_var\", \".\", \"destination_workload\", \"destination_workload_namespace\")"
        )
    };
    let mut out = vec![
        panel("Traffic Volume", format!("round(sum(rate(istio_requests_total{{{r}}}[1m])), 0.01)"), &[]),
        panel(
            "Success Rate",
            format!(
                "sum(rate(istio_requests_total{{{r},response_code!~\"5..\"}}[1m])) / sum(rate(istio_requests_total{{{r}}}[1m]))"
            ),
            &[],
        ),
        panel(
            "4xxs",
            format!("round(sum(rate(istio_requests_total{{{r},response_code=~\"4..\"}}[1m])), 0.01)or vector(0)"),
            &[],
        ),
        panel(
            "5xxs",
            format!("round(sum(rate(istio_requests_total{{{r},response_code=~\"5..\"}}[1m])), 0.01)or vector(0)"),
            &[],
        ),
        panel(
            "HTTP/gRPC Workloads: requests",
            join(format!(
                "sum(rate(istio_requests_total{{{r}}}[1m])) by (destination_workload, destination_workload_namespace, destination_service)"
            )),
            &[("destination_workload", "backend-1"), ("destination_service", BACKEND)],
        ),
        panel(
            "HTTP/gRPC Workloads: success",
            join(format!(
                "sum(rate(istio_requests_total{{{r},response_code!~\"5..\"}}[1m])) by (destination_workload, destination_workload_namespace) / \
                 sum(rate(istio_requests_total{{{r}}}[1m])) by (destination_workload, destination_workload_namespace)"
            )),
            &[("destination_workload_var", "backend-1.demo")],
        ),
        panel(
            "TCP Workloads: received",
            join(format!(
                "sum(rate(istio_tcp_received_bytes_total{{{r}}}[1m])) by (destination_workload, destination_workload_namespace, destination_service)"
            )),
            &[("destination_workload", "redis"), ("destination_service", REDIS)],
        ),
        panel(
            "TCP Workloads: sent",
            join(format!(
                "sum(rate(istio_tcp_sent_bytes_total{{{r}}}[1m])) by (destination_workload, destination_workload_namespace, destination_service)"
            )),
            &[("destination_workload", "redis")],
        ),
        panel(
            "Istio Component Versions (pilot)",
            "sum(istio_build) by (component, tag)".into(),
            &[("component", "pilot")],
        ),
        panel(
            "Istio Component Versions (ztunnel)",
            "sum(istio_build) by (component, tag)".into(),
            &[("component", "ztunnel")],
        ),
        panel(
            "Istio Component Versions (proxy)",
            "sum(istio_build) by (component, tag)".into(),
            &[("component", "proxy")],
        ),
    ];
    for q in ["0.5", "0.9", "0.99"] {
        out.push(panel(
            "HTTP/gRPC Workloads: latency",
            join(format!(
                "histogram_quantile({q}, sum(rate(istio_request_duration_milliseconds_bucket{{{r}}}[1m])) by (le, destination_workload, destination_workload_namespace))"
            )),
            &[("destination_workload_var", "backend-1.demo")],
        ));
    }
    out
}

/// The Control Plane dashboard's queries that concern what mesh-controller
/// does as istiod (its pushes, connections, push time and version). Its
/// Go runtime and kubelet (cAdvisor) panels have no equivalent in a Rust
/// process outside Kubernetes; its webhook panels count admission reviews,
/// which the quickstart (a directory of YAML) does not make.
fn control_plane_dashboard() -> Vec<Panel> {
    vec![
        panel("Pilot Versions", "sum(istio_build{component=\"pilot\"}) by (tag)".into(), &[]),
        panel("XDS Pushes", "sum(irate(pilot_xds_pushes[1m])) by (type)".into(), &[]),
        panel("Connections (server reported)", "sum(pilot_xds)".into(), &[]),
        panel("Push Time", "sum(rate(pilot_xds_push_time_bucket{}[1m])) by (le)".into(), &[("le", "0.01")]),
        panel("Push Errors: rejected config", "sum(pilot_total_xds_rejects) by (type)".into(), &[]),
    ]
}

/// The plaintext variants: empty, as every connection of the demo is mTLS.
fn plaintext_panels() -> Vec<String> {
    vec![
        format!(
            "round(sum(irate(istio_requests_total{{connection_security_policy!=\"mutual_tls\", destination_service=\"{BACKEND}\", \
             reporter=~\"waypoint\"}}[1m])) by (source_workload, source_workload_namespace, response_code), 0.001)"
        ),
        format!(
            "round(sum(irate(istio_tcp_received_bytes_total{{reporter=~\"destination\", connection_security_policy!=\"mutual_tls\", \
             destination_service=\"{REDIS}\"}}[1m])) by (source_workload, source_workload_namespace), 0.001)"
        ),
    ]
}

/// Prometheus' answer to an instant query: its series.
fn query(q: &str) -> Vec<Value> {
    let out = std::process::Command::new("curl")
        .args(["-sf", "-m", "5", "-G", &format!("http://{PROMETHEUS}/api/v1/query"), "--data-urlencode"])
        .arg(format!("query={q}"))
        .output()
        .expect("curl");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(v["status"] == "success" || v.is_null(), "Prometheus refused {q}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn has_labels(series: &[Value], labels: &[(&str, &str)]) -> bool {
    series.iter().any(|s| labels.iter().all(|(k, v)| s["metric"][*k] == *v))
}

/// Traffic from the demo's tester for as long as the check runs:
/// frontend -> backend (through the waypoint) -> redis.
fn traffic(tester: &Pod) -> Proc {
    let script = "while true; do curl -s -o /dev/null -m 5 http://10.96.0.30/; sleep 0.1; done";
    Proc::spawn_in("traffic", &tester.netns, &["sh", "-c", script], std::path::Path::new("/dev/null"))
}

pub fn istio_dashboards_on_prometheus(tester: &Pod) {
    let _traffic = traffic(tester);
    let panels: Vec<(&str, Panel)> = service_dashboard()
        .into_iter()
        .map(|p| ("Istio Service Dashboard", p))
        .chain(workload_dashboard().into_iter().map(|p| ("Istio Workload Dashboard", p)))
        .chain(mesh_dashboard().into_iter().map(|p| ("Istio Mesh Dashboard", p)))
        .chain(control_plane_dashboard().into_iter().map(|p| ("Istio Control Plane Dashboard", p)))
        .collect();
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(60));
    loop {
        let missing: Vec<String> = panels
            .iter()
            .filter(|(_, p)| {
                let series = query(&p.query);
                series.is_empty() || !has_labels(&series, p.labels)
            })
            .map(|(d, p)| format!("{d}: {}: {}\n  -> {:?}", p.title, p.query, query(&p.query)))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "panels without the series they show:\n{}", missing.join("\n"));
        thread::sleep(Duration::from_secs(2));
    }
    for q in plaintext_panels() {
        assert_eq!(query(&q), Vec::<Value>::new(), "{q}: no plaintext connection in the demo");
    }
    eprintln!(
        "{} panel queries of Istio's Service, Workload, Mesh and Control Plane dashboards answered",
        panels.len()
    );
}
