//! RequestAuthentications onto the services whose waypoint enforces them
//! (`at_waypoint`). Istio applies the union of every applying policy's rules.
use mesh_common::{api, parse_duration};

use super::mesh::MeshModel;
use crate::config::objects::{JwtRule, RequestAuthentication};

pub(super) fn apply(model: &mut MeshModel, ra: &RequestAuthentication) {
    let ns = ra.metadata.namespace().to_owned();
    let spec = &ra.spec;
    let targets: Vec<_> = spec.target_ref.iter().chain(&spec.target_refs).collect();
    let selector = spec.selector.as_ref().map(|s| &s.match_labels);
    let keys = super::at_waypoint::services(model, &ns, selector, &targets);
    let policy = format!("{ns}/{}", ra.metadata.name);
    for key in keys {
        if let Some(svc) = model.services.get_mut(&key) {
            svc.jwt_rules.extend(spec.jwt_rules.iter().map(|r| to_wire(&policy, r)));
        }
    }
}

fn to_wire(policy: &str, r: &JwtRule) -> api::JwtRule {
    api::JwtRule {
        policy: policy.to_owned(),
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        jwks_uri: r.jwks_uri.clone(),
        jwks: r.jwks.clone(),
        from_headers: r
            .from_headers
            .iter()
            .map(|h| api::JwtHeader { name: h.name.to_ascii_lowercase(), prefix: h.prefix.clone() })
            .collect(),
        from_params: r.from_params.clone(),
        from_cookies: r.from_cookies.clone(),
        forward_original_token: r.forward_original_token,
        output_payload_to_header: r.output_payload_to_header.to_ascii_lowercase(),
        output_claim_to_headers: r
            .output_claim_to_headers
            .iter()
            .map(|c| api::ClaimToHeader { header: c.header.to_ascii_lowercase(), claim: c.claim.clone() })
            .collect(),
        timeout_ms: r.timeout.as_deref().and_then(|t| parse_duration(t).ok()).map_or(0, |d| d.as_millis() as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::super::from_yaml;

    use super::super::WAYPOINT_NAMESPACE as BASE;

    fn rules(policy: &str) -> Vec<(String, Vec<String>)> {
        let m = from_yaml(&format!("{BASE}{policy}"));
        m.services
            .iter()
            .map(|(k, s)| (k.clone(), s.jwt_rules.iter().map(|r| format!("{}:{}", r.policy, r.issuer)).collect()))
            .collect()
    }

    fn ra(name: &str, spec: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{{spec}, jwtRules: [{{issuer: {name}-iss, jwksUri: \"http://keys.default:80/jwks\"}}]}}\n---\n"
        )
    }

    #[test]
    fn targets_and_selection() {
        let web_only =
            vec![("default/api".to_owned(), vec![]), ("default/web".to_owned(), vec!["default/a:a-iss".to_owned()])];
        assert_eq!(rules(&ra("a", "targetRefs: [{kind: Service, group: \"\", name: web}]")), web_only);
        let both = |names: &[&str]| -> Vec<String> { names.iter().map(|n| format!("default/{n}:{n}-iss")).collect() };
        for spec in [
            "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]",
            "selector: {matchLabels: {gateway.networking.k8s.io/gateway-name: waypoint}}",
        ] {
            let got = rules(&ra("a", spec));
            assert_eq!(got, vec![("default/api".into(), both(&["a"])), ("default/web".into(), both(&["a"]))], "{spec}");
        }
        // A selector that picks no waypoint pod, a Service that does not exist: nothing (yet).
        assert!(rules(&ra("a", "selector: {matchLabels: {app: web}}")).iter().all(|(_, r)| r.is_empty()));
        assert!(rules(&ra("a", "targetRefs: [{kind: Service, name: nope}]")).iter().all(|(_, r)| r.is_empty()));
        // Two policies: the union, by name.
        let got = rules(
            &(ra("b", "targetRefs: [{kind: Service, name: web}]")
                + &ra("a", "targetRefs: [{kind: Service, name: web}]")),
        );
        assert_eq!(got[1], ("default/web".into(), both(&["a", "b"])));
    }
}
