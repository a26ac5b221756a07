//! Istio's Telemetry API for access logs and metrics, on the real kernel:
//! a Service's Telemetry makes its waypoint log only failed requests
//! (`filter: response.code >= 400`, CEL), drop a tag from
//! `istio_requests_total` and stop counting request sizes; a Telemetry
//! selecting one client pod turns its node proxy's access lines off and
//! stops counting its sent bytes. Each change is in force within a second,
//! and taking the Telemetry away brings everything back.
use std::{
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Pod, Proc,
    mesh::sum_metric,
    run_in,
    waypoint::{BACKEND_VIP, access_log, l7_setup, waypoint_metrics},
};

/// `curl` of `path` on the backend with request id `id`; the status.
fn get(pod: &Pod, path: &str, id: &str) -> String {
    let url = format!("http://{BACKEND_VIP}{path}");
    let out = run_in(
        &pod.netns,
        &[
            "curl",
            "-s",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("x-request-id: {id}"),
            &url,
        ],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the waypoint logged the request with id `id` (its line comes when the response has ended).
fn logged(wp: &Proc, id: &str) -> bool {
    thread::sleep(Duration::from_millis(300));
    access_log(wp).iter().any(|l| l["request_id"] == id)
}

/// For the backend Service, at its waypoint (a namespace-wide one would
/// silence the node proxies too: a connection has no `response.code`, and a
/// filter that cannot be evaluated does not admit, as in Envoy).
const SERVICE_TELEMETRY: &str = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n\
    metadata: {name: errors-only, namespace: default}\nspec:\n  targetRefs: [{kind: Service, group: '', name: backend}]\n  accessLogging:\n  - providers: [{name: envoy}]\n    \
    filter: {expression: 'response.code >= 400'}\n  metrics:\n  - providers: [{name: prometheus}]\n    overrides:\n    \
    - match: {metric: REQUEST_COUNT}\n      tagOverrides: {request_protocol: {operation: REMOVE}}\n    \
    - match: {metric: REQUEST_SIZE}\n      disabled: true\n---\n";

const CLIENT_TELEMETRY: &str = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n\
    metadata: {name: quiet-client, namespace: default}\nspec:\n  selector: {matchLabels: {app: client}}\n  \
    accessLogging: [{disabled: true}]\n  metrics:\n  - overrides:\n    - match: {metric: TCP_SENT_BYTES, mode: CLIENT}\n      disabled: true\n---\n";

#[test]
fn telemetry_shapes_access_logs_and_metrics_at_waypoints_and_nodes() {
    let Some(s) = l7_setup("telemetry-api") else { return };
    let node1 = &s.mesh.node("node1").agent;
    let logs = || format!("waypoint:\n{}", s.wp.log_text());

    // Without Telemetry: every request logged and counted with all its tags.
    assert_eq!(get(&s.client, "/echo", "before-ok"), "200");
    assert!(logged(&s.wp, "before-ok"), "{}", logs());
    let sizes = |text: &str| sum_metric(text, "istio_request_bytes_count", &[("reporter", "waypoint")]);
    let before = waypoint_metrics(&s.wp_pod);
    assert!(sum_metric(&before, "istio_requests_total", &[("request_protocol", "http")]) > 0.0, "{before}");

    // The backend's Telemetry, in force at the waypoint within a second.
    let applied = Instant::now();
    s.mesh.apply("telemetry.yaml", SERVICE_TELEMETRY);
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let took = applied.elapsed();
    eprintln!("Telemetry in force at the waypoint after {took:?}");
    assert!(took < mesh_tests::patience(Duration::from_secs(1)), "took {took:?}");
    assert_eq!(get(&s.client, "/echo", "errors-only-ok"), "200");
    assert_eq!(get(&s.client, "/fail", "errors-only-fail"), "503");
    assert!(logged(&s.wp, "errors-only-fail"), "a 503 passes the filter\n{}", logs());
    assert!(!logged(&s.wp, "errors-only-ok"), "a 200 does not\n{}", logs());
    let after = waypoint_metrics(&s.wp_pod);
    let without_protocol =
        sum_metric(&after, "istio_requests_total", &[("request_protocol", ""), ("response_code", "200")]);
    assert!(without_protocol >= 1.0, "REQUEST_COUNT without request_protocol:\n{after}");
    assert_eq!(sizes(&after), sizes(&before), "REQUEST_SIZE is no longer counted:\n{after}");
    assert!(
        sum_metric(&after, "istio_request_duration_milliseconds_count", &[("request_protocol", "http")])
            > sum_metric(&before, "istio_request_duration_milliseconds_count", &[("request_protocol", "http")]),
        "REQUEST_DURATION keeps its tags"
    );

    // A Telemetry selecting the client pod: its node proxy writes no line
    // for it and does not count its sent bytes; the other pod's still.
    s.mesh.apply("client.yaml", CLIENT_TELEMETRY);
    let sent = |who: &str| {
        sum_metric(
            &mesh_tests::mesh::node_metrics(&s.mesh.node("node1").netns),
            "istio_tcp_sent_bytes_total",
            &[("reporter", "source"), ("source_workload", who)],
        )
    };
    let (client_before, other_before) = (sent("client"), sent("other"));
    let lines_before = node1.access_log().len();
    assert_eq!(get(&s.client, "/echo", "quiet-client"), "200");
    assert_eq!(get(&s.other, "/echo", "loud-other"), "200");
    node1.wait_access("the other pod's connection", |v| {
        v["pod"] == s.other.name.as_str() && v["direction"] == "outbound"
    });
    thread::sleep(Duration::from_millis(300));
    let new_lines: Vec<_> = node1.access_log().into_iter().skip(lines_before).collect();
    assert!(
        !new_lines.iter().any(|v| v["pod"] == s.client.name.as_str()),
        "the client's connections are not logged: {new_lines:?}"
    );
    assert_eq!(sent("client"), client_before, "the client's sent bytes are not counted");
    assert!(sent("other") > other_before, "the other pod's are");

    // Taken away: every line and every tag again.
    s.mesh.apply("telemetry.yaml", "# taken away\n");
    s.mesh.apply("client.yaml", "# taken away\n");
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let lines_before = node1.access_log().len();
    assert_eq!(get(&s.client, "/echo", "after-ok"), "200");
    assert!(logged(&s.wp, "after-ok"), "{}", logs());
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(5));
    while !node1.access_log().iter().skip(lines_before).any(|v| v["pod"] == s.client.name.as_str()) {
        assert!(Instant::now() < deadline, "the client's connections are logged again");
        thread::sleep(Duration::from_millis(50));
    }
}
