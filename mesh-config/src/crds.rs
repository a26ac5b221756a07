//! CustomResourceDefinitions for the kinds mesh reads that Kubernetes does
//! not define, made from the kind table ([`Kind::all`]) so the CRDs and the
//! parser can never disagree on a group, version or name. `deploy/crds/`
//! holds them as files; a test fails when those drift from this.
//!
//! Their schemas keep `spec` open (`x-kubernetes-preserve-unknown-fields`):
//! what an object means is checked by the controller's validator, the same
//! one `mesh-ctl check` runs, as Istio's validation webhook does. That keeps
//! them servable by API servers without CEL (before 1.25), and lets objects
//! written for a newer Istio in.
use serde_json::{Value, json};

use crate::Kind;

/// Which file of `deploy/crds/` a group's CRDs go to. A cluster that already
/// has Istio's or Gateway API's own CRDs keeps them and skips that file.
pub fn family(group: &str) -> Option<&'static str> {
    match group {
        g if g.ends_with(".istio.io") => Some("istio"),
        "gateway.networking.k8s.io" => Some("gateway-api"),
        // Kubernetes' own kinds (the core group, discovery.k8s.io).
        g if g.is_empty() || g.ends_with(".k8s.io") => None,
        _ => Some("mesh"),
    }
}

/// Where Gateway API's CRDs were approved (their `api-approved.kubernetes.io`).
const GATEWAY_API_APPROVAL: &str = "https://github.com/kubernetes-sigs/gateway-api/pull/2466";

/// Istio's and Gateway API's short names, so `kubectl get ap` works as with them.
fn short_names(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::VirtualService => &["vs"],
        Kind::DestinationRule => &["dr"],
        Kind::IstioGateway => &["gw"],
        Kind::ServiceEntry => &["se"],
        Kind::WorkloadEntry => &["we"],
        Kind::WorkloadGroup => &["wg"],
        Kind::PeerAuthentication => &["pa"],
        Kind::RequestAuthentication => &["ra"],
        Kind::AuthorizationPolicy => &["ap"],
        Kind::Gateway => &["gtw"],
        Kind::GatewayClass => &["gc"],
        _ => &[],
    }
}

/// The CRD of one kind (`None` for Kubernetes' own kinds).
pub fn crd(kind: Kind) -> Option<Value> {
    let group = kind.group();
    let family = family(group)?;
    let written = kind.written();
    let plural = kind.plural();
    let open = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    let versions: Vec<Value> = kind
        .api_versions()
        .iter()
        .enumerate()
        .map(|(i, api_version)| {
            let version = api_version.rsplit_once('/').map_or(*api_version, |(_, v)| v);
            json!({
                "name": version,
                "served": true,
                "storage": i == 0,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": open, "status": open},
                }},
            })
        })
        .collect();
    let mut names = json!({
        "kind": written,
        "listKind": format!("{written}List"),
        "plural": plural,
        "singular": written.to_ascii_lowercase(),
        // `kubectl get istio-io` lists every Istio object, as with Istio's CRDs.
        "categories": [if family == "istio" { "istio-io" } else { family }],
    });
    if !short_names(kind).is_empty() {
        names["shortNames"] = json!(short_names(kind));
    }
    let mut metadata = json!({
        "name": format!("{plural}.{group}"),
        "labels": {"app.kubernetes.io/part-of": "mesh"},
    });
    if group.ends_with(".k8s.io") {
        // API servers refuse CRDs in Kubernetes' own groups without the
        // approval of the API they define; Gateway API's own CRDs carry this.
        metadata["annotations"] = json!({"api-approved.kubernetes.io": GATEWAY_API_APPROVAL});
    }
    Some(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": metadata,
        "spec": {
            "group": group,
            "names": names,
            "scope": if kind.namespaced() { "Namespaced" } else { "Cluster" },
            "versions": versions,
        },
    }))
}

/// The files of `deploy/crds/`: (file name, YAML of its CRDs).
pub fn files() -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = Vec::new();
    for kind in Kind::all() {
        let (Some(family), Some(crd)) = (family(kind.group()), crd(kind)) else { continue };
        let name = format!("{family}.yaml");
        let yaml = serde_yaml_ng::to_string(&crd).expect("a CRD is YAML");
        match files.iter_mut().find(|(n, _)| *n == name) {
            Some((_, text)) => text.push_str(&format!("---\n{yaml}")),
            None => files.push((
                name,
                format!(
                    "# Generated from mesh's kind table (mesh-config/src/crds.rs) by `cargo xtask crds`: do not edit.\n{yaml}"
                ),
            )),
        }
    }
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_not_kubernetes_own_has_a_crd_named_as_its_api_server_will() {
        let policy = crd(Kind::AuthorizationPolicy).unwrap();
        assert_eq!(policy["metadata"]["name"], "authorizationpolicies.security.istio.io");
        assert_eq!(policy["spec"]["names"]["shortNames"], json!(["ap"]));
        let versions: Vec<(&str, bool)> = policy["spec"]["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap(), v["storage"].as_bool().unwrap()))
            .collect();
        assert_eq!(versions, [("v1", true), ("v1beta1", false)]);
        assert_eq!(crd(Kind::GatewayClass).unwrap()["spec"]["scope"], "Cluster");
        assert!(crd(Kind::Pod).is_none());
        let gateway = crd(Kind::Gateway).unwrap();
        assert_eq!(gateway["metadata"]["name"], "gateways.gateway.networking.k8s.io");
        assert!(gateway["metadata"]["annotations"]["api-approved.kubernetes.io"].is_string());
        let names: Vec<String> = files().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["gateway-api.yaml", "istio.yaml", "mesh.yaml"]);
    }
}
