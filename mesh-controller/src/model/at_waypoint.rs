//! Which services a waypoint-enforced policy (RequestAuthentication,
//! Telemetry) applies to: a targetRef to a Service, to the waypoint's
//! Gateway (every service bound to it) or, from the root namespace, to the
//! `istio-waypoint` GatewayClass; without targetRefs, the services of the
//! waypoints whose pods the selector picks (Istio's workload selection,
//! applied to waypoint pods), in the policy's namespace or, from the root
//! namespace, in every namespace.
use super::mesh::{MeshModel, selector_matches};
use crate::config::objects::{Labels, PolicyTargetReference};

/// The keys (`namespace/name`) of the services a policy in `ns` applies to.
pub(super) fn services(
    model: &MeshModel,
    ns: &str,
    selector: Option<&Labels>,
    targets: &[&PolicyTargetReference],
) -> Vec<String> {
    let root = model.root_namespace.as_str();
    model
        .services
        .iter()
        .filter(|(key, svc)| {
            // A Service target holds wherever a waypoint serves the service
            // (bound to it, or on a waypoint's plaintext listener).
            let waypoint = svc.waypoint.as_ref();
            if !targets.is_empty() {
                return targets.iter().any(|t| {
                    let t_ns = t.namespace.as_deref().unwrap_or(ns);
                    match t.kind.as_str() {
                        "Service" => **key == format!("{t_ns}/{}", t.name),
                        "Gateway" => waypoint.is_some_and(|w| w.gateway == format!("{t_ns}/{}", t.name)),
                        "GatewayClass" => waypoint.is_some() && ns == root && t.name == "istio-waypoint",
                        _ => false,
                    }
                });
            }
            let Some(w) = waypoint else { return false };
            let (w_ns, _) = w.gateway.split_once('/').unwrap_or_default();
            if ns != root && ns != w_ns {
                return false;
            }
            w.instances
                .iter()
                .filter_map(|uid| model.workloads.get(uid))
                .any(|wl| wl.namespace == w_ns && selector.is_none_or(|s| selector_matches(s, &wl.labels)))
        })
        .map(|(k, _)| k.clone())
        .collect()
}
