//! AuthorizationPolicy `action: CUSTOM` at the waypoint, on the real kernel:
//! a real external authorizer in a mesh pod, behind a Service, over Envoy's
//! ext_authz HTTP protocol (Python's http.server) and its gRPC protocol
//! (grpcio with Envoy's own generated API, PyPI's xds-protos), configured as
//! Istio configures it (`MeshConfig.extensionProviders` in the `istio`
//! ConfigMap). The authorizer allows a request carrying `x-ext-authz: allow`
//! (as Istio's sample does), adds headers to the request and to the
//! response, and denies everything else with its own status, body and
//! headers; CUSTOM runs before DENY; requests the rules do not match never
//! reach it; an unreachable authorizer fails closed unless `failOpen`.
use std::time::{Duration, Instant};

use mesh_tests::{
    EXT_AUTHZ_PYTHONPATH, Pod, Proc,
    mesh::sum_metric,
    run_in,
    waypoint::{BACKEND_VIP, SYSTEM_PYTHON, access_log, l7_setup, waypoint_metrics},
};

const AUTHZ_VIP: &str = "10.96.0.30";
const HTTP_PORT: u16 = 8000;
const GRPC_PORT: u16 = 9000;
/// A port of the authorizer's Service where nothing listens.
const DOWN_PORT: u16 = 8001;

/// Both authorizers in one process: gRPC on 9000 (Envoy's
/// `envoy.service.auth.v3.Authorization` from xds-protos), HTTP on 8000.
/// Each check is printed, so the test can see what the authorizer was told.
const AUTHORIZER: &str = r#"
import socket, sys
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import grpc
from envoy.service.auth.v3 import external_auth_pb2 as pb, external_auth_pb2_grpc as pbg
from envoy.config.core.v3 import base_pb2
from envoy.type.v3 import http_status_pb2
from google.rpc import status_pb2

DENIED = "denied by ext_authz for not found header `x-ext-authz: allow` in the request"

def header(k, v):
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v))

class Authz(pbg.AuthorizationServicer):
    def Check(self, req, ctx):
        a = req.attributes
        h = a.request.http
        print("grpc check method=%s path=%s host=%s allow=%s principal=%s remove=%s" % (h.method, h.path, h.host,
              h.headers.get("x-ext-authz", ""), a.source.principal, h.headers.get("x-remove-me", "")), flush=True)
        if h.headers.get("x-ext-authz") == "allow":
            return pb.CheckResponse(status=status_pb2.Status(code=0), ok_response=pb.OkHttpResponse(
                headers=[header("x-ext-authz-check-result", "allowed")],
                headers_to_remove=["x-remove-me"],
                response_headers_to_add=[header("x-ext-authz-allowed-by", "grpc")]))
        return pb.CheckResponse(status=status_pb2.Status(code=7), denied_response=pb.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
            headers=[header("x-ext-authz-check-result", "denied")], body=DENIED + " (grpc)"))

g = grpc.server(futures.ThreadPoolExecutor(8))
pbg.add_AuthorizationServicer_to_server(Authz(), g)
g.add_insecure_port("[::]:%s" % sys.argv[2])
g.start()

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def check(self):
        print("http check method=%s path=%s host=%s allow=%s ignored=%s length=%s" % (self.command, self.path,
              self.headers.get("host"), self.headers.get("x-ext-authz", ""), self.headers.get("x-ignored", ""),
              self.headers.get("content-length")), flush=True)
        ok = self.headers.get("x-ext-authz") == "allow"
        body = b"" if ok else DENIED.encode()
        self.send_response(200 if ok else 403)
        self.send_header("x-ext-authz-check-result", "allowed" if ok else "denied")
        self.send_header("x-ext-authz-allowed-by", "http")
        self.send_header("x-not-for-the-client", "1")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = check

class S(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
print("listening", flush=True)
S(("::", int(sys.argv[1])), H).serve_forever()
"#;

fn authorizer(s: &mesh_tests::waypoint::L7Setup, pod: &Pod) -> Proc {
    let pythonpath = format!("PYTHONPATH={EXT_AUTHZ_PYTHONPATH}");
    let (http, grpc) = (HTTP_PORT.to_string(), GRPC_PORT.to_string());
    let proc = Proc::spawn_in(
        "ext-authz",
        &pod.netns,
        &["env", &pythonpath, SYSTEM_PYTHON, "-u", "-c", AUTHORIZER, &http, &grpc],
        &s.mesh.t.dir.join("ext-authz.log"),
    );
    proc.wait_for_log("listening", Duration::from_secs(20));
    proc
}

/// The Service the authorizer is reached by, and Istio's MeshConfig naming it.
fn providers() -> String {
    let host = "ext-authz.default.svc.cluster.local";
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: ext-authz, namespace: default}}\n\
         spec: {{clusterIP: {AUTHZ_VIP}, selector: {{app: other}}, ports: [{{name: http, port: {HTTP_PORT}}}, {{name: grpc, port: {GRPC_PORT}}}, {{name: http-down, port: {DOWN_PORT}}}]}}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |-\n    \
         extensionProviders:\n    \
         - name: http-authz\n      envoyExtAuthzHttp:\n        service: default/{host}\n        port: \"{HTTP_PORT}\"\n        \
           pathPrefix: /check\n        includeRequestHeadersInCheck: [x-ext-authz]\n        \
           headersToUpstreamOnAllow: [x-ext-authz-check-result]\n        headersToDownstreamOnAllow: [x-ext-authz-allowed-by]\n        \
           headersToDownstreamOnDeny: [x-ext-authz-check-result]\n    \
         - name: grpc-authz\n      envoyExtAuthzGrpc:\n        service: {host}\n        port: {GRPC_PORT}\n        timeout: 5s\n    \
         - name: down\n      envoyExtAuthzHttp: {{service: {host}, port: {DOWN_PORT}, timeout: 2s}}\n    \
         - name: down-503\n      envoyExtAuthzGrpc: {{service: {host}, port: {DOWN_PORT}, timeout: 2s, statusOnError: \"503\"}}\n    \
         - name: down-open\n      envoyExtAuthzHttp: {{service: {host}, port: {DOWN_PORT}, timeout: 2s, failOpen: true}}\n---\n"
    )
}

/// CUSTOM on the backend Service with `provider`, for every path but `/public*`.
fn custom(provider: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ext, namespace: default}}\n\
         spec:\n  targetRefs: [{{kind: Service, group: '', name: backend}}]\n  action: CUSTOM\n  \
         provider: {{name: {provider}}}\n  rules: [{{to: [{{operation: {{notPaths: ['/public*']}}}}]}}]\n---\n"
    )
}

/// DENY on the backend Service for `/echo/deny-me`: decided after CUSTOM.
const DENY_ME: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
    metadata: {name: deny-me, namespace: default}\nspec:\n  targetRefs: [{kind: Service, group: '', name: backend}]\n  \
    action: DENY\n  rules: [{to: [{operation: {paths: ['/echo/deny-me']}}]}]\n---\n";

/// `curl -i` of `path` on the backend with `headers`: status, headers (lowercase names), body.
fn get(pod: &Pod, path: &str, headers: &[&str]) -> (u16, Vec<(String, String)>, String) {
    let url = format!("http://{BACKEND_VIP}{path}");
    let mut args = vec!["curl", "-s", "-i", "-m", "15"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(&url);
    let out = String::from_utf8_lossy(&run_in(&pod.netns, &args).stdout).replace("\r\n", "\n");
    let (head, body) = out.split_once("\n\n").unwrap_or((&out, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Waits until a request to `/echo` with the allow header gets `want` (a change in force takes a moment).
fn eventually(pod: &Pod, want: u16, what: &str, log: &dyn Fn() -> String) {
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(20));
    loop {
        let (got, ..) = get(pod, "/echo", &["x-ext-authz: allow"]);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: got {got}, want {want}\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The checks the authorizer printed (the lines of its log that start with `kind`).
fn checks(authz: &Proc, kind: &str) -> Vec<String> {
    authz.log_text().lines().filter(|l| l.starts_with(kind)).map(str::to_owned).collect()
}

#[test]
fn custom_authorization_over_http_and_grpc() {
    let Some(s) = l7_setup("wp-extauthz") else { return };
    if !std::path::Path::new(EXT_AUTHZ_PYTHONPATH).exists() {
        mesh_tests::skip("custom_authorization_over_http_and_grpc", "xds-protos not installed: run cargo xtask test");
        return;
    }
    let authz = authorizer(&s, &s.other);
    let logs = || format!("waypoint:\n{}\nauthorizer:\n{}", s.wp.log_text(), authz.log_text());
    s.mesh.apply("providers.yaml", &providers());

    // --- The HTTP protocol.
    s.mesh.apply("authz.yaml", &(custom("http-authz") + DENY_ME));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(20));
    while checks(&authz, "http check").is_empty() {
        assert!(Instant::now() < deadline, "the HTTP authorizer was never asked\n{}", logs());
        let _ = get(&s.client, "/echo", &["x-ext-authz: allow"]);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, headers, body) = get(&s.client, "/echo?q=1", &["x-ext-authz: allow", "x-ignored: 1"]);
    assert_eq!(status, 200, "{}", logs());
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(echo["headers"]["x-ext-authz-check-result"], "allowed", "headersToUpstreamOnAllow: {echo}");
    assert_eq!(header(&headers, "x-ext-authz-allowed-by"), Some("http"), "headersToDownstreamOnAllow: {headers:?}");
    assert_eq!(header(&headers, "x-not-for-the-client"), None, "{headers:?}");
    let last = checks(&authz, "http check").pop().unwrap_or_default();
    // The client's method and path behind pathPrefix, its Host, the included header only, no body.
    assert!(
        last.contains("method=GET path=/check/echo?q=1 host=10.96.0.10 allow=allow ignored= length=0"),
        "what the authorizer was told: {last}\n{}",
        logs()
    );

    let (status, headers, body) = get(&s.client, "/echo", &[]);
    assert_eq!(status, 403, "{}", logs());
    assert!(body.starts_with("denied by ext_authz for not found header"), "the authorizer's body: {body}");
    assert_eq!(header(&headers, "x-ext-authz-check-result"), Some("denied"), "headersToDownstreamOnDeny: {headers:?}");
    assert_eq!(header(&headers, "x-ext-authz-allowed-by"), None, "not listed for denials: {headers:?}");
    let line = access_log(&s.wp).into_iter().rev().find(|l| l["path"] == "/echo").expect("an access-log line");
    assert_eq!((line["status"].as_u64(), line["response_flags"].as_str()), (Some(403), Some("UAEX")), "{line}");
    assert!(s.wp.log_text().contains("request denied by external authorizer"), "{}", logs());

    // CUSTOM decides first, then DENY: allowed by the authorizer, denied by the DENY policy.
    assert_eq!(get(&s.client, "/echo/deny-me", &["x-ext-authz: allow"]).2, "RBAC: access denied");
    assert!(get(&s.client, "/echo/deny-me", &[]).2.starts_with("denied by ext_authz"), "the authorizer decides first");
    // A path the CUSTOM rules do not match never reaches the authorizer.
    let asked = checks(&authz, "http check").len();
    assert_eq!(get(&s.client, "/public/x", &[]).0, 200);
    assert_eq!(checks(&authz, "http check").len(), asked, "the authorizer was asked about /public/x");

    // mesh-ctl names the authorizer the request goes to first.
    let out = s.mesh.ctl(&["authz", "explain", "--from", "client", "--to", "default/backend:80", "--path", "/echo"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("asks external authorizer \"http-authz\"") && text.contains("over HTTP"), "{text}");

    // --- The gRPC protocol, with Envoy's own message definitions.
    s.mesh.apply("authz.yaml", &(custom("grpc-authz") + DENY_ME));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(20));
    while checks(&authz, "grpc check").is_empty() {
        assert!(Instant::now() < deadline, "the gRPC authorizer was never asked\n{}", logs());
        let _ = get(&s.client, "/echo", &["x-ext-authz: allow"]);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, headers, body) = get(&s.client, "/echo", &["x-ext-authz: allow", "x-remove-me: 1"]);
    assert_eq!(status, 200, "{}", logs());
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(echo["headers"]["x-ext-authz-check-result"], "allowed", "ok_response.headers: {echo}");
    assert!(echo["headers"].get("x-remove-me").is_none(), "ok_response.headers_to_remove: {echo}");
    assert_eq!(header(&headers, "x-ext-authz-allowed-by"), Some("grpc"), "response_headers_to_add: {headers:?}");
    let last = checks(&authz, "grpc check").pop().unwrap_or_default();
    assert!(
        last.contains("method=GET path=/echo host=10.96.0.10 allow=allow")
            && last.contains("principal=spiffe://cluster.local/ns/default/sa/client remove=1"),
        "the attributes the authorizer was sent: {last}"
    );
    let (status, headers, body) = get(&s.client, "/echo", &[]);
    assert_eq!(
        (status, body.as_str()),
        (401, "denied by ext_authz for not found header `x-ext-authz: allow` in the request (grpc)")
    );
    assert_eq!(header(&headers, "x-ext-authz-check-result"), Some("denied"), "{headers:?}");

    let metrics = waypoint_metrics(&s.wp_pod);
    for (provider, result) in
        [("http-authz", "allowed"), ("http-authz", "denied"), ("grpc-authz", "allowed"), ("grpc-authz", "denied")]
    {
        let n =
            sum_metric(&metrics, "mesh_waypoint_ext_authz_checks_total", &[("provider", provider), ("result", result)]);
        assert!(n >= 1.0, "{provider} {result}: {n}\n{metrics}");
    }

    // --- An authorizer that cannot be asked: closed, statusOnError, failOpen.
    for (provider, want) in [("down", 403), ("down-503", 503), ("down-open", 200)] {
        s.mesh.apply("authz.yaml", &custom(provider));
        s.mesh.wait_waypoint_current(&s.wp_pod);
        eventually(&s.client, want, provider, &logs);
    }
    assert!(s.wp.log_text().contains("external authorizer could not be asked"), "{}", logs());
    let errors =
        sum_metric(&waypoint_metrics(&s.wp_pod), "mesh_waypoint_ext_authz_checks_total", &[("result", "error")]);
    assert!(errors >= 3.0, "{errors} errors counted");

    // --- A provider MeshConfig does not define: denied, and mesh-ctl says why.
    s.mesh.apply("authz.yaml", &custom("not-defined"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    eventually(&s.client, 403, "undefined provider", &logs);
    let out = s.mesh.ctl(&["authz", "explain", "--from", "client", "--to", "default/backend:80", "--path", "/echo"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("not-defined") && text.contains("does not define"), "{text}");

    // Its definition appearing later makes it take effect.
    s.mesh.apply(
        "providers.yaml",
        &providers().replace("- name: grpc-authz", "- name: not-defined\n      envoyExtAuthzGrpc: {service: ext-authz.default.svc.cluster.local, port: 9000}\n    - name: grpc-authz"),
    );
    eventually(&s.client, 200, "the provider defined", &logs);
}
