//! Bounded resources (issue 16 pt 5) with real clients: the node's and each
//! pod's connection limits reset what is over them at once, a flood to one
//! pod leaves another its share, slots come back as connections end, and a
//! peer that stalls its handshake on 15008 is cut off.
use mesh_tests::{
    Proc,
    mesh::{Mesh, yaml},
    run_in,
};
use serde_json::Value;

const NODE_MAX: usize = 30;
const POD_MAX: usize = 20;

/// Opens connections from a client outside the mesh and says how many were
/// served (an HTTP answer on a kept-alive connection) and how many reset.
/// Phases: 25 to b (held), 15 to c (held), b's closed, then 12 more to c
/// once c takes connections again; then two stalled handshakes on b's 15008.
const SCRIPT: &str = r#"
import json, socket, sys, time
b, c = sys.argv[1], sys.argv[2]
def served(ip, port=80):
    s = None
    try:
        # A reset can arrive before a connect with a timeout has returned.
        s = socket.create_connection((ip, port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        ok = s.recv(4096).startswith(b"HTTP/1.1 200")
    except OSError:
        ok = False
    return s, ok
def phase(ip, n):
    held = [served(ip) for _ in range(n)]
    return [s for s, ok in held if ok], sum(ok for _, ok in held)
out = {}
held_b, out["b"] = phase(b, 25)
held_c, out["c"] = phase(c, 15)
for s in held_b: s.close()
deadline = time.time() + 10
while time.time() < deadline:
    s, ok = served(c)
    if ok:
        held_c.append(s)
        break
    time.sleep(0.1)
more, out["c_after_b_closed"] = phase(c, 12)
out["c_held"] = len(held_c) + len(more)
for s in held_c + more: s.close()
def stalled(slowloris):
    s = socket.create_connection((b, 15008), timeout=10)
    start = time.time()
    try:
        if slowloris:
            s.sendall(bytes([0x16, 0x03, 0x01, 0x02, 0x00]))
            s.settimeout(0.3)
            while time.time() - start < 10:
                s.sendall(b"\x01")
                try:
                    if s.recv(1) == b"":
                        break
                except socket.timeout:
                    pass
        else:
            s.recv(1)
    except OSError:
        pass
    return round(time.time() - start, 1)
out["silent_cut_after_s"] = stalled(False)
out["slowloris_cut_after_s"] = stalled(True)
print(json.dumps(out))
"#;

#[test]
fn connection_limits_and_stalled_handshakes() {
    let limits = ["--max-connections", "30", "--max-connections-per-pod", "20", "--hbone-handshake-timeout", "1s"];
    let Some(mesh) = Mesh::start_with("overload", &["node1"], &limits) else { return };
    let (b, c) = (mesh.t.pod_in("shop", "b"), mesh.t.pod_in("shop", "c"));
    let out = mesh.t.pod_in("legacy", "out");
    let config = [
        yaml::namespace("shop", true),
        yaml::namespace("legacy", false),
        yaml::pod(&b, "node1", "sa-b", "b"),
        yaml::pod(&c, "node1", "sa-c", "c"),
        yaml::pod(&out, "node1", "sa-out", "out"),
    ]
    .concat();
    mesh.apply("config.yaml", &config);
    mesh.wait_ready(&[(&b, "node1", "sa-b"), (&c, "node1", "sa-c")]);
    let _servers: Vec<Proc> = vec![mesh.t.nginx(&b, 80, "b", 10), mesh.t.nginx(&c, 80, "c", 10)];

    let run = run_in(&out.netns, &["python3", "-c", SCRIPT, &b.ip4.to_string(), &c.ip4.to_string()]);
    let report: Value = serde_json::from_slice(&run.stdout)
        .unwrap_or_else(|_| panic!("client: {}", String::from_utf8_lossy(&run.stderr)));
    let n = |k: &str| report[k].as_f64().unwrap_or(-1.0);
    assert_eq!(n("b") as usize, POD_MAX, "b takes its pod limit, the rest is reset: {report}");
    assert_eq!(n("c") as usize, NODE_MAX - POD_MAX, "c gets what the node has left: {report}");
    assert_eq!(n("c_held") as usize, POD_MAX, "once b's are closed, c fills its own limit: {report}");
    for k in ["silent_cut_after_s", "slowloris_cut_after_s"] {
        assert!(n(k) >= 0.9 && n(k) < 8.0, "{k}: a stalled handshake on 15008 is cut at 1 s: {report}");
    }

    let metric = |name: &str, labels: &[(&str, &str)]| mesh.metric("node1", name, labels);
    let refused = |reason| metric("mesh_node_connections_refused_total", &[("reason", reason)]);
    assert!(refused("pod_limit") >= 8.0, "5 to b, 3 to c: {}", refused("pod_limit"));
    assert!(refused("node_limit") >= 5.0, "5 to c while b held 20: {}", refused("node_limit"));
    assert!(metric("mesh_node_hbone_errors_total", &[]) >= 2.0, "the two cut-off handshakes");
    let log = mesh.node("node1").agent.proc.log_text();
    assert!(log.contains("connection limit reached"), "the refusals are logged");
    assert!(log.contains("handshake not done within 1s"), "the cut-off handshakes are logged");

    // Every slot came back: both pods serve again.
    for pod in [&b, &c] {
        let url = format!("http://{}/", pod.ip4);
        let deadline = std::time::Instant::now() + mesh_tests::patience(std::time::Duration::from_secs(5));
        while !run_in(&out.netns, &["curl", "-sf", "-m", "2", &url]).status.success() {
            assert!(std::time::Instant::now() < deadline, "{} not served after the flood", pod.name);
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}
