//! mesh's control plane. `config` turns a directory of Kubernetes-style YAML
//! into validated objects (keeping the last good version of anything that
//! breaks); `model` turns those into what nodes need: workloads with
//! identities, services, and compiled L4 authorization.
pub mod admission;
pub mod ca;
pub use mesh_config as config;
pub mod distribute;
pub mod graph;
pub mod istio_ca;
pub mod kubernetes;
pub mod leader;
pub mod model;
pub mod node_api;
pub mod serving;
pub mod status;
