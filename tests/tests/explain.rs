//! `mesh-ctl authz explain` against what the proxy really does: for each
//! policy set, each (from, to, port) case is explained and then tried with a
//! real connection; the explained decision must be the observed one.
use mesh_tests::{
    Pod,
    mesh::{Mesh, yaml},
    run_in,
};

/// A client pod by name, a port of B, and the decision expected (so the
/// table also documents Istio's semantics).
type Case = (&'static str, u16, bool);

struct PolicySet {
    name: &'static str,
    yaml: String,
    cases: Vec<Case>,
}

fn sets(c_ip: &str) -> Vec<PolicySet> {
    let allow_a = "{selector: {matchLabels: {app: b}}, action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/sa-a]}}]}]}";
    vec![
        PolicySet {
            name: "no policy",
            yaml: String::new(),
            cases: vec![("a", 80, true), ("c", 8080, true), ("out", 80, true)],
        },
        PolicySet {
            name: "ALLOW by principal",
            yaml: yaml::authorization("shop", "allow-a", allow_a),
            cases: vec![("a", 80, true), ("a", 8080, true), ("c", 80, false), ("out", 80, false)],
        },
        PolicySet {
            name: "DENY by IP block beats ALLOW by namespace",
            yaml: [
                yaml::authorization(
                    "shop",
                    "deny-c",
                    &format!("{{action: DENY, rules: [{{from: [{{source: {{ipBlocks: [{c_ip}/32]}}}}]}}]}}"),
                ),
                yaml::authorization(
                    "shop",
                    "allow-shop",
                    "{action: ALLOW, rules: [{from: [{source: {namespaces: [shop]}}]}]}",
                ),
            ]
            .concat(),
            cases: vec![("a", 80, true), ("c", 80, false), ("out", 80, false)],
        },
        PolicySet {
            name: "ALLOW to one port",
            yaml: yaml::authorization(
                "shop",
                "only-8080",
                "{action: ALLOW, rules: [{to: [{operation: {ports: [\"8080\"]}}]}]}",
            ),
            cases: vec![("a", 8080, true), ("a", 80, false), ("out", 8080, true)],
        },
        PolicySet {
            name: "STRICT refuses plaintext before policy",
            yaml: yaml::peer_authentication("shop", "STRICT"),
            cases: vec![("out", 80, false), ("a", 80, true), ("c", 8080, true)],
        },
        PolicySet {
            name: "any principal, not port 8080 (notPorts, principals *)",
            yaml: yaml::authorization(
                "shop",
                "authenticated",
                "{action: ALLOW, rules: [{from: [{source: {principals: [\"*\"]}}], to: [{operation: {notPorts: [\"8080\"]}}]}]}",
            ),
            cases: vec![("a", 80, true), ("a", 8080, false), ("out", 80, false), ("c", 80, true)],
        },
        PolicySet {
            name: "mesh-wide DENY from the root namespace, with a when condition",
            yaml: yaml::authorization(
                "istio-system",
                "no-8080-but-a",
                "{selector: {matchLabels: {app: b}}, action: DENY, rules: [{when: [{key: destination.port, values: [\"8080\"]}, {key: source.principal, notValues: [cluster.local/ns/shop/sa/sa-a]}]}]}",
            ),
            cases: vec![("a", 8080, true), ("c", 8080, false), ("out", 8080, false), ("c", 80, true)],
        },
    ]
}

#[test]
fn authz_explain_agrees_with_the_proxy() {
    let Some(mesh) = Mesh::start("explain", &["node1", "node2"]) else { return };
    let (a, b, c) = (mesh.t.pod_in("shop", "a"), mesh.t.pod_in("shop", "b"), mesh.t.pod_in("shop", "c"));
    let out = mesh.t.pod_in("legacy", "out");
    let base = [
        yaml::namespace("shop", true),
        yaml::namespace("legacy", false),
        yaml::pod(&a, "node1", "sa-a", "a"),
        yaml::pod(&b, "node2", "sa-b", "b"),
        yaml::pod(&c, "node1", "sa-c", "c"),
        yaml::pod(&out, "node1", "sa-out", "out"),
    ]
    .concat();
    mesh.apply("base.yaml", &base);
    mesh.wait_ready(&[(&a, "node1", "sa-a"), (&b, "node2", "sa-b"), (&c, "node1", "sa-c")]);
    let _servers = [mesh.t.nginx(&b, 80, "b80", 10), mesh.t.nginx(&b, 8080, "b8080", 10)];
    let clients = [("a", &a), ("c", &c), ("out", &out)];

    let mut checked = 0;
    for set in sets(&c.ip4.to_string()) {
        if !set.yaml.is_empty() {
            mesh.apply("policy.yaml", &set.yaml);
        }
        for (from, port, expected) in &set.cases {
            let client: &Pod = clients.iter().find(|(n, _)| n == from).unwrap().1;
            // By name, by IP: both must resolve to the same decision.
            let by_name = explain(&mesh, &client.name, &format!("shop/b:{port}"));
            let by_ip = explain(&mesh, &client.ip4.to_string(), &format!("{}:{port}", b.ip4));
            assert_eq!(by_name["decision"], by_ip["decision"], "{}: {from} -> b:{port}", set.name);
            let explained = by_name["decision"]["allowed"].as_bool().unwrap();
            let url = format!("http://{}:{port}/", b.ip4);
            let got = run_in(&client.netns, &["curl", "-s", "-m", "3", &url]);
            let real = String::from_utf8_lossy(&got.stdout).starts_with(&format!("b{port}"));
            assert_eq!(
                (explained, real),
                (*expected, *expected),
                "{}: {from} -> b:{port}: explain {by_name:#}, curl {:?}",
                set.name,
                String::from_utf8_lossy(&got.stdout)
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked} cases");
}

/// `mesh-ctl authz explain`: JSON, exit 0 when allowed and 1 when denied.
fn explain(mesh: &Mesh, from: &str, to: &str) -> serde_json::Value {
    let out = mesh.ctl(&["authz", "explain", "--from", from, "--to", to, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("explain {from} -> {to}: {}", String::from_utf8_lossy(&out.stderr)));
    let allowed = v["decision"]["allowed"].as_bool().expect("a decision");
    assert_eq!(out.status.code(), Some(if allowed { 0 } else { 1 }), "{v:#}");
    v
}

/// The admin API (issue 16 pt 7): another host can never change a node
/// (enrol, report a network namespace), and reads it only with the node's
/// token; `mesh-ctl` without the token says what to pass. The node itself
/// changes it through its own address (as the harness's CNI stand-in does).
#[test]
fn other_hosts_only_read_a_nodes_admin_api_with_its_token() {
    let Some(mesh) = Mesh::start("admin_access", &["node1"]) else { return };
    let node = mesh.node("node1");
    let base = format!("http://{}", node.agent.admin_addr);
    let token = std::fs::read_to_string(mesh_tests::mesh::admin_token_file(&mesh.t)).unwrap();
    let from_controller = |method: &str, path: &str, auth: Option<&str>| -> (u16, String) {
        let url = format!("{base}{path}");
        let mut args = vec!["curl", "-s", "-m", "5", "-X", method, "-w", "\n%{http_code}", &url];
        let header;
        if let Some(t) = auth {
            header = format!("authorization: Bearer {t}");
            args.extend_from_slice(&["-H", &header]);
        }
        if method != "GET" {
            args.extend_from_slice(&["-d", r#"{"name":"shop/x","netns":"/run/netns/nowhere"}"#]);
        }
        let out = run_in(&mesh.controller.netns, &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.parse().unwrap_or(0), body.to_owned())
    };

    for (method, path) in [("POST", "/pods"), ("PUT", "/netns"), ("DELETE", "/netns?name=shop/x")] {
        for auth in [None, Some(token.as_str())] {
            let (code, body) = from_controller(method, path, auth);
            assert_eq!(code, 403, "{method} {path} from another host (token: {}): {body}", auth.is_some());
            assert!(body.contains("only from this node"), "{body}");
        }
    }
    let (code, body) = from_controller("GET", "/config_dump", None);
    assert_eq!(code, 401, "a read without the token: {body}");
    let (code, body) = from_controller("GET", "/connections", Some("not-the-token"));
    assert_eq!(code, 401, "a read with a wrong token: {body}");
    let (code, body) = from_controller("GET", "/config_dump", Some(&token));
    assert_eq!(code, 200, "a read with the token: {body}");

    // The node itself: its own address counts as local.
    let x = mesh.t.pod_in("shop", "x");
    node.agent.report_netns("shop/x", &x.netns);
    assert_eq!(node.agent.config_dump()["pods"], serde_json::json!([]), "reported, not enrolled");

    let refused = |reason: &str| mesh.metric("node1", "mesh_node_admin_requests_refused_total", &[("reason", reason)]);
    assert_eq!(refused("remote_mutation"), 6.0);
    assert_eq!(refused("no_token"), 1.0);
    assert_eq!(refused("wrong_token"), 1.0);

    // mesh-ctl: with the token (the harness's ctl), and without.
    let with = mesh.ctl(&["workloads"]);
    assert!(with.status.success(), "{}", String::from_utf8_lossy(&with.stderr));
    let bin = mesh_tests::sibling_bin("mesh-ctl");
    let url = format!("http://{}", mesh.controller.metrics_addr);
    let without = run_in(&mesh.controller.netns, &[bin.to_str().unwrap(), "--controller", &url, "workloads"]);
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert_eq!(without.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("401") && stderr.contains("--admin-token-file"), "{stderr}");
}
