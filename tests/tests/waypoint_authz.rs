//! L7 authorization at the waypoint, on the real kernel: AuthorizationPolicies
//! bound by targetRefs to the waypoint's Gateway or to a Service, decided per
//! request by the waypoint and explained by `mesh-ctl authz explain` with the
//! same evaluator; a table of cases run for real with curl and a gRPC client;
//! dry-run policies counted and not enforced; and no bypass: a client that
//! dials an endpoint's pod IP to get around the waypoint is refused by the
//! endpoint's node proxy, which says why.
use std::time::{Duration, Instant};

use mesh_tests::{
    Pod,
    mesh::sum_metric,
    run_in,
    waypoint::{SYSTEM_PYTHON, access_log, waypoint_metrics},
};

use mesh_tests::waypoint::{BACKEND_VIP, GRPC_VIP, http_status as status, l7_setup as setup};

/// One gRPC unary call of `method` (a full path) to `target`: the status code's name.
fn grpc_call(pod: &Pod, target: &str, method: &str) -> String {
    let script = "import grpc, sys\nch = grpc.insecure_channel(sys.argv[1])\ntry:\n    \
                  ch.unary_unary(sys.argv[2])(b'x', timeout=10)\n    print('OK')\n\
                  except grpc.RpcError as e:\n    print(e.code().name)\n";
    let out = run_in(&pod.netns, &[SYSTEM_PYTHON, "-c", script, target, method]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A request of the table.
struct Req {
    from: &'static str,
    method: &'static str,
    path: &'static str,
    headers: &'static [&'static str],
    allowed: bool,
}

const fn req(from: &'static str, method: &'static str, path: &'static str, allowed: bool) -> Req {
    Req { from, method, path, headers: &[], allowed }
}

const fn with(
    from: &'static str,
    method: &'static str,
    path: &'static str,
    headers: &'static [&'static str],
    allowed: bool,
) -> Req {
    Req { from, method, path, headers, allowed }
}

/// `name` bound to the backend service (`Service`) or to the waypoint (`Gateway`).
fn policy(name: &str, target: &str, spec: &str) -> String {
    let target = match target {
        "Service" => "{kind: Service, group: '', name: backend}",
        _ => "{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}",
    };
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  targetRefs: [{target}]\n{spec}---\n"
    )
}

/// What the first point asks: a table of (request, policy set,
/// expected) run for real through the waypoint, each case also explained by
/// `mesh-ctl authz explain` with the same decision; a denied request is 403
/// `RBAC: access denied`, counted and logged with the policy that decided.
#[test]
fn l7_policy_table_through_the_waypoint() {
    let Some(s) = setup("wp-authz-table") else { return };
    type Set = (&'static str, String, Vec<Req>);
    let sets: Vec<Set> = vec![
        (
            "ALLOW methods (bound to the Service)",
            policy("get-only", "Service", "  rules: [{to: [{operation: {methods: [GET, HEAD]}}]}]\n"),
            vec![
                req("client", "GET", "/", true),
                req("client", "POST", "/", false),
                req("client", "DELETE", "/x", false),
            ],
        ),
        (
            "ALLOW paths: exact, prefix, suffix; normalized first",
            policy("paths", "Gateway", "  rules: [{to: [{operation: {paths: [/exact, /public/*, '*.css']}}]}]\n"),
            vec![
                req("client", "GET", "/exact", true),
                req("client", "GET", "/exact/more", false),
                req("client", "GET", "/public/a/b", true),
                req("client", "GET", "/site/main.css", true),
                req("client", "GET", "/private", false),
                req("client", "GET", "/public/../private", false),
                req("client", "GET", "/%70ublic/x", true),
                req("client", "GET", "/exact?q=1", true),
            ],
        ),
        (
            "DENY on a header, no ALLOW",
            policy(
                "no-evil",
                "Gateway",
                "  action: DENY\n  rules: [{when: [{key: 'request.headers[x-evil]', values: ['yes', 'y*']}]}]\n",
            ),
            vec![
                req("client", "GET", "/", true),
                with("client", "GET", "/", &["x-evil: yes"], false),
                with("client", "GET", "/", &["x-evil: yikes"], false),
                with("client", "GET", "/", &["x-evil: no"], true),
            ],
        ),
        (
            "ALLOW by principal",
            policy(
                "client-only",
                "Service",
                "  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]}]\n",
            ),
            vec![req("client", "GET", "/", true), req("other", "GET", "/", false)],
        ),
        (
            "ALLOW namespace except notPaths",
            policy(
                "not-admin",
                "Gateway",
                "  rules: [{from: [{source: {namespaces: [default]}}], to: [{operation: {notPaths: ['/admin*']}}]}]\n",
            ),
            vec![
                req("other", "GET", "/x", true),
                req("other", "GET", "/admin", false),
                req("other", "GET", "/adminx", false),
            ],
        ),
        (
            "DENY wins over ALLOW",
            policy("allow-all", "Gateway", "  rules: [{}]\n")
                + &policy(
                    "other-no-delete",
                    "Service",
                    "  action: DENY\n  rules: [{from: [{source: {principals: ['*/sa/other']}}], to: [{operation: {methods: [DELETE]}}]}]\n",
                ),
            vec![
                req("other", "DELETE", "/", false),
                req("client", "DELETE", "/", true),
                req("other", "GET", "/", true),
            ],
        ),
        (
            "ALLOW hosts (any port) and ports",
            policy(
                "hosts",
                "Gateway",
                "  rules: [{to: [{operation: {hosts: [backend, 'backend.default.*'], ports: ['80']}}]}]\n",
            ),
            vec![
                with("client", "GET", "/", &["Host: backend"], true),
                with("client", "GET", "/", &["Host: BACKEND:80"], true),
                with("client", "GET", "/", &["Host: backend.default.svc.cluster.local"], true),
                with("client", "GET", "/", &["Host: elsewhere"], false),
            ],
        ),
        (
            "ALLOW with notValues and notMethods",
            policy(
                "careful",
                "Service",
                "  rules: [{to: [{operation: {notMethods: [PUT]}}], when: [{key: 'request.headers[x-user]', notValues: [mallory]}]}]\n",
            ),
            vec![
                with("client", "GET", "/", &["x-user: alice"], true),
                with("client", "GET", "/", &["x-user: mallory"], false),
                req("client", "GET", "/", true),
                req("client", "PUT", "/", false),
            ],
        ),
        ("allow-nothing", policy("nothing", "Gateway", "  action: ALLOW\n"), vec![req("client", "GET", "/", false)]),
        (
            "AUDIT decides nothing",
            policy("audit", "Gateway", "  action: AUDIT\n  rules: [{}]\n"),
            vec![req("client", "GET", "/", true)],
        ),
    ];
    let mut cases = 0;
    let mut denied = 0;
    for (name, yaml, reqs) in &sets {
        s.mesh.apply("authz.yaml", yaml);
        s.mesh.wait_waypoint_current(&s.wp_pod);
        for r in reqs {
            let pod = if r.from == "client" { &s.client } else { &s.other };
            let mut args = Vec::new();
            for h in r.headers {
                args.extend(["-H", h]);
            }
            let got = status(pod, r.method, &format!("http://{BACKEND_VIP}{}", r.path), &args);
            let want = if r.allowed { "200" } else { "403" };
            assert_eq!(
                got,
                want,
                "{name}: {} {} {:?} from {}:\n{}",
                r.method,
                r.path,
                r.headers,
                r.from,
                s.wp.log_text()
            );
            // mesh-ctl, with the same evaluator, on the policies the nodes hold.
            let mut ctl = vec!["authz", "explain", "--from", r.from, "--to", "default/backend:80", "-o", "json"];
            ctl.extend(["--method", r.method, "--path", r.path]);
            for h in r.headers {
                let (k, v) = h.split_once(": ").unwrap();
                if k.eq_ignore_ascii_case("host") {
                    ctl.extend(["--authority", v]);
                } else {
                    ctl.extend(["-H", h]);
                }
            }
            let out = s.mesh.ctl(&ctl);
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
            });
            assert_eq!(json["decision"]["allowed"], r.allowed, "{name}: mesh-ctl disagrees: {json}");
            assert_eq!(out.status.code(), Some(if r.allowed { 0 } else { 1 }), "{name}: exit code: {json}");
            cases += 1;
            denied += usize::from(!r.allowed);
        }
    }
    println!("{cases} cases through the waypoint, {denied} denied, each explained alike by mesh-ctl");
    assert!(cases >= 25, "the table has {cases} cases");

    // A denial's answer, count and log line.
    s.mesh.apply("authz.yaml", &policy("get-only", "Service", "  rules: [{to: [{operation: {methods: [GET]}}]}]\n"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let out = run_in(&s.client.netns, &["curl", "-s", "-m", "10", "-X", "POST", &format!("http://{BACKEND_VIP}/form")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "RBAC: access denied");
    let line = access_log(&s.wp).into_iter().rev().find(|l| l["path"] == "/form").expect("an access-log line");
    assert_eq!((line["status"].as_u64(), line["response_flags"].as_str()), (Some(403), Some("RBAC")), "{line}");
    assert!(s.wp.log_text().contains("request denied by authorization policy"), "{}", s.wp.log_text());
    let text = waypoint_metrics(&s.wp_pod);
    let flagged = sum_metric(&text, "istio_requests_total", &[("response_code", "403"), ("response_flags", "RBAC")]);
    assert!(flagged >= denied as f64, "{flagged} requests counted 403 RBAC, {denied} denied");
    let by_policy = sum_metric(
        &text,
        "mesh_waypoint_authz_decisions_total",
        &[("decision", "allow"), ("policy", "default/get-only")],
    );
    assert!(by_policy >= 1.0, "allowed requests counted by the deciding policy:\n{text}");

    // gRPC: a denied call is PERMISSION_DENIED; the allowed method answers.
    s.mesh.apply(
        "authz.yaml",
        &policy("unary-only", "Gateway", "  rules: [{to: [{operation: {paths: [/mesh.test.Echo/Unary]}}]}]\n"),
    );
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let target = format!("{GRPC_VIP}:9090");
    assert_eq!(grpc_call(&s.client, &target, "/mesh.test.Echo/Unary"), "OK");
    assert_eq!(grpc_call(&s.client, &target, "/mesh.test.Echo/Missing"), "PERMISSION_DENIED");
}

/// Dry-run policies (`istio.io/dry-run: "true"`) decide nothing: the request
/// is answered, and what the policy would have decided is counted and logged.
#[test]
fn dry_run_policies_are_counted_not_enforced() {
    let Some(s) = setup("wp-authz-dryrun") else { return };
    let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                metadata: {name: would-deny, namespace: default, annotations: {istio.io/dry-run: 'true'}}\n\
                spec:\n  targetRefs: [{kind: Service, group: '', name: backend}]\n  action: DENY\n  \
                rules: [{to: [{operation: {paths: ['/secret*']}}]}]\n";
    s.mesh.apply("authz.yaml", yaml);
    s.mesh.wait_waypoint_current(&s.wp_pod);
    for _ in 0..5 {
        assert_eq!(status(&s.client, "GET", &format!("http://{BACKEND_VIP}/secret/x"), &[]), "200");
    }
    assert_eq!(status(&s.client, "GET", &format!("http://{BACKEND_VIP}/open"), &[]), "200");
    let deadline = Instant::now() + Duration::from_secs(5);
    let shadow = |decision: &str| {
        sum_metric(
            &waypoint_metrics(&s.wp_pod),
            "mesh_waypoint_authz_dry_run_decisions_total",
            &[("decision", decision)],
        )
    };
    while shadow("deny") < 5.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!((shadow("deny"), shadow("allow")), (5.0, 1.0), "{}", waypoint_metrics(&s.wp_pod));
    assert!(s.wp.log_text().contains("dry-run authorization (not enforced)"), "{}", s.wp.log_text());
    let out =
        s.mesh.ctl(&["authz", "explain", "--from", "client", "--to", "default/backend:80", "--path", "/secret/x"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "allowed: {text}");
    assert!(text.contains("[dry-run]") && text.contains("would be DENY"), "{text}");
}

/// No bypass: with an L7 policy on the service, a client dialing an
/// endpoint's pod IP directly is refused by that endpoint's node proxy (its
/// log says why, and `mesh-ctl authz explain` names the rule); through the
/// waypoint, the L7 policy decides. Without an L7 policy, direct dials work.
#[test]
fn no_bypass_around_the_waypoint() {
    let Some(s) = setup("wp-authz-bypass") else { return };
    let b1 = &s.backends[0];
    let direct = format!("http://{}:8080/", b1.ip4);
    assert_eq!(status(&s.client, "GET", &direct, &[]), "200", "no L7 policy yet: a direct dial is allowed");
    s.mesh.apply("authz.yaml", &policy("get-only", "Service", "  rules: [{to: [{operation: {methods: [GET]}}]}]\n"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    assert_eq!(status(&s.client, "GET", &direct, &[]), "000", "a direct dial gets around the waypoint");
    assert_eq!(status(&s.client, "GET", &format!("http://{BACKEND_VIP}/"), &[]), "200", "through the waypoint");
    assert_eq!(status(&s.client, "POST", &format!("http://{BACKEND_VIP}/"), &[]), "403", "and its L7 policy");
    let log = s.mesh.node("node2").agent.proc.log_text();
    assert!(log.contains("mesh:waypoint-only:backend") && log.contains("only its waypoint"), "node2's log:\n{log}");
    let out = s.mesh.ctl(&["authz", "explain", "--from", "client", "--to", "default/b1:8080"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("default/mesh:waypoint-only:backend") && text.contains("only its waypoint may connect"),
        "{text}"
    );
    // The policy's removal lifts the guard.
    s.mesh.apply("authz.yaml", "# no policy\n");
    assert_eq!(status(&s.client, "GET", &direct, &[]), "200", "the guard goes with the L7 policy");
}
