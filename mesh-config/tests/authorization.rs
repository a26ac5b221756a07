//! L7 AuthorizationPolicies through the same reading the controller and
//! `mesh-ctl check` do: Istio's waypoint examples load unchanged; what Istio's
//! admission rejects is rejected with its line and field; what mesh does not
//! evaluate is accepted with a warning that says what happens instead.
use mesh_config::{Document, not_enforced, parse_document};

const HEAD: &str =
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: shop\nspec:\n";
const WAYPOINT: &str = "  targetRefs:\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n";

fn doc(text: &str) -> Document {
    Document { file: "authz.yaml".into(), line: 3, text: text.into() }
}

#[test]
fn istio_waypoint_policies_are_accepted() {
    for spec in [
        // Istio's ambient L7 example: GET from the sleep service account, to a Service.
        "  targetRefs:\n  - {kind: Service, group: '', name: productpage}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/default/sa/sleep]}\n    to:\n    - operation: {methods: [GET]}\n",
        // Every L7 field, bound to the waypoint.
        &format!(
            "{WAYPOINT}  action: DENY\n  rules:\n  - from:\n    - source: {{requestPrincipals: ['*'], notRemoteIpBlocks: [10.0.0.0/8]}}\n    to:\n    - operation: {{hosts: ['*.shop'], notPaths: ['/public/*'], methods: [POST], ports: ['8080']}}\n    when:\n    - {{key: 'request.headers[x-user]', values: [mallory]}}\n    - {{key: 'request.auth.claims[groups]', values: [admin]}}\n    - {{key: 'request.auth.claims[realm][role]', notValues: [guest]}}\n    - {{key: remote.ip, values: [192.0.2.0/24]}}\n    - {{key: request.auth.audiences, values: [api]}}\n"
        ),
        // A mesh-wide policy for every waypoint (root namespace, GatewayClass).
        "  targetRefs:\n  - {kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}\n  action: DENY\n  rules: [{to: [{operation: {paths: [/debug*]}}]}]\n",
    ] {
        let text = format!("{HEAD}{spec}");
        if let Err((_, problems)) = parse_document(&doc(&text)) {
            panic!("rejected:\n{text}\n{problems:?}");
        }
    }
}

#[test]
fn what_istio_rejects_is_rejected_with_line_and_field() {
    for (spec, field, message) in [
        (
            format!("{WAYPOINT}  rules: [{{when: [{{key: request.method, values: [GET]}}]}}]\n"),
            "spec.rules[0].when[0].key",
            "unknown attribute",
        ),
        (
            format!("{WAYPOINT}  rules: [{{when: [{{key: 'request.headers[]', values: [x]}}]}}]\n"),
            "spec.rules[0].when[0].key",
            "unknown attribute",
        ),
        (
            format!("{WAYPOINT}  rules: [{{when: [{{key: remote.ip, values: [10.0.0.300/8]}}]}}]\n"),
            "spec.rules[0].when[0].values[0]",
            "CIDR",
        ),
        (
            format!("{WAYPOINT}  rules: [{{from: [{{source: {{remoteIpBlocks: [nope]}}}}]}}]\n"),
            "spec.rules[0].from[0].source.remoteIpBlocks[0]",
            "CIDR",
        ),
        (
            format!("{WAYPOINT}  rules: [{{when: [{{key: 'request.headers[x]'}}]}}]\n"),
            "spec.rules[0].when[0]",
            "needs values or notValues",
        ),
    ] {
        let text = format!("{HEAD}{spec}");
        let Err((_, problems)) = parse_document(&doc(&text)) else { panic!("accepted:\n{text}") };
        let p = problems
            .iter()
            .find(|p| p.field.as_deref() == Some(field))
            .unwrap_or_else(|| panic!("no problem at {field} in {problems:?}\n{text}"));
        assert!(p.message.contains(message), "{field}: {}", p.message);
        assert!(p.to_string().starts_with("authz.yaml:"), "{p}");
    }
}

#[test]
fn what_mesh_does_not_evaluate_is_a_warning() {
    for (spec, field, says) in [
        (
            format!("{WAYPOINT}  rules: [{{when: [{{key: connection.sni, values: [a.example]}}]}}]\n"),
            "spec.rules[0].when[0].key",
            "a rule with it never matches",
        ),
        (
            format!("{WAYPOINT}  action: DENY\n  rules: [{{when: [{{key: connection.sni, values: [a.example]}}]}}]\n"),
            "spec.rules[0].when[0].key",
            "a DENY rule with it denies without it",
        ),
        // At L4 (no targetRefs) HTTP attributes fail closed, as in ztunnel (Istio accepts them).
        (
            "  rules: [{to: [{operation: {methods: [GET]}}]}]\n".to_string(),
            "spec.rules[0].to[0].operation.methods",
            "so this rule never matches there",
        ),
        (
            "  action: DENY\n  rules: [{from: [{source: {requestPrincipals: ['*']}}]}]\n".to_string(),
            "spec.rules[0].from[0].source.requestPrincipals",
            "this DENY rule denies whatever it says",
        ),
        (
            // Enforced at waypoints (with targetRefs, or selecting their pods); never at L4.
            "  selector: {matchLabels: {app: web}}\n  action: CUSTOM\n  provider: {name: opa}\n  rules: [{}]\n"
                .to_string(),
            "spec.action",
            "node proxies (L4) do not call external authorizers",
        ),
        (
            "  targetRefs: [{kind: Deployment, name: x}]\n  rules: [{}]\n".to_string(),
            "spec.targetRefs[0].kind",
            "applies nowhere",
        ),
    ] {
        let text = format!("{HEAD}{spec}");
        let (_, resource) = parse_document(&doc(&text)).unwrap_or_else(|(_, p)| panic!("rejected: {p:?}\n{text}"));
        let warnings = not_enforced(&resource);
        assert!(
            warnings.iter().any(|(f, m)| f.as_deref() == Some(field) && m.contains(says)),
            "{field}: {warnings:?}\n{text}"
        );
    }
}
