//! The quickstart's sample application and the configuration that meshes it.
//! Pods are network namespaces on the bridge; the servers are Debian's
//! (nginx, redis, python3), started inside them.
use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::{
    Pod, Proc,
    mesh::{Mesh, yaml},
    run_in,
    waypoint::yaml as l7,
};

use super::DIR;

pub const NAMESPACE: &str = "demo";
pub const FRONTEND_VIP: &str = "10.96.0.30";
pub const BACKEND_VIP: &str = "10.96.0.10";
pub const REDIS_VIP: &str = "10.96.0.20";
/// The name the waypoint's process joins the controller as (its Pod's nodeName).
pub const WAYPOINT_NODE: &str = "waypoint-1";

/// A pod of the demo: where it runs and as whom.
pub struct Member {
    pub pod: Pod,
    pub node: &'static str,
    pub sa: &'static str,
    pub app: &'static str,
}

pub struct App {
    pub members: Vec<Member>,
}

impl App {
    /// Makes the pods and writes their configuration; returns once every node
    /// has enrolled its pods and holds their certificates.
    pub fn create(mesh: &Mesh) -> anyhow::Result<App> {
        let spec: [(&str, &str, &str, &str); 5] = [
            ("tester", "node1", "tester", "tester"),
            ("frontend", "node1", "frontend", "frontend"),
            ("backend-1", "node1", "backend", "backend"),
            ("backend-2", "node2", "backend", "backend"),
            ("redis", "node2", "redis", "redis"),
        ];
        let members: Vec<Member> = spec
            .into_iter()
            .map(|(name, node, sa, app)| Member { pod: mesh.t.pod_in(NAMESPACE, name), node, sa, app })
            .collect();
        for m in &members {
            println!(
                "    pod {:<16} on {}  {:<12} {:<14} service account {}",
                m.pod.name, m.node, m.pod.ip4, m.pod.ip6, m.sa
            );
        }
        let app = App { members };
        // One file: a namespace alone changes nothing nodes hold, so nothing to wait for.
        mesh.apply("10-demo.yaml", &format!("{}{}", yaml::namespace(NAMESPACE, true), app.pods_yaml()));
        mesh.apply("20-services.yaml", &services_yaml(false));
        let ready: Vec<(&Pod, &str, &str)> = app.members.iter().map(|m| (&m.pod, m.node, m.sa)).collect();
        mesh.wait_ready(&ready);
        Ok(app)
    }

    /// The backends carry `version: v1` (the canary will be v2).
    pub fn pods_yaml(&self) -> String {
        self.members
            .iter()
            .map(|m| match m.app {
                "backend" => l7::versioned_pod(&m.pod, m.node, m.app, "v1"),
                _ => yaml::pod(&m.pod, m.node, m.sa, m.app),
            })
            .collect()
    }

    pub fn member(&self, name: &str) -> &Member {
        self.members.iter().find(|m| m.pod.name == format!("{NAMESPACE}/{name}")).expect("a demo pod")
    }

    /// The L7 part: a waypoint for the backend service (a Gateway of class
    /// istio-waypoint, its pod, its process), a canary backend v2, then the
    /// backend service bound to the waypoint. Returns the processes started.
    pub fn add_waypoint(&self, mesh: &Mesh) -> anyhow::Result<(Pod, Vec<Proc>)> {
        let (wp, v2) = (mesh.t.pod_in(NAMESPACE, "waypoint"), mesh.t.pod_in(NAMESPACE, "backend-v2"));
        println!("    pod {:<16} (the waypoint, joins the controller as {WAYPOINT_NODE})  {}", wp.name, wp.ip4);
        println!("    pod {:<16} on node2  {}  version v2 (the canary)", v2.name, v2.ip4);
        let config = l7::gateway(NAMESPACE, "waypoint")
            + &l7::instance(&wp, "waypoint", WAYPOINT_NODE)
            + &l7::versioned_pod(&v2, "node2", "backend", "v2");
        mesh.apply("40-waypoint.yaml", &config);
        mesh.wait_ready(&[(&v2, "node2", "backend")]);
        let mut procs = vec![self.start_backend(&v2, "backend-v2", "node2")?];
        mesh.reach_controller(&wp);
        procs.push(mesh.start_waypoint(&wp, WAYPOINT_NODE));
        // Bound last, once the waypoint runs: a bound service whose waypoint is down is refused.
        mesh.apply("20-services.yaml", &services_yaml(true));
        mesh.wait_waypoint_current(&wp);
        Ok((wp, procs))
    }

    fn start_backend(&self, pod: &Pod, name: &str, node: &str) -> anyhow::Result<Proc> {
        let dir = Path::new(DIR).join("app");
        let script = dir.join("backend.py");
        std::fs::write(&script, BACKEND_PY)?;
        let redis_addr = format!("{REDIS_VIP}:6379");
        let p = Proc::spawn_in(
            name,
            &pod.netns,
            &["python3", "-u", script.to_str().unwrap(), name, node, &redis_addr],
            &dir.join(format!("{name}.log")),
        );
        wait_until(pod, &["curl", "-s", "-m", "2", "http://127.0.0.1:8080/"], name, &p)?;
        Ok(p)
    }

    /// redis, both backends and the frontend, each answering before the next starts.
    pub fn start_servers(&self) -> anyhow::Result<Vec<Proc>> {
        let dir = Path::new(DIR).join("app");
        std::fs::create_dir_all(&dir)?;
        let mut procs = Vec::new();

        let redis = &self.member("redis").pod;
        let p = Proc::spawn_in(
            "redis",
            &redis.netns,
            &[
                "redis-server",
                "--bind",
                "0.0.0.0 ::",
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--dir",
                dir.to_str().unwrap(),
            ],
            &dir.join("redis.log"),
        );
        wait_until(redis, &["redis-cli", "-h", "127.0.0.1", "ping"], "PONG", &p)?;
        procs.push(p);

        for name in ["backend-1", "backend-2"] {
            let m = self.member(name);
            procs.push(self.start_backend(&m.pod, name, m.node)?);
        }

        let frontend = &self.member("frontend").pod;
        let conf = nginx_conf(&dir.join("nginx"))?;
        let p = Proc::spawn_in(
            "frontend",
            &frontend.netns,
            &["nginx", "-c", conf.to_str().unwrap()],
            &dir.join("frontend.log"),
        );
        wait_until(frontend, &["curl", "-s", "-m", "3", "http://127.0.0.1/"], "visit", &p)?;
        procs.push(p);
        Ok(procs)
    }
}

/// The services; the backend's port is named `http` (so Istio and mesh treat
/// it as HTTP), and `bound` labels it `istio.io/use-waypoint: waypoint`.
fn services_yaml(bound: bool) -> String {
    let label = if bound { ", labels: {istio.io/use-waypoint: waypoint}" } else { "" };
    let backend = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: backend, namespace: {NAMESPACE}{label}}}\n\
         spec: {{clusterIP: {BACKEND_VIP}, selector: {{app: backend}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n"
    );
    [
        yaml::service(NAMESPACE, "frontend", FRONTEND_VIP, "frontend", &[(80, 80)]),
        backend,
        yaml::service(NAMESPACE, "redis", REDIS_VIP, "redis", &[(6379, 6379)]),
    ]
    .concat()
}

/// The canary: DestinationRule subsets by version, and a VirtualService that
/// sends the tester's marked requests (x-tester: yes) to v2 and 10 % of the rest.
pub const ROUTES_YAML: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend, namespace: demo}
spec:
  host: backend
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend, namespace: demo}
spec:
  hosts: [backend]
  http:
  - name: marked-tester
    match: [{headers: {x-tester: {exact: 'yes'}}}]
    route: [{destination: {host: backend, subset: v2}}]
  - name: canary
    route:
    - {destination: {host: backend, subset: v1}, weight: 90}
    - {destination: {host: backend, subset: v2}, weight: 10}
";

/// Runs `cmd` in `pod` until its output contains `want` (10 s at most).
fn wait_until(pod: &Pod, cmd: &[&str], want: &str, server: &Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = run_in(&pod.netns, cmd);
        if String::from_utf8_lossy(&out.stdout).contains(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} did not answer `{}` in 10 s; its log:\n{}", server.name, cmd.join(" "), server.log_text());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// nginx on port 80, passing every request to the backend service.
fn nginx_conf(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir.join("tmp")).context("nginx dir")?;
    let d = dir.display();
    let conf = format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 1024; }}\nhttp {{\n access_log {d}/access.log;\n \
         client_body_temp_path {d}/tmp;\n proxy_temp_path {d}/tmp;\n fastcgi_temp_path {d}/tmp;\n \
         uwsgi_temp_path {d}/tmp;\n scgi_temp_path {d}/tmp;\n \
         server {{ listen 80; listen [::]:80; location / {{ proxy_pass http://{BACKEND_VIP}:80; }} }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// The backend: answers each GET with its name, its node and a visit count
/// it keeps in redis (INCR over RESP, through the redis service).
const BACKEND_PY: &str = r#"import http.server, socket, sys

NAME, NODE, REDIS = sys.argv[1], sys.argv[2], sys.argv[3]


def incr():
    host, port = REDIS.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.sendall(b"*2\r\n$4\r\nINCR\r\n$6\r\nvisits\r\n")
        reply = s.recv(64)
    if not reply.startswith(b":"):
        raise RuntimeError(reply.decode(errors="replace").strip() or "connection closed")
    return int(reply[1:].split(b"\r\n")[0])


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            code, body = 200, f"{NAME} on {NODE}: visit {incr()}\n"
        except Exception as e:
            code, body = 503, f"{NAME} on {NODE}: redis unavailable: {e}\n"
        data = body.encode()
        self.send_response(code)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


Server(("::", 8080), Handler).serve_forever()
"#;
