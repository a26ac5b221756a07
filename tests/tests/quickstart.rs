//! `cargo xtask quickstart` on this host, every `mesh-ctl` command against the
//! mesh it leaves running (each output checked against what is known to be
//! true), an unenroll/enroll round trip seen on the wire, and `--down`
//! leaving nothing behind; Istio's dashboards' queries answered by the
//! Prometheus it starts; the live service graph in Chromium and drawn by
//! `mesh-ctl graph`. One test: the quickstart has fixed names.
#[path = "quickstart/dashboards.rs"]
mod dashboards;
#[path = "quickstart/graph.rs"]
mod graph;

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Output},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use mesh_tests::{Pod, capture::Capture, run_in, sibling_bin};
use serde_json::Value;

const DIR: &str = "/var/tmp/mesh-quickstart";
const CONFIG: &str = "/var/tmp/mesh-quickstart/config";

fn xtask(args: &[&str]) -> Output {
    Command::new(sibling_bin("xtask")).args(args).output().expect("running xtask")
}

/// The nodes' admin token, which the quickstart's alias for mesh-ctl passes.
const ADMIN_TOKEN: &str = "/var/tmp/mesh-quickstart/admin-token";

/// `mesh-ctl` as the quickstart's alias runs it.
fn ctl(args: &[&str]) -> Output {
    Command::new(sibling_bin("mesh-ctl"))
        .args(args)
        .env_remove("MESH_CONTROLLER")
        .env("MESH_ADMIN_TOKEN_FILE", ADMIN_TOKEN)
        .output()
        .expect("running mesh-ctl")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `mesh-ctl ARGS -o json`, which must exit with `code`.
fn ctl_json_code(args: &[&str], code: i32) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = ctl(&all);
    assert_eq!(out.status.code(), Some(code), "mesh-ctl {}: {}", args.join(" "), text(&out));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn ctl_json(args: &[&str]) -> Value {
    ctl_json_code(args, 0)
}

/// Takes the quickstart down even when an assertion fails.
struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        if thread::panicking() {
            let _ = xtask(&["quickstart", "--down"]);
        }
    }
}

/// mesh-ctl on this host is another host to the nodes: without their token
/// it reads the controller but not them, and says what to pass.
fn without_the_admin_token() {
    let out = Command::new(sibling_bin("mesh-ctl"))
        .args(["certs"])
        .env_remove("MESH_CONTROLLER")
        .env_remove("MESH_ADMIN_TOKEN_FILE")
        .output()
        .expect("running mesh-ctl");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("answered 401") && text(&out).contains("MESH_ADMIN_TOKEN_FILE"), "{}", text(&out));
}

/// The demo's pods as the controller holds them: (name, node, service account, IPv4, IPv6).
fn config_pods() -> Vec<(String, String, String, String, String)> {
    let out = Command::new("curl").args(["-sf", "http://127.0.0.1:15014/debug/config"]).output().unwrap();
    let config: Value = serde_json::from_slice(&out.stdout).expect("controller /debug/config");
    config["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["object"]["kind"] == "Pod")
        .map(|o| {
            let p = &o["object"];
            let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (
                s(&p["metadata"]["name"]),
                s(&p["spec"]["nodeName"]),
                s(&p["spec"]["serviceAccountName"]),
                s(&p["status"]["podIPs"][0]["ip"]),
                s(&p["status"]["podIPs"][1]["ip"]),
            )
        })
        .collect()
}

fn pod(name: &str, pods: &[(String, String, String, String, String)]) -> Pod {
    let p = pods.iter().find(|p| p.0 == name).expect("a demo pod");
    Pod {
        name: format!("demo/{name}"),
        netns: format!("/run/netns/mq-{name}").into(),
        ip4: p.3.parse().unwrap(),
        ip6: p.4.parse().unwrap(),
    }
}

#[test]
fn quickstart_then_every_mesh_ctl_command_then_down() {
    mesh_tests::require_root();
    let _ = xtask(&["quickstart", "--down"]);
    let _down = Down;

    // 1. The tour completes, and says what it checked.
    let up = xtask(&["quickstart", "--no-build"]);
    let tour = text(&up);
    if tour.contains("cannot run mesh-node") {
        mesh_tests::skip("quickstart", "this kernel cannot run mesh-node");
        return;
    }
    assert!(up.status.success(), "quickstart failed:\n{tour}");
    for want in [
        "\"backend-1\":",
        "\"backend-2\":",
        "spiffe://cluster.local/ns/demo/sa/frontend",
        "on any other port: 0",
        "\"visit\" in the clear: 0",
        "Error: Connection reset by peer",
        "decision  DENY: ALLOW policies apply and none matched",
        "RBAC",
        "as the waypoint counted them (istio_requests_total by destination_workload)",
        "10 requests with x-tester: yes  ->  backend-v2 on node2",
        "1. VirtualService/demo/backend/marked-tester: MATCHES",
        "the mesh keeps running",
        "http://127.0.0.1:19090/",
        "http://127.0.0.1:15014/graph",
        &format!("alias mesh-ctl='MESH_ADMIN_TOKEN_FILE={ADMIN_TOKEN} "),
    ] {
        assert!(tour.contains(want), "the tour lacks {want:?}:\n{tour}");
    }

    let pods = config_pods();
    assert_eq!(pods.len(), 7, "five demo pods, the canary and the waypoint's");
    dashboards::istio_dashboards_on_prometheus(&pod("tester", &pods));
    graph::live_graph_page_and_mesh_ctl_graph(&pod("tester", &pods));
    mesh_ctl_views(&pods);
    without_the_admin_token();
    mesh_ctl_connections(&pods);
    mesh_ctl_explain_check_status();
    enroll_round_trip(&pods);
    unreachable_node();

    // --down: nothing of the quickstart remains.
    let down = xtask(&["quickstart", "--down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(text(&down).contains("removed mesh-controller"), "{}", text(&down));
    let netns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!netns.iter().any(|n| n.starts_with("mq-")), "namespaces left: {netns:?}");
    assert!(!Path::new("/sys/class/net/mq-host").exists(), "the host's veth is left");
    let pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf/mesh")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!pins.iter().any(|p| p.starts_with("mq-")), "pins left: {pins:?}");
    assert!(std::net::TcpStream::connect("127.0.0.1:19090").is_err(), "Prometheus still listens");
    for path in [DIR, "/run/mesh-tests/mq"] {
        assert!(!Path::new(path).exists(), "{path} is left");
    }
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!cmdline.contains(DIR) && !cmdline.contains("mq-node"), "process left: {cmdline}");
    }
    assert!(std::net::TcpStream::connect("127.0.0.1:15014").is_err(), "the controller still listens");
}

/// Point 2: workloads, services, policies, certs, status and config-dump
/// against the configuration the quickstart wrote.
fn mesh_ctl_views(pods: &[(String, String, String, String, String)]) {
    let workloads = ctl_json(&["workloads"]);
    let rows = workloads.as_array().unwrap();
    assert_eq!(rows.len(), pods.len(), "{workloads:#}");
    for (name, node, sa, ip4, ip6) in pods {
        let w = rows.iter().find(|w| w["name"] == name.as_str()).unwrap_or_else(|| panic!("no {name}"));
        assert_eq!(w["namespace"], "demo");
        assert_eq!(w["node"], node.as_str());
        assert_eq!(w["ips"], serde_json::json!([ip4, ip6]));
        assert_eq!(w["identity"], format!("spiffe://cluster.local/ns/demo/sa/{sa}"));
        assert_eq!(w["protocol"], "HBONE");
        assert_eq!(w["seen_by"], serde_json::json!(["node1", "node2"]));
    }
    let table = text(&ctl(&["workloads"]));
    assert!(table.starts_with("NAMESPACE  NAME") && table.contains("HBONE"), "{table}");

    let services = ctl_json(&["services"]);
    let backend = services.as_array().unwrap().iter().find(|s| s["service"]["name"] == "backend").unwrap();
    let endpoints: BTreeSet<&str> =
        backend["service"]["endpoints"].as_array().unwrap().iter().map(|e| e["ip"].as_str().unwrap()).collect();
    let want: BTreeSet<&str> =
        pods.iter().filter(|p| p.0.starts_with("backend")).flat_map(|p| [p.3.as_str(), p.4.as_str()]).collect();
    assert_eq!(endpoints, want);
    assert_eq!(backend["service"]["vips"], serde_json::json!(["10.96.0.10"]));
    assert_eq!(services.as_array().unwrap().len(), 3);

    let policies = ctl_json(&["policies"]);
    assert_eq!(policies.as_array().unwrap().len(), 1);
    assert_eq!(policies[0]["policy"]["name"], "redis-only-from-backend");
    assert!(text(&ctl(&["policies"])).contains("app=redis in demo"));

    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let certs = ctl_json(&["certs"]);
    for node in ["node1", "node2"] {
        let want: BTreeSet<String> =
            pods.iter().filter(|p| p.1 == node).map(|p| format!("spiffe://cluster.local/ns/demo/sa/{}", p.2)).collect();
        let held: Vec<&Value> = certs.as_array().unwrap().iter().filter(|c| c["node"] == node).collect();
        let ids: BTreeSet<String> = held.iter().map(|c| c["identity"].as_str().unwrap().to_owned()).collect();
        assert_eq!(ids, want, "{node}'s certificates");
        for c in held {
            let (nb, na) = (c["not_before_unix"].as_i64().unwrap(), c["not_after_unix"].as_i64().unwrap());
            assert!(nb <= now + 5 && now < na, "{c}: now is within the lifetime");
            // 24 h from issue (the CA backdates not-before a little, for clock skew).
            assert!(na - now <= 86_400 + 60 && na - nb >= 86_400, "{c}: the quickstart's 24 h lifetime");
            assert!(c["chain_verified"].get("Ok").is_some(), "{c}: chains to the root");
            assert!(!c["serial"].as_str().unwrap().is_empty());
        }
    }

    let dump = ctl_json(&["config-dump", "--node", "node1"]);
    assert_eq!(dump["instance"], "mq-node1");
    assert_eq!(dump["workloads"].as_object().unwrap().len(), pods.len());
}

/// Point 2: a live iperf3 stream shows, with its identities, and its bytes grow.
fn mesh_ctl_connections(pods: &[(String, String, String, String, String)]) {
    let (tester, backend) = (pod("tester", pods), pod("backend-2", pods));
    let mut server = mesh_tests::Proc::spawn_in(
        "iperf3 server",
        &backend.netns,
        &["iperf3", "-s", "-1", "-p", "5201"],
        Path::new("/tmp/mesh-quickstart-iperf3.log"),
    );
    thread::sleep(Duration::from_millis(500));
    let target = backend.ip4.to_string();
    let mut client = mesh_tests::Proc::spawn_in(
        "iperf3 client",
        &tester.netns,
        &["iperf3", "-c", &target, "-p", "5201", "-t", "8", "-b", "100M"],
        Path::new("/tmp/mesh-quickstart-iperf3-client.log"),
    );
    let stream = |deadline: Instant| -> Value {
        loop {
            let rows = ctl_json(&["connections", "--node", "node2"]);
            let best = rows
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["dst"] == format!("{target}:5201") && c["direction"] == "inbound")
                .max_by_key(|c| c["bytes_received"].as_u64().unwrap_or(0))
                .cloned();
            if let Some(c) = best.filter(|c| c["bytes_received"].as_u64().unwrap_or(0) > 1_000_000) {
                return c;
            }
            assert!(Instant::now() < deadline, "no iperf3 stream in mesh-ctl connections: {rows:#}");
            thread::sleep(Duration::from_millis(200));
        }
    };
    let first = stream(Instant::now() + mesh_tests::patience(Duration::from_secs(5)));
    thread::sleep(Duration::from_secs(2));
    let second = stream(Instant::now() + mesh_tests::patience(Duration::from_secs(5)));
    assert_eq!(first["id"], second["id"], "the same connection");
    assert!(second["bytes_received"].as_u64() > first["bytes_received"].as_u64(), "{first}\n{second}");
    assert_eq!(second["src_principal"], "spiffe://cluster.local/ns/demo/sa/tester");
    assert_eq!(second["dst_principal"], "spiffe://cluster.local/ns/demo/sa/backend");
    assert_eq!(second["security"], "mutual_tls");
    let table = text(&ctl(&["connections"]));
    assert!(table.contains(&format!("{target}:5201")) && table.contains("demo/tester"), "{table}");
    client.wait_exit(Duration::from_secs(15));
    server.wait_exit(Duration::from_secs(5));
}

/// Points 2 and 4: explain agrees with the tour's policy; check passes the
/// quickstart's config; status reports a rejected file, then its removal.
fn mesh_ctl_explain_check_status() {
    let denied = ctl_json_code(&["authz", "explain", "--from", "demo/tester", "--to", "demo/redis:6379"], 1);
    assert_eq!(denied["decision"]["allowed"], false);
    assert_eq!(denied["policies"][0]["policy"], "demo/redis-only-from-backend");
    let allowed = ctl_json(&["authz", "explain", "--from", "demo/backend-1", "--to", "demo/redis:6379"]);
    assert_eq!(allowed["decision"]["policy"], "demo/redis-only-from-backend");

    let check = ctl(&["check", CONFIG]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(text(&check).starts_with("ok: "), "{}", text(&check));

    let status = ctl_json(&["status"]);
    assert_eq!(status["nodes_in_sync"], 2, "{status:#}");
    assert_eq!(status["rejected"], serde_json::json!([]));
    let broken = format!("{CONFIG}/99-broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: demo}\nspec: {ports: [{port: 70000}]}\n",
    )
    .unwrap();
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(5));
    loop {
        let status = ctl_json(&["status"]);
        let rejected = status["rejected"].as_array().unwrap();
        if let Some(r) = rejected.first() {
            assert!(
                r.as_str().unwrap().starts_with(&format!("{broken}:4: Service demo/bad: spec.ports[0].port")),
                "{r}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the broken file is not reported: {status:#}");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(text(&ctl(&["status"])).contains("1 rejected (the last good version of each stays in force)"));
    std::fs::remove_file(&broken).unwrap();
}

/// Point 5: after unenroll the pods talk plaintext on the app's port; after
/// enroll, only TLS on 15008 again; the pods' processes never restart.
fn enroll_round_trip(pods: &[(String, String, String, String, String)]) {
    let (tester, backend) = (pod("tester", pods), pod("backend-2", pods));
    let pids = |p: &Pod| -> String {
        let out = Command::new("ip").args(["netns", "pids", &format!("mq-{}", &p.name[5..])]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = (pids(&tester), pids(&backend));
    let url = format!("http://{}:8080/", backend.ip4);
    let net = Path::new("/run/netns/mq-net");

    let out = ctl(&["unenroll", "demo"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("namespace demo unenrolled"), "{}", text(&out));
    // Every pod leaves the mesh but the waypoint's, which speaks HBONE itself.
    let protocols = |w: &Value| (w["name"] == "waypoint", w["protocol"].as_str().unwrap_or_default().to_owned());
    assert!(
        ctl_json(&["workloads"])
            .as_array()
            .unwrap()
            .iter()
            .map(protocols)
            .all(|(wp, p)| p == if wp { "HBONE" } else { "TCP" })
    );
    let capture = Capture::start_in(net, Path::new(DIR), &tester, &backend);
    let reply = run_in(&tester.netns, &["curl", "-s", "-m", "5", &url]);
    assert!(String::from_utf8_lossy(&reply.stdout).contains("backend-2 on node2"), "{}", text(&reply));
    let (packets, _, raw) = capture.packets(&tester, &backend);
    assert!(packets.iter().any(|(s, d, _)| *s == 8080 || *d == 8080), "plain TCP to 8080: {packets:?}");
    assert!(!packets.iter().any(|(s, d, _)| *s == 15008 || *d == 15008), "no HBONE when unenrolled");
    assert!(raw.windows(18).any(|w| w == b"backend-2 on node2"), "the reply is in the clear");

    let out = ctl(&["enroll", "demo"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(ctl_json(&["workloads"]).as_array().unwrap().iter().all(|w| w["protocol"] == "HBONE"));
    let capture = Capture::start_in(net, Path::new(DIR), &tester, &backend);
    let reply = run_in(&tester.netns, &["curl", "-s", "-m", "5", &url]);
    assert!(String::from_utf8_lossy(&reply.stdout).contains("backend-2 on node2: visit"), "{}", text(&reply));
    let (packets, tls, raw) = capture.packets(&tester, &backend);
    let data: Vec<_> = packets.iter().filter(|(_, _, len)| *len > 0).collect();
    assert!(!data.is_empty() && data.iter().all(|(s, d, _)| *s == 15008 || *d == 15008), "{packets:?}");
    assert!(tls > 0, "TLS application data on 15008");
    assert!(!raw.windows(18).any(|w| w == b"backend-2 on node2"), "nothing in the clear");
    assert_eq!((pids(&tester), pids(&backend)), before, "the pods' processes did not restart");
}

/// Point 6 through the controller: a node it lists whose agent does not
/// answer (stopped, as a hung node would be).
fn unreachable_node() {
    let out = Command::new("ip").args(["netns", "pids", "mq-node1"]).output().unwrap();
    let pids: Vec<i32> =
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect();
    assert!(!pids.is_empty(), "node1's agent runs");
    let signal = |sig| {
        for pid in &pids {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(*pid, sig) };
        }
    };
    signal(libc::SIGSTOP);
    let out = ctl(&["workloads", "--timeout", "2"]);
    signal(libc::SIGCONT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot reach node node1 at http://10.201.0.1:15000/config_dump: timed out")
            && stderr.contains("(hint: "),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}
