//! The external authorizers AuthorizationPolicies with `action: CUSTOM`
//! name: Istio's `MeshConfig.extensionProviders` (`envoyExtAuthzHttp`,
//! `envoyExtAuthzGrpc`), read from the `istio` ConfigMap (key `mesh`) in the
//! root namespace, as istiod reads it, and resolved into the wire form the
//! waypoint calls them with. A policy whose provider is not (yet) defined
//! goes out without one: the waypoint then denies what its rules match.
use std::collections::BTreeMap;

use mesh_common::{api, parse_duration};

use crate::config::{
    ConfigStore, Resource,
    objects::{
        IntOrString,
        mesh_config::{ExtensionProvider, MESH_CONFIG_MAP, MeshConfig},
    },
};

/// The external authorizers by name.
pub(super) fn providers(store: &ConfigStore, root_namespace: &str) -> BTreeMap<String, api::ExtAuthz> {
    let Some(config) = mesh_config(store, root_namespace) else { return BTreeMap::new() };
    config.extension_providers.iter().filter_map(|p| Some((p.name.clone(), to_wire(p)?))).collect()
}

/// The MeshConfig of the `istio` ConfigMap in the root namespace, as istiod reads it.
pub(super) fn mesh_config(store: &ConfigStore, root_namespace: &str) -> Option<MeshConfig> {
    store.objects().values().find_map(|s| match s.resource.as_ref() {
        Resource::ConfigMap(cm) if cm.metadata.name == MESH_CONFIG_MAP && cm.metadata.namespace() == root_namespace => {
            cm.mesh_config().and_then(Result::ok)
        }
        _ => None,
    })
}

fn to_wire(p: &ExtensionProvider) -> Option<api::ExtAuthz> {
    let number = |v: &Option<IntOrString>| v.as_ref().and_then(IntOrString::as_number).unwrap_or(0) as u32;
    let ms = |t: &Option<String>| t.as_deref().and_then(|t| parse_duration(t).ok()).map_or(0, |d| d.as_millis() as u64);
    let lower = |v: &[String]| v.iter().map(|h| h.to_ascii_lowercase()).collect::<Vec<_>>();
    // What both protocols have.
    let common = |grpc, service: &str, port, timeout, fail_open, status_on_error| api::ExtAuthz {
        name: p.name.clone(),
        grpc,
        host: host_of(service),
        port: number(port),
        timeout_ms: ms(timeout),
        fail_open,
        status_on_error: number(status_on_error),
        ..Default::default()
    };
    if let Some(h) = &p.envoy_ext_authz_http {
        let mut include = lower(&h.include_request_headers_in_check);
        include.extend(lower(&h.include_headers_in_check));
        return Some(api::ExtAuthz {
            path_prefix: h.path_prefix.clone().unwrap_or_default(),
            include_request_headers: include,
            additional_headers: h.include_additional_headers_in_check.clone(),
            headers_to_upstream_on_allow: lower(&h.headers_to_upstream_on_allow),
            headers_to_downstream_on_deny: lower(&h.headers_to_downstream_on_deny),
            headers_to_downstream_on_allow: lower(&h.headers_to_downstream_on_allow),
            ..common(false, &h.service, &h.port, &h.timeout, h.fail_open, &h.status_on_error)
        });
    }
    let g = p.envoy_ext_authz_grpc.as_ref()?;
    Some(common(true, &g.service, &g.port, &g.timeout, g.fail_open, &g.status_on_error))
}

/// `[<namespace>/]<hostname>`: the host name (the namespace only
/// disambiguates in Istio's registry; mesh's hosts are unique).
pub(super) fn host_of(service: &str) -> String {
    service.split_once('/').map_or(service, |(_, h)| h).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_from_mesh_config() {
        let model = crate::model::from_yaml(
            r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    accessLogFile: /dev/stdout
    extensionProviders:
    - name: "sample-ext-authz-grpc"
      envoyExtAuthzGrpc:
        service: "ext-authz.foo.svc.cluster.local"
        port: "9000"
    - name: "sample-ext-authz-http"
      envoyExtAuthzHttp:
        service: "foo/ext-authz.foo.svc.cluster.local"
        port: 8000
        timeout: 2s
        failOpen: true
        statusOnError: "503"
        pathPrefix: /check
        includeRequestHeadersInCheck: ["X-Ext-Authz"]
        includeAdditionalHeadersInCheck: {x-added: yes}
        headersToUpstreamOnAllow: ["x-ext-authz-check-result"]
        headersToDownstreamOnDeny: ["X-Ext-Authz-Check-Result"]
    - name: zipkin
      zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: foo}
spec:
  targetRefs: [{kind: Service, group: "", name: httpbin}]
  action: CUSTOM
  provider: {name: sample-ext-authz-http}
  rules: [{to: [{operation: {paths: ["/headers"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: missing, namespace: foo}
spec:
  targetRefs: [{kind: Service, group: "", name: httpbin}]
  action: CUSTOM
  provider: {name: not-defined}
  rules: [{}]
"#,
        );
        let ext = model.policies["foo/ext"].to_wire();
        assert_eq!((ext.action, ext.provider.as_str()), (i32::from(api::Action::Custom), "sample-ext-authz-http"));
        let http = ext.ext_authz.expect("resolved");
        assert_eq!((http.grpc, http.host.as_str(), http.port), (false, "ext-authz.foo.svc.cluster.local", 8000));
        assert_eq!((http.timeout_ms, http.fail_open, http.status_on_error), (2000, true, 503));
        assert_eq!(http.path_prefix, "/check");
        assert_eq!(http.include_request_headers, ["x-ext-authz"]);
        assert_eq!(http.additional_headers.get("x-added").map(String::as_str), Some("yes"));
        assert_eq!(http.headers_to_downstream_on_deny, ["x-ext-authz-check-result"]);
        let missing = model.policies["foo/missing"].to_wire();
        assert_eq!((missing.provider.as_str(), missing.ext_authz), ("not-defined", None));
    }
}
