//! `mesh-ctl` without a mesh: `check` on broken and good files, and what it
//! says when the controller or a node cannot be reached.
use std::{
    path::PathBuf,
    process::{Command, Output},
};

fn mesh_ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mesh-ctl")).args(args).output().expect("running mesh-ctl")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A fresh directory holding `files`.
fn dir_with(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-ctl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, body) in files {
        std::fs::write(dir.join(file), body).unwrap();
    }
    dir
}

const BROKEN: &[(&str, &str)] = &[
    (
        "namespace.yaml",
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: sidecar
"#,
    ),
    (
        "workloads.yaml",
        r#"# a pod and a service, each with one mistake
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: node1, serviceAccountName: Web_SA}
status: {podIP: 10.0.0.300}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.1
  ports:
  - port: 70000
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: ['fd00::1']}]
"#,
    ),
    (
        "policy.yaml",
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  action: MAYBE
  rules:
  - from: [{source: {principals: ["spiffe://"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: shop}
spec:
  rules:
  - to: [{operation: {methods: [GET], ports: [http]}}]
"#,
    ),
    (
        "syntax.yaml",
        r#"apiVersion: v1
kind: Namespace
metadata: {name: [unclosed
"#,
    ),
    (
        "dup.yaml",
        r#"apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
"#,
    ),
];

#[test]
fn check_names_every_problem_with_file_line_and_field() {
    let dir = dir_with("broken", BROKEN);
    let out = mesh_ctl(&["check", dir.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "problems exit 1:\n{stdout}{stderr}");
    let d = dir.display();
    for want in [
        format!("{d}/namespace.yaml:5: Namespace shop: metadata.labels[istio.io/dataplane-mode]: \"sidecar\""),
        format!("{d}/workloads.yaml:5: Pod shop/web: spec.serviceAccountName: \"Web_SA\" is not a valid name"),
        format!("{d}/workloads.yaml:6: Pod shop/web: status.podIP: \"10.0.0.300\" is not an IP address"),
        format!("{d}/workloads.yaml:14: Service shop/web: spec.ports[0].port: 70000 is not a port"),
        format!(
            "{d}/workloads.yaml:20: EndpointSlice shop/web-1: endpoints[0].addresses[0]: \"fd00::1\" is not an IPv4 address"
        ),
        format!("{d}/policy.yaml:5: AuthorizationPolicy shop/p: spec.action: \"MAYBE\""),
        format!("{d}/policy.yaml:7: AuthorizationPolicy shop/p: spec.rules[0].from[0].source.principals[0]:"),
        format!(
            "{d}/policy.yaml:14: AuthorizationPolicy shop/l7: spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port"
        ),
        format!("{d}/syntax.yaml:4: invalid YAML"),
        format!("{d}/dup.yaml:5: Namespace other: metadata.name: duplicate: already defined at {d}/dup.yaml:1"),
    ] {
        assert!(stdout.lines().any(|l| l.starts_with(&want)), "missing {want:?} in:\n{stdout}");
    }
    assert!(stdout.contains("10 problems"), "{stdout}");

    // The same as JSON, for scripts.
    let out = mesh_ctl(&["check", dir.to_str().unwrap(), "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["problems"].as_array().unwrap().len(), 10);
    assert_eq!(v["problems"][0]["field"], "metadata.labels[istio.io/dataplane-mode]");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_passes_good_files_given_one_by_one() {
    let dir = dir_with(
        "good",
        &[
            (
                "ns.yaml",
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n",
            ),
            (
                "pod.yaml",
                "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n\
                 spec: {nodeName: node1, serviceAccountName: web}\nstatus: {podIP: 10.0.0.3}\n",
            ),
        ],
    );
    let files: Vec<String> = ["ns.yaml", "pod.yaml"].iter().map(|f| dir.join(f).display().to_string()).collect();
    let out = mesh_ctl(&["check", &files[0], &files[1]]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout, "ok: 2 objects in 2 files, no problems, 0 warnings\n");
    let missing = mesh_ctl(&["check", "/nonexistent/mesh.yaml"]);
    assert_eq!(missing.status.code(), Some(3));
    assert!(text(&missing).1.contains("cannot read /nonexistent/mesh.yaml"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// One line on stderr naming the address and giving a hint; exit 3; no panic.
fn assert_clean_error(out: &Output, address: &str) {
    let (stdout, stderr) = text(out);
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains(address) && stderr.contains("(hint: "), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
}

#[test]
fn unreachable_controller_or_node_is_one_clear_line() {
    // A port nothing listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let controller = format!("http://127.0.0.1:{port}");
    for cmd in [
        &["status"][..],
        &["workloads"],
        &["certs"],
        &["connections"],
        &["enroll", "demo"],
        &["authz", "explain", "--from", "a", "--to", "b:80"],
    ] {
        let mut args = vec!["--controller", controller.as_str(), "--timeout", "2"];
        args.extend_from_slice(cmd);
        assert_clean_error(&mesh_ctl(&args), &format!("127.0.0.1:{port}"));
    }
    let node = format!("127.0.0.1:{port}");
    for cmd in ["workloads", "services", "policies", "certs", "connections", "config-dump"] {
        assert_clean_error(&mesh_ctl(&[cmd, "--node-addr", &node, "--timeout", "2"]), &node);
    }
    // MESH_CONTROLLER names the controller too.
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-ctl"))
        .arg("status")
        .env("MESH_CONTROLLER", &controller)
        .output()
        .unwrap();
    assert_clean_error(&out, &controller);
}

#[test]
fn help_has_examples_and_completion_scripts_generate() {
    for cmd in [
        "status",
        "workloads",
        "services",
        "policies",
        "certs",
        "connections",
        "config-dump",
        "check",
        "enroll",
        "unenroll",
        "completion",
    ] {
        let out = mesh_ctl(&[cmd, "--help"]);
        assert!(out.status.success());
        assert!(text(&out).0.contains("Examples:\n  mesh-ctl "), "{cmd} --help has examples");
    }
    assert!(text(&mesh_ctl(&["authz", "explain", "--help"])).0.contains("Examples:"));
    for shell in ["bash", "zsh", "fish"] {
        let out = mesh_ctl(&["completion", shell]);
        assert!(out.status.success() && text(&out).0.contains("authz"), "{shell} completion");
    }
}

#[test]
fn check_accepts_istio_routing_samples_with_warnings_and_exit_0() {
    let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-config/tests/fixtures/bookinfo");
    let out = mesh_ctl(&["check", samples.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "warnings only: exit 0\n{stdout}{stderr}");
    assert!(stdout.contains("ok: 10 objects in 4 files, no problems,"), "{stdout}");
    // The samples route to services they do not define: warnings with file, line and field, as istioctl analyze gives.
    assert!(
        stdout.lines().any(|l| l.starts_with("warning: ")
            && l.contains(
                "virtual-service-reviews-test-v2.yaml:1: VirtualService default/reviews: spec.http[0].route[0].destination: \
                 host \"reviews\" is not a Service or ServiceEntry (yet)"
            )),
        "{stdout}"
    );
}
