//! The data plane's cost, measured on the namespace topology (release
//! builds): direct (pods outside the mesh) against the mesh across nodes
//! (HBONE between two node proxies), on one node, to a service VIP at L4,
//! and to the same service bound to a waypoint (client -> node proxy ->
//! waypoint -> node proxy -> server). Figures are ratios to the direct
//! baseline taken in the same run, interleaved, because these machines are
//! noisy. Latency at a fixed rate comes from `mesh-loadgen` (open loop, to
//! the microsecond), keep-alive and one connection per request; maximum
//! rate from wrk; throughput from iperf3 (1, 4 and 16 streams); a database's
//! small exchanges from redis-benchmark (50 clients, no pipelining). Writes
//! /var/tmp/mesh-bench/dataplane.json.
//!
//! Pinning: clients run on CPU 0, servers on CPU 1; the agents are not pinned
//! (the kernel places them), as a node proxy would not be.
use std::{path::Path, thread, time::Duration};

use mesh_tests::{
    Pod, Proc,
    bench::{
        cpu_ticks, hold_connections, hold_server, iperf, loadgen, median_all, push, redis_benchmark, redis_server,
        rss_kib, ticks_per_second, wait_until_idle, wrk,
    },
    mesh::{Mesh, yaml},
    waypoint::yaml as l7,
};
use serde_json::{Value, json};

const ROUNDS: usize = 2;
/// `MESH_BENCH_QUICK=1`: one round of direct, cross-node and same node, no
/// held connections: for trying a change (about 3 minutes), never for a report.
const QUICK: &str = "MESH_BENCH_QUICK";
/// Idle connections held through both node proxies, for memory per connection.
const HELD: usize = 10_000;
const HOLD_PORT: u16 = 9000;
/// RSS is also read with this many held (the goal is stated there).
const FIRST_HELD: usize = 1000;
/// The agents give back the heap a burst freed a second after their size
/// holds still (`mesh_proxy::heap`): RSS is read after that, as a user
/// would see it.
const HEAP_TRIMMED: Duration = Duration::from_secs(3);
/// Parallel iperf3 streams, beside the single stream.
const PARALLEL: [u32; 2] = [4, 16];

struct Path3<'a> {
    name: &'static str,
    client: &'a Pod,
    /// The address the client dials (a pod's, or a service VIP).
    target: String,
    /// Agents (and the waypoint) whose CPU the path costs.
    agents: Vec<i32>,
}

const L4_VIP: &str = "10.96.0.50";
const WAYPOINT_VIP: &str = "10.96.0.51";

/// A service over `app` with an HTTP port, iperf3's and redis's TCP ports, bound to the waypoint or not.
fn service(name: &str, vip: &str, app: &str, bound: bool) -> String {
    let label = if bound { ", labels: {istio.io/use-waypoint: waypoint}" } else { "" };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default{label}}}\n\
         spec: {{clusterIP: {vip}, selector: {{app: {app}}}, ports: [{{name: http, port: 80}}, {{name: tcp-iperf, port: 5201}}, {{name: tcp-redis, port: 6379}}]}}\n---\n"
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`
    }
    // Limits above the held connections: the defaults follow the open-file
    // limit, which is 20 000 on these machines (a quarter of it per pod).
    let limits = ["--max-connections", "15000", "--max-connections-per-pod", "15000"];
    let Some(mesh) = Mesh::start_with("bench-dataplane", &["node1", "node2"], &limits) else { return };
    let c = mesh.t.pod("client");
    let s_far = mesh.t.pod("server-far");
    let s_near = mesh.t.pod("server-near");
    let d = mesh.t.pod_in("plain", "direct-client");
    let sd = mesh.t.pod_in("plain", "direct-server");
    let wp_pod = mesh.t.pod("waypoint");
    let config = format!(
        "{}{}{}{}{}{}{}{}{}{}{}",
        yaml::namespace("default", true),
        yaml::namespace("plain", false),
        yaml::pod(&c, "node1", "client", "client"),
        yaml::pod(&s_far, "node2", "server", "far"),
        yaml::pod(&s_near, "node1", "server", "near"),
        yaml::pod(&d, "node1", "direct", "direct"),
        yaml::pod(&sd, "node2", "direct", "direct"),
        l7::gateway("default", "waypoint"),
        l7::instance(&wp_pod, "waypoint", "wp"),
        service("far-l4", L4_VIP, "far", false),
        service("far-l7", WAYPOINT_VIP, "far", true),
    );
    mesh.apply("mesh.yaml", &config);
    mesh.wait_ready(&[(&c, "node1", "client"), (&s_far, "node2", "server"), (&s_near, "node1", "server")]);
    let mut servers = Vec::new();
    for s in [&s_far, &s_near, &sd] {
        servers.push(mesh.t.nginx(s, 80, "hello\n", 10));
        servers.push(Proc::spawn_in(
            "iperf3",
            &s.netns,
            &["taskset", "-c", "1", "iperf3", "-s"],
            &mesh.t.dir.join(format!("iperf-{}.log", s.ip4)),
        ));
        servers.push(redis_server(s, &mesh.t.dir));
    }
    mesh.reach_controller(&wp_pod);
    let waypoint = mesh.start_waypoint(&wp_pod, "wp");
    let (n1, n2) = (mesh.node("node1").agent.proc.pid(), mesh.node("node2").agent.proc.pid());
    let ip = |p: &Pod| p.ip4.to_string();
    let paths = [
        Path3 { name: "direct", client: &d, target: ip(&sd), agents: vec![] },
        Path3 { name: "mesh_cross_node", client: &c, target: ip(&s_far), agents: vec![n1, n2] },
        Path3 { name: "mesh_same_node", client: &c, target: ip(&s_near), agents: vec![n1] },
        Path3 { name: "mesh_l4_service", client: &c, target: L4_VIP.into(), agents: vec![n1, n2] },
        Path3 { name: "mesh_waypoint", client: &c, target: WAYPOINT_VIP.into(), agents: vec![n1, n2, waypoint.pid()] },
    ];
    let quick = std::env::var(QUICK).is_ok_and(|v| v == "1");
    let (rounds, paths) = if quick { (1, &paths[..3]) } else { (ROUNDS, &paths[..]) };
    thread::sleep(HEAP_TRIMMED);
    let idle_rss = (rss_kib(n1), rss_kib(n2));
    // Fresh agents holding a thousand idle connections (the goal is
    // stated there), before any load has grown their heaps.
    let first_rss = {
        let _holder = hold_server(&s_far, HOLD_PORT);
        let _open = hold_connections(&c, &s_far, HOLD_PORT, FIRST_HELD, false);
        wait_until_idle(&[n1, n2]);
        thread::sleep(HEAP_TRIMMED);
        (rss_kib(n1), rss_kib(n2))
    };

    let mut results: Vec<Value> = paths.iter().map(|p| json!({ "path": p.name })).collect();
    for round in 0..rounds {
        for (p, r) in paths.iter().zip(results.iter_mut()) {
            eprintln!("round {round}: {}", p.name);
            push(r, "throughput_gbps", iperf(p.client, &p.target, 1));
            for streams in PARALLEL {
                push(r, &format!("throughput_{streams}_streams_gbps"), iperf(p.client, &p.target, streams));
            }
            for (test, rps, p50, p99) in redis_benchmark(p.client, &p.target) {
                push(r, &format!("redis_{test}_rps"), rps);
                push(r, &format!("redis_{test}_p50_ms"), p50);
                push(r, &format!("redis_{test}_p99_ms"), p99);
            }
            // Open loop, microseconds: 1000 rps over 10 keep-alive
            // connections, then 500 rps each on a connection of its own
            // (connection setup through the mesh; HBONE pooled).
            let (rate, errors, fixed) = loadgen(p.client, &format!("{}:80", p.target), 1000, false);
            push(r, "fixed_rate_rps", rate);
            push(r, "fixed_rate_errors", errors);
            for (k, v) in fixed {
                push(r, &format!("fixed_{k}_us"), v);
            }
            let (rate, errors, fresh) = loadgen(p.client, &format!("{}:80", p.target), 500, true);
            push(r, "new_connection_rps", rate);
            push(r, "new_connection_errors", errors);
            for (k, v) in fresh {
                push(r, &format!("new_connection_{k}_us"), v);
            }
            let cpu_before: u64 = p.agents.iter().map(|pid| cpu_ticks(*pid)).sum();
            let (rps, requests, lat) = wrk(p.client, &format!("http://{}/", p.target), 10);
            let cpu_after: u64 = p.agents.iter().map(|pid| cpu_ticks(*pid)).sum();
            push(r, "max_rps", rps);
            for (k, v) in lat {
                push(r, &format!("max_{k}_ms"), v);
            }
            if !p.agents.is_empty() {
                let ms = (cpu_after - cpu_before) as f64 * 1000.0 / ticks_per_second();
                push(r, "proxy_cpu_ms_per_1000_requests", ms / (requests / 1000.0));
            }
        }
    }
    let waypoint_idle_rss = rss_kib(waypoint.pid());
    // Issue 16 pt 5: 10 000 idle connections across both node proxies, and
    // the latency of other connections while they are open.
    let held = (!quick).then(|| {
        let holder = hold_server(&s_far, HOLD_PORT + 1);
        let before_hold = (rss_kib(n1), rss_kib(n2));
        let open = hold_connections(&c, &s_far, HOLD_PORT + 1, HELD, false);
        wait_until_idle(&[n1, n2]);
        thread::sleep(HEAP_TRIMMED);
        let busy_rss = (rss_kib(n1), rss_kib(n2));
        // Every one of them carried, or the figure per connection means nothing.
        let refused = |node: &str| mesh.metric(node, "mesh_node_connections_refused_total", &[]);
        assert_eq!((refused("node1"), refused("node2")), (0.0, 0.0), "held connections were refused");
        // The others' latency meanwhile: the cross-node fixed-rate run again.
        let (_, _, held_latency) = loadgen(&c, &format!("{}:80", ip(&s_far)), 1000, false);
        drop((open, holder));
        (before_hold, busy_rss, held_latency)
    });

    let summary: Vec<Value> = results.iter().map(median_all).collect();
    let base = &summary[0];
    let ratio = |v: &Value, k: &str| v[k].as_f64().zip(base[k].as_f64()).map(|(a, b)| a / b);
    let added = |v: &Value, k: &str| v[k].as_f64().zip(base[k].as_f64()).map(|(a, b)| a - b);
    let mut report = json!({
        "rounds": rounds,
        "pinning": "clients on CPU 0, servers on CPU 1, agents unpinned",
        "paths": summary,
        "rss_kib": {
            "node1_idle": idle_rss.0, "node2_idle": idle_rss.1,
            "node1_1000_connections": first_rss.0, "node2_1000_connections": first_rss.1,
            "waypoint_after_load": waypoint_idle_rss,
        },
    });
    print_table(
        &summary,
        &[
            ("Gbit/s", "throughput_gbps"),
            ("p50 µs", "fixed_p50_us"),
            ("p90 µs", "fixed_p90_us"),
            ("p99 µs", "fixed_p99_us"),
            ("new p50", "new_connection_p50_us"),
            ("new p99", "new_connection_p99_us"),
            ("max rps", "max_rps"),
            ("max p50", "max_p50_ms"),
            ("max p99", "max_p99_ms"),
            ("CPU ms/1k", "proxy_cpu_ms_per_1000_requests"),
        ],
    );
    print_table(
        &summary,
        &[
            ("1 stream", "throughput_gbps"),
            ("4", "throughput_4_streams_gbps"),
            ("16", "throughput_16_streams_gbps"),
            ("redis SET", "redis_set_rps"),
            ("redis GET", "redis_get_rps"),
            ("GET p50", "redis_get_p50_ms"),
            ("GET p99", "redis_get_p99_ms"),
        ],
    );
    let mut ratios = serde_json::Map::new();
    let l4 = summary.iter().find(|s| s["path"] == "mesh_l4_service").cloned().unwrap_or_default();
    for s in &summary[1..] {
        let name = s["path"].as_str().unwrap();
        let mut r = json!({
            "throughput_vs_direct": ratio(s, "throughput_gbps"),
            "throughput_4_streams_vs_direct": ratio(s, "throughput_4_streams_gbps"),
            "throughput_16_streams_vs_direct": ratio(s, "throughput_16_streams_gbps"),
            "redis_set_rps_vs_direct": ratio(s, "redis_set_rps"),
            "redis_get_rps_vs_direct": ratio(s, "redis_get_rps"),
            "redis_get_added_p50_ms": added(s, "redis_get_p50_ms"),
            "max_rps_vs_direct": ratio(s, "max_rps"),
            "added_p50_us_at_fixed_rate": added(s, "fixed_p50_us"),
            "added_p99_us_at_fixed_rate": added(s, "fixed_p99_us"),
            "added_p50_us_new_connections": added(s, "new_connection_p50_us"),
            "added_p99_us_new_connections": added(s, "new_connection_p99_us"),
        });
        if name == "mesh_waypoint" {
            let d = |k: &str| s[k].as_f64().zip(l4[k].as_f64()).map(|(a, b)| a - b);
            r["added_p50_us_vs_l4_mesh"] = json!(d("fixed_p50_us"));
            r["added_p99_us_vs_l4_mesh"] = json!(d("fixed_p99_us"));
            r["max_rps_vs_l4_mesh"] = json!(s["max_rps"].as_f64().zip(l4["max_rps"].as_f64()).map(|(a, b)| a / b));
        }
        println!("{name}: {r}");
        ratios.insert(name.into(), r);
    }
    report["vs_direct"] = Value::Object(ratios);
    if let Some((before_hold, busy_rss, held_latency)) = held {
        let per_connection = |busy: u64, idle: u64| busy.saturating_sub(idle) as f64 * 1024.0 / HELD as f64;
        let per_conn = (per_connection(busy_rss.0, before_hold.0), per_connection(busy_rss.1, before_hold.1));
        let rss = &mut report["rss_kib"];
        rss["node1_before_holding"] = json!(before_hold.0);
        rss["node2_before_holding"] = json!(before_hold.1);
        rss["node1_10000_connections"] = json!(busy_rss.0);
        rss["node2_10000_connections"] = json!(busy_rss.1);
        rss["node1_bytes_per_held_connection"] = json!(per_conn.0);
        rss["node2_bytes_per_held_connection"] = json!(per_conn.1);
        let cross = summary.iter().find(|s| s["path"] == "mesh_cross_node").cloned().unwrap_or_default();
        let mut with_held = serde_json::Map::new();
        for (k, v) in &held_latency {
            with_held.insert(format!("fixed_{k}_us"), json!(v));
            let without = cross[format!("fixed_{k}_us")].as_f64();
            with_held.insert(format!("added_{k}_us_vs_none_held"), json!(without.map(|w| v - w)));
        }
        println!("cross-node at 1000 rps with {HELD} connections held open: {}", Value::Object(with_held.clone()));
        report["cross_node_with_10000_held"] = Value::Object(with_held);
        println!(
            "RSS KiB: idle {idle_rss:?}, with {FIRST_HELD} open connections {first_rss:?}, before holding \
             {before_hold:?}, with {HELD} open connections {busy_rss:?} \
             (node1, node2): {:.0} / {:.0} bytes per connection; waypoint {waypoint_idle_rss}",
            per_conn.0, per_conn.1
        );
    }
    let dir = Path::new("/var/tmp/mesh-bench");
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join(if quick { "dataplane-quick.json" } else { "dataplane.json" });
    std::fs::write(&file, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("report: {}", file.display());
}

/// One row per path, a column per (header, key of the summary).
fn print_table(summary: &[Value], columns: &[(&str, &str)]) {
    let headers: String = columns.iter().map(|(h, _)| format!(" {h:>10}")).collect();
    println!("\n{:<18}{headers}", "path");
    for s in summary {
        let cells: String = columns
            .iter()
            .map(|(_, k)| format!(" {:>10}", s[*k].as_f64().map_or("-".into(), |v| format!("{v:.3}"))))
            .collect();
        println!("{:<18}{cells}", s["path"].as_str().unwrap_or("?"));
    }
}
