//! What the benchmarks share: the load generators run inside a pod (wrk at
//! saturation, mesh-loadgen and hey at a fixed rate, iperf3, redis-benchmark)
//! with their output parsed, idle
//! connections held open, a process's RSS and CPU time, and samples reduced
//! to their medians.
pub mod profile;

use std::time::Duration;

use serde_json::{Value, json};

use crate::{Pod, Proc, run_in};

/// How long each load generator runs.
pub const SECONDS: &str = "5";

/// Appends sample `v` to the list under `key`.
pub fn push(r: &mut Value, key: &str, v: f64) {
    r.as_object_mut().unwrap().entry(key).or_insert_with(|| json!([])).as_array_mut().unwrap().push(json!(v));
}

/// Each list of samples becomes its median.
pub fn median_all(r: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for (k, v) in r.as_object().unwrap() {
        let value = match v.as_array() {
            Some(samples) => {
                let mut s: Vec<f64> = samples.iter().filter_map(Value::as_f64).collect();
                s.sort_by(f64::total_cmp);
                json!(s[s.len() / 2])
            }
            None => v.clone(),
        };
        out.insert(k.clone(), value);
    }
    Value::Object(out)
}

/// hey from `client` on CPU 0 at a fixed total rate (`rps`, 10 workers):
/// (achieved rps, latency percentiles in ms).
pub fn hey(client: &Pod, url: &str, rps: u32) -> (f64, Vec<(&'static str, f64)>) {
    hey_with(client, url, rps, &[])
}

/// [`hey`] sending `headers` (`Name: value`) with each request.
pub fn hey_with(client: &Pod, url: &str, rps: u32, headers: &[&str]) -> (f64, Vec<(&'static str, f64)>) {
    let per_worker = (rps / 10).to_string();
    let duration = format!("{SECONDS}s");
    let mut args = vec!["taskset", "-c", "0", "hey", "-z", &duration, "-c", "10", "-q", &per_worker];
    args.extend(headers.iter().flat_map(|h| ["-H", h]));
    args.push(url);
    let out = run_in(&client.netns, &args);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lat = Vec::new();
    let mut achieved = 0.0;
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            achieved = v.trim().parse().unwrap_or(0.0);
        }
        for (pct, key) in [("50%", "p50"), ("90%", "p90"), ("99%", "p99")] {
            if let Some(rest) = line.strip_prefix(&format!("{pct} in ")) {
                let secs: f64 = rest.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
                lat.push((key, secs * 1000.0));
            }
        }
    }
    (achieved, lat)
}

/// `mesh-loadgen` (open loop, microseconds) from `client` on CPU 0: `rps`
/// requests a second to `target` (`IP:PORT`) over 10 keep-alive
/// connections, or each on a new connection: (rate achieved, errors,
/// latency percentiles in µs as `p50`, `p90`, `p99`, `p999`).
pub fn loadgen(client: &Pod, target: &str, rps: u32, new_connections: bool) -> (f64, f64, Vec<(&'static str, f64)>) {
    let bin = crate::sibling_bin("mesh-loadgen");
    let rate = rps.to_string();
    let mut args = vec!["taskset", "-c", "0", bin.to_str().unwrap(), target, "--rate", &rate, "--seconds", SECONDS];
    if new_connections {
        args.push("--new-connections");
    }
    let out = run_in(&client.netns, &args);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let lat = vec![("p50", f("p50_us")), ("p90", f("p90_us")), ("p99", f("p99_us")), ("p999", f("p999_us"))];
    (f("achieved_rps"), f("errors"), lat)
}

/// wrk from `client` on CPU 0 at its maximum rate (1 thread, `connections`):
/// (rps, requests, latency percentiles in ms).
pub fn wrk(client: &Pod, url: &str, connections: u32) -> (f64, f64, Vec<(&'static str, f64)>) {
    wrk_with(client, url, connections, &[])
}

/// [`wrk`] sending `headers` (`Name: value`) with each request.
pub fn wrk_with(client: &Pod, url: &str, connections: u32, headers: &[&str]) -> (f64, f64, Vec<(&'static str, f64)>) {
    let duration = format!("{SECONDS}s");
    let c = format!("-c{connections}");
    let mut args = vec!["taskset", "-c", "0", "wrk", "-t1", &c, "-d", &duration, "--latency"];
    args.extend(headers.iter().flat_map(|h| ["-H", h]));
    args.push(url);
    let out = run_in(&client.netns, &args);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lat = Vec::new();
    let (mut rps, mut requests) = (0.0, 0.0);
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().unwrap_or(0.0);
        }
        if line.contains("requests in") {
            requests = line.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
        }
        for (pct, key) in [("50%", "p50"), ("90%", "p90"), ("99%", "p99")] {
            if let Some(rest) = line.strip_prefix(pct) {
                lat.push((key, wrk_ms(rest.trim())));
            }
        }
    }
    (rps, requests, lat)
}

/// wrk prints `123.45us`, `1.23ms` or `1.02s`.
fn wrk_ms(s: &str) -> f64 {
    let num = |suffix: &str| s.strip_suffix(suffix).and_then(|v| v.parse::<f64>().ok());
    num("us").map(|v| v / 1000.0).or_else(|| num("ms")).or_else(|| num("s").map(|v| v * 1000.0)).unwrap_or(f64::NAN)
}

/// iperf3 from `client` on CPU 0 to `target` for [`SECONDS`] with
/// `streams` parallel streams: the received Gbit/s.
pub fn iperf(client: &Pod, target: &str, streams: u32) -> f64 {
    let p = streams.to_string();
    let out = run_in(&client.netns, &["taskset", "-c", "0", "iperf3", "-c", target, "-t", SECONDS, "-P", &p, "-J"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9
}

/// A redis server on port 6379 in `pod`, on CPU 1, keeping nothing on disk.
pub fn redis_server(pod: &Pod, dir: &std::path::Path) -> Proc {
    let d = dir.display().to_string();
    let args = [
        "taskset",
        "-c",
        "1",
        "redis-server",
        "--port",
        "6379",
        "--bind",
        "0.0.0.0",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &d,
    ];
    let proc = Proc::spawn_in("redis", &pod.netns, &args, &dir.join(format!("redis-{}.log", pod.ip4)));
    proc.wait_for_log("Ready to accept connections", Duration::from_secs(10));
    proc
}

/// redis-benchmark from `client` on CPU 0 against `target:6379`: 50 clients,
/// no pipelining, SET then GET: for each, (rps, p50 ms, p99 ms).
pub fn redis_benchmark(client: &Pod, target: &str) -> Vec<(&'static str, f64, f64, f64)> {
    let args = [
        "taskset",
        "-c",
        "0",
        "redis-benchmark",
        "-h",
        target,
        "-c",
        "50",
        "-P",
        "1",
        "-n",
        "100000",
        "-t",
        "set,get",
        "--csv",
    ];
    let out = run_in(&client.netns, &args);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').map(|c| c.trim_matches('"')).collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
        let name = match f.first() {
            Some(&"SET") => "set",
            Some(&"GET") => "get",
            _ => continue,
        };
        // test, rps, avg, min, p50, p95, p99, max
        rows.push((name, num(1), num(4), num(6)));
    }
    rows
}

/// Opens `n` connections from `client` to `server:port` (each sends one
/// HTTP/1.1 request and reads its answer when `request`), and holds them
/// until the returned process is dropped.
pub fn hold_connections(client: &Pod, server: &Pod, port: u16, n: usize, request: bool) -> Proc {
    let send = if request { "c.sendall(b'GET / HTTP/1.1\\r\\nHost: web\\r\\n\\r\\n'); " } else { "" };
    let read = if request { "for c in s: c.recv(65536)\n" } else { "" };
    let script = format!(
        "import socket,time,resource\n\
         _,h=resource.getrlimit(resource.RLIMIT_NOFILE); resource.setrlimit(resource.RLIMIT_NOFILE,(h,h))\n\
         s=[]\n\
         for _ in range({n}):\n\
         \x20   c=socket.create_connection(('{}',{port})); {send}s.append(c)\n\
         {read}print('open',len(s),flush=True)\n\
         time.sleep(600)\n",
        server.ip4
    );
    let log = std::env::temp_dir().join(format!("mesh-bench-hold-{port}.log"));
    let proc = Proc::spawn_in("hold", &client.netns, &["python3", "-u", "-c", &script], &log);
    proc.wait_for_log("open", Duration::from_secs(120));
    proc
}

/// A server on `port` in `pod` that accepts every connection and holds it,
/// reading nothing: the far end for [`hold_connections`] beyond what nginx's
/// worker_connections allows.
pub fn hold_server(pod: &Pod, port: u16) -> Proc {
    let script = format!(
        "import socket,resource\n\
         _,h=resource.getrlimit(resource.RLIMIT_NOFILE); resource.setrlimit(resource.RLIMIT_NOFILE,(h,h))\n\
         l=socket.create_server(('0.0.0.0',{port}),backlog=4096)\n\
         print('listening',flush=True)\n\
         held=[]\n\
         while True: held.append(l.accept()[0])\n"
    );
    let log = std::env::temp_dir().join(format!("mesh-bench-hold-server-{port}.log"));
    let proc = Proc::spawn_in("hold server", &pod.netns, &["python3", "-u", "-c", &script], &log);
    proc.wait_for_log("listening", Duration::from_secs(10));
    proc
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

/// Waits (up to 60 s) until `pids` have used almost no CPU for half a
/// second together: after opening thousands of connections, the proxies go
/// on setting up their far ends for seconds after the client's connects
/// return, and a measurement started then would time that instead.
pub fn wait_until_idle(pids: &[i32]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let total = || pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>();
    let mut before = total();
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let now = total();
        // A tick is 10 ms: at most 2% of one core over the half second.
        if now - before <= 1 {
            return;
        }
        before = now;
    }
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}
