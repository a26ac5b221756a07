//! `cargo xtask quickstart`: a small mesh on this host, built with the same
//! namespace harness as the tests. One simulated node runs `mesh-node`; pods
//! `frontend` and `backend` are enrolled, `legacy` is not. It drives traffic,
//! shows what the node proxy saw, and leaves everything running until
//! `cargo xtask quickstart --down`.
use std::{path::Path, thread, time::Duration};

use anyhow::Context as _;
use mesh_tests::{Pod, Topology, remove_named};
use serde_json::Value;

use crate::{cargo, prereqs, step};

/// Every namespace, pin and state directory of the quickstart starts with this.
const ID: &str = "mq";
const LOG_DIR: &str = "/var/tmp/mesh-quickstart";

pub fn up() -> anyhow::Result<()> {
    prereqs::require_root("cargo xtask quickstart")?;
    prereqs::ensure()?;
    step("building mesh-node");
    cargo(&["build", "-p", "mesh-node"])?;
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let bin = metadata.target_directory.join("debug/mesh-node");
    // SAFETY: still single-threaded; the harness reads this to find the agent.
    unsafe { std::env::set_var("MESH_NODE_BIN", bin.as_std_path()) };

    if !remove_named(ID).is_empty() {
        step("removed the previous quickstart");
    }
    let _ = std::fs::remove_dir_all(LOG_DIR);
    step("creating the topology: a bridge, pods frontend/backend/legacy, node node1");
    let t = Topology::named(ID, Path::new(LOG_DIR));
    let (frontend, backend, legacy) = (t.pod("frontend"), t.pod("backend"), t.pod("legacy"));
    let node = t.node("node1");
    for pod in [&frontend, &backend, &legacy] {
        eprintln!("    pod {:<18} {:<12} {:<16} netns {}", pod.name, pod.ip4, pod.ip6, pod.netns.display());
    }

    step("starting mesh-node on node1 and enrolling default/frontend and default/backend");
    let agent = t.start_agent(&node, "node1", &["--cleanup"]).map_err(|reason| anyhow::anyhow!(reason))?;
    agent.enroll(&frontend);
    agent.enroll(&backend);
    let servers = [t.http_server(&backend, 8080), t.http_server(&legacy, 8080)];

    step("sending traffic");
    for (from, to, what) in [
        (&frontend, &backend, "enrolled -> enrolled: redirected out, steered in"),
        (&legacy, &backend, "not enrolled -> enrolled: steered in"),
        (&frontend, &legacy, "enrolled -> not enrolled: redirected out, plain TCP on"),
        (&frontend, &backend, "the same over IPv6"),
    ] {
        let v6 = what.contains("IPv6");
        let url = if v6 { format!("http://[{}]:8080/", to.ip6) } else { format!("http://{}:8080/", to.ip4) };
        let out = from.curl(&url);
        let status = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("    {} -> {url:<28} HTTP {status}   ({what})", short(from));
    }
    thread::sleep(Duration::from_millis(300));

    step("what the node proxy saw (one access-log line per connection)");
    eprintln!(
        "    {:<9} {:<17} {:<18} {:<24} {:<26} {:>6} {:>6}",
        "DIRECTION", "POD", "LISTENER", "SOURCE", "ORIGINAL DEST", "SENT", "RECV"
    );
    for v in agent.access_log() {
        eprintln!(
            "    {:<9} {:<17} {:<18} {:<24} {:<26} {:>6} {:>6}",
            text(&v["direction"]),
            text(&v["pod"]),
            text(&v["listener"]),
            text(&v["src"]),
            text(&v["original_dst"]),
            text(&v["bytes_sent"]),
            text(&v["bytes_received"])
        );
    }
    let pins = agent.pin_dir.display().to_string();
    let node_ns = node.display().to_string();
    agent.proc.leave_running();
    for s in servers {
        s.leave_running();
    }
    t.keep();

    step("the mesh is running; try:");
    eprintln!("    nsenter --net={node_ns} curl -s 127.0.0.1:15000/config_dump     # what node1 sees");
    eprintln!("    nsenter --net=/run/netns/{ID}-frontend curl -s http://{}:8080/ # more traffic", backend.ip4);
    eprintln!("    bpftool link show; ls {pins}/links                # the programs and their pins");
    eprintln!("    tail -f {LOG_DIR}/agent-node1-*.log              # the agent's log");
    eprintln!("    cargo xtask quickstart --down                     # remove everything");
    Ok(())
}

pub fn down() -> anyhow::Result<()> {
    prereqs::require_root("cargo xtask quickstart --down")?;
    let removed = remove_named(ID);
    let _ = std::fs::remove_dir_all(LOG_DIR);
    if removed.is_empty() {
        eprintln!("no quickstart mesh was running");
    } else {
        eprintln!("removed: {}", removed.join(", "));
    }
    Ok(())
}

fn short(pod: &Pod) -> &str {
    pod.name.trim_start_matches("default/")
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}
