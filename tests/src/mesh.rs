//! A whole mesh in namespaces: a controller on a node of its own, agents on
//! simulated nodes joined to it, pods scheduled on them by the configuration
//! the test writes; and the YAML a user would write for that.
use std::{
    fmt::Write as _,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use crate::{
    controller::Controller,
    kube::Kube,
    process::{Proc, run_in},
    topology::{Agent, Pod, Topology},
};

pub struct Node {
    pub name: String,
    pub netns: PathBuf,
    pub agent: Agent,
}

pub struct Mesh {
    pub controller: Controller,
    pub nodes: Vec<Node>,
    /// The API server the controller reads, for a mesh on Kubernetes.
    pub kube: Option<Kube>,
    pub t: Topology,
    /// Arguments every agent gets besides the harness's own.
    agent_extra: Vec<String>,
}

impl Mesh {
    /// A controller and one agent per name in `nodes`. `None` (after saying
    /// SKIPPED) where the kernel cannot run the agent.
    pub fn start(test: &str, nodes: &[&str]) -> Option<Mesh> {
        Self::start_in(Topology::new(test), test, nodes)
    }

    pub fn start_in(t: Topology, test: &str, nodes: &[&str]) -> Option<Mesh> {
        let cnode = t.node("controller");
        let controller = t.start_controller(&cnode, &[]);
        Self::join(t, controller, test, nodes)
    }

    /// Like [`Self::start`], with the controller reading a real API server
    /// (on the controller's node, with mesh's CRDs installed) instead of a
    /// directory; [`Self::apply`] is then `kubectl apply`.
    pub fn start_on_kubernetes(test: &str, nodes: &[&str]) -> Option<Mesh> {
        Self::start_on_kubernetes_with(test, nodes, &[])
    }

    /// Like [`Self::start_on_kubernetes`], every agent also started with `extra` arguments.
    pub fn start_on_kubernetes_with(test: &str, nodes: &[&str], extra: &[&str]) -> Option<Mesh> {
        let t = Topology::new(test);
        let cnode = t.node("controller");
        let kube = t.start_kube(&cnode);
        kube.install_crds_and_namespace();
        let kubeconfig = kube.kubeconfig.display().to_string();
        let controller = t.start_controller(&cnode, &["--kubernetes", "--kubeconfig", &kubeconfig]);
        // Each agent joins with its pod's service-account token: no join tokens on Kubernetes.
        for node in nodes {
            controller.set_node_token(node, &kube.node_agent_token(node));
        }
        let mut mesh = Self::join_with(t, controller, test, nodes, extra)?;
        mesh.kube = Some(kube);
        Some(mesh)
    }

    /// Like [`Self::start`], every agent also started with `extra` arguments.
    pub fn start_with(test: &str, nodes: &[&str], extra: &[&str]) -> Option<Mesh> {
        let t = Topology::new(test);
        let cnode = t.node("controller");
        let controller = t.start_controller(&cnode, &[]);
        Self::join_with(t, controller, test, nodes, extra)
    }

    /// Agents on new nodes `nodes`, joined to `controller` ([`agent_args`]).
    pub fn join(t: Topology, controller: Controller, test: &str, nodes: &[&str]) -> Option<Mesh> {
        Self::join_with(t, controller, test, nodes, &[])
    }

    fn join_with(t: Topology, controller: Controller, test: &str, nodes: &[&str], extra: &[&str]) -> Option<Mesh> {
        write_admin_token(&t);
        let agent_extra: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
        let mut started = Vec::new();
        for name in nodes {
            let netns = t.node(name);
            let args = agent_args(&t, &controller, name, &netns, &agent_extra);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let agent = t.agent_or_skip(test, &netns, name, &args)?;
            started.push(Node { name: (*name).into(), netns, agent });
        }
        Some(Mesh { controller, nodes: started, kube: None, t, agent_extra })
    }

    /// Kills node `name`'s agent (SIGKILL: no drain, as a crash) and starts
    /// a new one with the same instance, state directory and arguments.
    pub fn restart_agent(&mut self, name: &str) {
        let i = self.nodes.iter().position(|n| n.name == name).expect("no such node");
        self.nodes[i].agent.proc.kill();
        let netns = self.nodes[i].netns.clone();
        let args = agent_args(&self.t, &self.controller, name, &netns, &self.agent_extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.nodes[i].agent = self.t.start_agent(&netns, name, &args).expect("the agent ran here before");
    }

    /// Starts a new agent on node `name` beside the running one, as an
    /// upgrade does (same instance, state and arguments): it takes the pods'
    /// listeners over. Returns the old agent, which drains and exits.
    pub fn upgrade_agent(&mut self, name: &str) -> Agent {
        let i = self.nodes.iter().position(|n| n.name == name).expect("no such node");
        let netns = self.nodes[i].netns.clone();
        let args = agent_args(&self.t, &self.controller, name, &netns, &self.agent_extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let new = self.t.start_agent(&netns, name, &args).expect("the agent ran here before");
        // The old agent answered the readiness probe until it handed over.
        new.proc.wait_for_log("mesh-node ready", crate::patience(Duration::from_secs(20)));
        std::mem::replace(&mut self.nodes[i].agent, new)
    }

    /// Pods `a` (sa-a, node1) and `b` (sa-b, node2) in an ambient `default`
    /// namespace, enrolled and certified, with nginx on b:80 and a one-shot
    /// iperf3 server on b: the two ends most load tests need.
    pub fn a_and_b_serving(&self) -> (Pod, Pod, Vec<Proc>) {
        let (a, b) = (self.t.pod("a"), self.t.pod("b"));
        let config = [
            yaml::namespace("default", true),
            yaml::pod(&a, "node1", "sa-a", "a"),
            yaml::pod(&b, "node2", "sa-b", "b"),
        ]
        .concat();
        self.apply("mesh.yaml", &config);
        self.wait_ready(&[(&a, "node1", "sa-a"), (&b, "node2", "sa-b")]);
        let nginx = self.t.nginx(&b, 80, "b\n", 10);
        let iperf = Proc::spawn_in("iperf3 -s", &b.netns, &["iperf3", "-s", "-1"], &self.t.dir.join("iperf-s.log"));
        thread::sleep(Duration::from_millis(300));
        (a, b, vec![nginx, iperf])
    }

    /// Runs `mesh-ctl` in the controller's namespace, pointed at it, with
    /// the nodes' admin token.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let bin = crate::topology::sibling_bin("mesh-ctl");
        let url = format!("http://{}", self.controller.metrics_addr);
        let token = admin_token_file(&self.t);
        let mut all = vec![bin.to_str().unwrap(), "--controller", &url, "--admin-token-file", token.to_str().unwrap()];
        all.extend_from_slice(args);
        run_in(&self.controller.netns, &all)
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).expect("no such node")
    }

    /// Writes (or replaces) a configuration file, then waits until every
    /// node's proxy enforces the configuration that results. Returns how long
    /// that took. On Kubernetes, `kubectl apply`s the objects instead (and
    /// writes the Pods' status, as a kubelet would): objects of an earlier
    /// apply that `yaml` leaves out stay, as with kubectl.
    pub fn apply(&self, file: &str, yaml: &str) -> Duration {
        let before = self.controller.json("/debug/nodes")["version"].clone();
        let start = Instant::now();
        match &self.kube {
            Some(kube) => {
                kube.apply_ok(yaml);
                // The pods' sandboxes are made after they are scheduled: the
                // CNI plugin runs, and returns once the pod is enrolled.
                self.cni_add_pods(yaml);
                for (namespace, name, ips) in pod_ips_in(yaml) {
                    kube.set_pod_ips(&namespace, &name, &ips);
                }
            }
            None => {
                self.report_pods(yaml);
                self.controller.write(file, yaml);
            }
        }
        let deadline = start + crate::patience(Duration::from_secs(10));
        loop {
            let now = self.controller.json("/debug/nodes")["version"].clone();
            if now != before && self.nodes.iter().all(|n| n.agent.config_dump()["proxy"]["version"] == now) {
                return start.elapsed();
            }
            assert!(Instant::now() < deadline, "{file}: configuration not in force on every node after 10 s");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Plays the container runtime's part: runs the real CNI plugin's ADD for
    /// each Pod in `yaml` scheduled on one of the nodes, and checks that when
    /// it returns the pod is already enrolled (a pod of an ambient namespace)
    /// or not (any other): the app would start only then.
    pub fn cni_add_pods(&self, yaml: &str) {
        for (name, node, netns) in pods_in(yaml) {
            let Some(n) = self.nodes.iter().find(|n| n.name == node) else { continue };
            let (ok, out) = n.agent.cni("ADD", &name, &netns);
            assert!(ok, "mesh-cni ADD {name} failed: {out}");
            let enrolled = n.agent.config_dump()["pods"].as_array().into_iter().flatten().any(|p| p["name"] == name);
            let captured = self.controller.json("/debug/model")["workloads"][format!("Pod/{name}")]["captured"] == true;
            assert_eq!(enrolled, captured, "{name} when mesh-cni ADD returned: {out}");
        }
    }

    /// Plays the CNI plugin's part: each Pod in `yaml` scheduled on one of
    /// the nodes has its network namespace (the `mesh.io/netns` annotation
    /// the harness writes) reported to that node. The controller never
    /// carries it: it is node-local knowledge.
    pub fn report_pods(&self, yaml: &str) {
        for (name, node, netns) in pods_in(yaml) {
            if let Some(n) = self.nodes.iter().find(|n| n.name == node) {
                n.agent.report_netns(&name, &netns);
            }
        }
    }

    /// Waits until every node has enrolled its pods among `pods` and its proxy
    /// holds a certificate for each of their identities.
    pub fn wait_ready(&self, pods: &[(&Pod, &str, &str)]) {
        let deadline = Instant::now() + crate::patience(Duration::from_secs(20));
        for node in &self.nodes {
            let want: Vec<(&str, String)> = pods
                .iter()
                .filter(|(_, n, _)| *n == node.name)
                .map(|(p, _, sa)| (p.name.as_str(), identity(p.name.split('/').next().unwrap(), sa)))
                .collect();
            loop {
                let dump = node.agent.config_dump();
                let enrolled: Vec<&str> =
                    dump["pods"].as_array().into_iter().flatten().filter_map(|p| p["name"].as_str()).collect();
                let ids: Vec<&str> = dump["certificates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i["identity"].as_str())
                    .collect();
                if want.iter().all(|(pod, id)| enrolled.contains(pod) && ids.contains(&id.as_str())) {
                    break;
                }
                assert!(Instant::now() < deadline, "node {} not ready for {want:?}:\n{dump:#}", node.name);
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The value of a counter on a node's `/metrics`, summed over the series
    /// whose labels include every `label="value"` in `labels`.
    pub fn metric(&self, node: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = node_metrics(&self.node(node).netns);
        sum_metric(&text, name, labels)
    }
}

/// How the harness starts the agent of node `name`: joined to `controller`,
/// its admin API on the node's bridge address (announced to the controller,
/// so `mesh-ctl` finds it), readable from other hosts with the topology's
/// admin token.
fn agent_args(
    t: &Topology,
    controller: &Controller,
    name: &str,
    netns: &std::path::Path,
    extra: &[String],
) -> Vec<String> {
    let mut args = controller.agent_args(name);
    args.extend_from_slice(extra);
    args.extend(["--admin-addr".into(), format!("{}:15000", t.node_ip(netns))]);
    args.extend(["--admin-token-file".into(), admin_token_file(t).display().to_string()]);
    args
}

/// The file holding the admin token of a topology's nodes.
pub fn admin_token_file(t: &Topology) -> PathBuf {
    t.dir.join("admin-token")
}

/// A fresh random admin token for the topology's nodes, readable by root only.
fn write_admin_token(t: &Topology) {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let mut random = [0u8; 24];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut random)).expect("reading /dev/urandom");
    let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let path = admin_token_file(t);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    std::io::Write::write_all(&mut file, token.as_bytes()).expect("writing the admin token");
}

/// The Pod documents of a YAML text.
fn pod_documents(yaml: &str) -> Vec<serde_yaml_ng::Value> {
    use serde::Deserialize as _;
    serde_yaml_ng::Deserializer::from_str(yaml)
        .filter_map(|doc| serde_yaml_ng::Value::deserialize(doc).ok())
        .filter(|v| v["kind"].as_str() == Some("Pod"))
        .collect()
}

/// The Pods of a YAML text: `namespace/name`, the node they are scheduled
/// on, and the network namespace their `mesh.io/netns` annotation names.
pub fn pods_in(yaml: &str) -> Vec<(String, String, PathBuf)> {
    let mut out = Vec::new();
    for v in pod_documents(yaml) {
        let meta = &v["metadata"];
        let (Some(name), Some(node), Some(netns)) =
            (meta["name"].as_str(), v["spec"]["nodeName"].as_str(), meta["annotations"][NETNS_ANNOTATION].as_str())
        else {
            continue;
        };
        let namespace = meta["namespace"].as_str().unwrap_or("default");
        out.push((format!("{namespace}/{name}"), node.to_owned(), PathBuf::from(netns)));
    }
    out
}

/// The Pods of a YAML text that have addresses in their status: namespace,
/// name, addresses.
fn pod_ips_in(yaml: &str) -> Vec<(String, String, Vec<std::net::IpAddr>)> {
    let mut out = Vec::new();
    for v in pod_documents(yaml) {
        let ips: Vec<std::net::IpAddr> = v["status"]["podIPs"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|i| i["ip"].as_str()?.parse().ok())
            .collect();
        if ips.is_empty() {
            continue;
        }
        let meta = &v["metadata"];
        let namespace = meta["namespace"].as_str().unwrap_or("default").to_owned();
        out.push((namespace, meta["name"].as_str().unwrap_or_default().to_owned(), ips));
    }
    out
}

/// Where the harness's Pod YAML names the pod's network namespace, for its
/// stand-in CNI ([`Mesh::report_pods`]); the controller ignores it.
pub const NETNS_ANNOTATION: &str = "mesh.io/netns";

pub fn node_metrics(netns: &std::path::Path) -> String {
    let out = run_in(netns, &["curl", "-sf", "-m", "5", "http://127.0.0.1:15020/metrics"]);
    assert!(out.status.success(), "GET /metrics on the node failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sums the samples of `name` whose labels include all of `labels`.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn identity(namespace: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{namespace}/sa/{sa}")
}

/// YAML a user writes.
pub mod yaml {
    use super::*;

    pub fn namespace(name: &str, ambient: bool) -> String {
        let label = if ambient { ", labels: {istio.io/dataplane-mode: ambient}" } else { "" };
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}{label}}}\n---\n")
    }

    /// A pod scheduled on `node` with service account `sa` and label `app: <app>`.
    pub fn pod(p: &Pod, node: &str, sa: &str, app: &str) -> String {
        let (ns, name) = p.name.split_once('/').unwrap();
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}, \
             annotations: {{{NETNS_ANNOTATION}: {}}}}}\nspec: {{nodeName: {node}, serviceAccountName: {sa}, \
             containers: [{{name: app, image: app}}]}}\n{}---\n",
            p.netns.display(),
            status(p)
        )
    }

    /// A Pod's `status` with both its addresses.
    pub fn status(p: &Pod) -> String {
        format!("status: {{podIP: {}, podIPs: [{{ip: {}}}, {{ip: {}}}]}}\n", p.ip4, p.ip4, p.ip6)
    }

    /// A Service with a cluster IP, selecting `app`.
    pub fn service(namespace: &str, name: &str, vip: &str, app: &str, ports: &[(u16, u16)]) -> String {
        let mut p = String::new();
        for (port, target) in ports {
            let _ = write!(p, "{{port: {port}, targetPort: {target}}}, ");
        }
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
             spec: {{clusterIP: {vip}, selector: {{app: {app}}}, ports: [{}]}}\n---\n",
            p.trim_end_matches(", ")
        )
    }

    pub fn peer_authentication(namespace: &str, mode: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: {namespace}}}\n\
             spec: {{mtls: {{mode: {mode}}}}}\n---\n"
        )
    }

    /// An AuthorizationPolicy with the given spec (flow-style YAML).
    pub fn authorization(namespace: &str, name: &str, spec: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n---\n"
        )
    }
}

/// Real servers in pods.
impl Topology {
    /// nginx on `[::]:port` (and IPv4) in `pod`, serving `body` at `/` and a
    /// file of `size` bytes at `/blob`; waits until it answers.
    pub fn nginx(&self, pod: &Pod, port: u16, body: &str, size: usize) -> Proc {
        let dir = self.dir.join(format!("nginx-{}-{port}", pod.name.replace('/', "_")));
        std::fs::create_dir_all(dir.join("root")).unwrap();
        std::fs::write(dir.join("root/index.html"), body).unwrap();
        std::fs::write(dir.join("root/blob"), vec![b'x'; size]).unwrap();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\nhttp {{\n access_log off;\n \
             client_body_temp_path {d}/tmp;\n proxy_temp_path {d}/tmp;\n fastcgi_temp_path {d}/tmp;\n \
             uwsgi_temp_path {d}/tmp;\n scgi_temp_path {d}/tmp;\n keepalive_requests 100000;\n \
             server {{ listen {port}; listen [::]:{port}; root {d}/root; }}\n}}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let conf_path = dir.join("nginx.conf");
        let proc = Proc::spawn_in(
            &format!("nginx {}", pod.name),
            &pod.netns,
            &["nginx", "-c", conf_path.to_str().unwrap(), "-e", dir.join("error.log").to_str().unwrap()],
            &dir.join("stdout.log"),
        );
        crate::topology::wait_http(pod, &format!("http://127.0.0.1:{port}/"), &proc);
        proc
    }

    /// A TCP peer that reads until the client closes its side, then answers
    /// `reply` bytes and closes: an exchange whose byte counts are known.
    pub fn sink_server(&self, pod: &Pod, port: u16, reply: usize) -> Proc {
        let script = format!(
            "import socket,threading\n\
             s=socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0); s.bind(('::',{port})); s.listen(64)\n\
             print('listening',flush=True)\n\
             def serve(c):\n\
             \x20   n=0\n\
             \x20   while True:\n\
             \x20       b=c.recv(65536)\n\
             \x20       if not b: break\n\
             \x20       n+=len(b)\n\
             \x20   c.sendall(b'r'*{reply}); c.close(); print('got',n,flush=True)\n\
             while True:\n\
             \x20   c,_=s.accept(); threading.Thread(target=serve,args=(c,)).start()\n"
        );
        let log = self.dir.join(format!("sink-{}-{port}.log", pod.name.replace('/', "_")));
        let proc = Proc::spawn_in("sink", &pod.netns, &["python3", "-u", "-c", &script], &log);
        proc.wait_for_log("listening", Duration::from_secs(10));
        proc
    }

    /// An echo server in `pod` on each of `ports`.
    pub fn echo_server(&self, pod: &Pod, ports: &[u16]) -> Proc {
        const ECHO: &str = "import socket,sys,threading\n\
def serve(c):\n\
\x20   while True:\n\
\x20       b=c.recv(4096)\n\
\x20       if not b: break\n\
\x20       c.sendall(b)\n\
def listen(port):\n\
\x20   s=socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
\x20   s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0); s.bind(('::',port)); s.listen(16)\n\
\x20   while True:\n\
\x20       c,_=s.accept(); threading.Thread(target=serve,args=(c,),daemon=True).start()\n\
for p in sys.argv[1:]: threading.Thread(target=listen,args=(int(p),),daemon=True).start()\n\
print('listening',flush=True)\n\
threading.Event().wait()\n";
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let mut args = vec!["python3", "-u", "-c", ECHO];
        args.extend(ports.iter().map(String::as_str));
        let log = self.dir.join(format!("echo-{}-{}.log", pod.name.replace('/', "_"), ports.join("-")));
        let proc = Proc::spawn_in("echo", &pod.netns, &args, &log);
        proc.wait_for_log("listening", Duration::from_secs(10));
        proc
    }

    /// A connection from `pod` to an echo server at `ip`:`port` that sends a
    /// ping every 50 ms and reads it back; returns once three round trips
    /// are done. Its log says `closed after N` when the connection ends.
    pub fn held_connection(&self, pod: &Pod, ip: &str, port: u16) -> Proc {
        const HOLD: &str = "import socket,sys,time\n\
s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=30)\n\
n=0\n\
while True:\n\
\x20   try:\n\
\x20       s.sendall(b'ping'); b=s.recv(64)\n\
\x20   except OSError as e:\n\
\x20       b=b''\n\
\x20   if not b: print('closed after',n,flush=True); break\n\
\x20   n+=1\n\
\x20   if n==3: print('connected',flush=True)\n\
\x20   time.sleep(0.05)\n";
        let log = self.dir.join(format!("hold-{}-{ip}-{port}.log", pod.name.replace('/', "_")));
        let proc = Proc::spawn_in(
            &format!("hold {port}"),
            &pod.netns,
            &["python3", "-u", "-c", HOLD, ip, &port.to_string()],
            &log,
        );
        proc.wait_for_log("connected", Duration::from_secs(10));
        proc
    }
}

/// A client in `pod` opening a new connection to `ip`:80 every 5 ms for
/// `seconds` (or until SIGTERM), each an HTTP/1.0 GET that must be answered
/// 200; see [`prober_counts`].
pub fn connection_prober(pod: &Pod, ip: &str, seconds: u64, log: &std::path::Path) -> Proc {
    const SCRIPT: &str = r#"
import signal, socket, sys, time
ip, seconds = sys.argv[1], float(sys.argv[2])
ok = failed = 0
end = time.time() + seconds
def stop(*_):
    global end
    end = 0
signal.signal(signal.SIGTERM, stop)
while time.time() < end:
    try:
        s = socket.create_connection((ip, 80), timeout=5)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            b = s.recv(4096)
            if not b: break
            data += b
        s.close()
        good = data.startswith(b"HTTP/1.1 200")
    except OSError as e:
        good = False
        print("failed:", e, flush=True)
    ok += good
    failed += not good
    time.sleep(0.005)
print(ok, failed, flush=True)
"#;
    Proc::spawn_in("connection prober", &pod.netns, &["python3", "-c", SCRIPT, ip, &seconds.to_string()], log)
}

/// (served, failed) of a [`connection_prober`] that has exited.
pub fn prober_counts(prober: &Proc) -> (u64, u64) {
    prober
        .log_text()
        .lines()
        .rev()
        .find_map(|l| l.split_once(' ').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?))))
        .unwrap_or((0, u64::MAX))
}

/// Sends `send` bytes from `pod` to `addr`, closes its side, and returns how
/// many bytes came back (`None` when the connection failed).
pub fn exchange(pod: &Pod, addr: &str, send: usize) -> Option<usize> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let seconds = crate::patience(Duration::from_secs(5)).as_secs();
    let script = format!(
        "import socket,sys\n\
         c=socket.create_connection(('{}',{port}),timeout={seconds}); c.sendall(b's'*{send}); c.shutdown(socket.SHUT_WR)\n\
         n=0\n\
         while True:\n\
         \x20   b=c.recv(65536)\n\
         \x20   if not b: break\n\
         \x20   n+=len(b)\n\
         print(n)\n",
        host.trim_matches(['[', ']'])
    );
    let out = run_in(&pod.netns, &["python3", "-c", &script]);
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}
