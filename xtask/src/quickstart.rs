//! `cargo xtask quickstart`: a whole mesh on this host. `mesh-controller` runs
//! on the host with a config directory written here; two simulated nodes
//! (network namespaces on one bridge) each run `mesh-node`; the sample app of
//! namespace `demo` runs in pods: nginx (frontend) calls a Python backend
//! service (two replicas, one per node), which counts visits in redis. It
//! drives traffic, shows the tour (identities, HBONE on the wire, a policy
//! that blocks a caller, metrics), starts a real Prometheus scraping it all,
//! and leaves everything running until `cargo xtask quickstart --down`.
mod app;
mod prometheus;
mod tour;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::{Placement, Topology, mesh::Mesh, remove_named, sibling_bin};

use crate::{cargo, prereqs, step};

/// Every namespace, pin and state directory of the quickstart starts with this.
pub const ID: &str = "mq";
pub const DIR: &str = "/var/tmp/mesh-quickstart";
/// The host's end of the veth into the quickstart's bridge.
pub const HOST_IF: &str = "mq-host";
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 254);
/// Where `mesh-ctl`'s default `--controller` finds it.
pub const METRICS_ADDR: &str = "127.0.0.1:15014";

fn pid_file() -> PathBuf {
    Path::new(DIR).join("controller.pid")
}

pub fn up(no_build: bool, debug: bool) -> anyhow::Result<()> {
    prereqs::require_root("cargo xtask quickstart")?;
    prereqs::ensure()?;
    if !no_build {
        let crates = ["-p", "mesh-node", "-p", "mesh-waypoint", "-p", "mesh-controller", "-p", "mesh-ctl"];
        if debug {
            step("building mesh-node, mesh-waypoint, mesh-controller and mesh-ctl (debug: --debug)");
            cargo(&[&["build"], &crates[..]].concat())?;
        } else {
            // What users will run: the mesh's cost measured here is the
            // release build's (the debug build carried a database's small
            // exchanges at a third of the release build's rate).
            step(
                "building mesh-node, mesh-waypoint, mesh-controller and mesh-ctl in release mode \
                 (the first build takes a few minutes, later ones are cached; --debug for a debug build)",
            );
            cargo(&[&["build", "--release"], &crates[..]].concat())?;
            let release = mesh_tests::profile_dir("release");
            // SAFETY: single-threaded here, before any process or thread starts.
            unsafe { std::env::set_var(mesh_tests::BIN_DIR_VAR, &release) };
        }
    }
    if down_quietly()? {
        step("removed the previous quickstart");
    }
    std::fs::create_dir_all(DIR)?;

    step("network: a bridge, nodes node1 (10.201.0.1) and node2 (10.201.0.2), this host as 10.201.0.254");
    let t = Topology::named(ID, Path::new(DIR));
    t.attach_host(HOST_IF, HOST_IP);
    // nsenter opening its own namespace: it stays in this host's.
    let host_netns = Path::new("/proc/self/ns/net");
    step("starting mesh-controller on this host (nodes dial 10.201.0.254:15012; HTTP on 127.0.0.1:15014)");
    let grpc = format!("{HOST_IP}:15012");
    let controller = t.start_controller_at(
        Placement { netns: host_netns, grpc_addr: &grpc, metrics_addr: METRICS_ADDR, dial: grpc.clone() },
        &[],
    );
    std::fs::write(pid_file(), controller.proc.pid().to_string())?;
    step("starting mesh-node on node1 and node2");
    let Some(mesh) = Mesh::join(t, controller, "quickstart", &["node1", "node2"]) else {
        bail!("this kernel cannot run mesh-node (see the SKIPPED line above)");
    };

    step("the demo app: namespace demo (ambient), pods, services; then its servers");
    let app = app::App::create(&mesh)?;
    let servers = app.start_servers()?;

    let ctl = Ctl::new(mesh_tests::mesh::admin_token_file(&mesh.t));
    let (l7, waypoint) = tour::run(&mesh, &app, &ctl)?;

    step(&format!(
        "Prometheus (Debian's package) on http://{}, scraping the controller, both nodes and the waypoint",
        prometheus::ADDR
    ));
    let nodes: Vec<String> = mesh.nodes.iter().map(|n| format!("{}:15020", mesh.t.node_ip(&n.netns))).collect();
    let targets = [
        ("mesh-controller", vec![METRICS_ADDR.to_owned()]),
        ("mesh-node", nodes),
        ("mesh-waypoint", vec![format!("{}:15020", mesh_tests::waypoint::nodes_side(&waypoint))]),
    ];
    let prometheus = prometheus::start(&targets)?;
    prometheus.leave_running();

    let Mesh { controller, nodes, t, .. } = mesh;
    controller.proc.leave_running();
    for node in nodes {
        node.agent.proc.leave_running();
    }
    for s in servers.into_iter().chain(l7) {
        s.leave_running();
    }
    t.keep();
    tour::next_steps(&ctl);
    Ok(())
}

pub fn down() -> anyhow::Result<()> {
    prereqs::require_root("cargo xtask quickstart --down")?;
    if !down_quietly()? {
        println!("no quickstart was running");
    }
    Ok(())
}

/// Removes everything a quickstart made; says what. `false`: there was nothing.
fn down_quietly() -> anyhow::Result<bool> {
    let mut removed = Vec::new();
    for (name, pid_file) in [("mesh-controller", pid_file()), ("prometheus", prometheus::pid_file())] {
        if let Some(pid) = quickstart_process(&pid_file, name) {
            stop(pid);
            removed.push(format!("{name} (pid {pid})"));
        }
    }
    removed.extend(remove_named(ID));
    // The veth goes with the bridge's namespace; this is in case that failed.
    if Path::new("/sys/class/net").join(HOST_IF).exists() {
        let _ = std::process::Command::new("ip").args(["link", "del", HOST_IF]).status();
        removed.push(format!("link {HOST_IF}"));
    }
    if Path::new(DIR).exists() {
        std::fs::remove_dir_all(DIR).with_context(|| format!("removing {DIR}"))?;
        removed.push(DIR.into());
    }
    for r in &removed {
        println!("removed {r}");
    }
    Ok(!removed.is_empty())
}

/// The pid of the program `name` a quickstart started, if it still runs
/// (and is still that program: pids are reused).
fn quickstart_process(pid_file: &Path, name: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains(name) && cmdline.contains(DIR)).then_some(pid)
}

/// SIGTERM, then SIGKILL after 5 s.
fn stop(pid: i32) {
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// The `mesh-ctl` built beside this xtask, run on this host.
pub struct Ctl {
    pub bin: PathBuf,
    /// The nodes' admin token: mesh-ctl on this host is another host to them.
    pub admin_token: PathBuf,
}

impl Ctl {
    fn new(admin_token: PathBuf) -> Ctl {
        Ctl { bin: sibling_bin("mesh-ctl"), admin_token }
    }

    /// Runs `mesh-ctl ARGS` and returns its output (stdout, then stderr).
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = std::process::Command::new(&self.bin)
            .args(args)
            .env("MESH_CONTROLLER", format!("http://{METRICS_ADDR}"))
            .env("MESH_ADMIN_TOKEN_FILE", &self.admin_token)
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        Ok(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}
