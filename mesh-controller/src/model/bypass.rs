//! No bypass. Where L7 policy applies to a service (an AuthorizationPolicy
//! bound to the service or to its waypoint), a client that dials an
//! endpoint's pod IP directly would skip the waypoint and its policy. So the
//! service's endpoints admit connections to the service's target ports only
//! from the waypoint's own identities: a DENY policy for every other source
//! (plaintext included), enforced by the endpoints' node proxies. Istio's
//! documentation asks users to write this ALLOW rule by hand; mesh derives
//! it, and `mesh-ctl authz explain` shows it by name.
use mesh_common::{
    api,
    authz::{WAYPOINT_GUARD, WaypointTarget, applies_at_waypoint},
};

use super::{
    authz::{Action, CompiledPolicy, CompiledRule, OperationMatch, SourceMatch, StringMatch},
    mesh::{MeshModel, ScopedPolicy},
};
use crate::config::objects::{IntOrString, Labels};

pub(super) fn guard_waypoint_services(model: &mut MeshModel) {
    let wires: Vec<api::Authorization> = model
        .policies
        .values()
        .filter(|p| !p.policy.dry_run && matches!(p.scope, api::Scope::Targeted | api::Scope::WorkloadSelector))
        .map(ScopedPolicy::to_wire)
        .collect();
    let no_labels = Labels::new();
    let mut guards = Vec::new();
    for svc in model.services.values() {
        let Some(binding) = &svc.waypoint else { continue };
        // Endpoints not chosen by labels (a ServiceEntry's addresses) have no node proxy to guard them.
        if svc.selector.is_empty() {
            continue;
        }
        let (gateway_namespace, gateway_name) = binding.gateway.split_once('/').unwrap_or_default();
        let instances: Vec<_> = binding.instances.iter().filter_map(|uid| model.workloads.get(uid)).collect();
        let label_sets = instances.iter().map(|w| &w.labels).chain(std::iter::once(&no_labels));
        let l7 = label_sets.into_iter().any(|labels| {
            let at = WaypointTarget {
                gateway_namespace,
                gateway_name,
                labels,
                service_namespace: &svc.namespace,
                service_name: &svc.name,
            };
            wires.iter().any(|p| applies_at_waypoint(p, &at))
        });
        if !l7 {
            continue;
        }
        let mut ports: Vec<u16> = svc
            .ports
            .iter()
            .map(|p| match p.target {
                Some(IntOrString::Int(n)) if n > 0 => u16::try_from(n).unwrap_or(p.port),
                // A named target port means the same port, as everywhere in the mesh's model.
                _ => p.port,
            })
            .collect();
        ports.sort_unstable();
        ports.dedup();
        let mut waypoints: Vec<StringMatch> =
            instances.iter().map(|w| StringMatch::Exact(w.identity.principal())).collect();
        waypoints.dedup();
        let policy = CompiledPolicy {
            namespace: svc.namespace.clone(),
            name: format!("{WAYPOINT_GUARD}{}", svc.name),
            action: Action::Deny,
            rules: vec![CompiledRule {
                from: vec![SourceMatch { not_principals: waypoints, ..Default::default() }],
                to: vec![OperationMatch { ports, ..Default::default() }],
                when: Vec::new(),
            }],
            dry_run: false,
            provider: String::new(),
        };
        let scope = ScopedPolicy {
            scope: api::Scope::WorkloadSelector,
            selector: Some(svc.selector.clone()),
            targets: Vec::new(),
            ext_authz: None,
            policy,
        };
        guards.push((format!("{}/{WAYPOINT_GUARD}{}", svc.namespace, svc.name), scope));
    }
    model.policies.extend(guards);
}

#[cfg(test)]
mod tests {
    use mesh_common::authz::{Connection, evaluate};

    use crate::model::from_yaml as model;

    const MESH: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {nodeName: wp1, serviceAccountName: waypoint}
status: {podIP: 10.0.9.1}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: shop, labels: {app: reviews}}
spec: {nodeName: n1, serviceAccountName: reviews}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {selector: {app: reviews}, clusterIP: 10.96.0.1, ports: [{name: http, port: 9080, targetPort: 8080}, {name: grpc, port: 7070}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec: {selector: {app: reviews}, clusterIP: 10.96.0.2, ports: [{port: 5000}]}
";

    fn policy(target: &str, annotations: &str) -> String {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: l7, namespace: shop, annotations: {{{annotations}}}}}\n\
             spec: {{targetRefs: [{target}], rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]}}\n"
        )
    }

    fn conn(from: Option<&str>, port: u16) -> Connection {
        Connection {
            source: from.map(|s| format!("spiffe://cluster.local/ns/shop/sa/{s}").parse().unwrap()),
            source_ip: "10.0.5.5".parse().unwrap(),
            destination_ip: "10.0.0.1".parse().unwrap(),
            destination_port: port,
        }
    }

    #[test]
    fn l7_policy_admits_only_the_waypoint_to_the_service_ports() {
        for target in
            ["{kind: Service, name: reviews}", "{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}"]
        {
            let m = model(&format!("{MESH}{}", policy(target, "")));
            let guard = &m.policies["shop/mesh:waypoint-only:reviews"];
            assert_eq!(guard.selector.as_ref().unwrap()["app"], "reviews", "{target}");
            let reviews = &m.workloads["Pod/shop/reviews-v1"];
            let decide = |from, port| evaluate(m.policies_for(reviews), &conn(from, port));
            for (from, port, allowed) in [
                (Some("waypoint"), 8080, true), // the waypoint, to the target port
                (Some("waypoint"), 7070, true),
                (Some("frontend"), 8080, false), // another client, straight to the pod: bypass
                (None, 8080, false),             // plaintext, straight to the pod
                (Some("frontend"), 7070, false),
                (Some("frontend"), 5000, true), // a port of another service, without L7 policy
            ] {
                let d = decide(from, port);
                assert_eq!(d.allowed, allowed, "{target}: {from:?} to {port}: {d:?}");
                if !allowed {
                    assert_eq!(d.policy.as_deref(), Some("shop/mesh:waypoint-only:reviews"));
                    assert!(d.reason.contains("only its waypoint"), "{}", d.reason);
                }
            }
        }
    }

    #[test]
    fn no_guard_without_enforced_l7_policy() {
        let m = model(MESH);
        assert!(!m.policies.keys().any(|k| k.contains("waypoint-only")), "no L7 policy: no guard");
        let m = model(&format!("{MESH}{}", policy("{kind: Service, name: reviews}", "istio.io/dry-run: 'true'")));
        assert!(!m.policies.keys().any(|k| k.contains("waypoint-only")), "a dry-run policy enforces nothing");
        let m = model(&format!("{MESH}{}", policy("{kind: Service, name: plain}", "")));
        assert!(!m.policies.keys().any(|k| k.contains("waypoint-only")), "plain has no waypoint to enforce it");
    }
}
