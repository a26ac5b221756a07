//! The node-facing model, built from the configuration in force: pure
//! functions over the store, tested with tables.
mod at_waypoint;
pub mod authz;
mod bypass;
mod ext_authz;
mod incremental;
mod jwt;
mod mesh;
pub mod routes;
mod telemetry;

pub use mesh::{
    Endpoint, MeshModel, MtlsMode, ScopedPolicy, Service, ServicePort, WaypointBinding, Workload, selector_matches,
};

/// Serializes through `Display` (identities print as `spiffe://...`).
fn as_display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// A namespace of the tests: ambient, bound to waypoint `default/waypoint`
/// (one instance, `wp-1`), with services `web` and `api`.
#[cfg(test)]
pub(crate) const WAYPOINT_NAMESPACE: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default, labels: {istio.io/waypoint-for: service}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-1, namespace: default, labels: {gateway.networking.k8s.io/gateway-name: waypoint}, annotations: {ambient.istio.io/redirection: disabled}}
spec: {nodeName: n1, serviceAccountName: waypoint}
status: {podIPs: [{ip: 10.0.0.9}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec: {clusterIP: 10.96.0.2, selector: {app: api}, ports: [{name: http, port: 80}]}
---
";

/// The model of a configuration written as YAML (which must have no problems).
#[cfg(test)]
pub(crate) fn from_yaml(yaml: &str) -> MeshModel {
    use crate::config::{ConfigStore, MeshSettings, Snapshot, split_documents};
    let docs = split_documents(std::path::Path::new("t.yaml"), yaml);
    let snap = Snapshot::from_documents(&docs, vec![]);
    assert!(snap.problems.is_empty(), "{:?}", snap.problems);
    let mut store = ConfigStore::default();
    store.apply(snap);
    MeshModel::build(&store, &MeshSettings::default())
}
