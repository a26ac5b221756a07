//! The node agent needs the capabilities the DaemonSet grants it and no
//! others: started through setpriv with only CAP_BPF, CAP_NET_ADMIN and
//! CAP_SYS_ADMIN in its bounding set (no other capability can be gained),
//! it loads and attaches its programs, enrolls pods, carries their traffic
//! over HBONE and enforces a policy. The DaemonSet grants exactly these.
use mesh_tests::{
    Topology, http_ok,
    mesh::{Mesh, yaml},
};

/// CAP_NET_ADMIN (12), CAP_SYS_ADMIN (21), CAP_BPF (39).
const GRANTED: u64 = (1 << 12) | (1 << 21) | (1 << 39);

#[test]
fn the_agent_runs_with_only_the_capabilities_the_daemonset_grants() {
    let t = Topology::new("privileges");
    t.launch_agents_with(&["setpriv", "--bounding-set=-all,+net_admin,+sys_admin,+bpf", "--inh-caps=-all", "--"]);
    let Some(mesh) = Mesh::start_in(t, "privileges", &["node1", "node2"]) else { return };
    for node in ["node1", "node2"] {
        let pid = mesh.node(node).agent.proc.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let caps = |field: &str| {
            let hex = status.lines().find_map(|l| l.strip_prefix(field)).unwrap_or_else(|| panic!("{field}"));
            u64::from_str_radix(hex.trim(), 16).unwrap()
        };
        assert!(status.contains("Name:\tmesh-node"), "the process held is the agent itself:\n{status}");
        assert_eq!(caps("CapBnd:"), GRANTED, "{node}'s bounding set");
        assert_eq!(caps("CapEff:"), GRANTED, "{node}'s effective set");
    }

    let (a, b, _servers) = mesh.a_and_b_serving();
    let reaches = || http_ok(&a.curl(&format!("http://{}/", b.ip4)));
    assert!(reaches(), "a → b through the mesh");
    let tunnels = mesh.metric("node2", "istio_tcp_connections_opened_total", &[("reporter", "destination")]);
    assert!(tunnels >= 1.0, "the connection crossed over HBONE to node2's proxy ({tunnels})");
    let deny = "{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sa-a]}}]}]}";
    mesh.apply("deny.yaml", &yaml::authorization("default", "deny-a", deny));
    assert!(!reaches(), "a is denied by the policy");
    for node in ["node1", "node2"] {
        let log = mesh.node(node).agent.proc.log_text();
        assert!(!log.contains("Operation not permitted"), "{node}'s agent was refused something:\n{log}");
    }

    // What the DaemonSet grants its agent: these, and nothing else.
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/daemonset/mesh-node.yaml"))
        .expect("the DaemonSet");
    let daemonset = serde_yaml_ng::Deserializer::from_str(&manifest)
        .map(|d| <serde_json::Value as serde::Deserialize>::deserialize(d).unwrap())
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let containers = daemonset["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    let agent = containers.iter().find(|c| c["name"] == "mesh-node").expect("the agent's container");
    let security = &agent["securityContext"];
    assert_ne!(security["privileged"], true, "{security}");
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]), "{security}");
    assert_eq!(security["capabilities"]["add"], serde_json::json!(["BPF", "NET_ADMIN", "SYS_ADMIN"]), "{security}");
}
