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
