//! Node trust (issue 16 pt 6) with real agents: each node joins with a token
//! of its own from `mesh-ctl node add` (the harness registers every node
//! that way); a used token replayed, or presented for another node name, is
//! refused and counted; `mesh-ctl node remove` cuts a node off at once (its
//! stream ends, its certificate and token are refused, no workload
//! certificate is issued to it) and `mesh-ctl node add` lets it back with a
//! new token, which the agent picks up from its token file on its own.
use std::{
    thread,
    time::{Duration, Instant},
};

use mesh_tests::mesh::{Mesh, exchange, identity, sum_metric, yaml};
use serde_json::Value;

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + mesh_tests::patience(limit);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn ctl_ok(mesh: &Mesh, args: &[&str]) -> String {
    let out = mesh.ctl(args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "mesh-ctl {}: {text}", args.join(" "));
    text
}

#[test]
fn nodes_join_with_their_own_tokens_and_removed_nodes_are_cut_off() {
    let Some(mesh) = Mesh::start("trust", &["node1", "node2"]) else { return };
    let (a, b, c) = (mesh.t.pod("a"), mesh.t.pod("b"), mesh.t.pod("c"));
    let base =
        [yaml::namespace("default", true), yaml::pod(&a, "node1", "sa-a", "a"), yaml::pod(&b, "node2", "sa-b", "b")]
            .concat();
    mesh.apply("mesh.yaml", &base);
    mesh.wait_ready(&[(&a, "node1", "sa-a"), (&b, "node2", "sa-b")]);
    let _sink = mesh.t.sink_server(&b, 7000, 100);
    let to_b = format!("{}:7000", b.ip4);
    assert_eq!(exchange(&a, &to_b, 10), Some(100), "a reaches b before anything happens");

    // Both nodes joined with their own tokens, now used up.
    let list: Value = serde_json::from_str(&ctl_ok(&mesh, &["node", "list", "-o", "json"])).unwrap();
    for node in ["node1", "node2"] {
        assert!(list[node]["joined_unix"].as_u64() > Some(0), "{node} joined: {list:#}");
        assert_eq!(list[node]["token_sha256"], "", "{node}'s token is used: {list:#}");
    }
    // (The registry takes changes only on the controller's host: the rule
    // `mesh_common::admin::is_local_caller`, tested end to end on the node's
    // admin API in explain.rs; the harness's controller serves loopback only.)

    // Rogue joins: node1's used token replayed, and presented as another node.
    let controller_metric = |reason: &str| {
        sum_metric(&mesh.controller.get("/metrics"), "mesh_controller_node_refusals_total", &[("reason", reason)])
    };
    let token1 = mesh.controller.node_token("node1");
    let root = mesh.controller.state_dir.join("ca-cert.pem");
    for (netns, name) in [("rogue1", "node1"), ("rogue2", "node9")] {
        let n = mesh.t.node(netns);
        let args = [
            "--controller",
            &mesh.controller.address,
            "--node-name",
            name,
            "--join-token",
            token1.to_str().unwrap(),
            "--controller-ca",
            root.to_str().unwrap(),
        ];
        let rogue = mesh.t.start_agent(&n, netns, &args).expect("the agent ran here before");
        wait_for(&format!("{netns} refused"), Duration::from_secs(10), || {
            rogue.proc.log_text().contains("controller refused")
        });
    }
    assert!(controller_metric("token_used") >= 1.0, "the replayed token is refused as used");
    assert!(controller_metric("unknown_node") >= 1.0, "a token for another node name is refused");
    assert_eq!(exchange(&a, &to_b, 10), Some(100), "the real nodes are unaffected");

    // Removing node2: its stream ends at once, and it cannot come back.
    let removed = Instant::now();
    ctl_ok(&mesh, &["node", "remove", "node2"]);
    wait_for("node2 disconnected", Duration::from_secs(5), || {
        mesh.controller.json("/debug/nodes")["nodes"]["node2"]["connected"] == false
    });
    eprintln!("node2 cut off {:?} after mesh-ctl node remove", removed.elapsed());
    let node2 = &mesh.node("node2").agent;
    wait_for("node2 told", Duration::from_secs(5), || {
        node2.proc.log_text().contains("the controller no longer accepts this node's certificate")
    });
    wait_for("node2's rejoin refused", Duration::from_secs(10), || controller_metric("revoked") >= 1.0);
    // A pod scheduled on the removed node gets no certificate.
    mesh.controller.write("mesh.yaml", &[base.clone(), yaml::pod(&c, "node2", "sa-c", "c")].concat());
    node2.report_netns(&c.name, &c.netns);
    thread::sleep(Duration::from_secs(2));
    let c_id = identity("default", "sa-c");
    let held =
        |dump: &Value| dump["certificates"].as_array().into_iter().flatten().any(|x| x["identity"] == c_id.as_str());
    assert!(!held(&node2.config_dump()), "a removed node obtains no workload certificate");

    // Registered again: the new token, written where the agent reads it, lets it back.
    let token2 = mesh.controller.node_token("node2");
    ctl_ok(&mesh, &["node", "add", "node2", "--token-file", token2.to_str().unwrap()]);
    wait_for("node2 back with c's certificate", Duration::from_secs(20), || held(&node2.config_dump()));
    assert_eq!(exchange(&a, &to_b, 10), Some(100), "a reaches b again");
}
