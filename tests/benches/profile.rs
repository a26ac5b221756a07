//! Where the node proxies' CPU time goes (`cargo xtask bench profile`): the
//! profiles behind PERFORMANCE.md, taken the same way every time. Two
//! nodes, a client pod on node1, a server pod on node2 (cross-node, HBONE)
//! and one on node1 (the same-node path); release agents. Each load runs
//! for [`SECONDS`] while `perf record -e cpu-clock` samples both agents at
//! once (this VM has no hardware counters); each sample is put in a
//! category by its symbol ([`category`]). Prints one table per load and
//! writes /var/tmp/mesh-bench/profile.json.
//!
//! Pinning as in the dataplane bench: clients on CPU 0, servers on CPU 1,
//! agents unpinned.
use std::{collections::BTreeMap, path::Path, process::Command, thread, time::Duration};

use mesh_tests::{
    Pod, Proc,
    bench::{
        SECONDS, iperf,
        profile::{TABLE_ORDER, category},
        wrk,
    },
    mesh::{Mesh, yaml},
};
use serde_json::{Value, json};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`
    }
    let Some(mesh) = Mesh::start("bench-profile", &["node1", "node2"]) else { return };
    let c = mesh.t.pod("client");
    let s_far = mesh.t.pod("server-far");
    let s_near = mesh.t.pod("server-near");
    let config = format!(
        "{}{}{}{}",
        yaml::namespace("default", true),
        yaml::pod(&c, "node1", "client", "client"),
        yaml::pod(&s_far, "node2", "server", "far"),
        yaml::pod(&s_near, "node1", "server", "near"),
    );
    mesh.apply("mesh.yaml", &config);
    mesh.wait_ready(&[(&c, "node1", "client"), (&s_far, "node2", "server"), (&s_near, "node1", "server")]);
    let mut servers = Vec::new();
    for s in [&s_far, &s_near] {
        servers.push(mesh.t.nginx(s, 80, "hello\n", 10));
        let log = mesh.t.dir.join(format!("iperf-{}.log", s.ip4));
        servers.push(Proc::spawn_in("iperf3", &s.netns, &["taskset", "-c", "1", "iperf3", "-s"], &log));
    }
    thread::sleep(Duration::from_millis(500));
    let (n1, n2) = (mesh.node("node1").agent.proc.pid(), mesh.node("node2").agent.proc.pid());
    let dir = Path::new("/var/tmp/mesh-bench");
    std::fs::create_dir_all(dir).unwrap();

    let loads: [(&str, &Pod, &[i32]); 4] = [
        ("bulk_cross_node", &s_far, &[n1, n2]),
        ("bulk_same_node", &s_near, &[n1]),
        ("request_response_cross_node", &s_far, &[n1, n2]),
        ("request_response_same_node", &s_near, &[n1]),
    ];
    let mut report = serde_json::Map::new();
    for (name, server, agents) in loads {
        eprintln!("profiling {name}");
        let target = server.ip4.to_string();
        let recorders: Vec<(i32, Proc, std::path::PathBuf)> = agents
            .iter()
            .map(|pid| {
                let data = mesh.t.dir.join(format!("perf-{name}-{pid}.data"));
                (*pid, record(*pid, &data, &mesh.t.dir), data)
            })
            .collect();
        let figure = if name.starts_with("bulk") {
            format!("{:.2} Gbit/s", iperf(&c, &target, 1))
        } else {
            let (rps, _, _) = wrk(&c, &format!("http://{target}/"), 10);
            format!("{rps:.0} rps")
        };
        let mut columns = Vec::new();
        for (pid, recorder, data) in recorders {
            recorder.wait_for_log("perf-done", Duration::from_secs(30));
            let node = if pid == n1 { "node1 (client's)" } else { "node2 (server's)" };
            columns.push((node, shares(&data)));
        }
        print_table(name, &figure, &columns);
        let json_columns: serde_json::Map<String, Value> =
            columns.iter().map(|(node, shares)| ((*node).to_string(), json!(shares))).collect();
        report.insert(name.into(), json!({ "load": figure, "shares_percent": json_columns }));
    }
    let file = dir.join("profile.json");
    std::fs::write(&file, serde_json::to_string_pretty(&Value::Object(report)).unwrap()).unwrap();
    println!("report: {}", file.display());
}

/// `perf record` on `pid` for the load's length (less a second for it to
/// start), then a line the caller waits for.
fn record(pid: i32, data: &Path, dir: &Path) -> Proc {
    let secs = SECONDS.parse::<u64>().unwrap_or(5).saturating_sub(1).max(1);
    let script = format!(
        "perf record -q -e cpu-clock -F 2000 -p {pid} -o {} -- sleep {secs} >/dev/null 2>&1; echo perf-done",
        data.display()
    );
    let log = dir.join(format!("perf-{pid}-{}.log", data.file_stem().unwrap().to_string_lossy()));
    Proc::spawn_in("perf", Path::new("/proc/self/ns/net"), &["sh", "-c", &script], &log)
}

/// Each category's share of the samples in `data`, in percent.
fn shares(data: &Path) -> BTreeMap<String, f64> {
    let out = Command::new("perf")
        .args(["report", "-q", "--stdio", "--no-children", "--sort", "sym", "--percent-limit", "0", "-i"])
        .arg(data)
        .output()
        .expect("perf report");
    let mut shares = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "    12.34%  [k] tcp_sendmsg_locked"
        let mut words = line.split_whitespace();
        let Some(pct) = words.next().and_then(|p| p.strip_suffix('%')).and_then(|p| p.parse::<f64>().ok()) else {
            continue;
        };
        let kernel = words.next() == Some("[k]");
        let symbol: String = words.collect::<Vec<_>>().join(" ");
        *shares.entry(category(&symbol, kernel).to_string()).or_insert(0.0) += pct;
    }
    shares
}

fn print_table(name: &str, figure: &str, columns: &[(&str, BTreeMap<String, f64>)]) {
    println!("\n{name} ({figure}), share of each agent's CPU samples\n");
    let header: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
    println!("| category | {} |", header.join(" | "));
    println!("| --- |{}", " --- |".repeat(columns.len()));
    for cat in TABLE_ORDER {
        let cells: Vec<String> =
            columns.iter().map(|(_, s)| s.get(*cat).map_or("–".into(), |v| format!("{v:.1}%"))).collect();
        println!("| {cat} | {} |", cells.join(" | "));
    }
}
