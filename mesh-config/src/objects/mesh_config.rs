//! `v1/ConfigMap`, and in the one Istio reads its mesh-wide settings from
//! (`istio` in istiod's namespace, key `mesh`), the `MeshConfig` fields mesh
//! reads: `extensionProviders` (the external authorizers that
//! AuthorizationPolicy `action: CUSTOM` names).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

use super::{IntOrString, ObjectMeta};

/// The ConfigMap name and key Istio reads `MeshConfig` from.
pub const MESH_CONFIG_MAP: &str = "istio";
pub const MESH_CONFIG_KEY: &str = "mesh";

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMap {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    #[serde(default, skip_serializing)]
    pub binary_data: Option<Value>,
    #[serde(default, skip_serializing)]
    pub immutable: Option<bool>,
}

impl ConfigMap {
    /// The text of Istio's `MeshConfig`, when this is the ConfigMap that holds it.
    pub fn mesh_config_text(&self) -> Option<&str> {
        (self.metadata.name == MESH_CONFIG_MAP).then(|| self.data.get(MESH_CONFIG_KEY)).flatten().map(String::as_str)
    }

    /// Istio's `MeshConfig` in it (`None`: not that ConfigMap); `Err` is the
    /// YAML or schema error, with the path inside `mesh`.
    pub fn mesh_config(&self) -> Option<Result<MeshConfig, (String, String)>> {
        let text = self.mesh_config_text()?;
        if text.trim().is_empty() {
            return Some(Ok(MeshConfig::default()));
        }
        let de = serde_yaml_ng::Deserializer::from_str(text);
        Some(serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            (if path == "." { String::new() } else { path }, e.inner().to_string())
        }))
    }
}

/// `MeshConfig`: the fields mesh reads, and every other one kept as written
/// (accepted; `enforced.rs` says which have no effect).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    #[serde(default)]
    pub extension_providers: Vec<ExtensionProvider>,
    /// The providers that apply where no Telemetry names one.
    #[serde(default)]
    pub default_providers: Option<DefaultProviders>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// `MeshConfig.DefaultProviders`: provider names by signal.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DefaultProviders {
    #[serde(default)]
    pub tracing: Vec<String>,
    #[serde(default)]
    pub metrics: Vec<String>,
    #[serde(default)]
    pub access_logging: Vec<String>,
}

/// `MeshConfig.ExtensionProvider`: a name and exactly one provider.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub envoy_ext_authz_http: Option<ExtAuthzHttp>,
    #[serde(default)]
    pub envoy_ext_authz_grpc: Option<ExtAuthzGrpc>,
    /// Tracing providers, named by Telemetry's `tracing.providers`.
    #[serde(default)]
    pub zipkin: Option<TracingProvider>,
    #[serde(default)]
    pub lightstep: Option<Value>,
    #[serde(default)]
    pub datadog: Option<Value>,
    #[serde(default)]
    pub stackdriver: Option<Value>,
    #[serde(default)]
    pub opencensus: Option<Value>,
    #[serde(default)]
    pub skywalking: Option<Value>,
    #[serde(default)]
    pub opentelemetry: Option<TracingProvider>,
    #[serde(default)]
    pub prometheus: Option<Value>,
    #[serde(default)]
    pub envoy_file_access_log: Option<Value>,
    #[serde(default)]
    pub envoy_http_als: Option<Value>,
    #[serde(default)]
    pub envoy_tcp_als: Option<Value>,
    #[serde(default)]
    pub envoy_otel_als: Option<Value>,
    #[serde(default)]
    pub sds: Option<Value>,
}

impl ExtensionProvider {
    /// The provider kinds set, by their field names.
    pub fn kinds(&self) -> Vec<&'static str> {
        let set = [
            ("envoyExtAuthzHttp", self.envoy_ext_authz_http.is_some()),
            ("envoyExtAuthzGrpc", self.envoy_ext_authz_grpc.is_some()),
            ("zipkin", self.zipkin.is_some()),
            ("lightstep", self.lightstep.is_some()),
            ("datadog", self.datadog.is_some()),
            ("stackdriver", self.stackdriver.is_some()),
            ("opencensus", self.opencensus.is_some()),
            ("skywalking", self.skywalking.is_some()),
            ("opentelemetry", self.opentelemetry.is_some()),
            ("prometheus", self.prometheus.is_some()),
            ("envoyFileAccessLog", self.envoy_file_access_log.is_some()),
            ("envoyHttpAls", self.envoy_http_als.is_some()),
            ("envoyTcpAls", self.envoy_tcp_als.is_some()),
            ("envoyOtelAls", self.envoy_otel_als.is_some()),
            ("sds", self.sds.is_some()),
        ];
        set.into_iter().filter(|(_, on)| *on).map(|(k, _)| k).collect()
    }
}

/// `ZipkinTracingProvider` and `OpenTelemetryTracingProvider`: where spans
/// go. The fields mesh does not read (Zipkin's `enable64bitTraceId`,
/// `traceContextOption`, OpenTelemetry's resource detectors and samplers,
/// ...) are kept in `other` and named by a warning.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TracingProvider {
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub port: Option<IntOrString>,
    #[serde(default)]
    pub max_tag_length: Option<u32>,
    /// Zipkin's collector path (default `/api/v2/spans`).
    #[serde(default)]
    pub path: Option<String>,
    /// OpenTelemetry over HTTP (OTLP/HTTP, protobuf); unset: OTLP/gRPC.
    #[serde(default)]
    pub http: Option<OtlpHttp>,
    #[serde(default)]
    pub grpc: Option<OtlpGrpc>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OtlpHttp {
    /// Default `/v1/traces`.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub headers: Vec<HttpHeader>,
}

/// `OpenTelemetryTracingProvider.grpc` (Istio's `GrpcService`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OtlpGrpc {
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub initial_metadata: Vec<HttpHeader>,
}

/// Istio's `HttpHeader`: a value, or the proxy's environment variable `envName`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpHeader {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub env_name: Option<String>,
}

/// `EnvoyExternalAuthorizationHttpProvider`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtAuthzHttp {
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub port: Option<IntOrString>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub status_on_error: Option<IntOrString>,
    /// Deprecated by Istio for `includeRequestHeadersInCheck`; read as it.
    #[serde(default)]
    pub include_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    #[serde(default)]
    pub include_request_body_in_check: Option<ExtAuthzBody>,
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_allow: Vec<String>,
}

/// `EnvoyExternalAuthorizationGrpcProvider`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtAuthzGrpc {
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub port: Option<IntOrString>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub status_on_error: Option<IntOrString>,
    #[serde(default)]
    pub include_request_body_in_check: Option<ExtAuthzBody>,
}

/// `EnvoyExternalAuthorizationRequestBody`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtAuthzBody {
    #[serde(default)]
    pub max_request_bytes: Option<i64>,
    #[serde(default)]
    pub allow_partial_message: bool,
    #[serde(default)]
    pub pack_as_bytes: bool,
}
