//! `telemetry.istio.io/v1` `Telemetry`: how the proxies trace, log and
//! count a workload's (for mesh: a waypoint's services') requests. The
//! fields are Istio's; what mesh does with each is in `enforced.rs`.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ObjectMeta, PolicyTargetReference, WorkloadSelector};

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: TelemetrySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelemetrySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default)]
    pub tracing: Vec<Tracing>,
    #[serde(default)]
    pub metrics: Vec<Metrics>,
    #[serde(default)]
    pub access_logging: Vec<AccessLogging>,
}

impl TelemetrySpec {
    /// Names no workload or target: applies to its whole namespace (or, in
    /// the root namespace, to the mesh).
    pub fn is_namespace_wide(&self) -> bool {
        self.selector.is_none() && self.target_ref.is_none() && self.target_refs.is_empty()
    }
}

/// `Tracing`: the first entry is the one Istio applies.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    #[serde(default, rename = "match")]
    pub match_: Option<TrafficMatch>,
    #[serde(default)]
    pub providers: Vec<ProviderRef>,
    /// Unset: inherited (from the namespace's or the mesh's Telemetry), else 1 %.
    #[serde(default)]
    pub random_sampling_percentage: Option<f64>,
    #[serde(default)]
    pub disable_span_reporting: Option<bool>,
    #[serde(default)]
    pub custom_tags: BTreeMap<String, CustomTag>,
    #[serde(default)]
    pub use_request_id_for_trace_sampling: Option<bool>,
    #[serde(default)]
    pub enable_istio_tags: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficMatch {
    /// `CLIENT_AND_SERVER` (the default), `CLIENT` or `SERVER`.
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderRef {
    #[serde(default)]
    pub name: String,
}

/// One of a literal, an environment variable of the proxy, or a request header.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CustomTag {
    #[serde(default)]
    pub literal: Option<Literal>,
    #[serde(default)]
    pub environment: Option<FromEnvironment>,
    #[serde(default)]
    pub header: Option<FromHeader>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Literal {
    #[serde(default)]
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FromEnvironment {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub default_value: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FromHeader {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub default_value: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metrics {
    #[serde(default)]
    pub providers: Vec<ProviderRef>,
    #[serde(default)]
    pub overrides: Vec<MetricsOverride>,
    #[serde(default)]
    pub reporting_interval: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsOverride {
    #[serde(default, rename = "match")]
    pub match_: Option<MetricSelector>,
    #[serde(default)]
    pub disabled: Option<bool>,
    #[serde(default)]
    pub tag_overrides: BTreeMap<String, TagOverride>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricSelector {
    /// `ALL_METRICS`, `REQUEST_COUNT`, `REQUEST_DURATION`, ... (Istio's names).
    #[serde(default)]
    pub metric: Option<String>,
    #[serde(default)]
    pub custom_metric: Option<String>,
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TagOverride {
    /// `UPSERT` (the default) or `REMOVE`.
    #[serde(default)]
    pub operation: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogging {
    #[serde(default, rename = "match")]
    pub match_: Option<TrafficMatch>,
    #[serde(default)]
    pub providers: Vec<ProviderRef>,
    #[serde(default)]
    pub disabled: Option<bool>,
    #[serde(default)]
    pub filter: Option<AccessLogFilter>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogFilter {
    #[serde(default)]
    pub expression: String,
}

/// Istio's `MetricSelector.IstioMetric` values.
pub const ISTIO_METRICS: &[&str] = &[
    "ALL_METRICS",
    "REQUEST_COUNT",
    "REQUEST_DURATION",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "TCP_OPENED_CONNECTIONS",
    "TCP_CLOSED_CONNECTIONS",
    "TCP_SENT_BYTES",
    "TCP_RECEIVED_BYTES",
    "GRPC_REQUEST_MESSAGES",
    "GRPC_RESPONSE_MESSAGES",
];

/// The tags of Istio's standard metrics (what a tagOverride can set or remove).
pub const STANDARD_TAGS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_canonical_service",
    "source_canonical_revision",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// Istio's `WorkloadMode` values.
pub const WORKLOAD_MODES: &[&str] = &["CLIENT_AND_SERVER", "CLIENT", "SERVER"];
