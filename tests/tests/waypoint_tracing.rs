//! Distributed tracing across two waypoints, on the real kernel: a client
//! calls `front` (namespace `shop`, waypoint `shop-wp`), whose application
//! calls `backend` (namespace `default`, waypoint `waypoint`) passing the
//! trace headers on, as Istio asks applications to. Istio's Telemetry API
//! and MeshConfig providers name a collector; the collector is a small
//! server in a mesh pod that stores what it is sent (no Zipkin, Jaeger or
//! OpenTelemetry collector package exists here), while the sending side is
//! opentelemetry's real Zipkin v2, OTLP/HTTP and OTLP/gRPC exporters.
//! Checked: one trace of four spans with the right parents, by each
//! protocol; sampling at 0 % and 100 %; W3C, B3 multi and B3 single callers
//! continued; a Telemetry change in force within a second; a span joined
//! with the client node's access-log line by its connection id; the
//! OTLP providers' `http.headers` and `grpc.initialMetadata` sent with
//! every export (the collector refuses an export without them).
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use mesh_tests::{
    Pod, Proc, run_in,
    waypoint::{BACKEND_VIP, SYSTEM_PYTHON, l7_setup, yaml},
};
use serde_json::Value;

const FRONT_VIP: &str = "10.96.0.50";
const COLLECTOR_VIP: &str = "10.96.0.51";

/// A collector of the three protocols: Zipkin v2 JSON (POST /api/v2/spans
/// on 9411), OTLP/HTTP protobuf (POST /v1/traces on 4318) and OTLP/gRPC
/// (TraceService/Export on 4317, grpcio with a generic handler on raw
/// bytes). Every span it is sent is printed as a JSON line, `span {...}`, in
/// Zipkin's shape (OTLP's protobuf read with a small wire-format reader, as
/// no OTLP package is installed), with the protocol it came by.
const COLLECTOR: &str = r#"
import json, socket, struct
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import grpc

def varint(b, i):
    n = s = 0
    while True:
        c = b[i]; i += 1; n |= (c & 0x7f) << s; s += 7
        if c < 0x80: return n, i

def fields(b):
    i = 0
    while i < len(b):
        k, i = varint(b, i)
        f, t = k >> 3, k & 7
        if t == 0: v, i = varint(b, i)
        elif t == 1: v = b[i:i + 8]; i += 8
        elif t == 2:
            n, i = varint(b, i); v = b[i:i + n]; i += n
        elif t == 5: v = b[i:i + 4]; i += 4
        else: raise ValueError("wire type %d" % t)
        yield f, v

def any_value(b):
    for f, v in fields(b):
        if f == 1: return v.decode()
        if f == 2: return "true" if v else "false"
        if f == 3: return str(v)
        if f == 4: return str(struct.unpack("<d", v)[0])
    return ""

def attributes(items):
    out = {}
    for b in items:
        kv = dict(fields(b))
        out[kv[1].decode()] = any_value(kv.get(2, b""))
    return out

KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}

def otlp(body, via):
    for f, rs in fields(body):
        if f != 1: continue
        service = ""
        for g, v in fields(rs):
            if g == 1:
                service = attributes([a for h, a in fields(v) if h == 1]).get("service.name", "")
            if g != 2: continue
            for h, sp in fields(v):
                if h != 2: continue
                span = {"localEndpoint": {"serviceName": service}, "tags": {}, "via": via}
                attrs = []
                for k, x in fields(sp):
                    if k == 1: span["traceId"] = x.hex()
                    elif k == 2: span["id"] = x.hex()
                    elif k == 4 and x: span["parentId"] = x.hex()
                    elif k == 5: span["name"] = x.decode()
                    elif k == 6: span["kind"] = KINDS.get(x, str(x))
                    elif k == 9: attrs.append(x)
                span["tags"] = attributes(attrs)
                print("span " + json.dumps(span), flush=True)

def export(req, ctx):
    if dict(ctx.invocation_metadata()).get("x-tenant") != "blue":
        print("refused otlp-grpc without its metadata", flush=True)
        ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "x-tenant: blue expected")
    otlp(req, "otlp-grpc")
    return b""

g = grpc.server(futures.ThreadPoolExecutor(4))
g.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "opentelemetry.proto.collector.trace.v1.TraceService",
    {"Export": grpc.unary_unary_rpc_method_handler(export)}),))
g.add_insecure_port("[::]:4317")
g.start()

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        ctype = self.headers.get("content-type")
        code = 200
        if self.path == "/api/v2/spans" and ctype == "application/json":
            for s in json.loads(body):
                s["via"] = "zipkin"
                print("span " + json.dumps(s), flush=True)
        elif self.path == "/v1/traces" and ctype == "application/x-protobuf" and self.headers.get("x-tenant") == "blue":
            otlp(body, "otlp-http")
        else:
            print("refused %s %s" % (self.path, ctype), flush=True)
            code = 400
        self.send_response(code)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
class S(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
import threading
for port in (9411, 4318):
    threading.Thread(target=S(("::", port), H).serve_forever, daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"#;

/// `front`'s application: calls `argv[1]` passing the trace headers on and
/// answers what it and the backend were sent.
const FRONT: &str = r#"
import json, socket, sys, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
TARGET, PORT = sys.argv[1], int(sys.argv[2])
PASS_ON = ("traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled",
           "x-b3-flags", "x-request-id")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        got = {k.lower(): v for k, v in self.headers.items()}
        req = urllib.request.Request(TARGET, headers={k: got[k] for k in PASS_ON if k in got})
        with opener.open(req, timeout=10) as r:
            down = json.loads(r.read())
        body = json.dumps({"front": got, "backend": down["headers"]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
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
S(("::", PORT), H).serve_forever()
"#;

/// Istio's MeshConfig naming the collector by its three protocols, and its Service.
fn providers() -> String {
    let host = "collector.default.svc.cluster.local";
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: collector, namespace: default}}\n\
         spec: {{clusterIP: {COLLECTOR_VIP}, selector: {{app: other}}, ports: [{{name: http-zipkin, port: 9411}}, \
         {{name: grpc-otlp, port: 4317}}, {{name: http-otlp, port: 4318}}]}}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |-\n    \
         extensionProviders:\n    - name: zipkin\n      zipkin: {{service: {host}, port: 9411}}\n    \
         - name: otel-http\n      opentelemetry: {{service: {host}, port: 4318, http: {{path: /v1/traces, timeout: 5s, \
         headers: [{{name: x-tenant, value: blue}}]}}}}\n    \
         - name: otel-grpc\n      opentelemetry: {{service: {host}, port: 4317, grpc: {{timeout: 5s, \
         initialMetadata: [{{name: x-tenant, value: blue}}]}}}}\n---\n"
    )
}

/// The mesh-wide Telemetry: `provider`, tracing `percentage` of new traces.
fn telemetry(provider: &str, percentage: u32) -> String {
    format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: mesh-default, namespace: istio-system}}\n\
         spec:\n  tracing:\n  - providers: [{{name: {provider}}}]\n    randomSamplingPercentage: {percentage}\n    \
         customTags: {{team: {{literal: {{value: checkout}}}}}}\n---\n"
    )
}

/// What `client` gets from `front` with `headers`: the headers front's
/// application and the backend were sent.
fn call(client: &Pod, headers: &[&str]) -> Value {
    let url = format!("http://{FRONT_VIP}/");
    let mut args = vec!["curl", "-sf", "-m", "15"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(&url);
    let out = run_in(&client.netns, &args);
    assert!(out.status.success(), "curl {url} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("front answers JSON")
}

/// The spans the collector holds, by trace id.
fn traces(collector: &Proc) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for line in collector.log_text().lines() {
        if let Some(span) = line.strip_prefix("span ").and_then(|s| serde_json::from_str::<Value>(s).ok()) {
            out.entry(span["traceId"].as_str().unwrap_or_default().to_owned()).or_default().push(span);
        }
    }
    out
}

/// Waits for trace `id` to have `n` spans at the collector.
fn wait_trace(collector: &Proc, id: &str, n: usize, logs: &dyn Fn() -> String) -> Vec<Value> {
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(20));
    loop {
        let spans = traces(collector).remove(id).unwrap_or_default();
        if spans.len() >= n {
            assert_eq!(spans.len(), n, "trace {id}: {spans:#?}");
            return spans;
        }
        assert!(Instant::now() < deadline, "trace {id}: {} of {n} spans after 20 s\n{}", spans.len(), logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The span of `service` (the waypoint's `<name>.<namespace>`) of `kind`.
fn span<'a>(spans: &'a [Value], service: &str, kind: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| s["localEndpoint"]["serviceName"] == service && s["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} span of {service} in {spans:#?}"))
}

/// Checks the four spans of one request through both waypoints: each
/// waypoint's SERVER span under what called it, its CLIENT span under that,
/// and returns the root's parent (`None` for a trace the mesh began).
fn check_chain(spans: &[Value]) -> Option<String> {
    let shop_server = span(spans, "shop-wp.shop", "SERVER");
    let shop_client = span(spans, "shop-wp.shop", "CLIENT");
    let default_server = span(spans, "waypoint.default", "SERVER");
    let default_client = span(spans, "waypoint.default", "CLIENT");
    assert_eq!(shop_client["parentId"], shop_server["id"], "{spans:#?}");
    assert_eq!(default_server["parentId"], shop_client["id"], "the backend's waypoint continues front's call");
    assert_eq!(default_client["parentId"], default_server["id"]);
    assert_eq!(shop_server["name"], "front.shop.svc.cluster.local:80/*");
    assert_eq!(default_server["name"], "backend.default.svc.cluster.local:80/*");
    assert_eq!(shop_client["tags"]["upstream_cluster"], "outbound|80||front.shop.svc.cluster.local");
    for s in spans {
        let tags = &s["tags"];
        assert_eq!(tags["http.status_code"], "200", "{s:#}");
        assert_eq!(tags["http.method"], "GET", "{s:#}");
        assert_eq!(tags["team"], "checkout", "custom tag: {s:#}");
        assert_eq!(tags["component"], "proxy");
    }
    assert_eq!(shop_server["tags"]["source.principal"], "spiffe://cluster.local/ns/default/sa/client");
    assert_eq!(default_server["tags"]["source.principal"], "spiffe://cluster.local/ns/shop/sa/front");
    assert_eq!(default_client["tags"]["destination.principal"], "spiffe://cluster.local/ns/default/sa/backend");
    shop_server["parentId"].as_str().map(String::from)
}

#[test]
fn one_trace_across_two_waypoints() {
    let Some(s) = l7_setup("wp-trace") else { return };
    let t = &s.mesh.t;
    let (shop_wp, front) = (t.pod_in("shop", "shop-wp"), t.pod_in("shop", "front"));
    let config = yaml::namespace("shop", "shop-wp")
        + &yaml::gateway("shop", "shop-wp")
        + &yaml::instance(&shop_wp, "shop-wp", "wp-2")
        + &mesh_tests::mesh::yaml::pod(&front, "node2", "front", "front")
        + &yaml::http_service("shop", "front", FRONT_VIP, "app: front", 80, 8081)
        + &providers();
    s.mesh.apply("shop.yaml", &config);
    s.mesh.apply("telemetry.yaml", &telemetry("zipkin", 100));
    s.mesh.wait_ready(&[(&front, "node2", "front")]);
    let collector = Proc::spawn_in(
        "collector",
        &s.other.netns,
        &[SYSTEM_PYTHON, "-u", "-c", COLLECTOR],
        &t.dir.join("collector.log"),
    );
    collector.wait_for_log("listening", Duration::from_secs(20));
    let backend = format!("http://{BACKEND_VIP}/echo");
    let front_app = Proc::spawn_in(
        "front",
        &front.netns,
        &["python3", "-u", "-c", FRONT, &backend, "8081"],
        &t.dir.join("front.log"),
    );
    front_app.wait_for_log("listening", Duration::from_secs(20));
    s.mesh.reach_controller(&shop_wp);
    let shop = s.mesh.start_waypoint(&shop_wp, "wp-2");
    s.mesh.wait_waypoint_current(&s.wp_pod);
    s.mesh.wait_waypoint_current(&shop_wp);
    let logs = || {
        format!(
            "shop-wp:\n{}\nwaypoint:\n{}\ncollector:\n{}\nfront:\n{}",
            shop.log_text(),
            s.wp.log_text(),
            collector.log_text(),
            front_app.log_text()
        )
    };

    // --- 100 %: a request without trace headers begins a trace of four spans.
    let seen = call(&s.client, &[]);
    let sent = seen["backend"]["traceparent"].as_str().unwrap_or_else(|| panic!("no traceparent: {seen}\n{}", logs()));
    let trace_id = sent.split('-').nth(1).unwrap().to_owned();
    assert_eq!(seen["front"]["x-b3-traceid"], trace_id.as_str(), "B3 travels beside W3C: {seen}");
    let spans = wait_trace(&collector, &trace_id, 4, &logs);
    assert_eq!(check_chain(&spans), None, "the mesh began this trace");
    let backend_client = span(&spans, "waypoint.default", "CLIENT");
    assert_eq!(sent.split('-').nth(2), backend_client["id"].as_str(), "the backend is sent the last span's context");
    // Node proxies stay L4 and make no spans; the client's node logs the
    // connection by the id the waypoint's span carries.
    let shop_server = span(&spans, "shop-wp.shop", "SERVER");
    let id =
        shop_server["tags"]["connection_id"].as_str().unwrap_or_else(|| panic!("no connection_id: {shop_server:#}"));
    let line = s.mesh.node("node1").agent.wait_access("the client's connection to front", |v| {
        v["direction"] == "outbound" && v["pod"] == s.client.name.as_str() && v["connection_id"] == id
    });
    assert_eq!(line["dst_service"], "front.shop.svc.cluster.local", "{line}");
    let logged = mesh_tests::waypoint::access_log(&shop);
    assert!(logged.iter().any(|l| l["connection_id"] == id), "the waypoint's access log carries it too: {logged:?}");

    // --- 0 %, and a change in force within a second.
    let applied = Instant::now();
    s.mesh.apply("telemetry.yaml", &telemetry("zipkin", 0));
    s.mesh.wait_waypoint_current(&shop_wp);
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let took = applied.elapsed();
    eprintln!("Telemetry change in force at both waypoints after {took:?}");
    assert!(took < mesh_tests::patience(Duration::from_secs(1)), "Telemetry change took {took:?}");
    let before = traces(&collector).len();
    let mut unsampled = Vec::new();
    for _ in 0..5 {
        let seen = call(&s.client, &[]);
        let tp = seen["backend"]["traceparent"].as_str().unwrap().to_owned();
        assert!(tp.ends_with("-00"), "0 %: not sampled, and the next hop is told so: {tp}");
        unsampled.push(tp.split('-').nth(1).unwrap().to_owned());
    }

    // --- Callers that decided: W3C, B3 multi, B3 single, each continued at 0 %.
    let callers: [(&str, Vec<String>); 3] = [
        ("W3C", vec!["traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()]),
        (
            "B3 multi",
            vec![
                "x-b3-traceid: 463ac35c9f6413ad48485a3953bb6124".into(),
                "x-b3-spanid: a2fb4a1d1a96d312".into(),
                "x-b3-sampled: 1".into(),
            ],
        ),
        ("B3 single", vec!["b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1".into()]),
    ];
    for (what, headers) in &callers {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let seen = call(&s.client, &headers);
        let tp = seen["backend"]["traceparent"].as_str().unwrap();
        let (trace, parent) = match *what {
            "W3C" => ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"),
            "B3 multi" => ("463ac35c9f6413ad48485a3953bb6124", "a2fb4a1d1a96d312"),
            _ => ("80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1"),
        };
        assert_eq!(tp.split('-').nth(1), Some(trace), "{what}: the caller's trace goes on: {seen}");
        let spans = wait_trace(&collector, trace, 4, &logs);
        assert_eq!(check_chain(&spans).as_deref(), Some(parent), "{what}: the first span's parent is the caller's");
    }
    // Spans are sent in order, so the unsampled requests' would have come by now.
    let all = traces(&collector);
    assert_eq!(all.len(), before + callers.len(), "only the callers' traces were reported at 0 %");
    for id in &unsampled {
        assert!(!all.contains_key(id), "unsampled trace {id} was reported");
    }

    // --- OTLP, over HTTP and over gRPC: the same trace, the same spans.
    for (provider, via) in [("otel-http", "otlp-http"), ("otel-grpc", "otlp-grpc")] {
        s.mesh.apply("telemetry.yaml", &telemetry(provider, 100));
        s.mesh.wait_waypoint_current(&shop_wp);
        s.mesh.wait_waypoint_current(&s.wp_pod);
        let seen = call(&s.client, &[]);
        let trace = seen["backend"]["traceparent"].as_str().unwrap().split('-').nth(1).unwrap().to_owned();
        let spans = wait_trace(&collector, &trace, 4, &logs);
        assert!(spans.iter().all(|s| s["via"] == via), "{provider}: {spans:#?}");
        assert_eq!(check_chain(&spans), None, "{provider}");
    }
    assert!(!collector.log_text().contains("refused"), "{}", collector.log_text());
}
