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
};

use super::DIR;

pub const NAMESPACE: &str = "demo";
pub const FRONTEND_VIP: &str = "10.96.0.30";
pub const BACKEND_VIP: &str = "10.96.0.10";
pub const REDIS_VIP: &str = "10.96.0.20";

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
        mesh.apply("20-services.yaml", &services_yaml());
        let ready: Vec<(&Pod, &str, &str)> = app.members.iter().map(|m| (&m.pod, m.node, m.sa)).collect();
        mesh.wait_ready(&ready);
        Ok(app)
    }

    pub fn pods_yaml(&self) -> String {
        self.members.iter().map(|m| yaml::pod(&m.pod, m.node, m.sa, m.app)).collect()
    }

    pub fn member(&self, name: &str) -> &Member {
        self.members.iter().find(|m| m.pod.name == format!("{NAMESPACE}/{name}")).expect("a demo pod")
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

        let script = dir.join("backend.py");
        std::fs::write(&script, BACKEND_PY)?;
        for name in ["backend-1", "backend-2"] {
            let m = self.member(name);
            let redis_addr = format!("{REDIS_VIP}:6379");
            let p = Proc::spawn_in(
                name,
                &m.pod.netns,
                &["python3", "-u", script.to_str().unwrap(), name, m.node, &redis_addr],
                &dir.join(format!("{name}.log")),
            );
            wait_until(&m.pod, &["curl", "-s", "-m", "2", "http://127.0.0.1:8080/"], name, &p)?;
            procs.push(p);
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

fn services_yaml() -> String {
    [
        yaml::service(NAMESPACE, "frontend", FRONTEND_VIP, "frontend", &[(80, 80)]),
        yaml::service(NAMESPACE, "backend", BACKEND_VIP, "backend", &[(80, 8080)]),
        yaml::service(NAMESPACE, "redis", REDIS_VIP, "redis", &[(6379, 6379)]),
    ]
    .concat()
}

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
