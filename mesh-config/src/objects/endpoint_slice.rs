//! `discovery.k8s.io/v1` (and `v1beta1`) `EndpointSlice`: the endpoints of
//! a Service without a selector (a database outside the cluster, endpoints
//! another controller manages). A Service with a selector takes its
//! endpoints from the pods it selects, as Istio's ambient mode does, and its
//! slices (which Kubernetes' own controller writes) are not read.
use serde::{Deserialize, Serialize};

use super::ObjectMeta;

/// The label naming a slice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN` (read as no endpoints: mesh routes to addresses).
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Vec<SliceEndpoint>,
    /// `null` in a slice means every port; mesh reads it as none named.
    #[serde(default)]
    pub ports: Option<Vec<SlicePort>>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Conditions,
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
}

/// An endpoint is ready unless `ready: false` (Kubernetes: unset is ready).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Conditions {
    #[serde(default)]
    pub ready: Option<bool>,
    #[serde(default)]
    pub serving: Option<bool>,
    #[serde(default)]
    pub terminating: Option<bool>,
}

/// `v1/ObjectReference`, less what mesh does not read.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SlicePort {
    /// Matches the Service port's name (empty for its one unnamed port).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

impl EndpointSlice {
    /// The Service it belongs to (its label), in its namespace.
    pub fn service(&self) -> Option<&str> {
        self.metadata.labels.get(SERVICE_NAME_LABEL).map(String::as_str)
    }

    /// Whether its addresses are IP addresses mesh can route to.
    pub fn routable(&self) -> bool {
        matches!(self.address_type.as_str(), "IPv4" | "IPv6")
    }

    /// The port its endpoints serve for the Service port named `name` (empty:
    /// the unnamed one).
    pub fn port_named(&self, name: &str) -> Option<u16> {
        let ports = self.ports.as_deref().unwrap_or_default();
        let port = ports.iter().find(|p| p.name.as_deref().unwrap_or_default() == name)?;
        port.port.and_then(|p| u16::try_from(p).ok())
    }
}
