//! The same-node path (issue 15 pt 4) on the real kernel: two enrolled pods
//! on one node talk through the node proxy without HBONE, and lose nothing
//! of what HBONE gives them. Nothing of theirs crosses the bridge; both
//! records carry both identities and exact bytes, as on HBONE, with route
//! `local`, and so do Istio's metrics of both reporters; `mesh-ctl
//! connections` shows the path; AuthorizationPolicy refuses a new
//! connection and closes an open one; with the agent gone, connections
//! fail closed.
use std::{
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    capture::Capture,
    mesh::{Mesh, exchange, identity, node_metrics, sum_metric, yaml},
};

#[test]
fn same_node_connections_skip_hbone_and_keep_its_guarantees() {
    let Some(mut mesh) = Mesh::start("local-path", &["node1"]) else { return };
    let (a, b) = (mesh.t.pod("a"), mesh.t.pod("b"));
    let config =
        [yaml::namespace("default", true), yaml::pod(&a, "node1", "sa-a", "a"), yaml::pod(&b, "node1", "sa-b", "b")]
            .concat();
    mesh.apply("mesh.yaml", &config);
    mesh.wait_ready(&[(&a, "node1", "sa-a"), (&b, "node1", "sa-b")]);
    let probe = mesh.t.pod("probe");
    let capture = Capture::start(&mesh, &probe, &b);
    let _sink = mesh.t.sink_server(&b, 7000, 70_000);
    let _echo = mesh.t.echo_server(&b, &[9100, 9101]);
    let to_b = format!("{}:7000", b.ip4);

    // A known exchange, recorded on both sides as HBONE records it.
    assert_eq!(exchange(&a, &to_b, 12_345), Some(70_000));
    let (a_id, b_id) = (identity("default", "sa-a"), identity("default", "sa-b"));
    let node1 = &mesh.node("node1").agent;
    let out = node1.wait_access("a's outbound", |v| v["direction"] == "outbound" && v["original_dst"] == to_b.as_str());
    let inb = node1.wait_access("b's inbound", |v| v["direction"] == "inbound" && v["original_dst"] == to_b.as_str());
    for (what, line) in [("outbound", &out), ("inbound", &inb)] {
        assert_eq!(line["route"], "local", "{what}: {line}");
        assert_eq!(line["security"], "mutual_tls", "{what}: {line}");
        assert_eq!((line["src_identity"].as_str(), line["dst_identity"].as_str()), (Some(&*a_id), Some(&*b_id)));
        assert_eq!(line["outcome"], "ok", "{what}: {line}");
    }
    assert_eq!(inb["decision"], "allow", "{inb}");
    assert!(inb["src"].as_str().unwrap().starts_with(&a.ip4.to_string()), "{inb}");
    let labels = |reporter: &'static str| {
        vec![
            ("reporter", reporter),
            ("source_principal", a_id.as_str()),
            ("destination_principal", b_id.as_str()),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    let m = node_metrics(&mesh.node("node1").netns);
    for reporter in ["source", "destination"] {
        let figure = |name: &str| sum_metric(&m, name, &labels(reporter));
        assert_eq!(figure("istio_tcp_connections_closed_total"), 1.0, "{reporter}:\n{m}");
        assert_eq!(figure("istio_tcp_received_bytes_total"), 12_345.0, "{reporter}");
        assert_eq!(figure("istio_tcp_sent_bytes_total"), 70_000.0, "{reporter}");
    }

    // mesh-ctl connections names the path of an open connection.
    let kept = mesh.t.held_connection(&a, &b.ip4.to_string(), 9101);
    let denied = mesh.t.held_connection(&a, &b.ip4.to_string(), 9100);
    let shown = String::from_utf8_lossy(&mesh.ctl(&["connections", "--node", "node1"]).stdout).into_owned();
    assert!(shown.lines().any(|l| l.contains(":9101") && l.contains(" local ")), "{shown}");

    // Policy: a DENY on 9100 closes the open connection there and refuses new ones.
    let applied = Instant::now();
    mesh.apply(
        "deny.yaml",
        &yaml::authorization(
            "default",
            "deny-9100",
            "{selector: {matchLabels: {app: b}}, action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sa-a]}}], to: [{operation: {ports: ['9100']}}]}]}",
        ),
    );
    denied.wait_for_log("closed after", Duration::from_secs(5));
    eprintln!("open same-node connection closed {:?} after the DENY was written", applied.elapsed());
    let line = node1.wait_access("closed by policy", |v| v["policy"] == "default/deny-9100" && v["route"] == "local");
    assert_eq!((line["decision"].as_str(), line["response_flags"].as_str()), (Some("deny"), Some("RBAC")), "{line}");
    assert_eq!(exchange(&a, &format!("{}:9100", b.ip4), 10), None, "a new connection to 9100 was admitted");
    thread::sleep(Duration::from_millis(200));
    assert!(!kept.log_text().contains("closed after"), "the allowed connection was closed:\n{}", kept.log_text());

    // Nothing of it on the bridge: the bytes never left the node's memory.
    let (packets, _, raw) = capture.packets(&a, &b);
    assert!(packets.is_empty(), "segments between a and b on the bridge: {:?}", &packets[..packets.len().min(5)]);
    assert!(!String::from_utf8_lossy(&raw).contains("ssssssssssssssss"));
    drop((kept, denied));

    // The agent gone: the same-node connection fails closed, never direct.
    mesh.nodes[0].agent.proc.kill();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(exchange(&a, &to_b, 10), None, "a reached b with the agent gone");
}
