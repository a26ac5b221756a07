//! The node-facing model, built from the configuration in force: pure
//! functions over the store, tested with tables.
pub mod authz;
mod mesh;
pub mod routes;

pub use mesh::{
    Endpoint, MeshModel, MtlsMode, ScopedPolicy, Service, ServicePort, WaypointBinding, Workload, selector_matches,
};

/// Serializes through `Display` (identities print as `spiffe://...`).
fn as_display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}
