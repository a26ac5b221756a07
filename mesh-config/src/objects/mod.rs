//! The configuration kinds, as users write them: Kubernetes objects and Istio's
//! security/networking resources. Unknown fields are rejected everywhere;
//! the fields Kubernetes defines that mesh does not read are removed before
//! (`unmodelled.rs`).
pub mod endpoint_slice;
pub mod mesh_config;
pub mod routing;
pub mod telemetry;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    /// Pods: the prefix Kubernetes generated the name from, and the
    /// owners (Istio names a pod's workload after its controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
    // What else Kubernetes keeps in `metadata` (uid, resourceVersion, ...)
    // is removed before this is read: `unmodelled.rs`.
}

/// `metadata.ownerReferences[]`, as far as a workload's name needs it (the
/// rest is removed before this is read).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub controller: Option<bool>,
}

impl ObjectMeta {
    /// The namespace, `default` when unset (as kubectl applies it).
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// `v1/Namespace`. The label `istio.io/dataplane-mode: ambient` enrolls its pods.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub spec: Option<Value>,
    #[serde(default, skip_serializing)]
    pub status: Option<Value>,
}

/// `v1/Node`: mesh reads its labels only, the topology labels that place
/// the pods scheduled on it (`topology.kubernetes.io/region`, `.../zone`,
/// `topology.istio.io/subzone`), as Istio does. Its spec and status are the
/// kubelet's and the API server's (the status changes at every heartbeat).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub spec: Option<Value>,
    #[serde(default, skip_serializing)]
    pub status: Option<Value>,
}

/// `v1/ServiceAccount`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccount {
    pub metadata: ObjectMeta,
}

/// `v1/Pod`. In local mode `spec.nodeName` names the mesh node; the pod's
/// network namespace is the node's own knowledge (reported to it locally).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

impl Pod {
    /// Istio's workload name (`source_workload`, `destination_workload`):
    /// for a pod whose name Kubernetes generated, its controller's name, a
    /// ReplicaSet's less its pod-template-hash (the Deployment), a Job's
    /// less a CronJob's timestamp; else the pod's own name.
    pub fn workload_name(&self) -> String {
        let m = &self.metadata;
        let Some(owner) = m.generate_name.as_ref().and(m.owner_references.iter().find(|o| o.controller == Some(true)))
        else {
            return m.name.clone();
        };
        let hash = |label: &str| m.labels.get(label).filter(|h| !h.is_empty());
        match owner.kind.as_str() {
            "ReplicaSet" => {
                for label in ["pod-template-hash", "rollouts-pod-template-hash"] {
                    if let Some(deployment) = hash(label).and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
                        return deployment.to_owned();
                    }
                }
                owner.name.clone()
            }
            "ReplicationController" => m.labels.get("deploymentconfig").cloned().unwrap_or_else(|| owner.name.clone()),
            "Job" => match owner.name.rsplit_once('-') {
                Some((cron, stamp)) if (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit()) => {
                    cron.to_owned()
                }
                _ => owner.name.clone(),
            },
            _ => owner.name.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSpec {
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub node_name: Option<String>,
    /// Not used by the mesh; accepted so real pod manifests load.
    #[serde(default, skip_serializing)]
    pub containers: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodStatus {
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default, skip_serializing)]
    pub phase: Option<Value>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PodIp {
    pub ip: String,
}

/// `v1/Service`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub metadata: ObjectMeta,
    pub spec: ServiceSpec,
    #[serde(default, skip_serializing)]
    pub status: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default)]
    pub selector: Option<Labels>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: i64,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

impl IntOrString {
    /// A number written as one (`9000`) or as a string (`"9000"`, as
    /// Istio's examples write some ports).
    pub fn as_number(&self) -> Option<i64> {
        match self {
            IntOrString::Int(n) => Some(*n),
            IntOrString::String(s) => s.trim().parse().ok(),
        }
    }
}

/// `security.istio.io/v1` `PeerAuthentication`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAuthentication {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MutualTls {
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: Labels,
}

/// `security.istio.io/v1` `RequestAuthentication`: the JWTs a workload (at
/// its waypoint) accepts.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestAuthentication {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RequestAuthenticationSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    #[serde(default)]
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub jwks_uri: String,
    #[serde(default)]
    pub jwks: String,
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    #[serde(default)]
    pub output_payload_to_header: String,
    #[serde(default)]
    pub forward_original_token: bool,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// The JWKS fetch's timeout (a duration, e.g. `5s`).
    #[serde(default)]
    pub timeout: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtHeader {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub prefix: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeader {
    #[serde(default)]
    pub header: String,
    #[serde(default)]
    pub claim: String,
}

/// `security.istio.io/v1` `AuthorizationPolicy`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default)]
    pub action: Option<String>,
    /// `action: CUSTOM`: the external authorizer (`MeshConfig.extensionProviders`).
    #[serde(default)]
    pub provider: Option<ProviderRef>,
    /// `None` and `Some([])` differ: no rules at all is Istio's allow-nothing.
    #[serde(default)]
    pub rules: Option<Vec<Rule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderRef {
    #[serde(default)]
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    #[serde(default)]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    #[serde(default)]
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// `networking.istio.io/v1` `ServiceEntry`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    pub metadata: ObjectMeta,
    pub spec: ServiceEntrySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServiceEntryPort>,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub resolution: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntrySpec>,
    #[serde(default)]
    pub workload_selector: Option<EntrySelector>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntryPort {
    pub number: i64,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub target_port: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySelector {
    #[serde(default)]
    pub labels: Labels,
}

/// `networking.istio.io/v1` `WorkloadEntry`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadEntry {
    pub metadata: ObjectMeta,
    pub spec: WorkloadEntrySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntrySpec {
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub ports: BTreeMap<String, i64>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub locality: Option<String>,
    #[serde(default)]
    pub weight: Option<i64>,
    #[serde(default)]
    pub service_account: Option<String>,
}

/// A kind of Istio or Gateway API that mesh reads but does not implement yet:
/// accepted as it is (never rejected), with a warning that it has no effect.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Opaque {
    /// Set by the parser from `kind` (the key of `/debug/config` shows it too).
    #[serde(skip, default = "placeholder_kind")]
    pub kind: Kind,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<Value>,
    #[serde(default, skip_serializing)]
    pub status: Option<Value>,
}

fn placeholder_kind() -> Kind {
    Kind::Sidecar
}

/// Linkerd's `HTTPLocalRateLimitPolicy` (`policy.linkerd.io/v1alpha1`),
/// mesh's local rate limit: a total limit for the target, a limit for each
/// client identity, and overrides for named service accounts.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPolicy {
    pub metadata: ObjectMeta,
    pub spec: RateLimitSpec,
    #[serde(default, skip_serializing)]
    pub status: Option<Value>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    pub target_ref: PolicyTargetReference,
    #[serde(default)]
    pub total: Option<RateLimit>,
    #[serde(default)]
    pub identity: Option<RateLimit>,
    #[serde(default)]
    pub overrides: Vec<RateLimitOverride>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitOverride {
    pub requests_per_second: i64,
    #[serde(default)]
    pub client_refs: Vec<ClientRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRef {
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// Every kind the controller understands.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind")]
pub enum Resource {
    Namespace(Namespace),
    Node(Node),
    ServiceAccount(ServiceAccount),
    Pod(Pod),
    Service(Service),
    EndpointSlice(endpoint_slice::EndpointSlice),
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
    RequestAuthentication(RequestAuthentication),
    Telemetry(telemetry::Telemetry),
    ServiceEntry(ServiceEntry),
    WorkloadEntry(WorkloadEntry),
    Gateway(routing::Gateway),
    HttpRoute(routing::HttpRoute),
    GrpcRoute(routing::GrpcRoute),
    VirtualService(routing::VirtualService),
    DestinationRule(routing::DestinationRule),
    HttpLocalRateLimitPolicy(RateLimitPolicy),
    ConfigMap(mesh_config::ConfigMap),
    /// One of the kinds [`Kind::is_opaque`] names.
    Opaque(Opaque),
}

impl Resource {
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Namespace(o) => &o.metadata,
            Self::Node(o) => &o.metadata,
            Self::ServiceAccount(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::Service(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::PeerAuthentication(o) => &o.metadata,
            Self::AuthorizationPolicy(o) => &o.metadata,
            Self::RequestAuthentication(o) => &o.metadata,
            Self::Telemetry(o) => &o.metadata,
            Self::ServiceEntry(o) => &o.metadata,
            Self::WorkloadEntry(o) => &o.metadata,
            Self::Gateway(o) => &o.metadata,
            Self::HttpRoute(o) => &o.metadata,
            Self::GrpcRoute(o) => &o.metadata,
            Self::VirtualService(o) => &o.metadata,
            Self::DestinationRule(o) => &o.metadata,
            Self::HttpLocalRateLimitPolicy(o) => &o.metadata,
            Self::ConfigMap(o) => &o.metadata,
            Self::Opaque(o) => &o.metadata,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Self::Namespace(_) => Kind::Namespace,
            Self::Node(_) => Kind::Node,
            Self::ServiceAccount(_) => Kind::ServiceAccount,
            Self::Pod(_) => Kind::Pod,
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::PeerAuthentication(_) => Kind::PeerAuthentication,
            Self::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Self::RequestAuthentication(_) => Kind::RequestAuthentication,
            Self::Telemetry(_) => Kind::Telemetry,
            Self::ServiceEntry(_) => Kind::ServiceEntry,
            Self::WorkloadEntry(_) => Kind::WorkloadEntry,
            Self::Gateway(_) => Kind::Gateway,
            Self::HttpRoute(_) => Kind::HttpRoute,
            Self::GrpcRoute(_) => Kind::GrpcRoute,
            Self::VirtualService(_) => Kind::VirtualService,
            Self::DestinationRule(_) => Kind::DestinationRule,
            Self::HttpLocalRateLimitPolicy(_) => Kind::HttpLocalRateLimitPolicy,
            Self::ConfigMap(_) => Kind::ConfigMap,
            Self::Opaque(o) => o.kind,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Namespace,
    Node,
    ServiceAccount,
    Pod,
    Service,
    EndpointSlice,
    ConfigMap,
    PeerAuthentication,
    AuthorizationPolicy,
    RequestAuthentication,
    ServiceEntry,
    WorkloadEntry,
    Gateway,
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    VirtualService,
    DestinationRule,
    // Read but not implemented yet (`Resource::Opaque`).
    IstioGateway,
    Sidecar,
    EnvoyFilter,
    WorkloadGroup,
    ProxyConfig,
    Telemetry,
    WasmPlugin,
    GatewayClass,
    #[serde(rename = "GRPCRoute")]
    GrpcRoute,
    #[serde(rename = "TCPRoute")]
    TcpRoute,
    #[serde(rename = "TLSRoute")]
    TlsRoute,
    ReferenceGrant,
    #[serde(rename = "HTTPLocalRateLimitPolicy")]
    HttpLocalRateLimitPolicy,
}

const ISTIO_NETWORKING: &[&str] =
    &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"];
const ISTIO_SECURITY: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];
/// Istio's API groups: every kind in them is in [`KINDS`], so another
/// name there is a mistake (the API server refuses it too).
const ISTIO_GROUPS: &[&str] =
    &["networking.istio.io", "security.istio.io", "telemetry.istio.io", "extensions.istio.io"];

/// The group of an `apiVersion` (`group/version`; empty for the core group's `v1`).
fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(group, _)| group)
}

const GATEWAY_API: &[&str] = &["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"];

/// One kind as users write it: `kind`, the `apiVersion`s served (the first is
/// the one suggested), and whether mesh reads it without effect yet.
struct KindInfo {
    kind: Kind,
    written: &'static str,
    /// How problems name it (differs from `written` only where two groups share a kind name).
    name: &'static str,
    versions: &'static [&'static str],
    opaque: bool,
}

const fn typed(kind: Kind, written: &'static str, versions: &'static [&'static str]) -> KindInfo {
    KindInfo { kind, written, name: written, versions, opaque: false }
}

const fn opaque(kind: Kind, written: &'static str, versions: &'static [&'static str]) -> KindInfo {
    KindInfo { kind, written, name: written, versions, opaque: true }
}

/// Every kind mesh reads: the one table behind [`Kind::from_type`], [`Kind::name`] and [`Kind::is_opaque`].
const KINDS: &[KindInfo] = &[
    typed(Kind::Namespace, "Namespace", &["v1"]),
    typed(Kind::Node, "Node", &["v1"]),
    typed(Kind::ServiceAccount, "ServiceAccount", &["v1"]),
    typed(Kind::Pod, "Pod", &["v1"]),
    typed(Kind::Service, "Service", &["v1"]),
    typed(Kind::EndpointSlice, "EndpointSlice", &["discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"]),
    typed(Kind::ConfigMap, "ConfigMap", &["v1"]),
    typed(Kind::PeerAuthentication, "PeerAuthentication", ISTIO_SECURITY),
    typed(Kind::AuthorizationPolicy, "AuthorizationPolicy", ISTIO_SECURITY),
    typed(Kind::ServiceEntry, "ServiceEntry", ISTIO_NETWORKING),
    typed(Kind::WorkloadEntry, "WorkloadEntry", ISTIO_NETWORKING),
    typed(Kind::VirtualService, "VirtualService", ISTIO_NETWORKING),
    typed(Kind::DestinationRule, "DestinationRule", ISTIO_NETWORKING),
    typed(Kind::Gateway, "Gateway", GATEWAY_API),
    typed(Kind::HttpRoute, "HTTPRoute", GATEWAY_API),
    KindInfo { name: "Gateway.networking.istio.io", ..opaque(Kind::IstioGateway, "Gateway", ISTIO_NETWORKING) },
    opaque(Kind::Sidecar, "Sidecar", ISTIO_NETWORKING),
    opaque(Kind::EnvoyFilter, "EnvoyFilter", &["networking.istio.io/v1alpha3"]),
    opaque(Kind::WorkloadGroup, "WorkloadGroup", ISTIO_NETWORKING),
    opaque(Kind::ProxyConfig, "ProxyConfig", &["networking.istio.io/v1beta1"]),
    typed(Kind::RequestAuthentication, "RequestAuthentication", ISTIO_SECURITY),
    typed(Kind::Telemetry, "Telemetry", &["telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1"]),
    opaque(Kind::WasmPlugin, "WasmPlugin", &["extensions.istio.io/v1alpha1"]),
    opaque(Kind::GatewayClass, "GatewayClass", GATEWAY_API),
    typed(
        Kind::GrpcRoute,
        "GRPCRoute",
        &["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1", "gateway.networking.k8s.io/v1alpha2"],
    ),
    opaque(Kind::TcpRoute, "TCPRoute", &["gateway.networking.k8s.io/v1alpha2"]),
    opaque(Kind::TlsRoute, "TLSRoute", &["gateway.networking.k8s.io/v1alpha2", "gateway.networking.k8s.io/v1alpha3"]),
    // Linkerd's, adopted as mesh's local rate limit (Istio has no API for one).
    typed(Kind::HttpLocalRateLimitPolicy, "HTTPLocalRateLimitPolicy", &["policy.linkerd.io/v1alpha1"]),
    opaque(
        Kind::ReferenceGrant,
        "ReferenceGrant",
        &["gateway.networking.k8s.io/v1beta1", "gateway.networking.k8s.io/v1alpha2"],
    ),
];

impl Kind {
    fn info(self) -> &'static KindInfo {
        KINDS.iter().find(|i| i.kind == self).expect("every Kind is in KINDS")
    }

    /// The kind for an `apiVersion` and `kind` pair: `None` for a kind mesh
    /// does not read (a Deployment, another project's resource, Linkerd's
    /// AuthorizationPolicy), which is valid and has no effect on the mesh;
    /// an error, with what was expected, for a version of one of mesh's
    /// kinds that its group does not serve and for a kind that does not
    /// exist in Istio's groups (every kind of those is in the table).
    /// Every version Istio and Gateway API still serve of a schema is accepted.
    pub fn from_type(api_version: &str, kind: &str) -> Result<Option<Kind>, String> {
        let named = || KINDS.iter().filter(|i| i.written == kind);
        if let Some(info) = named().find(|i| i.versions.contains(&api_version)) {
            return Ok(Some(info.kind));
        }
        let group = group_of(api_version);
        if let Some(info) = named().find(|i| i.versions.iter().any(|v| group_of(v) == group)) {
            let first = info.versions.iter().find(|v| group_of(v) == group).unwrap_or(&info.versions[0]);
            return Err(format!("apiVersion {api_version:?} for kind {kind}: expected {first:?}"));
        }
        if ISTIO_GROUPS.contains(&group) {
            let list = |opaque: bool| {
                let names: Vec<String> = KINDS
                    .iter()
                    .filter(|i| i.opaque == opaque && ISTIO_GROUPS.contains(&group_of(i.versions[0])))
                    .map(|i| format!("{} ({})", i.written, i.versions[0]))
                    .collect();
                names.join(", ")
            };
            return Err(format!(
                "unknown kind {kind:?} in Istio's group {group}; supported: {}; read without effect yet: {}",
                list(false),
                list(true)
            ));
        }
        Ok(None)
    }

    /// The kind as problems name it.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Kinds read as they are, without effect yet ([`Resource::Opaque`]).
    pub fn is_opaque(self) -> bool {
        self.info().opaque
    }

    /// Every kind mesh reads.
    pub fn all() -> impl Iterator<Item = Kind> {
        KINDS.iter().map(|i| i.kind)
    }

    /// `kind` as written in objects (`HTTPRoute`; `Gateway` for both gateways).
    pub fn written(self) -> &'static str {
        self.info().written
    }

    /// The `apiVersion`s read (`group/version`, or `v1` for the core group),
    /// the preferred one first.
    pub fn api_versions(self) -> &'static [&'static str] {
        self.info().versions
    }

    /// The API group (empty for the core group).
    pub fn group(self) -> &'static str {
        group_of(self.api_versions()[0])
    }

    /// The resource's plural name, as in its URL and its CRD's name.
    pub fn plural(self) -> String {
        let lower = self.written().to_ascii_lowercase();
        let consonant_y = lower.ends_with('y') && !lower[..lower.len() - 1].ends_with(['a', 'e', 'i', 'o', 'u']);
        if consonant_y {
            format!("{}ies", &lower[..lower.len() - 1])
        } else if lower.ends_with('s') {
            format!("{lower}es")
        } else {
            format!("{lower}s")
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node | Kind::GatewayClass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_table_round_trips() {
        for info in KINDS {
            for v in info.versions {
                assert_eq!(Kind::from_type(v, info.written), Ok(Some(info.kind)), "{v} {}", info.written);
            }
            assert_eq!(KINDS.iter().filter(|i| i.kind == info.kind).count(), 1, "{:?} listed once", info.kind);
        }
        assert_eq!(Kind::from_type("networking.istio.io/v1", "Gateway"), Ok(Some(Kind::IstioGateway)));
        assert_eq!(Kind::IstioGateway.name(), "Gateway.networking.istio.io");
        let typo = Kind::from_type("security.istio.io/v1", "AuthorisationPolicy").unwrap_err();
        assert!(typo.contains("AuthorizationPolicy (security.istio.io/v1)"), "{typo}");
        assert!(!typo.contains("HTTPRoute"), "only Istio's kinds are listed: {typo}");
        assert!(Kind::from_type("v2", "Pod").unwrap_err().contains("expected \"v1\""));
        assert!(Kind::from_type("security.istio.io/v2", "PeerAuthentication").unwrap_err().contains("expected"));
        // Kinds mesh does not read, valid elsewhere: no effect, not an error.
        for (api_version, kind) in [
            ("apps/v1", "Deployment"),
            ("v1", "Secret"),
            ("policy.linkerd.io/v1alpha1", "AuthorizationPolicy"),
            ("policy.linkerd.io/v1beta3", "HTTPRoute"),
            ("gateway.networking.k8s.io/v1alpha2", "UDPRoute"),
            ("cert-manager.io/v1", "Certificate"),
        ] {
            assert_eq!(Kind::from_type(api_version, kind), Ok(None), "{api_version} {kind}");
        }
        let plurals: Vec<String> = [
            Kind::Telemetry,
            Kind::ServiceEntry,
            Kind::HttpLocalRateLimitPolicy,
            Kind::GatewayClass,
            Kind::Gateway,
            Kind::Pod,
        ]
        .iter()
        .map(|k| format!("{}.{}", k.plural(), k.group()))
        .collect();
        assert_eq!(
            plurals,
            [
                "telemetries.telemetry.istio.io",
                "serviceentries.networking.istio.io",
                "httplocalratelimitpolicies.policy.linkerd.io",
                "gatewayclasses.gateway.networking.k8s.io",
                "gateways.gateway.networking.k8s.io",
                "pods."
            ]
        );
    }
}
