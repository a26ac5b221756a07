//! RequestAuthentication through the same reading the controller and
//! `mesh-ctl check` do: Istio's examples load unchanged; what Istio's
//! admission rejects is rejected with its line and field.
use mesh_config::{Document, not_enforced, parse_document};

const HEAD: &str =
    "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: jwt\n  namespace: shop\nspec:\n";
const WAYPOINT: &str = "  targetRefs:\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n";
const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","alg":"ES256","kid":"k1","x":"AAAA","y":"AAAA"}]}"#;

fn doc(text: &str) -> Document {
    Document { file: "jwt.yaml".into(), line: 3, text: text.into() }
}

#[test]
fn istio_examples_are_accepted() {
    for spec in [
        // Istio's task: an issuer and its jwksUri, on a waypoint.
        format!("{WAYPOINT}  jwtRules:\n  - issuer: testing@secure.istio.io\n    jwksUri: https://raw.githubusercontent.com/istio/istio/release-1.24/security/tools/jwt/samples/jwks.json\n"),
        // Every field.
        format!(
            "  targetRefs:\n  - {{kind: Service, group: '', name: web}}\n  jwtRules:\n  - issuer: https://issuer.example\n    audiences: [web, api]\n    jwks: '{JWKS}'\n    fromHeaders: [{{name: x-jwt-assertion, prefix: 'Bearer '}}]\n    fromParams: [token]\n    fromCookies: [session]\n    forwardOriginalToken: true\n    outputPayloadToHeader: x-jwt-payload\n    outputClaimToHeaders: [{{header: x-sub, claim: sub}}]\n    timeout: 3s\n"
        ),
        // Selecting the waypoint's pods.
        "  selector:\n    matchLabels: {gateway.networking.k8s.io/gateway-name: waypoint}\n  jwtRules: [{issuer: a, jwksUri: 'http://keys.shop.svc.cluster.local:8000/jwks'}]\n".to_string(),
    ] {
        let text = format!("{HEAD}{spec}");
        if let Err((_, problems)) = parse_document(&doc(&text)) {
            panic!("rejected:\n{text}\n{problems:?}");
        }
    }
}

#[test]
fn what_istio_rejects_is_rejected_with_line_and_field() {
    let rule = |body: &str| format!("{WAYPOINT}  jwtRules:\n  - {body}\n");
    for (spec, field, message) in [
        (rule("{jwksUri: 'https://keys/jwks'}"), "spec.jwtRules[0].issuer", "non-empty"),
        (rule("{issuer: a, jwksUri: 'ftp://keys/jwks'}"), "spec.jwtRules[0].jwksUri", "expected http or https"),
        (rule("{issuer: a, jwksUri: 'keys/jwks'}"), "spec.jwtRules[0].jwksUri", "absolute"),
        (rule("{issuer: a, jwksUri: 'http:///jwks'}"), "spec.jwtRules[0].jwksUri", "no host"),
        (rule("{issuer: a, jwksUri: 'http://keys:99999/jwks'}"), "spec.jwtRules[0].jwksUri", "port"),
        (rule("{issuer: a, jwks: 'not json'}"), "spec.jwtRules[0].jwks", "not a JSON Web Key Set"),
        (
            rule(r#"{issuer: a, jwks: '{"keys":[{"kty":"RSA","alg":"XS256","n":"AQAB","e":"AQAB"}]}'}"#),
            "spec.jwtRules[0].jwks",
            "unknown algorithm",
        ),
        (rule(r#"{issuer: a, jwks: '{"keys":[{"kty":"DSA"}]}'}"#), "spec.jwtRules[0].jwks", "kty"),
        (rule("{issuer: a, audiences: ['']}"), "spec.jwtRules[0].audiences[0]", "non-empty"),
        (rule("{issuer: a, fromHeaders: [{prefix: x}]}"), "spec.jwtRules[0].fromHeaders[0].name", "non-empty"),
        (rule("{issuer: a, fromParams: ['']}"), "spec.jwtRules[0].fromParams[0]", "non-empty"),
        (
            rule("{issuer: a, outputClaimToHeaders: [{header: x}]}"),
            "spec.jwtRules[0].outputClaimToHeaders[0]",
            "non-empty",
        ),
        (
            rule("{issuer: a, outputClaimToHeaders: [{header: 'bad header', claim: sub}]}"),
            "spec.jwtRules[0].outputClaimToHeaders[0].header",
            "not a header name",
        ),
        (rule("{issuer: a, timeout: 0s}"), "spec.jwtRules[0].timeout", "positive"),
        (rule("{issuer: a, timeout: soon}"), "spec.jwtRules[0].timeout", "expected a number"),
        (
            format!("{WAYPOINT}  selector: {{matchLabels: {{app: web}}}}\n  jwtRules: [{{issuer: a}}]\n"),
            "spec.selector",
            "cannot be combined",
        ),
    ] {
        let text = format!("{HEAD}{spec}");
        let Err((_, problems)) = parse_document(&doc(&text)) else { panic!("accepted:\n{text}") };
        let p = problems
            .iter()
            .find(|p| p.field.as_deref() == Some(field))
            .unwrap_or_else(|| panic!("no problem at {field} in {problems:?}\n{text}"));
        assert!(p.message.contains(message), "{field}: {}", p.message);
        assert!(p.to_string().starts_with("jwt.yaml:"), "{p}");
    }
}

#[test]
fn where_it_applies_is_told() {
    let text = format!("{HEAD}  selector: {{matchLabels: {{app: web}}}}\n  jwtRules: [{{issuer: a}}]\n");
    let (_, resource) = parse_document(&doc(&text)).expect("accepted");
    let warnings = not_enforced(&resource);
    assert!(warnings.iter().any(|(_, w)| w.contains("waypoints only")), "{warnings:?}");
    let text = format!("{HEAD}  targetRefs: [{{kind: Deployment, name: web}}]\n  jwtRules: [{{issuer: a}}]\n");
    let (_, resource) = parse_document(&doc(&text)).expect("accepted");
    assert!(
        not_enforced(&resource)
            .iter()
            .any(|(f, w)| f.as_deref() == Some("spec.targetRefs[0].kind") && w.contains("applies nowhere"))
    );
}
