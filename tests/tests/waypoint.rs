//! Waypoints on the real kernel: a namespace bound to a waypoint (Istio's
//! `istio.io/use-waypoint`), a `mesh-waypoint` in a pod of its own joined to
//! the controller, clients on one node and backends on both. Real curl
//! against a real HTTP application; the node proxies send the service's
//! connections to the waypoint over HBONE, and the waypoint routes each
//! request by the user's VirtualService, DestinationRule and HTTPRoute.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use mesh_tests::{
    Pod, Proc,
    capture::Capture,
    mesh::{Mesh, sum_metric, yaml as mesh_yaml},
    run_in,
    waypoint::{GRPC_CLIENT, SYSTEM_PYTHON, access_log, waypoint_metrics, yaml},
};

const BACKEND_VIP: &str = "10.96.0.10";
const ALL_VIP: &str = "10.96.0.11";
const FLAKY_VIP: &str = "10.96.0.12";
const GRPC_VIP: &str = "10.96.0.13";
const UNDECLARED_VIP: &str = "10.96.0.14";

struct Setup {
    mesh: Mesh,
    client: Pod,
    wp_pod: Pod,
    wp: Proc,
    backends: Vec<Pod>,
    _apps: Vec<Proc>,
}

/// Two nodes; a client on node1; backends b1 (v1, node2), b2 (v1, node1)
/// and b3 (v2, node2) behind `backend` and `all`, f1 alone behind `flaky`;
/// the namespace bound to waypoint `waypoint`, running in its own pod.
fn setup(test: &str) -> Option<Setup> {
    let mesh = Mesh::start(test, &["node1", "node2"])?;
    let t = &mesh.t;
    let (client, wp_pod) = (t.pod("client"), t.pod("waypoint"));
    let backends = vec![t.pod("b1"), t.pod("b2"), t.pod("b3"), t.pod("f1")];
    let placement =
        [("node2", "backend", "v1"), ("node1", "backend", "v1"), ("node2", "backend", "v2"), ("node2", "flaky", "v1")];
    let mut config = yaml::namespace("default", "waypoint")
        + &yaml::gateway("default", "waypoint")
        + &yaml::instance(&wp_pod, "waypoint", "wp-1")
        + &mesh_yaml::pod(&client, "node1", "client", "client");
    for (pod, (node, app, version)) in backends.iter().zip(placement) {
        config += &yaml::versioned_pod(pod, node, app, version);
    }
    config += &yaml::http_service("default", "backend", BACKEND_VIP, "app: backend", 80, 8080);
    config += &yaml::http_service("default", "all", ALL_VIP, "app: backend", 80, 8080);
    config += &yaml::http_service("default", "flaky", FLAKY_VIP, "app: flaky", 80, 8080);
    config += &format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: grpc, namespace: default}}\n\
         spec: {{clusterIP: {GRPC_VIP}, selector: {{app: backend}}, ports: [{{name: grpc, port: 9090}}]}}\n---\n"
    );
    // Ports without a declared protocol: the waypoint detects it.
    config += &format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: undeclared, namespace: default}}\n\
         spec: {{clusterIP: {UNDECLARED_VIP}, selector: {{app: flaky}}, ports: [{{port: 80, targetPort: 8080}}, {{port: 7000}}]}}\n---\n"
    );
    mesh.apply("mesh.yaml", &config);
    let mut ready = vec![(&client, "node1", "client")];
    for (pod, (node, app, _)) in backends.iter().zip(placement) {
        ready.push((pod, node, app));
    }
    mesh.wait_ready(&ready);
    let apps = backends.iter().map(|p| t.app(p, 8080, p.name.trim_start_matches("default/"))).collect();
    mesh.reach_controller(&wp_pod);
    let wp = mesh.start_waypoint(&wp_pod, "wp-1");
    Some(Setup { mesh, client, wp_pod, wp, backends, _apps: apps })
}

/// `curl` from `pod` with `args`; stdout, and whether it succeeded.
fn curl(pod: &Pod, args: &[&str]) -> (bool, String) {
    let mut all = vec!["curl", "-sS", "-m", "20"];
    all.extend_from_slice(args);
    let out = run_in(&pod.netns, &all);
    if !out.status.success() {
        eprintln!("curl {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How many lines of `text` each distinct line is.
fn tally(text: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in text.lines().filter(|l| !l.is_empty()) {
        *m.entry(l.to_owned()).or_insert(0) += 1;
    }
    m
}

/// Waits until the waypoint's `name` summed over `labels` is `want` (a
/// request is counted when its response has ended), and returns it.
fn wait_metric(s: &Setup, name: &str, labels: &[(&str, &str)], want: f64) -> f64 {
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(5));
    loop {
        let got = sum_metric(&waypoint_metrics(&s.wp_pod), name, labels);
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const ROUTES: &str = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend, namespace: default}
spec:
  host: backend
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend, namespace: default}
spec:
  hosts: [backend]
  http:
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: backend, subset: v2}}]
  - name: echo
    match: [{uri: {prefix: /echo}}]
    rewrite: {uri: /echo/rewritten}
    headers: {request: {add: {x-added: added}, remove: [x-drop]}, response: {set: {x-served-by: waypoint}}}
    route: [{destination: {host: backend, subset: v1}}]
  - name: old
    match: [{uri: {regex: '/old/[0-9]+'}}]
    redirect: {uri: /new, redirectCode: 308}
  - name: split
    route:
    - {destination: {host: backend, subset: v1}, weight: 90}
    - {destination: {host: backend, subset: v2}, weight: 10}
";

/// Points 1, 2, 7, 8 and 9: HTTP/1.1 through the waypoint, the bookinfo-style
/// 90/10 split by subsets and the `end-user: jason` route, rewrite, header
/// edits and a regex redirect seen by an echoing backend, a bad regex
/// rejected with the last good routes kept, an undefined subset answered 503
/// NR, and a known exchange counted exactly in Istio's request metrics.
#[test]
fn http_routes_split_and_are_counted() {
    let Some(s) = setup("waypoint-http") else { return };
    let url = format!("http://{BACKEND_VIP}/");
    let (ok, body) = curl(&s.client, &[&url]);
    assert!(ok, "curl through the waypoint failed:\n{}", s.wp.log_text());
    assert!(["b1", "b2", "b3"].contains(&body.trim()), "{body}");
    let line = access_log(&s.wp).into_iter().find(|l| l["authority"] == BACKEND_VIP).expect("an access-log line");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["source"], mesh_tests::mesh::identity("default", "client"), "{line}");
    assert_eq!(line["route"], "default", "no routes yet: the service itself: {line}");
    assert!(line["request_id"].as_str().is_some_and(|id| id.len() == 36), "{line}");

    s.mesh.apply("routes.yaml", ROUTES);
    s.mesh.wait_waypoint_current(&s.wp_pod);

    // 2000 requests on one keep-alive connection: 90/10 within ±3 points.
    let (ok, out) = curl(&s.client, &[&format!("{url}?[1-2000]")]);
    assert!(ok);
    let t = tally(&out);
    let v2 = *t.get("b3").unwrap_or(&0) as f64 / 2000.0;
    assert_eq!(t.values().sum::<usize>(), 2000, "{t:?}");
    println!("90/10 split over 2000 requests: {t:?} (v2 share {:.3})", v2);
    assert!((0.07..=0.13).contains(&v2), "v2 got {v2:.3} of the requests, want 0.10 ± 0.03: {t:?}");
    // The v1 subset is two pods: the waypoint spreads over both.
    assert!(t.get("b1").is_some_and(|n| *n > 700) && t.get("b2").is_some_and(|n| *n > 700), "{t:?}");

    // mesh-ctl explains a request with the waypoint's matcher, on the routes the nodes hold.
    let out = s.mesh.ctl(&["route", "explain", "--to", "default/backend:80", "--header", "end-user=jason"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("through waypoint default/waypoint")
            && text.contains("1. VirtualService/default/backend/jason: MATCHES"),
        "{text}"
    );
    assert!(text.contains("default/backend (v2) 100%"), "{text}");
    let out = s.mesh.ctl(&["routes", "default/backend"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("default/backend (v1) 90%, default/backend (v2) 10%"), "{text}");

    // Every marked request goes to v2.
    let (_, out) = curl(&s.client, &["-H", "end-user: jason", &format!("{url}?[1-50]")]);
    assert_eq!(tally(&out), BTreeMap::from([("b3".to_string(), 50)]), "jason's requests");

    // Rewrite and header edits, as the backend saw them; the response header set.
    let (_, out) = curl(&s.client, &["-D", "-", "-H", "x-drop: 1", &format!("http://{BACKEND_VIP}/echo/x?q=1")]);
    let (head, json) = out.split_once("\r\n\r\n").expect("headers then body");
    let echo: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(echo["path"], "/echo/rewritten/x?q=1", "{echo}");
    assert_eq!(echo["headers"]["x-added"], "added", "{echo}");
    assert!(echo["headers"].get("x-drop").is_none(), "{echo}");
    assert!(echo["headers"]["x-request-id"].as_str().is_some(), "x-request-id propagated: {echo}");
    assert!(["b1", "b2"].contains(&echo["version"].as_str().unwrap()), "subset v1: {echo}");
    assert!(head.to_ascii_lowercase().contains("x-served-by: waypoint"), "{head}");

    // A regex route redirects.
    let (_, out) = curl(
        &s.client,
        &["-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", &format!("http://{BACKEND_VIP}/old/42")],
    );
    assert_eq!(out, format!("308 http://{BACKEND_VIP}/new"));

    // A known exchange: 20 POSTs of 1000 bytes, each answered with 70 bytes.
    let labels = [("reporter", "waypoint"), ("destination_service_name", "backend"), ("response_code", "200")];
    let text = waypoint_metrics(&s.wp_pod);
    let before = |name: &str| sum_metric(&text, name, &labels);
    let (requests, req_bytes, resp_bytes, observed) = (
        before("istio_requests_total"),
        before("istio_request_bytes_sum"),
        before("istio_response_bytes_sum"),
        before("istio_request_duration_milliseconds_count"),
    );
    let body = "x".repeat(1000);
    let (ok, out) = curl(&s.client, &["-d", &body, &format!("http://{BACKEND_VIP}/post?[1-20]")]);
    assert!(ok && out.lines().count() == 20 && out.lines().all(|l| l.starts_with("1000 ")), "{out}");
    assert_eq!(wait_metric(&s, "istio_requests_total", &labels, requests + 20.0), requests + 20.0);
    assert_eq!(wait_metric(&s, "istio_request_bytes_sum", &labels, req_bytes + 20_000.0), req_bytes + 20_000.0);
    assert_eq!(wait_metric(&s, "istio_response_bytes_sum", &labels, resp_bytes + 1400.0), resp_bytes + 1400.0);
    let n = "istio_request_duration_milliseconds_count";
    assert_eq!(wait_metric(&s, n, &labels, observed + 20.0), observed + 20.0);

    // A mirror gets a copy of every request; the client sees only the primary's answers.
    s.mesh.apply(
        "mirror.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: all, namespace: default}\n\
         spec:\n  hosts: [all]\n  http:\n  - route: [{destination: {host: all}}]\n    mirror: {host: flaky}\n    \
         mirrorPercentage: {value: 100}\n",
    );
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let (_, out) = curl(&s.client, &[&format!("http://{ALL_VIP}/mirrored?[1-10]")]);
    assert!(
        out.lines().count() == 10 && out.lines().all(|l| ["b1", "b2", "b3"].contains(&l)),
        "primary answers only: {out}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mirrored = loop {
        let (_, n) = curl(&s.backends[3], &["http://127.0.0.1:8080/hits/mirrored"]);
        let n: u32 = n.trim().parse().unwrap_or(0);
        if n >= 10 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(mirrored, 10, "the mirror got every request");

    // A bad regex is rejected by the controller; the waypoint keeps the last good routes.
    s.mesh.controller.write("routes.yaml", &ROUTES.replace("'/old/[0-9]+'", "'/old/[0-9'"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.mesh.controller.get("/healthz/ready").contains("invalid regular expression") {
        assert!(Instant::now() < deadline, "the controller did not report the bad regex");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, out) = curl(&s.client, &["-H", "end-user: jason", &format!("{url}?[1-10]")]);
    assert_eq!(tally(&out), BTreeMap::from([("b3".to_string(), 10)]), "last good routes in force");

    // A subset no DestinationRule defines: accepted, and its requests get 503 NR.
    s.mesh.apply("routes.yaml", &ROUTES.replace("subset: v2}}]", "subset: v9}}]"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let (_, out) = curl(&s.client, &["-o", "/dev/null", "-w", "%{http_code}", "-H", "end-user: jason", &url]);
    assert_eq!(out, "503");
    let nr = access_log(&s.wp).into_iter().rev().find(|l| l["status"] == 503).expect("the 503's log line");
    assert_eq!(
        (nr["response_flags"].as_str(), nr["route"].as_str()),
        (Some("NR"), Some("VirtualService/default/backend/jason"))
    );
}

/// Point 3: one HTTP/2 connection (h2load, prior knowledge, one client)
/// carrying 300 requests is spread over the three endpoints, not pinned to one.
#[test]
fn http2_requests_on_one_connection_are_balanced() {
    let Some(s) = setup("waypoint-h2") else { return };
    let out =
        run_in(&s.client.netns, &["h2load", "-n", "300", "-c", "1", "-m", "10", &format!("http://{ALL_VIP}/spread")]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("300 succeeded") && report.contains("300 2xx"), "h2load:\n{report}\n{}", s.wp.log_text());
    assert!(report.contains("h2c"), "HTTP/2 with prior knowledge: {report}");
    let hits: Vec<u32> = s.backends[..3]
        .iter()
        .map(|b| curl(b, &["http://127.0.0.1:8080/hits/spread"]).1.trim().parse().unwrap())
        .collect();
    println!("300 HTTP/2 requests on one connection: {hits:?} per endpoint");
    // Istio's default balancer (LEAST_REQUEST) picks per request; at equal
    // load that is at random: 100 each within 5 standard deviations (8.2).
    for (b, n) in ["b1", "b2", "b3"].iter().zip(&hits) {
        assert!((59..=141).contains(n), "{b} got {n} of 300, want 100 ± 41: {hits:?}");
    }
    let logged = access_log(&s.wp).into_iter().filter(|l| l["path"] == "/spread").count();
    assert_eq!(logged, 300, "one access-log line per request");
}

const RETRIES: &str = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: flaky, namespace: default}
spec:
  hosts: [flaky.default.svc.cluster.local]
  http:
  - name: slow
    match: [{uri: {prefix: /slow/}}]
    timeout: 0.5s
    route: [{destination: {host: flaky}}]
  - name: retried
    retries: {attempts: 3, perTryTimeout: 300ms, retryOn: '5xx,reset'}
    route: [{destination: {host: flaky}}]
";

/// Points 4 and 5: failed attempts (503, a reset, a per-try timeout) are
/// retried and the client sees success; a POST body arrives intact on the
/// retry; against a backend failing every request the backend sees no more
/// attempts than the budget allows; a slow backend gives 504 at the route's
/// timeout.
#[test]
fn retries_budget_and_timeouts() {
    let Some(s) = setup("waypoint-retry") else { return };
    // Istio's default policy already retries a 503.
    let (_, out) = curl(&s.client, &[&format!("http://{FLAKY_VIP}/flaky/default?fail=1")]);
    assert_eq!(out, "ok after 2\n", "{}", s.wp.log_text());

    s.mesh.apply("retries.yaml", RETRIES);
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let retries_before = sum_metric(&waypoint_metrics(&s.wp_pod), "mesh_waypoint_retries_total", &[]);
    for (path, want) in [
        ("/flaky/a?fail=2", "ok after 3\n"),
        ("/reset/a?fail=1", "ok after 2\n"),
        ("/slowonce/a?ms=3000", "attempt 2\n"),
    ] {
        let (ok, out) = curl(&s.client, &[&format!("http://{FLAKY_VIP}{path}")]);
        assert!(ok && out == want, "{path}: {out:?}\n{}", s.wp.log_text());
    }
    let retries = sum_metric(&waypoint_metrics(&s.wp_pod), "mesh_waypoint_retries_total", &[]) - retries_before;
    assert_eq!(retries, 4.0, "2 after the 503s, 1 after the reset, 1 after the per-try timeout");
    let line = access_log(&s.wp).into_iter().rev().find(|l| l["path"] == "/flaky/a?fail=2").unwrap();
    assert_eq!(line["attempts"], 3, "{line}");

    // The body of a POST arrives whole on its retry.
    let body: String = (0..5000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let digest = run_in(&s.client.netns, &["sh", "-c", &format!("printf %s '{body}' | sha256sum")]);
    let digest = String::from_utf8_lossy(&digest.stdout).split_whitespace().next().unwrap().to_owned();
    let (_, out) = curl(&s.client, &["-d", &body, &format!("http://{FLAKY_VIP}/flakypost/p?fail=1")]);
    assert_eq!(out, format!("5000 {digest}\n"));

    // A backend failing every request: the budget bounds the retries.
    let start = Instant::now();
    let (_, out) =
        curl(&s.client, &["-o", "/dev/null", "-w", "%{http_code}\n", &format!("http://{FLAKY_VIP}/fail?[1-200]")]);
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(tally(&out), BTreeMap::from([("503".to_string(), 200)]));
    let (_, hits) = curl(&s.backends[3], &["http://127.0.0.1:8080/hits/fail"]);
    let hits: f64 = hits.trim().parse().unwrap();
    // 200 requests, 20 % of them as retries, 10 a second, and at most 100 saved before.
    let allowed = 200.0 + 0.2 * 200.0 + 10.0 * elapsed.ceil() + 100.0;
    println!("200 requests to a failing backend: {hits} attempts in {elapsed:.1} s (budget {allowed}, unbounded 800)");
    assert!(hits > 200.0 && hits <= allowed, "{hits} attempts, budget {allowed}");

    // A slow backend: 504 at the route's 0.5 s timeout.
    let start = Instant::now();
    let (_, out) =
        curl(&s.client, &["-o", "/dev/null", "-w", "%{http_code}", &format!("http://{FLAKY_VIP}/slow/x?ms=3000")]);
    let took = start.elapsed();
    println!("timeout 0.5s: 504 after {took:?}");
    assert_eq!(out, "504");
    assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(2500), "{took:?}");
    let line = access_log(&s.wp).into_iter().rev().find(|l| l["status"] == 504).unwrap();
    assert_eq!(line["response_flags"], "UT", "{line}");
}

/// Point 6: with the waypoint gone its clients are refused, never sent
/// around it to the backends; restarted, traffic flows again.
#[test]
fn waypoint_down_means_refused_not_bypassed() {
    let Some(mut s) = setup("waypoint-down") else { return };
    let url = format!("http://{BACKEND_VIP}/bypass");
    let (ok, _) = curl(&s.client, &[&url]);
    assert!(ok);
    s.wp.kill();
    let (ok, out) = curl(&s.client, &["-o", "/dev/null", "-w", "%{http_code}", &url]);
    assert!(!ok && out == "000", "a request got through without the waypoint: {out}");
    let node1 = &s.mesh.node("node1").agent;
    node1.wait_access("the refused connection", |v| v["pod"] == "default/client" && v["outcome"] == "error");
    let seen: u32 = s.backends[..3]
        .iter()
        .map(|b| curl(b, &["http://127.0.0.1:8080/hits/bypass"]).1.trim().parse::<u32>().unwrap())
        .sum();
    assert_eq!(seen, 1, "only the request made through the waypoint reached a backend");

    s.wp = s.mesh.start_waypoint(&s.wp_pod, "wp-1");
    let (ok, _) = curl(&s.client, &[&url]);
    assert!(ok, "traffic did not flow again after the restart:\n{}", s.wp.log_text());

    // mesh-ctl sees the instance; delete unbinds the namespace, apply binds it again.
    let ctl = |args: &[&str]| {
        let out = s.mesh.ctl(args);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "mesh-ctl {args:?}: {text}");
        text
    };
    let status = ctl(&["waypoint", "status", "-n", "default"]);
    assert!(status.contains("instance default/waypoint on wp-1") && status.contains("connected, in sync"), "{status}");
    assert!(status.contains("default/backend"), "{status}");
    let list = ctl(&["waypoint", "list"]);
    assert!(list.contains("1/1"), "{list}");
    let deleted = ctl(&["waypoint", "delete", "-n", "default"]);
    assert!(
        deleted.contains("Gateway default/waypoint removed from")
            && deleted.contains("label istio.io/use-waypoint removed"),
        "{deleted}"
    );
    let before = access_log(&s.wp).len();
    let (ok, _) = curl(&s.client, &[&url]);
    assert!(ok && access_log(&s.wp).len() == before, "unbound: the service is reached at L4, not through the waypoint");
    let applied = ctl(&["waypoint", "apply", "-n", "default", "--enroll-namespace"]);
    // backend, all, flaky, grpc and undeclared.
    assert!(applied.contains("5 service(s) bound on every node") && applied.contains("1 instance(s)"), "{applied}");
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let (ok, _) = curl(&s.client, &[&url]);
    assert!(ok && access_log(&s.wp).len() > before, "bound again: through the waypoint\n{}", s.wp.log_text());
}

/// Points 1 and 3 for gRPC: a real gRPC client (python3-grpcio) on one
/// channel: 300 unary calls spread over the three endpoints, then a server
/// stream, a client stream and a bidirectional stream, and a missing method
/// answered UNIMPLEMENTED by the server, all through the waypoint, counted
/// with request_protocol="grpc" and the grpc-status of the trailers; tshark
/// on the bridge sees only TLS on 15008 on both hops.
#[test]
fn grpc_calls_of_every_kind_through_the_waypoint() {
    let Some(s) = setup("waypoint-grpc") else { return };
    let _servers: Vec<Proc> =
        s.backends[..3].iter().map(|b| s.mesh.t.grpc_server(b, 9090, b.name.trim_start_matches("default/"))).collect();
    let probe = s.mesh.t.pod("probe");
    let mut capture = Capture::start(&s.mesh, &probe, &s.wp_pod);
    let out = run_in(&s.client.netns, &[SYSTEM_PYTHON, "-c", GRPC_CLIENT, &format!("{GRPC_VIP}:9090"), "300"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gRPC client failed: {text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.wp.log_text()
    );
    let got: serde_json::Value = serde_json::from_str(&text).unwrap();
    println!("gRPC through the waypoint: {got}");
    for b in ["b1", "b2", "b3"] {
        let n = got["unary"][b].as_u64().unwrap_or(0);
        // Per call, at random at equal load (LEAST_REQUEST): 100 within 5 standard deviations.
        assert!((59..=141).contains(&n), "{b} got {n} of 300 calls on one channel, want 100 ± 41: {got}");
    }
    assert_eq!(got["server_stream"].as_array().map(Vec::len), Some(5), "{got}");
    assert!(got["client_stream"].as_str().is_some_and(|c| c.ends_with(" got 7")), "{got}");
    let bidi: Vec<&str> = got["bidi"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(bidi.len(), 3, "{got}");
    assert!(bidi.iter().zip(["1", "2", "3"]).all(|(m, n)| m.ends_with(&format!(":{n}"))), "{got}");
    assert_eq!(got["missing"], "UNIMPLEMENTED", "{got}");

    let metrics = waypoint_metrics(&s.wp_pod);
    let grpc = |status: &str| {
        sum_metric(&metrics, "istio_requests_total", &[("request_protocol", "grpc"), ("grpc_response_status", status)])
    };
    assert_eq!(grpc("0"), 303.0, "300 unary calls and 3 streams, OK");
    assert_eq!(grpc("12"), 1.0, "the missing method, UNIMPLEMENTED in its trailers");

    // Both hops, client -> waypoint and waypoint -> backend, are TLS on 15008 only.
    capture.stop();

    // A GRPCRoute sends one method to v2 (b3); the others keep spreading.
    s.mesh.apply(
        "grpcroute.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: grpc-v2, namespace: default}\n\
             spec: {clusterIP: 10.96.0.15, selector: {app: backend, version: v2}, ports: [{name: grpc, port: 9090}]}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: echo, namespace: default}\n\
             spec:\n  parentRefs: [{group: '', kind: Service, name: grpc, port: 9090}]\n  rules:\n  \
             - matches: [{method: {service: mesh.test.Echo, method: ServerStream}}]\n    \
             backendRefs: [{name: grpc-v2, port: 9090}]\n  - backendRefs: [{name: grpc, port: 9090}]\n",
    );
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let out = run_in(&s.client.netns, &[SYSTEM_PYTHON, "-c", GRPC_CLIENT, &format!("{GRPC_VIP}:9090"), "30"]);
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    let streamed: Vec<&str> = got["server_stream"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert!(streamed.len() == 5 && streamed.iter().all(|m| m.starts_with("b3 ")), "GRPCRoute to v2: {got}");
    assert!(got["unary"].as_object().unwrap().len() == 3, "the other methods still spread: {got}");
    for (a, b) in [(&s.client, &s.wp_pod), (&s.wp_pod, &s.backends[0])] {
        let (packets, tls, _) = capture.between(a, b);
        assert!(!packets.is_empty(), "nothing captured between {} and {}", a.name, b.name);
        let off: Vec<_> = packets.iter().filter(|(sp, dp, _)| *sp != 15008 && *dp != 15008).collect();
        assert!(off.is_empty(), "segments between {} and {} not on 15008: {off:?}", a.name, b.name);
        assert!(tls > 0, "no TLS application data between {} and {}", a.name, b.name);
    }
}

/// A server that speaks first (a banner on accept, as SMTP, MySQL or FTP do),
/// then echoes.
const BANNER_SERVER: &str = r#"
import socket, threading
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(("::", 7000)); s.listen(16)
print("listening", flush=True)
def serve(c):
    c.sendall(b"220 banner\r\n")
    while True:
        b = c.recv(4096)
        if not b: break
        c.sendall(b)
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A client that waits for the server's banner, then sends and reads an echo;
/// prints how long the banner took.
const BANNER_CLIENT: &str = r#"
import socket, sys, time
t = time.time()
c = socket.create_connection((sys.argv[1], 7000), timeout=10)
banner = c.recv(64)
took = time.time() - t
c.sendall(b"ping"); echo = c.recv(64)
print(banner.decode().strip(), echo.decode(), "%.3f" % took, sep="|")
"#;

/// Point 4's detection: a port without a declared protocol is served as HTTP
/// when its client speaks HTTP, and relayed as TCP when its server speaks
/// first, after a bounded wait rather than a multi-second stall.
#[test]
fn undeclared_ports_are_detected_without_stalling_server_first_protocols() {
    let Some(s) = setup("waypoint-sniff") else { return };
    let f1 = &s.backends[3];
    let banner =
        Proc::spawn_in("banner", &f1.netns, &["python3", "-u", "-c", BANNER_SERVER], &s.mesh.t.dir.join("banner.log"));
    banner.wait_for_log("listening", Duration::from_secs(10));

    let (ok, body) = curl(&s.client, &[&format!("http://{UNDECLARED_VIP}/echo")]);
    assert!(ok && body.contains("\"path\": \"/echo\""), "{body}\n{}", s.wp.log_text());
    assert!(
        access_log(&s.wp).iter().any(|l| l["authority"] == UNDECLARED_VIP && l["status"] == 200),
        "detected as HTTP: the waypoint logged the request"
    );

    let out = run_in(&s.client.netns, &["python3", "-c", BANNER_CLIENT, UNDECLARED_VIP]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let fields: Vec<&str> = text.trim().split('|').collect();
    assert_eq!(&fields[..2], ["220 banner", "ping"], "{text}");
    let took: f64 = fields[2].parse().unwrap();
    println!("server-first protocol through the waypoint: banner after {took:.3} s (detection waits 0.2 s)");
    assert!(took < 2.0, "the banner took {took} s: a stall");
}

/// Point 1's drain: on SIGTERM the waypoint turns unready, takes no new
/// tunnel, answers the request in flight and exits once it is done.
#[test]
fn waypoint_drains_requests_in_flight_on_sigterm() {
    let Some(mut s) = setup("waypoint-drain") else { return };
    let client = s.client.clone();
    let slow = std::thread::spawn(move || curl(&client, &[&format!("http://{FLAKY_VIP}/slow/x?ms=1500")]));
    // The backend holds it for 1.5 s: well in flight by then.
    std::thread::sleep(Duration::from_millis(300));
    s.wp.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    let ready = run_in(
        &s.wp_pod.netns,
        &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:15021/healthz/ready"],
    );
    assert_eq!(String::from_utf8_lossy(&ready.stdout), "503", "unready while draining");
    let (ok, _) = curl(&s.client, &["-o", "/dev/null", &format!("http://{BACKEND_VIP}/new")]);
    assert!(!ok, "a new connection was taken while draining");
    let (ok, body) = slow.join().unwrap();
    assert!(ok && body == "slow\n", "the request in flight was cut: {body:?}\n{}", s.wp.log_text());
    assert_eq!(s.wp.wait_exit(Duration::from_secs(10)), Some(0), "{}", s.wp.log_text());
    assert!(s.wp.log_text().contains("drained: no request left"), "{}", s.wp.log_text());
}

/// An HTTP/1.1 Upgrade (as WebSocket does it) through the waypoint: 101,
/// then bytes both ways on the upgraded connection.
const UPGRADE_CLIENT: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], 80), timeout=10)
c.sendall(b"GET /ws HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += c.recv(1)
c.sendall(b"hello through the waypoint")
got = b""
while len(got) < 26:
    got += c.recv(64)
print(head.split(b"\r\n")[0].decode(), "|", got.decode())
"#;

#[test]
fn upgrades_pass_through_the_waypoint() {
    let Some(s) = setup("waypoint-upgrade") else { return };
    let out = run_in(&s.client.netns, &["python3", "-c", UPGRADE_CLIENT, BACKEND_VIP]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}\n{}", String::from_utf8_lossy(&out.stderr), s.wp.log_text());
    assert_eq!(text.trim(), "HTTP/1.1 101 Switching Protocols | HELLO THROUGH THE WAYPOINT");
    assert!(access_log(&s.wp).iter().any(|l| l["path"] == "/ws" && l["status"] == 101), "{}", s.wp.log_text());
}

/// Point 2's replicas: two instances of one waypoint share the clients'
/// connections (the node proxies take them in turn), and with one killed the
/// other takes them all.
#[test]
fn waypoint_replicas_share_connections_and_cover_for_each_other() {
    let Some(s) = setup("waypoint-replicas") else { return };
    let wp2_pod = s.mesh.t.pod("waypoint-2");
    s.mesh.apply("wp2.yaml", &yaml::instance(&wp2_pod, "waypoint", "wp-2"));
    s.mesh.reach_controller(&wp2_pod);
    let mut wp2 = s.mesh.start_waypoint(&wp2_pod, "wp-2");
    let url = format!("http://{BACKEND_VIP}/replicas");
    for _ in 0..20 {
        let (ok, _) = curl(&s.client, &[&url]); // a new connection each time
        assert!(ok);
    }
    let count = |p: &Proc| access_log(p).iter().filter(|l| l["path"] == "/replicas").count();
    let (one, two) = (count(&s.wp), count(&wp2));
    println!("20 connections over two waypoint instances: {one} and {two}");
    assert_eq!(one + two, 20);
    assert!((5..=15).contains(&one), "instances taken in turn: {one} and {two}");

    wp2.kill();
    for _ in 0..10 {
        let (ok, _) = curl(&s.client, &[&url]);
        assert!(ok, "the remaining instance takes every connection");
    }
    assert_eq!(count(&s.wp), one + 10);
}
