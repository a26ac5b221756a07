//! Bridge, pods and nodes in network namespaces, and the agents that run there.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Mutex, Once,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::process::{Proc, run_in, run_in_ok};

const PREFIX: &str = "mt-";
const BPFFS: &str = "/sys/fs/bpf";
pub(crate) const STATE_ROOT: &str = "/run/mesh-tests";
static NEXT_ID: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// One test's private network: a bridge in its own namespace, and the pods and
/// nodes attached to it, with blackhole routes for its subnets on this host
/// while it exists ([`crate::blackhole`]). Dropping it removes everything it
/// made.
pub struct Topology {
    pub id: String,
    /// Where process logs go (kept after a failed test for post-mortems).
    pub dir: PathBuf,
    net: PathBuf,
    created: Mutex<Created>,
    /// Set by [`Topology::keep`]: dropping leaves everything running.
    kept: bool,
    /// A command agents are started through ([`Topology::launch_agents_with`]).
    agent_launcher: Mutex<Vec<String>>,
}

#[derive(Default)]
struct Created {
    netns: Vec<String>,
    pods: u8,
    nodes: Vec<(PathBuf, Ipv4Addr)>,
    instances: Vec<String>,
    cgroups: Vec<PathBuf>,
}

/// A pod: a network namespace with one veth on the bridge, an IPv4 and an IPv6 address.
#[derive(Clone, Debug)]
pub struct Pod {
    /// `default/<name>`, as enrolled.
    pub name: String,
    pub netns: PathBuf,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl Topology {
    /// A topology for one test, named uniquely.
    pub fn new(test: &str) -> Topology {
        crate::require_root();
        SWEEP.call_once(sweep_leftovers);
        let id = format!("{PREFIX}{}-{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join("mesh-tests").join(format!("{test}-{id}"));
        Topology::named(&id, &dir)
    }

    /// A topology with a fixed name (the quickstart's), logs in `dir`. Remove
    /// an earlier one of the same name with [`remove_named`] first.
    pub fn named(id: &str, dir: &Path) -> Topology {
        crate::require_root();
        fs::create_dir_all(dir).expect("creating the log directory");
        let t = Topology {
            net: netns_path(&format!("{id}-net")),
            id: id.into(),
            dir: dir.into(),
            created: Mutex::default(),
            kept: false,
            agent_launcher: Mutex::default(),
        };
        let net = t.add_netns("net");
        // After the namespace that marks the routes as in use (sweep).
        crate::blackhole::add(id);
        ip(&["-n", &ns_name(&net), "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &ns_name(&net), "link", "set", "br0", "up"]);
        t
    }

    fn add_netns(&self, suffix: &str) -> PathBuf {
        let name = format!("{}-{suffix}", self.id);
        ip(&["netns", "add", &name]);
        self.created.lock().unwrap().netns.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        netns_path(&name)
    }

    /// A pod on the bridge, with addresses 10.200.0.N/24 and fd00:200::N/64.
    pub fn pod(&self, name: &str) -> Pod {
        self.pod_in("default", name)
    }

    /// A pod of Kubernetes namespace `namespace` (only its name says so).
    pub fn pod_in(&self, namespace: &str, name: &str) -> Pod {
        let n = {
            let mut c = self.created.lock().unwrap();
            c.pods += 1;
            c.pods + 1
        };
        let netns = self.add_netns(name);
        let (pod_ns, net_ns) = (ns_name(&netns), ns_name(&self.net));
        let veth = format!("v{n}");
        ip(&["-n", &net_ns, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod_ns]);
        ip(&["-n", &net_ns, "link", "set", &veth, "master", "br0", "up"]);
        let ip4 = Ipv4Addr::new(10, 200, 0, n);
        let ip6 = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, u16::from(n));
        ip(&["-n", &pod_ns, "addr", "add", &format!("{ip4}/24"), "dev", "eth0"]);
        ip(&["-n", &pod_ns, "addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
        ip(&["-n", &pod_ns, "link", "set", "eth0", "up"]);
        Pod { name: format!("{namespace}/{name}"), netns, ip4, ip6 }
    }

    /// A node: a namespace where an agent runs, so each agent has the standard
    /// ports to itself. It is on the bridge too, as 10.201.0.N/24 (a subnet of
    /// its own: pods do not route to it), so nodes reach a controller on
    /// another node.
    pub fn node(&self, name: &str) -> PathBuf {
        let netns = self.add_netns(name);
        let n = {
            let c = self.created.lock().unwrap();
            c.nodes.len() as u8 + 1
        };
        let (node_ns, net_ns) = (ns_name(&netns), ns_name(&self.net));
        let veth = format!("n{n}");
        ip(&["-n", &net_ns, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &node_ns]);
        ip(&["-n", &net_ns, "link", "set", &veth, "master", "br0", "up"]);
        let addr = Ipv4Addr::new(10, 201, 0, n);
        ip(&["-n", &node_ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ip(&["-n", &node_ns, "link", "set", "eth0", "up"]);
        self.created.lock().unwrap().nodes.push((netns.clone(), addr));
        netns
    }

    /// Connects this host to the bridge as `addr`/24 through a veth named
    /// `name` (so tools on the host reach nodes). It goes with the bridge's
    /// namespace.
    pub fn attach_host(&self, name: &str, addr: Ipv4Addr) {
        let net_ns = ns_name(&self.net);
        ip(&["link", "add", name, "type", "veth", "peer", "name", "host0", "netns", &net_ns]);
        ip(&["-n", &net_ns, "link", "set", "host0", "master", "br0", "up"]);
        ip(&["addr", "add", &format!("{addr}/24"), "dev", name]);
        ip(&["link", "set", name, "up"]);
    }

    /// The bridge address of a node made by [`Self::node`].
    pub fn node_ip(&self, node: &Path) -> Ipv4Addr {
        let c = self.created.lock().unwrap();
        c.nodes.iter().find(|(p, _)| p == node).map(|(_, ip)| *ip).expect("not a node of this topology")
    }

    /// The namespace that holds the bridge `br0` (where captures run).
    pub fn network(&self) -> &Path {
        &self.net
    }

    /// Starts `mesh-node` in `node` as instance `<id>-<name>` and waits until it
    /// is ready. `Err` carries the reason when the kernel lacks a feature.
    pub fn start_agent(&self, node: &Path, name: &str, extra: &[&str]) -> AgentStart {
        let instance = format!("{}-{name}", self.id);
        {
            let mut c = self.created.lock().unwrap();
            if !c.instances.contains(&instance) {
                c.instances.push(instance.clone());
            }
        }
        let bin = mesh_node_bin();
        let state_dir = format!("{STATE_ROOT}/{}", self.id);
        let log = self.dir.join(format!("agent-{name}-{}.log", now_millis()));
        let launcher = self.agent_launcher.lock().unwrap().clone();
        let mut args: Vec<&str> = launcher.iter().map(String::as_str).collect();
        args.extend([
            bin.to_str().unwrap(),
            "--instance",
            &instance,
            "--state-dir",
            &state_dir,
            "--log-format",
            "json",
        ]);
        args.extend_from_slice(extra);
        let admin_addr = extra
            .iter()
            .position(|a| *a == "--admin-addr")
            .and_then(|i| extra.get(i + 1))
            .map_or_else(|| "127.0.0.1:15000".to_owned(), |a| (*a).to_owned());
        let mut proc = Proc::spawn_in(&format!("agent {name}"), node, &args, &log);
        let deadline = Instant::now() + crate::patience(Duration::from_secs(30));
        loop {
            if !proc.is_running() {
                let code = proc.wait_exit(Duration::from_secs(1));
                let text = proc.log_text();
                if code == Some(3) {
                    return Err(text.lines().last().unwrap_or("kernel feature missing").to_string());
                }
                panic!("agent {name} exited ({code:?}) before it was ready:\n{text}");
            }
            let ready = run_in(node, &["curl", "-sf", "-m", "1", "http://127.0.0.1:15021/healthz/ready"]);
            if ready.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "agent {name} not ready after 30 s:\n{}", proc.log_text());
            thread::sleep(Duration::from_millis(50));
        }
        let pin_dir = Path::new(BPFFS).join("mesh").join(&instance);
        let state_dir = Path::new(&state_dir).join(&instance);
        Ok(Agent { proc, node: node.into(), instance, pin_dir, admin_addr, state_dir })
    }

    /// Agents started from now on are started through `launcher` (a command
    /// that execs its arguments, such as `setpriv` with fewer capabilities),
    /// so the agent's own process is the one the test holds.
    pub fn launch_agents_with(&self, launcher: &[&str]) {
        *self.agent_launcher.lock().unwrap() = launcher.iter().map(|a| (*a).to_owned()).collect();
    }

    /// Like [`Self::start_agent`], but says SKIPPED and returns `None` where the
    /// kernel lacks a feature.
    pub fn agent_or_skip(&self, test: &str, node: &Path, name: &str, extra: &[&str]) -> Option<Agent> {
        match self.start_agent(node, name, extra) {
            Ok(agent) => Some(agent),
            Err(reason) => {
                crate::skip(test, &reason);
                None
            }
        }
    }

    /// `python3 -m http.server` on `[::]:port` in `pod` (dual-stack), once it answers.
    pub fn http_server(&self, pod: &Pod, port: u16) -> Proc {
        let log = self.dir.join(format!("http-{}-{port}.log", pod.name.replace('/', "_")));
        let port_s = port.to_string();
        let proc = Proc::spawn_in(
            &format!("http server {}", pod.name),
            &pod.netns,
            &["python3", "-u", "-m", "http.server", &port_s, "--bind", "::", "--directory", self.dir.to_str().unwrap()],
            &log,
        );
        wait_http(pod, &format!("http://127.0.0.1:{port}/"), &proc);
        proc
    }

    /// A cgroup v2 child of the root, removed with the topology.
    pub fn cgroup(&self, name: &str) -> PathBuf {
        let path = cgroup_root().join(format!("{}-{name}", self.id));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        self.created.lock().unwrap().cgroups.push(path.clone());
        path
    }
}

impl Topology {
    /// Leaves the topology and its processes in place when dropped (the
    /// quickstart's mesh keeps running; [`remove_named`] takes it down).
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let c = std::mem::take(&mut *self.created.lock().unwrap_or_else(|e| e.into_inner()));
        // A failed test's logs stay for the post-mortem; a passing test's go
        // (hundreds of runs had filled /tmp with gigabytes), unless asked.
        let keep_logs = thread::panicking() || std::env::var_os("MESH_KEEP_LOGS").is_some();
        if thread::panicking() {
            eprintln!("test topology {} failed; logs are in {}", self.id, self.dir.display());
        }
        for name in c.netns.iter().rev() {
            kill_netns_processes(name);
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
        crate::blackhole::remove(&self.id);
        for instance in &c.instances {
            // Unlinking the pins detaches links a killed agent left behind.
            let _ = fs::remove_dir_all(Path::new(BPFFS).join("mesh").join(instance));
        }
        let _ = fs::remove_dir_all(Path::new(STATE_ROOT).join(&self.id));
        for cg in &c.cgroups {
            let _ = fs::remove_dir(cg);
        }
        if !keep_logs {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Result of starting an agent: `Err` is the reason the kernel cannot run it.
pub type AgentStart = Result<Agent, String>;

/// A running `mesh-node` and its admin API.
pub struct Agent {
    pub proc: Proc,
    pub node: PathBuf,
    pub instance: String,
    pub pin_dir: PathBuf,
    /// `ip:port` of its admin API (reached from inside its node).
    pub admin_addr: String,
    /// Its instance's state directory (persisted state, the CNI plugin's socket).
    pub state_dir: PathBuf,
}

impl Agent {
    fn admin(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let url = format!("http://{}{path}", self.admin_addr);
        let mut args = vec!["curl", "-s", "-m", "10", "-X", method, "-w", "\n%{http_code}", &url];
        if let Some(body) = body {
            args.extend_from_slice(&["-H", "content-type: application/json", "-d", body]);
        }
        let out = run_in_ok(&self.node, &args);
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    pub fn enroll(&self, pod: &Pod) {
        let body = format!(r#"{{"name":"{}","netns":"{}"}}"#, pod.name, pod.netns.display());
        let (code, text) = self.admin("POST", "/pods", Some(&body));
        assert_eq!(code, 201, "enrolling {}: {text}", pod.name);
    }

    /// Reports where `name`'s network namespace is, as a CNI plugin does when
    /// it sets a pod up (`PUT /netns`); with a controller, the pod is then
    /// enrolled once the controller schedules it here in an ambient namespace.
    pub fn report_netns(&self, name: &str, netns: &Path) {
        let body = format!(r#"{{"name":"{name}","netns":"{}"}}"#, netns.display());
        let (code, text) = self.admin("PUT", "/netns", Some(&body));
        assert_eq!(code, 204, "reporting the network namespace of {name}: {text}");
    }

    /// Runs the real CNI plugin (`mesh-cni`) as a container runtime does
    /// for the pod `name` (`namespace/name`) in `netns`: command `command`
    /// (ADD, DEL), the CNI environment, the network configuration on stdin
    /// with the previous plugin's result. Its exit status and standard output.
    pub fn cni(&self, command: &str, name: &str, netns: &Path) -> (bool, String) {
        use std::io::Write as _;
        let (namespace, pod) = name.split_once('/').expect("namespace/name");
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"mesh-test","type":"mesh-cni","agent_socket":"{}",
                "prevResult":{{"cniVersion":"1.0.0","interfaces":[{{"name":"eth0","sandbox":"{}"}}],"ips":[]}}}}"#,
            self.state_dir.join("cni.sock").display(),
            netns.display()
        );
        let mut child = std::process::Command::new(sibling_bin("mesh-cni"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("test-{}", pod))
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}"))
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("running mesh-cni");
        child.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
        let out = child.wait_with_output().expect("mesh-cni");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn unenroll(&self, pod: &Pod) {
        let (code, text) = self.admin("DELETE", &format!("/pods?name={}", pod.name), None);
        assert_eq!(code, 204, "unenrolling {}: {text}", pod.name);
    }

    pub fn config_dump(&self) -> Value {
        let (code, text) = self.admin("GET", "/config_dump", None);
        assert_eq!(code, 200, "config dump: {text}");
        serde_json::from_str(&text).expect("config dump is JSON")
    }

    /// Every access-log line (one per proxied connection) so far.
    pub fn access_log(&self) -> Vec<Value> {
        self.proc
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect()
    }

    /// Waits up to 5 s for an access-log line matching `pred`.
    pub fn wait_access(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + crate::patience(Duration::from_secs(5));
        loop {
            if let Some(v) = self.access_log().into_iter().find(|v| pred(v)) {
                return v;
            }
            assert!(Instant::now() < deadline, "no access-log line for {what}; log:\n{}", self.proc.log_text());
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Stops the agent with SIGTERM and returns its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.proc.signal(libc::SIGTERM);
        self.proc.wait_exit(Duration::from_secs(15))
    }
}

impl Pod {
    /// curl from this pod; returns the output (check `status`).
    pub fn curl(&self, url: &str) -> Output {
        let seconds = crate::patience(Duration::from_secs(3)).as_secs().to_string();
        run_in(&self.netns, &["curl", "-sS", "-m", &seconds, "-o", "/dev/null", "-w", "%{http_code}", url])
    }

    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 { IpAddr::V6(self.ip6) } else { IpAddr::V4(self.ip4) }
    }
}

/// Waits up to 10 s until `url` answers from inside `pod` (a server it started).
pub(crate) fn wait_http(pod: &Pod, url: &str, proc: &Proc) {
    let deadline = Instant::now() + crate::patience(Duration::from_secs(10));
    while !run_in(&pod.netns, &["curl", "-sf", "-o", "/dev/null", "-m", "1", url]).status.success() {
        assert!(Instant::now() < deadline, "server in {} did not answer {url}:\n{}", pod.name, proc.log_text());
        thread::sleep(Duration::from_millis(50));
    }
}

/// The client addresses an `http.server` log shows, IPv4-mapped ones as IPv4,
/// leaving out loopback (the harness's own readiness probe).
pub fn http_clients(server: &Proc) -> Vec<IpAddr> {
    server
        .log_text()
        .lines()
        .filter(|l| l.contains("\"GET "))
        .filter_map(|l| l.split_whitespace().next()?.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .filter(|ip| !ip.is_loopback())
        .collect()
}

fn mesh_node_bin() -> PathBuf {
    match std::env::var_os("MESH_NODE_BIN") {
        Some(bin) => bin.into(),
        None => sibling_bin("mesh-node"),
    }
}

/// Where [`sibling_bin`] looks instead, when set (the quickstart runs the
/// release build from a debug xtask).
pub const BIN_DIR_VAR: &str = "MESH_BIN_DIR";

/// The directory of the executable's own build profile: target/<profile>.
fn own_profile_dir() -> PathBuf {
    // target/<profile>/deps/<test> (a test) or target/<profile>/xtask -> target/<profile>
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("target dir").to_path_buf();
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir").to_path_buf();
    }
    dir
}

/// target/`profile`, beside the executable's own profile directory.
pub fn profile_dir(profile: &str) -> PathBuf {
    own_profile_dir().parent().expect("target dir").join(profile)
}

/// A binary of this workspace, built beside the test executable (or in
/// `$MESH_BIN_DIR`).
pub fn sibling_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os(BIN_DIR_VAR).map_or_else(own_profile_dir, PathBuf::from);
    let bin = dir.join(name);
    assert!(bin.exists(), "{} not built: run `cargo build` first (cargo xtask test does)", bin.display());
    bin
}

pub(crate) fn cgroup_root() -> PathBuf {
    let unified = PathBuf::from("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() { unified } else { PathBuf::from("/sys/fs/cgroup") }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

fn ns_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// Processes whose network namespace is `name`.
fn netns_pids(name: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

fn kill_netns_processes(name: &str) {
    for pid in netns_pids(name) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

pub(crate) fn now_millis() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// Removes every trace of topologies whose id `matches`: processes (agents get
/// SIGTERM first, so one started with --cleanup detaches its programs itself),
/// namespaces, pins, state and cgroups. Returns what it removed.
fn remove_matching(matches: impl Fn(&str) -> bool) -> Vec<String> {
    let entries = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    };
    let netns: Vec<String> = entries(Path::new("/run/netns")).into_iter().filter(|n| matches(n)).collect();
    for name in &netns {
        terminate_netns_processes(name);
    }
    for name in &netns {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
    }
    crate::blackhole::sweep();
    let mut removed = netns;
    let remove_dir: fn(&Path) -> std::io::Result<()> = |p| fs::remove_dir(p);
    let remove_all: fn(&Path) -> std::io::Result<()> = |p| fs::remove_dir_all(p);
    for (dir, remove) in [
        (Path::new(BPFFS).join("mesh"), remove_all),
        (PathBuf::from(STATE_ROOT), remove_all),
        (cgroup_root(), remove_dir),
    ] {
        for name in entries(&dir).into_iter().filter(|n| matches(n)) {
            if remove(&dir.join(&name)).is_ok() {
                removed.push(dir.join(name).display().to_string());
            }
        }
    }
    removed
}

/// Takes down the topology named `id` (see [`Topology::named`]).
pub fn remove_named(id: &str) -> Vec<String> {
    let prefix = format!("{id}-");
    remove_matching(|name| name == id || name.starts_with(&prefix))
}

/// Removes what test runs that were killed outright (their pid is gone) left.
fn sweep_leftovers() {
    remove_matching(|name| {
        let Some(rest) = name.strip_prefix(PREFIX) else { return false };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        pid.is_some_and(|pid| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists())
    });
}

/// SIGTERM to every process in the namespace, then SIGKILL to what is left after 5 s.
fn terminate_netns_processes(name: &str) {
    for pid in netns_pids(name) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + crate::patience(Duration::from_secs(5));
    while !netns_pids(name).is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    kill_netns_processes(name);
}
