//! Telemetry onto what enforces it. Istio's order: the mesh's Telemetry
//! (root namespace, no selector), then the namespace's, then those that
//! select or target; each more specific one overrides what it sets.
//!
//! - `tracing`, onto the services whose waypoint traces them: the fields
//!   it sets (providers, sampling, reporting) override, its custom tags
//!   add. Only a Telemetry's first `tracing` entry and that entry's first
//!   provider apply, as in Istio. Where no Telemetry names a provider,
//!   MeshConfig's `defaultProviders.tracing` does.
//! - `accessLogging` and `metrics`, onto workloads (their node proxy:
//!   namespace-wide and selecting Telemetry) and services (their waypoint:
//!   as `tracing`), as ordered rules the proxy reads last-first
//!   ([`policy`]).
use std::collections::BTreeMap;

use mesh_common::api;

use super::{
    ext_authz::{host_of, mesh_config},
    mesh::MeshModel,
};
use crate::config::{
    ConfigStore, Resource,
    objects::{
        IntOrString,
        mesh_config::ExtensionProvider,
        telemetry::{CustomTag, Telemetry, TelemetrySpec, Tracing},
    },
};

/// Istio's sampling when nothing sets it (`defaultConfig.tracing.sampling`).
pub const DEFAULT_SAMPLING_PERCENTAGE: f64 = 1.0;

/// The tracing fields set so far, from the least specific level up.
#[derive(Default)]
struct Merged {
    provider: Option<String>,
    percentage: Option<f64>,
    disable_reporting: Option<bool>,
    tags: BTreeMap<String, CustomTag>,
}

impl Merged {
    fn over(&mut self, t: &Tracing) {
        if let Some(p) = t.providers.first() {
            self.provider = Some(p.name.clone());
        }
        self.percentage = t.random_sampling_percentage.or(self.percentage);
        self.disable_reporting = t.disable_span_reporting.or(self.disable_reporting);
        self.tags.extend(t.custom_tags.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
}

/// A Telemetry's level: 0 the mesh's, 1 a namespace's, 2 selecting or targeting.
fn level(t: &Telemetry, root: &str) -> usize {
    match (t.spec.is_namespace_wide(), t.metadata.namespace() == root) {
        (true, true) => 0,
        (true, false) => 1,
        (false, _) => 2,
    }
}

/// The Telemetry objects with `accessLogging` or `metrics` (what node
/// proxies and waypoints enforce besides tracing), in the store's order.
pub(super) fn logging_and_metrics(store: &ConfigStore) -> imbl::Vector<Telemetry> {
    store
        .objects()
        .values()
        .filter_map(|s| match s.resource.as_ref() {
            Resource::Telemetry(t) if !t.spec.access_logging.is_empty() || !t.spec.metrics.is_empty() => {
                Some(t.clone())
            }
            _ => None,
        })
        .collect()
}

/// The access-log and metric rules of `specs`, least specific first.
pub(super) fn policy<'a>(specs: impl Iterator<Item = &'a TelemetrySpec>) -> Option<api::TelemetryPolicy> {
    let mode = |m: Option<&str>| match m {
        Some("CLIENT") => api::TrafficMode::Client,
        Some("SERVER") => api::TrafficMode::Server,
        _ => api::TrafficMode::ClientAndServer,
    } as i32;
    let mut p = api::TelemetryPolicy::default();
    for spec in specs {
        for l in &spec.access_logging {
            p.access_logs.push(api::AccessLogRule {
                mode: mode(l.match_.as_ref().and_then(|m| m.mode.as_deref())),
                disabled: l.disabled.unwrap_or(false),
                filter: l.filter.as_ref().map(|f| f.expression.clone()).unwrap_or_default(),
            });
        }
        for o in spec.metrics.iter().flat_map(|m| &m.overrides) {
            let selector = o.match_.as_ref();
            // mesh reports Istio's standard metrics only: a custom one's override matches none.
            if selector.is_some_and(|s| s.custom_metric.is_some()) {
                continue;
            }
            let tags = |op: &'static str| {
                o.tag_overrides.iter().filter(move |(_, t)| t.operation.as_deref().unwrap_or("UPSERT") == op)
            };
            p.metric_overrides.push(api::MetricOverride {
                mode: mode(selector.and_then(|s| s.mode.as_deref())),
                metric: selector.and_then(|s| s.metric.clone()).unwrap_or_else(|| "ALL_METRICS".into()),
                disabled: o.disabled,
                removed_tags: tags("REMOVE").map(|(k, _)| k.clone()).collect(),
                upserted_tags: tags("UPSERT").map(|(k, t)| (k.clone(), t.value.clone().unwrap_or_default())).collect(),
            });
        }
    }
    (!p.access_logs.is_empty() || !p.metric_overrides.is_empty()).then_some(p)
}

/// The rules for workload `w` at its node proxy: the mesh's and its
/// namespace's Telemetry, then those whose selector picks it (targetRefs
/// name waypoints' Gateways and Services: not node proxies').
pub(super) fn for_workload(
    telemetries: &imbl::Vector<Telemetry>,
    root: &str,
    w: &super::mesh::Workload,
) -> Option<api::TelemetryPolicy> {
    let mut applying: Vec<(usize, &Telemetry)> = telemetries
        .iter()
        .filter(|t| {
            let spec = &t.spec;
            let ns = t.metadata.namespace();
            if spec.target_ref.is_some() || !spec.target_refs.is_empty() || (ns != root && ns != w.namespace) {
                return false;
            }
            spec.selector.as_ref().is_none_or(|s| super::mesh::selector_matches(&s.match_labels, &w.labels))
        })
        .map(|t| (level(t, root), t))
        .collect();
    applying.sort_by_key(|(l, _)| *l);
    policy(applying.iter().map(|(_, t)| &t.spec))
}

pub(super) fn apply(model: &mut MeshModel, store: &ConfigStore) {
    let root = model.root_namespace.clone();
    let config = mesh_config(store, &root);
    let default_provider =
        config.as_ref().and_then(|c| c.default_providers.as_ref()).and_then(|d| d.tracing.first().cloned());
    let collectors: BTreeMap<&str, api::TraceCollector> = config
        .iter()
        .flat_map(|c| &c.extension_providers)
        .filter_map(|p| Some((p.name.as_str(), collector(p)?)))
        .collect();
    // By level (mesh, namespace, workload); within one, by namespace and name.
    let mut levels: [Vec<&Telemetry>; 3] = Default::default();
    for stored in store.objects().values() {
        if let Resource::Telemetry(t) = stored.resource.as_ref()
            && !t.spec.tracing.is_empty()
        {
            levels[level(t, &root)].push(t);
        }
    }
    services_logging_and_metrics(model, &root);
    let mut merged: BTreeMap<String, Merged> = BTreeMap::new();
    if default_provider.is_some() {
        // Every waypoint traces with the default provider, Telemetry or not.
        for (key, svc) in model.services.iter() {
            if svc.waypoint.is_some() {
                merged.insert(key.clone(), Merged { provider: default_provider.clone(), ..Default::default() });
            }
        }
    }
    for t in levels.iter().flatten() {
        let spec = &t.spec;
        let targets: Vec<_> = spec.target_ref.iter().chain(&spec.target_refs).collect();
        let selector = spec.selector.as_ref().map(|s| &s.match_labels);
        for key in super::at_waypoint::services(model, t.metadata.namespace(), selector, &targets) {
            merged.entry(key).or_default().over(&spec.tracing[0]);
        }
    }
    for (key, m) in merged {
        let provider = m.provider.or_else(|| default_provider.clone());
        let Some(collector) = provider.and_then(|p| collectors.get(p.as_str()).cloned()) else {
            // No provider, or one not (yet) defined: nothing is traced.
            continue;
        };
        if let Some(svc) = model.services.get_mut(&key) {
            svc.tracing = Some(api::Tracing {
                collector: Some(collector),
                sampling_percentage: m.percentage.unwrap_or(DEFAULT_SAMPLING_PERCENTAGE),
                custom_tags: m.tags.iter().filter_map(|(name, tag)| custom_tag(name, tag)).collect(),
                disable_reporting: m.disable_reporting.unwrap_or(false),
            });
        }
    }
}

/// Each service's access-log and metric rules at its waypoint.
fn services_logging_and_metrics(model: &mut MeshModel, root: &str) {
    let mut by_service: BTreeMap<String, Vec<(usize, &Telemetry)>> = BTreeMap::new();
    let telemetries = model.telemetries.clone();
    for t in telemetries.iter() {
        let spec = &t.spec;
        let targets: Vec<_> = spec.target_ref.iter().chain(&spec.target_refs).collect();
        let selector = spec.selector.as_ref().map(|s| &s.match_labels);
        for key in super::at_waypoint::services(model, t.metadata.namespace(), selector, &targets) {
            by_service.entry(key).or_default().push((level(t, root), t));
        }
    }
    for (key, mut applying) in by_service {
        applying.sort_by_key(|(l, _)| *l);
        if let Some(svc) = model.services.get_mut(&key) {
            svc.telemetry = policy(applying.iter().map(|(_, t)| &t.spec));
        }
    }
}

/// A tracing provider's collector (`zipkin` or `opentelemetry`).
fn collector(p: &ExtensionProvider) -> Option<api::TraceCollector> {
    use api::trace_collector::Protocol;
    let (protocol, t, path) = match (&p.zipkin, &p.opentelemetry) {
        (Some(z), _) => (Protocol::Zipkin, z, z.path.clone().unwrap_or_else(|| "/api/v2/spans".into())),
        (_, Some(o)) => match &o.http {
            Some(h) => (Protocol::OtlpHttp, o, h.path.clone().unwrap_or_else(|| "/v1/traces".into())),
            None => (Protocol::OtlpGrpc, o, String::new()),
        },
        _ => return None,
    };
    let port = t.port.as_ref().and_then(IntOrString::as_number).unwrap_or(0) as u32;
    let path = if path.is_empty() || path.starts_with('/') { path } else { format!("/{path}") };
    // OTLP's headers and deadline: `http`'s, or `grpc`'s initial metadata and timeout.
    let (headers, timeout) = match (protocol, &t.http, &t.grpc) {
        (Protocol::OtlpHttp, Some(h), _) => (&h.headers[..], h.timeout.as_deref()),
        (Protocol::OtlpGrpc, _, Some(g)) => (&g.initial_metadata[..], g.timeout.as_deref()),
        _ => (&[][..], None),
    };
    let timeout = timeout.and_then(|t| mesh_common::parse_duration(t).ok());
    Some(api::TraceCollector {
        name: p.name.clone(),
        protocol: protocol as i32,
        host: host_of(&t.service),
        port,
        path,
        max_tag_length: t.max_tag_length.unwrap_or(0),
        headers: headers
            .iter()
            .map(|h| api::CollectorHeader {
                name: h.name.clone(),
                value: h.value.clone().unwrap_or_default(),
                env_name: h.env_name.clone().unwrap_or_default(),
            })
            .collect(),
        timeout_ms: timeout.map_or(0, |t| t.as_millis().min(u128::from(u32::MAX)) as u32),
    })
}

fn custom_tag(name: &str, tag: &CustomTag) -> Option<api::CustomTag> {
    use api::custom_tag::Value;
    let (value, default_value) = match (&tag.literal, &tag.environment, &tag.header) {
        (Some(l), _, _) => (Value::Literal(l.value.clone()), None),
        (_, Some(e), _) => (Value::Environment(e.name.clone()), e.default_value.clone()),
        (_, _, Some(h)) => (Value::Header(h.name.to_ascii_lowercase()), h.default_value.clone()),
        _ => return None,
    };
    Some(api::CustomTag { name: name.to_owned(), value: Some(value), default_value: default_value.unwrap_or_default() })
}

#[cfg(test)]
mod tests {
    use super::super::from_yaml;
    use mesh_common::api::custom_tag::Value;

    /// The test namespace, MeshConfig's tracing providers, and a service without a waypoint.
    static BASE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "{}{}",
            super::super::WAYPOINT_NAMESPACE,
            "\
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: zipkin
      zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
    - name: otel
      opentelemetry: {service: istio-system/otel.istio-system.svc.cluster.local, port: 4318, http: {path: /v1/traces}}
    - name: otel-grpc
      opentelemetry: {service: otel.istio-system.svc.cluster.local, port: 4317}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: other}
spec: {clusterIP: 10.96.0.3, selector: {app: db}, ports: [{name: tcp, port: 5432}]}
"
        )
    });

    fn telemetry(ns: &str, name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
        )
    }

    /// A service's tracing: collector, protocol, percentage, reporting off, tags.
    type Traced = (String, i32, f64, bool, Vec<String>);

    /// Per service, its tracing.
    fn traced(extra: &str) -> Vec<(String, Option<Traced>)> {
        let model = from_yaml(&format!("{}{extra}", *BASE));
        model
            .services
            .iter()
            .map(|(k, s)| {
                let t = s.tracing.as_ref().map(|t| {
                    let c = t.collector.clone().unwrap_or_default();
                    let tags = t
                        .custom_tags
                        .iter()
                        .map(|c| match c.value.as_ref().unwrap() {
                            Value::Literal(v) => format!("{}={v}", c.name),
                            Value::Environment(e) => format!("{}=env:{e}:{}", c.name, c.default_value),
                            Value::Header(h) => format!("{}=header:{h}", c.name),
                        })
                        .collect();
                    (
                        format!("{}@{}:{}{}", c.name, c.host, c.port, c.path),
                        c.protocol,
                        t.sampling_percentage,
                        t.disable_reporting,
                        tags,
                    )
                });
                (k.clone(), t)
            })
            .collect()
    }

    #[test]
    fn levels_merge_and_providers_resolve() {
        let none = traced("");
        assert!(none.iter().all(|(_, t)| t.is_none()), "no Telemetry, no default provider: nothing traced");

        let mesh = telemetry(
            "istio-system",
            "mesh",
            "{tracing: [{providers: [{name: zipkin}], randomSamplingPercentage: 10, customTags: {cluster: {literal: {value: east}}}}]}",
        );
        let t = traced(&mesh);
        let web = t.iter().find(|(k, _)| k == "default/web").unwrap().1.clone().unwrap();
        assert_eq!(web.0, "zipkin@zipkin.istio-system.svc.cluster.local:9411/api/v2/spans");
        assert_eq!((web.1, web.2, web.3), (0, 10.0, false));
        assert_eq!(web.4, ["cluster=east"]);
        assert!(t.iter().find(|(k, _)| k == "other/db").unwrap().1.is_none(), "no waypoint, no tracing");

        // The namespace's Telemetry overrides the percentage and adds a tag;
        // the one targeting `api` switches its provider and turns reporting off.
        let ns = telemetry(
            "default",
            "ns",
            "{tracing: [{randomSamplingPercentage: 100, customTags: {who: {header: {name: X-User}}}}]}",
        );
        let api = telemetry(
            "default",
            "api",
            "{targetRefs: [{kind: Service, group: '', name: api}], tracing: [{providers: [{name: otel}], disableSpanReporting: true, customTags: {pod: {environment: {name: POD_NAME, defaultValue: unknown}}}}]}",
        );
        let t = traced(&format!("{mesh}{ns}{api}"));
        let get = |key: &str| t.iter().find(|(k, _)| k == key).unwrap().1.clone().unwrap();
        let web = get("default/web");
        assert_eq!((web.2, web.3), (100.0, false));
        assert_eq!(web.4, ["cluster=east", "who=header:x-user"]);
        let api = get("default/api");
        assert_eq!(api.0, "otel@otel.istio-system.svc.cluster.local:4318/v1/traces");
        assert_eq!((api.1, api.2, api.3), (1, 100.0, true));
        assert_eq!(api.4, ["cluster=east", "pod=env:POD_NAME:unknown", "who=header:x-user"]);
    }

    /// An OTLP provider's headers (gRPC: initial metadata) and timeout reach the waypoint.
    #[test]
    fn otlp_http_headers_and_timeout() {
        let provider = |yaml: &str| -> super::ExtensionProvider { serde_yaml_ng::from_str(yaml).unwrap() };
        let otel = super::collector(&provider(
            "{name: otel, opentelemetry: {service: otel.o.svc.cluster.local, port: 4318, http: {path: /v1/traces, \
             timeout: 3s, headers: [{name: x-tenant, value: blue}, {name: authorization, envName: OTEL_TOKEN}]}}}",
        ))
        .unwrap();
        assert_eq!(otel.timeout_ms, 3000);
        let headers: Vec<(&str, &str, &str)> =
            otel.headers.iter().map(|h| (h.name.as_str(), h.value.as_str(), h.env_name.as_str())).collect();
        assert_eq!(headers, [("x-tenant", "blue", ""), ("authorization", "", "OTEL_TOKEN")]);
        let grpc =
            super::collector(&provider("{name: g, opentelemetry: {service: otel.o.svc.cluster.local, port: 4317}}"));
        let grpc = grpc.unwrap();
        assert!(grpc.headers.is_empty() && grpc.timeout_ms == 0);
        let grpc = super::collector(&provider(
            "{name: g, opentelemetry: {service: otel.o.svc.cluster.local, port: 4317, \
             grpc: {timeout: 250ms, initialMetadata: [{name: x-tenant, value: blue}]}}}",
        ))
        .unwrap();
        assert_eq!(
            (grpc.timeout_ms, grpc.headers[0].name.as_str(), grpc.headers[0].value.as_str()),
            (250, "x-tenant", "blue")
        );
    }

    #[test]
    fn access_logs_and_metric_overrides_per_workload_and_per_service() {
        let pod = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: default, labels: {app: web}}\n\
                   spec: {nodeName: n1, serviceAccountName: web}\nstatus: {podIPs: [{ip: 10.0.0.5}]}\n";
        let mesh =
            telemetry("istio-system", "mesh", "{accessLogging: [{filter: {expression: 'response.code >= 400'}}]}");
        let ns = telemetry(
            "default",
            "ns",
            "{metrics: [{overrides: [{match: {metric: REQUEST_COUNT, mode: SERVER}, tagOverrides: {request_protocol: {operation: REMOVE}}}]}]}",
        );
        let web = telemetry(
            "default",
            "web",
            "{selector: {matchLabels: {app: web}}, accessLogging: [{disabled: true, match: {mode: CLIENT}}], metrics: [{overrides: [{disabled: true}, {match: {customMetric: my_metric}, disabled: false}]}]}",
        );
        let api = telemetry(
            "default",
            "api",
            "{targetRefs: [{kind: Service, group: '', name: api}], accessLogging: [{disabled: true}]}",
        );
        let model = from_yaml(&format!("{}{pod}{mesh}{ns}{web}{api}", *BASE));
        let show = |p: Option<mesh_common::api::TelemetryPolicy>| -> Vec<String> {
            let Some(p) = p else { return vec![] };
            let logs = p
                .access_logs
                .iter()
                .map(|r| format!("log mode={} disabled={} filter={:?}", r.mode, r.disabled, r.filter));
            let metrics = p.metric_overrides.iter().map(|o| {
                format!("metric {} mode={} disabled={:?} removed={:?}", o.metric, o.mode, o.disabled, o.removed_tags)
            });
            logs.chain(metrics).collect()
        };
        // The pod: the mesh's, the namespace's, then its selector's (the
        // custom metric's override is left out: mesh has none).
        let w = &model.workloads["Pod/default/web-1"];
        assert_eq!(
            show(model.telemetry_for(w)),
            [
                "log mode=0 disabled=false filter=\"response.code >= 400\"",
                "log mode=1 disabled=true filter=\"\"",
                "metric REQUEST_COUNT mode=2 disabled=None removed=[\"request_protocol\"]",
                "metric ALL_METRICS mode=0 disabled=Some(true) removed=[]",
            ]
        );
        // The waypoint's pod is not selected by `app: web`: mesh and namespace only.
        let wp = &model.workloads["Pod/default/wp-1"];
        assert_eq!(show(model.telemetry_for(wp)).len(), 2);
        // Services at the waypoint: `api` also gets its targeting Telemetry;
        // a service without a waypoint gets nothing.
        let get = |k: &str| show(model.services[k].telemetry.clone());
        assert_eq!(get("default/web").len(), 2);
        assert_eq!(
            get("default/api"),
            [
                "log mode=0 disabled=false filter=\"response.code >= 400\"",
                "log mode=0 disabled=true filter=\"\"",
                "metric REQUEST_COUNT mode=2 disabled=None removed=[\"request_protocol\"]",
            ]
        );
        assert!(get("other/db").is_empty());
    }

    #[test]
    fn default_provider_and_undefined_provider() {
        let with_default = BASE.replace(
            "    extensionProviders:",
            "    defaultProviders: {tracing: [otel-grpc]}\n    extensionProviders:",
        );
        let model = from_yaml(&with_default);
        let web = model.services["default/web"].tracing.clone().expect("the default provider traces waypoints");
        let c = web.collector.unwrap();
        assert_eq!((c.name.as_str(), c.protocol, c.path.as_str()), ("otel-grpc", 2, ""));
        assert_eq!(web.sampling_percentage, super::DEFAULT_SAMPLING_PERCENTAGE);

        // A provider not (yet) defined: no tracing until it is.
        let missing = telemetry("default", "ns", "{tracing: [{providers: [{name: jaeger}]}]}");
        let t = traced(&missing);
        assert!(t.iter().all(|(_, t)| t.is_none()));
    }
}
