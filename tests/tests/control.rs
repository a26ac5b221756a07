//! A controller and an agent joined to it, on the real kernel: configuration
//! edits reach the node's config dump and its enrolled pods within a second;
//! certificates are issued for the pods scheduled on the node and renewed at
//! half-life; after a controller restart the node resumes without a resync;
//! while the controller is away nodes serve, and a restarted node serves at
//! once from what it persisted.
use std::{
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Agent, Controller, Pod, Proc, Topology,
    capture::Capture,
    http_ok,
    mesh::{Mesh, exchange, identity, yaml},
};
use serde_json::Value;

fn namespace() -> &'static str {
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}\n"
}

fn pod(p: &Pod, node: &str, sa: &str) -> String {
    let name = p.name.split('/').nth(1).unwrap();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}, \
         annotations: {{mesh.io/netns: {}}}}}\nspec: {{nodeName: {node}, serviceAccountName: {sa}}}\n\
         status: {{podIP: {}, podIPs: [{{ip: {}}}, {{ip: {}}}]}}\n",
        p.netns.display(),
        p.ip4,
        p.ip4,
        p.ip6
    )
}

/// Polls the agent's config dump until `pred` holds; returns how long it took.
fn wait_dump(agent: &Agent, what: &str, since: Instant, limit: Duration, pred: impl Fn(&Value) -> bool) -> Duration {
    let limit = mesh_tests::patience(limit);
    loop {
        let dump = agent.config_dump();
        if pred(&dump) {
            return since.elapsed();
        }
        assert!(since.elapsed() < limit, "{what}: not in the node's config dump after {limit:?}:\n{dump:#}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn enrolled(dump: &Value) -> Vec<String> {
    dump["pods"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_owned()).collect()
}

fn cert<'a>(dump: &'a Value, identity: &str) -> Option<&'a Value> {
    dump["certificates"].as_array()?.iter().find(|c| c["identity"] == identity)
}

const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";

fn start(t: &Topology, extra: &[&str]) -> (Controller, Agent, Pod, Pod) {
    let node = t.node("node1");
    let web = t.pod("web");
    let api = t.pod("api");
    let controller = t.start_controller(&node, extra);
    controller.write("mesh.yaml", &format!("{}---\n{}", namespace(), pod(&web, "node1", "web")));
    let args = controller.agent_args("node1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = t.agent_or_skip("control", &node, "node1", &args).expect("agent");
    // The pods' network namespaces, as the node's CNI plugin reports them.
    for p in [&web, &api] {
        agent.report_netns(&p.name, &p.netns);
    }
    (controller, agent, web, api)
}

#[test]
fn edits_reach_the_node_within_a_second() {
    let t = Topology::new("control-edits");
    let (controller, agent, web, api) = start(&t, &[]);
    let limit = Duration::from_secs(10);
    wait_dump(&agent, "web enrolled with a certificate", Instant::now(), limit, |d| {
        enrolled(d) == ["default/web"] && cert(d, WEB_ID).is_some()
    });
    let dump = agent.config_dump();
    assert_eq!(dump["controller"]["connected"], true);
    assert!(dump["node_certificate"]["identity"] == "node/node1", "{:#}", dump["node_certificate"]);

    // The pod is really in the mesh: a plaintext client reaches it through the proxy.
    let server = t.http_server(&web, 8080);
    assert!(http_ok(&api.curl(&format!("http://{}:8080/", web.ip4))));
    agent.wait_access("inbound to web", |v| v["direction"] == "inbound" && v["pod"] == "default/web");
    drop(server);

    // 1. A pod added to the ambient namespace.
    let edit = Instant::now();
    controller.write("api.yaml", &pod(&api, "node1", "api"));
    let seen = wait_dump(&agent, "pod api", edit, limit, |d| d["workloads"].get("Pod/default/api").is_some());
    let enrolled_after =
        wait_dump(&agent, "api enrolled", edit, limit, |d| enrolled(d).contains(&"default/api".into()));
    eprintln!("pod edit -> node config dump: {seen:?}; -> enrolled: {enrolled_after:?}");

    // 2. A policy change.
    let edit = Instant::now();
    controller.write(
        "policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-web, namespace: default}\n\
         spec: {selector: {matchLabels: {app: api}}, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/web]}}]}]}\n",
    );
    let seen = wait_dump(&agent, "policy", edit, limit, |d| d["policies"].get("default/only-web").is_some());
    eprintln!("policy edit -> node config dump: {seen:?}");
    let p = &agent.config_dump()["policies"]["default/only-web"];
    assert_eq!(p["rules"][0]["from"][0]["principals"][0]["kind"]["Exact"], "cluster.local/ns/default/sa/web", "{p:#}");

    // 3. Removing the pod from the configuration unenrolls it.
    let edit = Instant::now();
    controller.remove("api.yaml");
    wait_dump(&agent, "api unenrolled", edit, limit, |d| enrolled(d) == ["default/web"]);

    // The controller sees the node in sync.
    let nodes = controller.json("/debug/nodes");
    let n = &nodes["nodes"]["node1"];
    assert_eq!(n["connected"], true, "{nodes:#}");
    assert_eq!(n["version_acked"], nodes["version"], "{nodes:#}");
    assert_eq!(n["nacks"], 0);
    assert_eq!(controller.metric("mesh_controller_nodes_connected"), 1.0);

    // The admin API no longer enrolls by hand: the controller decides.
    let out = mesh_tests::run_in(
        &agent.node,
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-d",
            "{}",
            "http://127.0.0.1:15000/pods",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "409");
}

#[test]
fn certificates_renew_at_half_life() {
    let t = Topology::new("control-renew");
    let (_controller, agent, _web, _api) = start(&t, &["--cert-lifetime", "16s", "--node-cert-lifetime", "16s"]);
    wait_dump(&agent, "web certificate", Instant::now(), Duration::from_secs(10), |d| cert(d, WEB_ID).is_some());
    let dump = agent.config_dump();
    let c = cert(&dump, WEB_ID).unwrap().clone();
    let node_serial = dump["node_certificate"]["serial"].clone();
    let lifetime = c["not_after_unix"].as_i64().unwrap() - c["not_before_unix"].as_i64().unwrap();
    // 16 s plus the 5 minutes the CA backdates for clock skew.
    assert_eq!(lifetime, 16 + 300, "{c:#}");
    assert!(c["renew_at_unix"].as_i64().unwrap() < c["not_after_unix"].as_i64().unwrap());
    // Renewed at half-life (8 s): a new serial, well before the old one expires.
    wait_dump(&agent, "renewed certificate", Instant::now(), Duration::from_secs(14), |d| {
        cert(d, WEB_ID).is_some_and(|n| n["serial"] != c["serial"]) && d["node_certificate"]["serial"] != node_serial
    });
    wait_dump(&agent, "reconnected with the renewed node certificate", Instant::now(), Duration::from_secs(10), |d| {
        d["controller"]["connected"] == true && d["controller"]["connects"].as_u64() >= Some(2)
    });
}

#[test]
fn controller_restart_resumes_without_resync() {
    let t = Topology::new("control-restart");
    let (mut controller, agent, web, _api) = start(&t, &[]);
    wait_dump(&agent, "web enrolled", Instant::now(), Duration::from_secs(10), |d| {
        enrolled(d) == ["default/web"] && cert(d, WEB_ID).is_some()
    });
    let root = controller.get("/debug/ca");
    let version = agent.config_dump()["version"].clone();

    controller.proc.kill();
    // The node keeps serving on what it has while the controller is away.
    wait_dump(&agent, "disconnected", Instant::now(), Duration::from_secs(10), |d| {
        d["controller"]["connected"] == false
    });
    let dump = agent.config_dump();
    assert_eq!(enrolled(&dump), ["default/web"]);
    assert!(cert(&dump, WEB_ID).is_some());
    let server = t.http_server(&web, 8080);
    let client = t.pod("client");
    assert!(
        http_ok(&client.curl(&format!("http://{}:8080/", web.ip4))),
        "the pod is served while the controller is down"
    );
    drop(server);

    let controller = t.start_controller(&controller.netns, &[]);
    assert_eq!(controller.get("/debug/ca"), root, "the CA root survives the restart");
    wait_dump(&agent, "reconnected", Instant::now(), Duration::from_secs(15), |d| {
        d["controller"]["connected"] == true && d["controller"]["connects"] == 2
    });
    assert_eq!(agent.config_dump()["version"], version);
    // The node said what it holds; nothing differed, so nothing was resent.
    assert_eq!(controller.metric("mesh_controller_resync_resources_total"), 0.0);
    assert_eq!(controller.json("/debug/nodes")["nodes"]["node1"]["resync_resources"], 0);
}

/// What `exchange` sends and the sink answers, as a capture would show them in clear.
const CLEAR_REQUEST: &str = "ssssssssssssssssssssssssssssssss";
const CLEAR_REPLY: &str = "rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr";

/// Pod a (sa-a) on node1 and b (sa-b) on node2 under STRICT mutual TLS (a
/// node that forgot the mesh cannot reach b in plaintext), a sink server in
/// b answering 777 bytes at the returned address, reached once.
fn strict_a_to_b(mesh: &Mesh) -> (Pod, Pod, Proc, String) {
    let (a, b) = (mesh.t.pod("a"), mesh.t.pod("b"));
    let config = format!(
        "{}{}{}{}",
        yaml::namespace("default", true),
        yaml::peer_authentication("default", "STRICT"),
        yaml::pod(&a, "node1", "sa-a", "a"),
        yaml::pod(&b, "node2", "sa-b", "b")
    );
    mesh.apply("mesh.yaml", &config);
    mesh.wait_ready(&[(&a, "node1", "sa-a"), (&b, "node2", "sa-b")]);
    let sink = mesh.t.sink_server(&b, 9000, 777);
    let target = format!("{}:9000", b.ip4);
    assert_eq!(exchange(&a, &target, 100), Some(777), "a reaches b");
    (a, b, sink, target)
}

/// Issue 16 point 2: the controller goes away. Established connections are
/// untouched, new ones between known workloads keep working, a node agent
/// restarted meanwhile serves its pods at once from what it persisted
/// (configuration and certificates), and on the controller's return it
/// resumes without a resync; `mesh-ctl status` says which node is stale and
/// since when.
#[test]
fn the_controller_away_nodes_serve_and_restarted_ones_restore() {
    let Some(mut mesh) = Mesh::start("control-outage", &["node1", "node2"]) else { return };
    let (a, b, _sink, target) = strict_a_to_b(&mesh);
    let capture = Capture::start(&mesh, &mesh.t.pod("probe"), &b);
    let version = mesh.node("node1").agent.config_dump()["proxy"]["version"].clone();

    // A connection opened before the outage, used again after it.
    let go = mesh.t.dir.join("long-go");
    let script = format!(
        "import socket,os,time\n\
         c=socket.create_connection(('{}',9000)); c.sendall(b's'*1000); print('open',flush=True)\n\
         while not os.path.exists('{}'): time.sleep(0.05)\n\
         c.sendall(b's'*1000); c.shutdown(socket.SHUT_WR)\n\
         n=0\n\
         while True:\n\
         \x20   b=c.recv(65536)\n\
         \x20   if not b: break\n\
         \x20   n+=len(b)\n\
         print('done',n,flush=True)\n",
        b.ip4,
        go.display()
    );
    let long =
        Proc::spawn_in("long connection", &a.netns, &["python3", "-u", "-c", &script], &mesh.t.dir.join("long.log"));
    long.wait_for_log("open", Duration::from_secs(10));

    mesh.controller.proc.kill();
    for node in ["node1", "node2"] {
        wait_dump(&mesh.node(node).agent, "controller lost", Instant::now(), Duration::from_secs(10), |d| {
            d["controller"]["connected"] == false && d["controller"]["disconnected_since_unix"].as_u64().is_some()
        });
    }
    assert_eq!(exchange(&a, &target, 100), Some(777), "a new connection while the controller is away");
    // The connection opened before the outage still carries bytes both ways.
    std::fs::write(&go, "").unwrap();
    long.wait_for_log("done 777", Duration::from_secs(10));

    // node1's agent dies and comes back while the controller is still away.
    mesh.restart_agent("node1");
    let restarted = Instant::now();
    let served = loop {
        if exchange(&a, &target, 100) == Some(777) {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < mesh_tests::patience(Duration::from_secs(10)),
            "a restarted node does not serve its pods without the controller:\n{:#}",
            mesh.node("node1").agent.config_dump()
        );
        thread::sleep(Duration::from_millis(50));
    };
    eprintln!("restarted agent served a new cross-node connection {served:?} after it was ready");
    mesh.node("node1").agent.wait_access("the restarted node's connection over HBONE", |v| {
        v["original_dst"] == target.as_str() && v["route"] == "hbone"
    });
    let dump = mesh.node("node1").agent.config_dump();
    assert_eq!(dump["controller"]["restored_version"], version, "{:#}", dump["controller"]);
    assert_eq!(dump["proxy"]["version"], version);
    assert_eq!(dump["controller"]["connected"], false);
    assert!(cert(&dump, &identity("default", "sa-a")).is_some(), "{:#}", dump["certificates"]);

    // The controller is back: both nodes resume from what they hold.
    let netns = mesh.controller.netns.clone();
    mesh.controller = mesh.t.start_controller(&netns, &[]);
    for node in ["node1", "node2"] {
        wait_dump(&mesh.node(node).agent, "reconnected", Instant::now(), Duration::from_secs(15), |d| {
            d["controller"]["connected"] == true && d["controller"]["disconnected_since_unix"].is_null()
        });
    }
    let nodes = mesh.controller.json("/debug/nodes");
    for node in ["node1", "node2"] {
        assert_eq!(nodes["nodes"][node]["resync_resources"], 0, "{node} resumed without a resync: {nodes:#}");
    }
    // Through the outage and the restart, nothing crossed in clear (pt 8).
    capture.assert_only_tls(&a, &b, &[CLEAR_REQUEST, CLEAR_REPLY]);

    // A node that goes away is shown stale, with the moment it left.
    mesh.nodes[1].agent.proc.kill();
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(10));
    loop {
        let out = mesh.ctl(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(line) = text.lines().find(|l| l.starts_with("node2 ") && l.contains("no, stale since 20")) {
            eprintln!("{line}");
            break;
        }
        assert!(Instant::now() < deadline, "mesh-ctl status does not show node2 stale:\n{text}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// A certificate that expires while the controller is away: its identity's
/// connections are refused (STRICT mutual TLS only, so never plaintext),
/// with an error line and `mesh_node_certificates_expired`; the controller
/// back, it is renewed at once and traffic flows again.
#[test]
fn a_certificate_expiring_in_an_outage_fails_closed_until_renewed() {
    let t = Topology::new("control-expiry");
    let controller = t.start_controller(&t.node("controller"), &["--cert-lifetime", "16s"]);
    let Some(mut mesh) = Mesh::join(t, controller, "control-expiry", &["node1", "node2"]) else { return };
    let (a, b, _sink, target) = strict_a_to_b(&mesh);
    let capture = Capture::start(&mesh, &mesh.t.pod("probe"), &b);

    mesh.controller.proc.kill();
    let expired = |mesh: &Mesh| mesh.metric("node1", "mesh_node_certificates_expired", &[]);
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(30));
    while expired(&mesh) < 1.0 {
        assert!(Instant::now() < deadline, "a's certificate never counted as expired");
        thread::sleep(Duration::from_millis(200));
    }
    assert_ne!(exchange(&a, &target, 100), Some(777), "an expired identity must not carry traffic");
    let agent = &mesh.node("node1").agent;
    agent.proc.wait_for_log("workload certificate expired before it could be renewed", Duration::from_secs(5));
    let log = agent.proc.log_text();
    let line = log.lines().find(|l| l.contains("expired before it could be renewed")).unwrap();
    assert!(line.contains(&identity("default", "sa-a")), "{line}");

    let netns = mesh.controller.netns.clone();
    mesh.controller = mesh.t.start_controller(&netns, &["--cert-lifetime", "16s"]);
    let back = Instant::now();
    while exchange(&a, &target, 100) != Some(777) {
        assert!(
            back.elapsed() < mesh_tests::patience(Duration::from_secs(15)),
            "traffic does not resume once the controller is back:\n{:#}",
            mesh.node("node1").agent.config_dump()
        );
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("certificates renewed and traffic back {:?} after the controller restarted", back.elapsed());
    assert_eq!(expired(&mesh), 0.0);
    // Expired, refused, renewed: never in clear (pt 8).
    capture.assert_only_tls(&a, &b, &[CLEAR_REQUEST, CLEAR_REPLY]);
}
