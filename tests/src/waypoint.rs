//! Waypoints in the namespace harness: a `mesh-waypoint` process in a pod of
//! its own, joined to the test's controller under a node name of its own
//! (the name its Pod's `spec.nodeName` gives), and the YAML that declares it.
use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use crate::{
    mesh::{Mesh, NETNS_ANNOTATION, node_metrics},
    process::{Proc, run_in, run_in_ok},
    topology::{Pod, STATE_ROOT, now_millis, sibling_bin},
};

/// The label Kubernetes puts on a Gateway's pods.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

impl Mesh {
    /// Gives `pod` an address on the nodes' subnet too, so a process in it
    /// reaches the controller (as a waypoint's pod reaches istiod).
    pub fn reach_controller(&self, pod: &Pod) {
        let addr = format!("{}/24", nodes_side(pod));
        run_in_ok(&pod.netns, &["ip", "addr", "add", &addr, "dev", "eth0"]);
    }

    /// Starts `mesh-waypoint` in `pod` (which [`Self::reach_controller`]
    /// connected), joined as `node`, and waits until it is ready: it has the
    /// configuration and a certificate for its identity.
    pub fn start_waypoint(&self, pod: &Pod, node: &str) -> Proc {
        self.start_waypoint_with(pod, node, &[], None, "info")
    }

    /// Like [`Self::start_waypoint`], with `extra` flags, pinned to `cpus`
    /// (taskset's list) when given, logging with `RUST_LOG=log`.
    pub fn start_waypoint_with(&self, pod: &Pod, node: &str, extra: &[&str], cpus: Option<&str>, log: &str) -> Proc {
        let bin = sibling_bin("mesh-waypoint");
        let state = format!("{STATE_ROOT}/{}/waypoint-{node}", self.t.id);
        let log_file = self.t.dir.join(format!("waypoint-{node}-{}.log", now_millis()));
        // env and taskset exec the waypoint: the process keeps the pid the caller measures.
        let mut args: Vec<String> = vec!["env".into(), format!("RUST_LOG={log}")];
        if let Some(cpus) = cpus {
            args.extend(["taskset".into(), "-c".into(), cpus.into()]);
        }
        args.extend([bin.display().to_string(), "--state-dir".into(), state, "--log-format".into(), "json".into()]);
        // mesh-ctl (beside the controller) reads its /debug/endpoints there.
        args.extend(["--announce-addr".into(), format!("{}:15020", nodes_side(pod))]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(self.controller.agent_args(node));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc = Proc::spawn_in(&format!("waypoint {node}"), &pod.netns, &args, &log_file);
        let deadline = Instant::now() + crate::patience(Duration::from_secs(20));
        while !ready(&pod.netns) {
            assert!(proc.is_running(), "waypoint exited:\n{}", proc.log_text());
            assert!(Instant::now() < deadline, "waypoint not ready after 20 s:\n{}", proc.log_text());
            thread::sleep(Duration::from_millis(20));
        }
        proc
    }
}

/// A waypoint pod's address on the nodes' subnet ([`Mesh::reach_controller`]).
pub fn nodes_side(pod: &Pod) -> String {
    format!("10.201.0.{}", 100 + pod.ip4.octets()[3])
}

fn ready(netns: &Path) -> bool {
    run_in(netns, &["curl", "-sf", "-m", "1", "http://127.0.0.1:15021/healthz/ready"]).status.success()
}

impl Mesh {
    /// Waits until the waypoint in `pod` has the configuration the controller
    /// publishes now (its readiness answer names its version).
    pub fn wait_waypoint_current(&self, pod: &Pod) {
        let want = self.controller.json("/debug/nodes")["version"].as_str().unwrap_or_default().to_owned();
        let deadline = Instant::now() + crate::patience(Duration::from_secs(10));
        loop {
            let out = run_in(&pod.netns, &["curl", "-sf", "-m", "1", "http://127.0.0.1:15021/healthz/ready"]);
            if String::from_utf8_lossy(&out.stdout).trim() == format!("ready {want}") {
                return;
            }
            assert!(Instant::now() < deadline, "waypoint not at version {want} after 10 s");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The waypoint's `/metrics`.
pub fn waypoint_metrics(pod: &Pod) -> String {
    node_metrics(&pod.netns)
}

/// Every access-log line of a waypoint so far (one per request).
pub fn access_log(proc: &Proc) -> Vec<serde_json::Value> {
    proc.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect()
}

/// YAML for waypoints.
pub mod yaml {
    use super::*;

    /// A namespace in the ambient mesh whose services use waypoint `waypoint`.
    pub fn namespace(name: &str, waypoint: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{istio.io/dataplane-mode: ambient, \
             istio.io/use-waypoint: {waypoint}}}}}\n---\n"
        )
    }

    /// The waypoint Gateway, as `istioctl waypoint generate` writes it.
    pub fn gateway(namespace: &str, name: &str) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: {namespace}, \
             labels: {{istio.io/waypoint-for: service}}}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  \
             - {{name: mesh, port: 15008, protocol: HBONE}}\n---\n"
        )
    }

    /// The waypoint's pod: labelled with its Gateway, scheduled on `node`
    /// (the name its process joins as), never enrolled by a node.
    pub fn instance(p: &Pod, gateway: &str, node: &str) -> String {
        labelled_instance(p, gateway, node, "")
    }

    /// [`instance`] with `extra` labels (`k: v, ...`).
    pub fn labelled_instance(p: &Pod, gateway: &str, node: &str, extra: &str) -> String {
        let (ns, name) = p.name.split_once('/').unwrap();
        let extra = if extra.is_empty() { String::new() } else { format!(", {extra}") };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{GATEWAY_NAME_LABEL}: {gateway}{extra}}}}}\n\
             spec: {{nodeName: {node}, serviceAccountName: {gateway}}}\n{}---\n",
            crate::mesh::yaml::status(p)
        )
    }

    /// A pod like [`crate::mesh::yaml::pod`] with a `version` label too.
    pub fn versioned_pod(p: &Pod, node: &str, app: &str, version: &str) -> String {
        labelled_pod(p, node, app, version, "")
    }

    /// [`versioned_pod`] with `extra` labels (`k: v, ...`).
    pub fn labelled_pod(p: &Pod, node: &str, app: &str, version: &str, extra: &str) -> String {
        let (ns, name) = p.name.split_once('/').unwrap();
        let extra = if extra.is_empty() { String::new() } else { format!(", {extra}") };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}, version: {version}{extra}}}, \
             annotations: {{{NETNS_ANNOTATION}: {}}}}}\nspec: {{nodeName: {node}, serviceAccountName: {app}}}\n{}---\n",
            p.netns.display(),
            crate::mesh::yaml::status(p)
        )
    }

    /// A Service with one HTTP port (`name: http`, so Istio reads it as HTTP).
    pub fn http_service(namespace: &str, name: &str, vip: &str, selector: &str, port: u16, target: u16) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
             spec: {{clusterIP: {vip}, selector: {{{selector}}}, ports: [{{name: http, port: {port}, targetPort: {target}}}]}}\n---\n"
        )
    }
}

/// A small HTTP/1.1 application for routing tests (Python's http.server,
/// keep-alive): `/` answers its version; `/echo` the request line and headers
/// as JSON; `/flaky/K?fail=N` answers 503 to the first N requests for K,
/// then 200; `/reset/K?fail=N` closes the connection without an answer the
/// first N times; `/slow?ms=N` answers after N ms (`/slowonce/K?ms=N`: only the first time; `/spans`: when
/// each `/slow` request it answered began and ended, `/spans?reset=1` starts over); `/fail` always 503;
/// `/hits/K` says how many requests K got; `/admin?fail=1` makes it answer 503
/// to everything else (but `/hits` and `/spans`) until `/admin?fail=0`, and
/// `/admin?delay=MS` delays every such answer; `/ws` switches protocols (101) and
/// then answers every byte upper-cased. POST bodies are answered with
/// their length and SHA-256 (PUT too; DELETE is answered as GET).
const APP: &str = r#"
import hashlib, json, sys, threading, time, urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import socket
VERSION, PORT = sys.argv[1], int(sys.argv[2])
hits, lock = {}, threading.Lock()
slow_spans = []
failing, delay = [False], [0]
def hit(key):
    with lock:
        hits[key] = hits.get(key, 0) + 1
        return hits[key]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One write per response, sent at once (Nagle would hold the body for the headers' ACK).
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    def log_message(self, *a): pass
    def answer(self, code, body, ctype="text/plain"):
        body = body.encode()
        self.send_response(code)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-version", VERSION)
        self.end_headers()
        self.wfile.write(body)
    def handle_any(self, body=b""):
        u = urllib.parse.urlparse(self.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        parts = u.path.strip("/").split("/")
        head = parts[0] if parts else ""
        key = "/".join(parts[1:])
        n = hit(u.path)
        if head == "admin":
            if "fail" in q:
                failing[0] = q["fail"] == "1"
            if "delay" in q:
                delay[0] = int(q["delay"])
            return self.answer(200, "failing\n" if failing[0] else "healthy\n")
        if head not in ("hits", "spans"):
            if failing[0]:
                return self.answer(503, "failing on purpose\n")
            if delay[0]:
                time.sleep(delay[0] / 1000)
        if head == "echo":
            return self.answer(200, json.dumps({"method": self.command, "path": self.path, "version": VERSION,
                "headers": {k.lower(): v for k, v in self.headers.items()}}), "application/json")
        if head == "flaky":
            if n <= int(q.get("fail", "1")):
                return self.answer(503, "failing %d\n" % n)
            return self.answer(200, "ok after %d\n" % n)
        if head == "reset":
            if n <= int(q.get("fail", "1")):
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            return self.answer(200, "ok after %d\n" % n)
        if head == "ws":
            self.send_response(101)
            self.send_header("Upgrade", self.headers.get("Upgrade", "echo"))
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while True:
                b = self.connection.recv(4096)
                if not b:
                    break
                self.connection.sendall(b.upper())
            self.close_connection = True
            return
        if head == "slowonce":
            if n == 1:
                time.sleep(int(q.get("ms", "2000")) / 1000)
            return self.answer(200, "attempt %d\n" % n)
        if head == "slow":
            began = time.time()
            time.sleep(int(q.get("ms", "1000")) / 1000)
            with lock:
                slow_spans.append((began, time.time()))
            return self.answer(200, "slow\n")
        if head == "spans":
            with lock:
                spans = list(slow_spans)
                if q.get("reset"):
                    slow_spans.clear()
            return self.answer(200, json.dumps(spans), "application/json")
        if head == "fail":
            return self.answer(503, "always\n")
        if head == "hits":
            with lock:
                return self.answer(200, str(hits.get("/" + key, 0)))
        if body:
            if head == "flakypost" and n <= int(q.get("fail", "1")):
                return self.answer(503, "failing %d\n" % n)
            return self.answer(200, "%d %s\n" % (len(body), hashlib.sha256(body).hexdigest()))
        return self.answer(200, VERSION + "\n")
    def do_GET(self): self.handle_any()
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.handle_any(body)
    do_PUT = do_POST
    do_DELETE = do_GET
class S(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
S(("::", PORT), H).serve_forever()
"#;

impl crate::topology::Topology {
    /// The routing test application ([`APP`]) in `pod` on `port`, answering `version` at `/`.
    pub fn app(&self, pod: &Pod, port: u16, version: &str) -> Proc {
        let log = self.dir.join(format!("app-{}-{port}.log", pod.name.replace('/', "_")));
        let port_s = port.to_string();
        let proc = Proc::spawn_in(
            &format!("app {}", pod.name),
            &pod.netns,
            &["python3", "-u", "-c", APP, version, &port_s],
            &log,
        );
        crate::topology::wait_http(pod, &format!("http://127.0.0.1:{port}/"), &proc);
        proc
    }
}

/// A gRPC server (Debian's python3-grpcio, generic handlers on raw bytes, so
/// no generated code): service `mesh.test.Echo` with one method of each
/// kind, every answer naming the server.
const GRPC_SERVER: &str = r#"
import grpc, sys
from concurrent import futures
NAME, PORT = sys.argv[1], int(sys.argv[2])
def unary(req, ctx): return NAME.encode()
def server_stream(req, ctx):
    for i in range(int(req.decode() or "3")):
        yield ("%s %d" % (NAME, i)).encode()
def client_stream(it, ctx): return ("%s got %d" % (NAME, sum(1 for _ in it))).encode()
def bidi(it, ctx):
    for m in it:
        yield NAME.encode() + b":" + m
handler = grpc.method_handlers_generic_handler("mesh.test.Echo", {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
    "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
    "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
})
s = grpc.server(futures.ThreadPoolExecutor(16))
s.add_generic_rpc_handlers((handler,))
s.add_insecure_port("[::]:%d" % PORT)
s.start()
print("listening", flush=True)
s.wait_for_termination()
"#;

/// A gRPC client: one channel to `argv[1]`, `argv[2]` unary calls, then one
/// call of each streaming kind; prints what came back as JSON.
pub const GRPC_CLIENT: &str = r#"
import collections, grpc, json, sys
ch = grpc.insecure_channel(sys.argv[1])
unary = ch.unary_unary("/mesh.test.Echo/Unary")
counts = collections.Counter(unary(b"x", timeout=10).decode() for _ in range(int(sys.argv[2])))
server_stream = [m.decode() for m in ch.unary_stream("/mesh.test.Echo/ServerStream")(b"5", timeout=10)]
client_stream = ch.stream_unary("/mesh.test.Echo/ClientStream")(iter([b"a"] * 7), timeout=10).decode()
bidi = [m.decode() for m in ch.stream_stream("/mesh.test.Echo/Bidi")(iter([b"1", b"2", b"3"]), timeout=10)]
try:
    ch.unary_unary("/mesh.test.Echo/Missing")(b"x", timeout=10)
    missing = "OK"
except grpc.RpcError as e:
    missing = e.code().name
print(json.dumps({"unary": counts, "server_stream": server_stream, "client_stream": client_stream, "bidi": bidi, "missing": missing}))
"#;

/// Debian's interpreter, which has python3-grpcio (a pyenv one first on PATH may not).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

impl crate::topology::Topology {
    /// The gRPC echo server ([`GRPC_SERVER`]) in `pod` on `port`, answering as `name`.
    pub fn grpc_server(&self, pod: &Pod, port: u16, name: &str) -> Proc {
        let log = self.dir.join(format!("grpc-{}-{port}.log", pod.name.replace('/', "_")));
        let port_s = port.to_string();
        let proc = Proc::spawn_in(
            &format!("grpc {}", pod.name),
            &pod.netns,
            &[SYSTEM_PYTHON, "-u", "-c", GRPC_SERVER, name, &port_s],
            &log,
        );
        proc.wait_for_log("listening", Duration::from_secs(20));
        proc
    }
}

pub const BACKEND_VIP: &str = "10.96.0.10";
pub const GRPC_VIP: &str = "10.96.0.13";

/// Two nodes: clients `client` and `other` (service accounts of those names)
/// on node1; backends b1 (node2, v1), b2 (node1, v1) and b3 (node2, v2) behind `backend` (HTTP, 80 to
/// 8080, [`APP`]) and `grpc` (9090, the gRPC echo server); the namespace bound
/// to waypoint `waypoint`, running in its own pod.
pub struct L7Setup {
    pub mesh: Mesh,
    /// `client` (service account `client`) and `other` (`other`), both on node1.
    pub client: Pod,
    pub other: Pod,
    pub wp_pod: Pod,
    pub wp: Proc,
    pub backends: Vec<Pod>,
    pub _apps: Vec<Proc>,
}

pub fn l7_setup(test: &str) -> Option<L7Setup> {
    l7_setup_with(test, &[])
}

/// Like [`l7_setup`], the waypoint started with `waypoint_flags`.
pub fn l7_setup_with(test: &str, waypoint_flags: &[&str]) -> Option<L7Setup> {
    l7_setup_labelled(test, waypoint_flags, "", ["", "", ""])
}

/// Like [`l7_setup_with`], with `extra` labels (`k: v, ...`) on the
/// waypoint's pod and on each backend pod.
pub fn l7_setup_labelled(
    test: &str,
    waypoint_flags: &[&str],
    waypoint_labels: &str,
    backend_labels: [&str; 3],
) -> Option<L7Setup> {
    let mesh = Mesh::start(test, &["node1", "node2"])?;
    let t = &mesh.t;
    let (client, other, wp_pod) = (t.pod("client"), t.pod("other"), t.pod("waypoint"));
    let backends = vec![t.pod("b1"), t.pod("b2"), t.pod("b3")];
    let config = yaml::namespace("default", "waypoint")
        + &yaml::gateway("default", "waypoint")
        + &yaml::labelled_instance(&wp_pod, "waypoint", "wp-1", waypoint_labels)
        + &crate::mesh::yaml::pod(&client, "node1", "client", "client")
        + &crate::mesh::yaml::pod(&other, "node1", "other", "other")
        + &yaml::labelled_pod(&backends[0], "node2", "backend", "v1", backend_labels[0])
        + &yaml::labelled_pod(&backends[1], "node1", "backend", "v1", backend_labels[1])
        + &yaml::labelled_pod(&backends[2], "node2", "backend", "v2", backend_labels[2])
        + &yaml::http_service("default", "backend", BACKEND_VIP, "app: backend", 80, 8080)
        + &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: grpc, namespace: default}}\n\
             spec: {{clusterIP: {GRPC_VIP}, selector: {{app: backend}}, ports: [{{name: grpc, port: 9090}}]}}\n---\n"
        );
    mesh.apply("mesh.yaml", &config);
    mesh.wait_ready(&[
        (&client, "node1", "client"),
        (&other, "node1", "other"),
        (&backends[0], "node2", "backend"),
        (&backends[1], "node1", "backend"),
        (&backends[2], "node2", "backend"),
    ]);
    let mut apps: Vec<Proc> = backends.iter().map(|p| t.app(p, 8080, p.name.trim_start_matches("default/"))).collect();
    apps.extend(backends.iter().map(|p| t.grpc_server(p, 9090, p.name.trim_start_matches("default/"))));
    mesh.reach_controller(&wp_pod);
    let wp = mesh.start_waypoint_with(&wp_pod, "wp-1", waypoint_flags, None, "info");
    Some(L7Setup { mesh, client, other, wp_pod, wp, backends, _apps: apps })
}

/// The HTTP status `pod` gets for `method url` with extra curl `args`
/// (`000` when the connection failed).
pub fn http_status(pod: &Pod, method: &str, url: &str, args: &[&str]) -> String {
    let mut all = vec!["curl", "-s", "-m", "10", "--path-as-is", "-o", "/dev/null", "-w", "%{http_code}", "-X", method];
    all.extend_from_slice(args);
    all.push(url);
    String::from_utf8_lossy(&run_in(&pod.netns, &all).stdout).trim().to_owned()
}
