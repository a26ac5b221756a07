//! Test fixtures shared by the state and plan tables.
use mesh_common::api;

/// A pod of namespace `shop` with service account `name`, PERMISSIVE but
/// STRICT on port 9000.
pub fn workload(name: &str, ip: &str, captured: bool, labels: &[(&str, &str)]) -> api::Workload {
    api::Workload {
        uid: format!("Pod/shop/{name}"),
        name: name.into(),
        namespace: "shop".into(),
        service_account: name.into(),
        identity: format!("spiffe://cluster.local/ns/shop/sa/{name}"),
        ips: vec![ip.into()],
        captured,
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        mtls_mode: api::MtlsMode::Permissive.into(),
        port_mtls: [(9000, api::MtlsMode::Strict.into())].into(),
        ..Default::default()
    }
}
