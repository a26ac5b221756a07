//! What is accepted but not (yet) acted on, and references to what is not
//! (yet) defined. Valid Istio and Gateway API YAML is never rejected: where
//! mesh does not enforce an object or a field, or an object names a service,
//! subset or waypoint that does not exist, it says so with the object's file
//! and line, the field, and what happens instead (as `istioctl analyze`
//! does). The controller logs these and serves them in `/healthz/ready`;
//! `mesh-ctl check` prints them as warnings (exit 0).
use crate::{
    Kind, Problem, Resource,
    objects::{
        Labels,
        mesh_config::{ConfigMap, MESH_CONFIG_KEY, MESH_CONFIG_MAP},
        routing::{BackendRef, HttpRouteFilter, ParentRef, TrafficPolicy, VirtualService},
    },
    store::{ConfigStore, ObjectKey},
    validate::WAYPOINT_CLASS,
};

/// The labels that bind a Service (or a Namespace's services) to a waypoint.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// The label Kubernetes puts on a Gateway's pods, naming the Gateway.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// A DestinationRule annotation beyond Istio's API: `peak-ewma` makes its
/// LEAST_REQUEST balancers (the default) weigh latency too, as linkerd2-proxy's do.
pub const LOAD_BALANCER_ANNOTATION: &str = "mesh.io/load-balancer";
pub const PEAK_EWMA: &str = "peak-ewma";

const LATER: &str = "accepted, not enforced yet (it comes with the waypoint's L7 resilience and security)";

/// Where a service reference resolves: `namespace/name` from an Istio host
/// (`reviews`, `reviews.shop`, `reviews.shop.svc.cluster.local`), else a
/// ServiceEntry host among `known` (`namespace/name` with its hosts), else
/// the short form (which then names nothing).
pub fn resolve_host<'a>(host: &str, from_ns: &str, known: impl Iterator<Item = (&'a str, &'a [String])>) -> String {
    let parts: Vec<&str> = host.split('.').collect();
    let short = match parts.as_slice() {
        [name] => Some(format!("{from_ns}/{name}")),
        [name, ns] | [name, ns, "svc", ..] => Some(format!("{ns}/{name}")),
        _ => None,
    };
    let known: Vec<(&str, &[String])> = known.collect();
    if let Some(key) = &short
        && known.iter().any(|(k, _)| k == key)
    {
        return key.clone();
    }
    known
        .iter()
        .find(|(_, hosts)| hosts.iter().any(|h| h == host))
        .map(|(k, _)| (*k).to_owned())
        .or(short)
        .unwrap_or_else(|| host.to_owned())
}

/// What of `resource` is not enforced, by field (`None`: the whole object).
pub fn not_enforced(resource: &Resource) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    match resource {
        // The waypoint itself is enforced; how its pods are made is the operator's.
        Resource::Gateway(g) if g.spec.gateway_class_name == WAYPOINT_CLASS && g.spec.infrastructure.is_some() => {
            out.push((Some("spec.infrastructure".into()), "ignored: the operator runs the waypoint's pods".into()));
        }
        Resource::Gateway(g) if g.spec.gateway_class_name == WAYPOINT_CLASS => {}
        Resource::EndpointSlice(slice) if slice.service().is_none() => out.push((
            Some(format!("metadata.labels[{}]", crate::objects::endpoint_slice::SERVICE_NAME_LABEL)),
            "missing: the slice belongs to no Service and is not used".into(),
        )),
        Resource::EndpointSlice(slice) if !slice.routable() => out.push((
            Some("addressType".into()),
            "FQDN endpoints are not used: mesh routes a Service to IP addresses (as Istio's ambient mode)".into(),
        )),
        Resource::Gateway(g) => out.push((
            None,
            format!(
                "accepted and ignored: gatewayClassName {:?} is another controller's (mesh runs only {WAYPOINT_CLASS:?})",
                g.spec.gateway_class_name
            ),
        )),
        Resource::VirtualService(vs) => virtual_service(vs, &mut out),
        Resource::HttpRoute(_) | Resource::GrpcRoute(_) => {
            if let Some(parts) = RouteParts::of(resource) {
                route(&parts, &mut out);
            }
        }
        Resource::DestinationRule(dr) => {
            if let Some(v) = dr.metadata.annotations.get(LOAD_BALANCER_ANNOTATION)
                && v != PEAK_EWMA
            {
                out.push((
                    Some(format!("metadata.annotations.{LOAD_BALANCER_ANNOTATION}")),
                    format!("{v:?}: mesh knows {PEAK_EWMA:?} only; ignored (loadBalancer decides)"),
                ));
            }
            if let Some(tp) = &dr.spec.traffic_policy {
                traffic_policy(tp, "spec.trafficPolicy", &mut out);
            }
            for (i, s) in dr.spec.subsets.iter().enumerate() {
                if let Some(tp) = &s.traffic_policy {
                    traffic_policy(tp, &format!("spec.subsets[{i}].trafficPolicy"), &mut out);
                }
            }
        }
        Resource::AuthorizationPolicy(ap) => {
            let spec = &ap.spec;
            let targeted = spec.target_ref.is_some() || !spec.target_refs.is_empty();
            if spec.action.as_deref() == Some("CUSTOM") && !targeted {
                out.push((
                    Some("spec.action".into()),
                    "CUSTOM: node proxies (L4) do not call external authorizers (nor does Istio's ztunnel), so \
                     connections to the workloads it selects are not checked by it; a waypoint whose pods it selects \
                     calls it (bind with targetRefs to check requests to a service at its waypoint)"
                        .into(),
                ));
            }
            for (i, t) in spec.target_ref.iter().chain(&spec.target_refs).enumerate() {
                if !matches!(t.kind.as_str(), "Gateway" | "Service" | "ServiceEntry" | "GatewayClass") {
                    let field = if spec.target_ref.is_some() { "spec.targetRef".to_owned() } else { format!("spec.targetRefs[{i}]") };
                    out.push((Some(format!("{field}.kind")), format!("{:?}: mesh binds policies to Gateways, Services and ServiceEntries only; this reference applies nowhere", t.kind)));
                }
            }
            if !targeted && spec.action.as_deref() != Some("CUSTOM") {
                let what = if spec.action.as_deref() == Some("DENY") {
                    "the node proxy (L4) cannot read it, so this DENY rule denies whatever it says"
                } else {
                    "the node proxy (L4) cannot read it, so this rule never matches there"
                };
                for field in l7_fields(spec) {
                    out.push((Some(field), format!("is an L7 (HTTP) attribute: {what}; a waypoint whose pods the policy selects enforces it fully (bind with targetRefs to enforce it at a service's waypoint)")));
                }
            }
            for (r, rule) in spec.rules.iter().flatten().enumerate() {
                for (w, c) in rule.when.iter().enumerate() {
                    if crate::validate::unevaluated_condition_key(&c.key) {
                        let what = if spec.action.as_deref() == Some("DENY") {
                            "a DENY rule with it denies without it"
                        } else {
                            "a rule with it never matches"
                        };
                        out.push((
                            Some(format!("spec.rules[{r}].when[{w}].key")),
                            format!("{:?} is not evaluated by mesh: {what}", c.key),
                        ));
                    }
                }
            }
        }
        Resource::RequestAuthentication(ra) => {
            let spec = &ra.spec;
            for (i, t) in spec.target_ref.iter().chain(&spec.target_refs).enumerate() {
                if !matches!(t.kind.as_str(), "Gateway" | "Service" | "GatewayClass") {
                    let field = if spec.target_ref.is_some() { "spec.targetRef".to_owned() } else { format!("spec.targetRefs[{i}]") };
                    out.push((Some(format!("{field}.kind")), format!("{:?}: mesh applies RequestAuthentication at waypoints, through Gateways and Services only; this reference applies nowhere", t.kind)));
                }
            }
            if spec.target_ref.is_none() && spec.target_refs.is_empty() {
                out.push((
                    Some("spec.selector".into()),
                    "JWTs are checked by waypoints only: this policy applies to the services of the waypoints whose \
                     pods it selects; node proxies (L4) do not read tokens"
                        .into(),
                ));
            }
        }
        Resource::Telemetry(t) => telemetry(&t.spec, &mut out),
        Resource::HttpLocalRateLimitPolicy(r) => {
            let t = &r.spec.target_ref;
            if t.kind != "Service" || t.group.as_deref().is_some_and(|g| !g.is_empty() && g != "core") {
                out.push((
                    Some("spec.targetRef".into()),
                    format!("{:?}: mesh enforces local rate limits on Services (at their waypoint); this one applies nowhere", t.kind),
                ));
            }
        }
        Resource::Opaque(o) => {
            out.push((None, format!("accepted, not enforced: mesh does not implement {} yet, so it has no effect", o.kind.name())))
        }
        Resource::ConfigMap(cm) => mesh_config(cm, &mut out),
        _ => {}
    }
    out
}

/// What of Istio's `MeshConfig` mesh does not read: every field but
/// `extensionProviders`, the providers other than external authorizers,
/// and request bodies sent for checks.
fn mesh_config(cm: &ConfigMap, out: &mut Vec<(Option<String>, String)>) {
    let Some(Ok(config)) = cm.mesh_config() else { return };
    let at = format!("data.{MESH_CONFIG_KEY}");
    for key in config.other.keys() {
        out.push((
            Some(format!("{at}.{key}")),
            "not read by mesh (of MeshConfig it reads extensionProviders only): no effect".into(),
        ));
    }
    for (i, p) in config.extension_providers.iter().enumerate() {
        let at = format!("{at}.extensionProviders[{i}]");
        let body = [
            ("envoyExtAuthzHttp", p.envoy_ext_authz_http.as_ref().map(|h| &h.include_request_body_in_check)),
            ("envoyExtAuthzGrpc", p.envoy_ext_authz_grpc.as_ref().map(|g| &g.include_request_body_in_check)),
        ];
        for (kind, b) in body {
            if b.is_some_and(Option::is_some) {
                out.push((
                    Some(format!("{at}.{kind}.includeRequestBodyInCheck")),
                    "not enforced yet: the check request carries the request's headers, not its body".into(),
                ));
            }
        }
        for kind in p.kinds() {
            if !matches!(kind, "envoyExtAuthzHttp" | "envoyExtAuthzGrpc" | "zipkin" | "opentelemetry") {
                out.push((
                    Some(format!("{at}.{kind}")),
                    "not read by mesh: its waypoints export spans to zipkin and opentelemetry providers only, \
                     and its metrics and access logs are not sent to providers: no effect"
                        .into(),
                ));
            }
        }
        for (kind, t) in [("zipkin", &p.zipkin), ("opentelemetry", &p.opentelemetry)] {
            for key in t.iter().flat_map(|t| t.other.keys()) {
                out.push((Some(format!("{at}.{kind}.{key}")), "not read by mesh: no effect".into()));
            }
        }
    }
}

/// What of a Telemetry mesh does not honour: tracing happens at waypoints
/// (node proxies stay L4 and make no spans), with the first tracing entry
/// and its first provider, as Istio's proxies do; access lines go to the
/// proxies' own log; metrics are Istio's standard ones, for Prometheus.
fn telemetry(spec: &crate::objects::telemetry::TelemetrySpec, out: &mut Vec<(Option<String>, String)>) {
    if spec.selector.is_some() && !spec.tracing.is_empty() {
        out.push((
            Some("spec.selector".into()),
            "tracing happens at waypoints: this Telemetry's tracing applies to the services of the waypoints whose \
             pods it selects"
                .into(),
        ));
    }
    for (i, t) in spec.target_ref.iter().chain(&spec.target_refs).enumerate() {
        if !matches!(t.kind.as_str(), "Gateway" | "Service" | "GatewayClass") {
            let field =
                if spec.target_ref.is_some() { "spec.targetRef".to_owned() } else { format!("spec.targetRefs[{i}]") };
            out.push((
                Some(format!("{field}.kind")),
                format!("{:?}: mesh applies Telemetry at waypoints, through Gateways and Services only; this reference applies nowhere", t.kind),
            ));
        }
    }
    if spec.tracing.len() > 1 {
        out.push((Some("spec.tracing".into()), "multiple tracing is not supported: the first entry applies".into()));
    }
    if let Some(t) = spec.tracing.first() {
        if t.providers.len() > 1 {
            out.push((
                Some("spec.tracing[0].providers".into()),
                "multiple providers are not supported: the first applies".into(),
            ));
        }
        if t.match_.as_ref().and_then(|m| m.mode.as_deref()).is_some_and(|m| m != "CLIENT_AND_SERVER") {
            out.push((
                Some("spec.tracing[0].match.mode".into()),
                "a waypoint is both server and client of each request: it reports both spans".into(),
            ));
        }
        if t.use_request_id_for_trace_sampling.is_some() {
            out.push((
                Some("spec.tracing[0].useRequestIdForTraceSampling".into()),
                "not read by mesh: sampling draws from the trace id".into(),
            ));
        }
    }
    for (i, l) in spec.access_logging.iter().enumerate() {
        for (j, p) in l.providers.iter().enumerate().filter(|(_, p)| p.name != "envoy") {
            out.push((
                Some(format!("spec.accessLogging[{i}].providers[{j}]")),
                format!("{:?}: access lines go to the proxies' own JSON log whatever the provider; its sink and format are not used", p.name),
            ));
        }
    }
    for (i, m) in spec.metrics.iter().enumerate() {
        let at = format!("spec.metrics[{i}]");
        for (j, p) in m.providers.iter().enumerate().filter(|(_, p)| p.name != "prometheus") {
            out.push((
                Some(format!("{at}.providers[{j}]")),
                format!("{:?}: metrics are exposed for Prometheus (port 15020) only", p.name),
            ));
        }
        if m.reporting_interval.is_some() {
            out.push((
                Some(format!("{at}.reportingInterval")),
                "not read: Prometheus scrapes at its own interval".into(),
            ));
        }
        for (j, o) in m.overrides.iter().enumerate() {
            let at = format!("{at}.overrides[{j}]");
            if o.match_.as_ref().is_some_and(|s| s.custom_metric.is_some()) {
                out.push((
                    Some(format!("{at}.match.customMetric")),
                    "mesh reports Istio's standard metrics only: this override applies to none".into(),
                ));
            }
            for (tag, t) in &o.tag_overrides {
                if t.operation.as_deref().unwrap_or("UPSERT") == "UPSERT"
                    && !crate::objects::telemetry::STANDARD_TAGS.contains(&tag.as_str())
                {
                    out.push((
                        Some(format!("{at}.tagOverrides[{tag}]")),
                        "not applied yet: mesh can set Istio's standard tags, not add new ones".into(),
                    ));
                }
            }
        }
    }
}

/// The HTTP attributes a policy's rules name, with their fields.
fn l7_fields(spec: &crate::objects::AuthorizationPolicySpec) -> Vec<String> {
    let mut out = Vec::new();
    for (r, rule) in spec.rules.iter().flatten().enumerate() {
        for (f, from) in rule.from.iter().enumerate() {
            let s = &from.source;
            for (name, v) in [
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ] {
                if !v.is_empty() {
                    out.push(format!("spec.rules[{r}].from[{f}].source.{name}"));
                }
            }
        }
        for (t, to) in rule.to.iter().enumerate() {
            let o = &to.operation;
            for (name, v) in [
                ("hosts", &o.hosts),
                ("notHosts", &o.not_hosts),
                ("methods", &o.methods),
                ("notMethods", &o.not_methods),
                ("paths", &o.paths),
                ("notPaths", &o.not_paths),
            ] {
                if !v.is_empty() {
                    out.push(format!("spec.rules[{r}].to[{t}].operation.{name}"));
                }
            }
        }
        for (w, c) in rule.when.iter().enumerate() {
            if !mesh_common::authz::L4_CONDITION_KEYS.contains(&c.key.as_str())
                && !crate::validate::unevaluated_condition_key(&c.key)
            {
                out.push(format!("spec.rules[{r}].when[{w}].key"));
            }
        }
    }
    out
}

/// What of a TrafficPolicy the waypoint does not enforce yet (its
/// connectionPool it does, but for the fields named here).
fn traffic_policy(tp: &TrafficPolicy, at: &str, out: &mut Vec<(Option<String>, String)>) {
    let later =
        |field: &str, out: &mut Vec<(Option<String>, String)>| out.push((Some(format!("{at}.{field}")), LATER.into()));
    let lbs = std::iter::once((at.to_owned(), tp.load_balancer.as_ref())).chain(
        tp.port_level_settings
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("{at}.portLevelSettings[{i}]"), p.load_balancer.as_ref())),
    );
    for (base, lb) in lbs {
        let Some(lb) = lb else { continue };
        if lb.simple.as_deref() == Some("PASSTHROUGH") {
            out.push((
                Some(format!("{base}.loadBalancer.simple")),
                "PASSTHROUGH is not enforced: a waypoint's requests are for a service, so its endpoints are balanced by LEAST_REQUEST".into(),
            ));
        }
        let locality = lb.locality_lb_setting.as_ref().filter(|l| l.enabled != Some(false));
        let outliers =
            tp.outlier_detection.is_some() || tp.port_level_settings.iter().any(|p| p.outlier_detection.is_some());
        if locality.is_some_and(|l| l.distribute.is_empty()) && !outliers {
            out.push((
                Some(format!("{base}.loadBalancer.localityLbSetting")),
                "locality failover needs outlierDetection in force for the same traffic (as in Istio): without it, \
                 requests are balanced across localities"
                    .into(),
            ));
        }
        let warmup = if lb.warmup.is_some() { "warmup" } else { "warmupDurationSecs" };
        if (lb.warmup.is_some() || lb.warmup_duration_secs.is_some()) && lb.consistent_hash.is_some() {
            out.push((
                Some(format!("{base}.loadBalancer.{warmup}")),
                "slow start applies to ROUND_ROBIN and LEAST_REQUEST only (as in Envoy): ignored with consistentHash"
                    .into(),
            ));
        }
        if lb.warmup.as_ref().and_then(|w| w.aggression).is_some_and(|a| a.is_nan() || a <= 0.0) {
            out.push((
                Some(format!("{base}.loadBalancer.warmup.aggression")),
                "must be above 0: 1.0 (a linear ramp) is used instead, as Envoy does".into(),
            ));
        }
        if lb.consistent_hash.as_ref().and_then(|c| c.http_cookie.as_ref()).is_some_and(|c| c.attributes.is_some()) {
            out.push((Some(format!("{base}.loadBalancer.consistentHash.httpCookie.attributes")), LATER.into()));
        }
    }
    for (name, set) in [
        ("tunnel", tp.tunnel.is_some()),
        ("proxyProtocol", tp.proxy_protocol.is_some()),
        ("retryBudget", tp.retry_budget.is_some()),
    ] {
        if set {
            later(name, out);
        }
    }
    if tp.tls.is_some() {
        out.push((
            Some(format!("{at}.tls")),
            "ignored: mesh traffic is always mutual TLS (HBONE) between proxies".into(),
        ));
    }
    let pools = std::iter::once((at.to_owned(), tp.connection_pool.as_ref())).chain(
        tp.port_level_settings
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("{at}.portLevelSettings[{i}]"), p.connection_pool.as_ref())),
    );
    for (base, pool) in pools {
        let Some(pool) = pool else { continue };
        if let Some(tcp) = &pool.tcp {
            for (name, set) in [
                ("tcpKeepalive", tcp.tcp_keepalive.is_some()),
                ("maxConnectionDuration", tcp.max_connection_duration.is_some()),
                ("idleTimeout", tcp.idle_timeout.is_some()),
            ] {
                if set {
                    out.push((Some(format!("{base}.connectionPool.tcp.{name}")), LATER.into()));
                }
            }
        }
        if let Some(http) = &pool.http {
            for (name, set) in [
                ("h2UpgradePolicy", http.h2_upgrade_policy.is_some()),
                ("useClientProtocol", http.use_client_protocol.is_some()),
                ("maxConcurrentStreams", http.max_concurrent_streams.is_some()),
            ] {
                if set {
                    out.push((Some(format!("{base}.connectionPool.http.{name}")), LATER.into()));
                }
            }
        }
    }
}

fn virtual_service(vs: &VirtualService, out: &mut Vec<(Option<String>, String)>) {
    if !vs.spec.gateways.is_empty() && !vs.spec.gateways.iter().any(|g| g == "mesh") {
        out.push((
            Some("spec.gateways".into()),
            "accepted and ignored: it binds ingress gateways only, which mesh does not run (add \"mesh\" for its services' waypoints)".into(),
        ));
    }
    for (field, set) in [("spec.tcp", vs.spec.tcp.is_some()), ("spec.tls", vs.spec.tls.is_some())] {
        if set {
            out.push((
                Some(field.into()),
                "not enforced yet: the service's connections go to its endpoints, balanced".into(),
            ));
        }
    }
    for (i, r) in vs.spec.http.iter().enumerate() {
        let at = format!("spec.http[{i}]");
        for (name, set) in [
            ("corsPolicy", r.cors_policy.is_some()),
            ("directResponse", r.direct_response.is_some()),
            ("delegate", r.delegate.is_some()),
        ] {
            if set {
                out.push((Some(format!("{at}.{name}")), LATER.into()));
            }
        }
        for (j, m) in r.matches.iter().enumerate() {
            let mat = format!("{at}.match[{j}]");
            for (name, set) in [
                ("sourceLabels", !m.source_labels.is_empty()),
                ("sourceNamespace", m.source_namespace.is_some()),
                ("gateways", !m.gateways.is_empty()),
                ("scheme", m.scheme.is_some()),
                ("ignoreUriCase", m.ignore_uri_case == Some(true)),
            ] {
                if set {
                    out.push((
                        Some(format!("{mat}.{name}")),
                        "not enforced yet: this condition is ignored, so the match is wider".into(),
                    ));
                }
            }
        }
    }
}

/// A route's parents, and per rule its session persistence and filters
/// (HTTPRoute and GRPCRoute alike).
struct RouteParts<'a> {
    namespace: &'a str,
    parents: &'a [ParentRef],
    rules: Vec<(bool, &'a [HttpRouteFilter], &'a [BackendRef])>,
}

impl<'a> RouteParts<'a> {
    fn of(resource: &'a Resource) -> Option<RouteParts<'a>> {
        match resource {
            Resource::HttpRoute(r) => Some(RouteParts {
                namespace: r.metadata.namespace(),
                parents: &r.spec.parent_refs,
                rules: r
                    .spec
                    .rules
                    .iter()
                    .map(|x| (x.session_persistence.is_some(), &x.filters[..], &x.backend_refs[..]))
                    .collect(),
            }),
            Resource::GrpcRoute(r) => Some(RouteParts {
                namespace: r.metadata.namespace(),
                parents: &r.spec.parent_refs,
                rules: r
                    .spec
                    .rules
                    .iter()
                    .map(|x| (x.session_persistence.is_some(), &x.filters[..], &x.backend_refs[..]))
                    .collect(),
            }),
            _ => None,
        }
    }
}

fn route(parts: &RouteParts<'_>, out: &mut Vec<(Option<String>, String)>) {
    for (i, p) in parts.parents.iter().enumerate() {
        if p.kind.as_deref() != Some("Service") {
            out.push((
                Some(format!("spec.parentRefs[{i}]")),
                "accepted and ignored: a Gateway parent is an ingress route; mesh routes Service parents (GAMMA) at waypoints".into(),
            ));
        }
    }
    for (i, (session_persistence, filters, _)) in parts.rules.iter().enumerate() {
        if *session_persistence {
            out.push((Some(format!("spec.rules[{i}].sessionPersistence")), LATER.into()));
        }
        for (j, f) in filters.iter().enumerate() {
            if matches!(f.type_.as_str(), "ExtensionRef" | "CORS") {
                out.push((
                    Some(format!("spec.rules[{i}].filters[{j}]")),
                    format!("filter {} is not enforced yet", f.type_),
                ));
            }
        }
    }
}

impl ConfigStore {
    /// Every warning of the objects in force, at their files and lines, and
    /// the objects of kinds mesh does not read.
    pub fn warnings(&self) -> Vec<Problem> {
        let mut all: Vec<Problem> = self.objects().keys().flat_map(|key| self.warnings_of(key)).collect();
        all.extend(self.not_read().iter().cloned());
        all
    }

    /// The warnings of one object in force: what of it is not enforced, and
    /// what it names that is not defined.
    pub fn warnings_of(&self, key: &ObjectKey) -> Vec<Problem> {
        let Some(stored) = self.objects().get(key) else { return Vec::new() };
        let problem = |(field, message): (Option<String>, String)| Problem {
            file: stored.origin.file.clone(),
            line: stored.origin.line,
            object: Some(key.to_string()),
            field,
            message,
        };
        let mut all = not_enforced(&stored.resource);
        all.extend(self.undefined_references(&stored.resource));
        all.into_iter().map(problem).collect()
    }

    /// Services (and ServiceEntries) by `namespace/name`, with their hosts.
    fn services(&self) -> Vec<(String, Vec<String>)> {
        self.objects()
            .values()
            .filter_map(|s| match s.resource.as_ref() {
                Resource::Service(svc) => {
                    let ns = svc.metadata.namespace();
                    Some((format!("{ns}/{}", svc.metadata.name), Vec::new()))
                }
                Resource::ServiceEntry(se) => {
                    Some((format!("{}/{}", se.metadata.namespace(), se.metadata.name), se.spec.hosts.clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn has(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.objects().contains_key(&ObjectKey { kind, namespace: namespace.into(), name: name.into() })
    }

    /// What `resource` names that is not defined (yet): Istio's admission
    /// accepts these and `istioctl analyze` warns; each takes effect when
    /// what it names appears.
    fn undefined_references(&self, resource: &Resource) -> Vec<(Option<String>, String)> {
        let mut out = Vec::new();
        // Listed only for the kinds that name services: most objects are
        // Pods and Services, and a first load asks for each one's warnings.
        let services = std::cell::OnceCell::new();
        let services = || services.get_or_init(|| self.services());
        let known = || services().iter().map(|(k, h)| (k.as_str(), h.as_slice()));
        let service_missing = |key: &str| !services().iter().any(|(k, _)| k == key);
        match resource {
            Resource::VirtualService(vs) => {
                let ns = vs.metadata.namespace();
                for (i, r) in vs.spec.http.iter().enumerate() {
                    for (j, d) in r.route.iter().enumerate() {
                        let field = format!("spec.http[{i}].route[{j}].destination");
                        let key = resolve_host(&d.destination.host, ns, known());
                        if service_missing(&key) {
                            out.push((
                                Some(field),
                                format!(
                                    "host {:?} is not a Service or ServiceEntry (yet): requests routed to it get 503 (NR) until it is defined",
                                    d.destination.host
                                ),
                            ));
                        } else if let Some(subset) = &d.destination.subset
                            && !self.subset_defined(&key, subset, known())
                        {
                            out.push((
                                Some(format!("{field}.subset")),
                                format!("subset {subset:?} of {key} is in no DestinationRule (yet): requests routed to it get 503 (NR) until it is"),
                            ));
                        }
                    }
                }
            }
            Resource::HttpRoute(_) | Resource::GrpcRoute(_) => {
                let Some(parts) = RouteParts::of(resource) else { return out };
                let ns = parts.namespace;
                for (i, (_, _, backends)) in parts.rules.iter().enumerate() {
                    for (j, b) in backends.iter().enumerate() {
                        let key = format!("{}/{}", b.namespace.as_deref().unwrap_or(ns), b.name);
                        if b.kind.as_deref().unwrap_or("Service") == "Service" && service_missing(&key) {
                            out.push((
                                Some(format!("spec.rules[{i}].backendRefs[{j}]")),
                                format!(
                                    "Service {key} is not defined (yet): requests routed to it get 503 (NR) until it is"
                                ),
                            ));
                        }
                    }
                }
                for (i, p) in parts.parents.iter().enumerate() {
                    let key = format!("{}/{}", p.namespace.as_deref().unwrap_or(ns), p.name);
                    if p.kind.as_deref() == Some("Service") && service_missing(&key) {
                        out.push((
                            Some(format!("spec.parentRefs[{i}]")),
                            format!("Service {key} is not defined (yet): the route applies when it is"),
                        ));
                    }
                }
            }
            Resource::AuthorizationPolicy(ap) if ap.spec.action.as_deref() == Some("CUSTOM") => {
                let Some(name) = ap.spec.provider.as_ref().map(|p| p.name.as_str()) else { return out };
                if !self.authorizer_defined(name) {
                    out.push((
                        Some("spec.provider.name".into()),
                        format!(
                            "{name:?} is not an external authorizer (envoyExtAuthzHttp or envoyExtAuthzGrpc) of \
                             MeshConfig.extensionProviders (ConfigMap {MESH_CONFIG_MAP}, key {MESH_CONFIG_KEY}) (yet): \
                             requests its rules match are denied (403) until it is, as Istio does"
                        ),
                    ));
                }
            }
            Resource::Service(svc) => self.waypoint_reference(svc.metadata.namespace(), &svc.metadata.labels, &mut out),
            Resource::Namespace(ns) => self.waypoint_reference(&ns.metadata.name, &ns.metadata.labels, &mut out),
            Resource::Gateway(g) if g.spec.gateway_class_name == WAYPOINT_CLASS => {
                let ns = g.metadata.namespace();
                let runs = self.objects().values().any(|s| match s.resource.as_ref() {
                    Resource::Pod(p) => {
                        p.metadata.namespace() == ns
                            && p.metadata.labels.get(GATEWAY_NAME_LABEL) == Some(&g.metadata.name)
                    }
                    _ => false,
                });
                if !runs {
                    out.push((
                        None,
                        format!(
                            "no Pod labelled {GATEWAY_NAME_LABEL}: {} runs this waypoint (yet): connections to the services bound to it are refused until one does",
                            g.metadata.name
                        ),
                    ));
                }
            }
            _ => {}
        }
        out
    }

    /// Whether a MeshConfig in force names external authorizer `name`.
    fn authorizer_defined(&self, name: &str) -> bool {
        self.objects().values().any(|s| match s.resource.as_ref() {
            Resource::ConfigMap(cm) => cm.mesh_config().and_then(Result::ok).is_some_and(|c| {
                c.extension_providers
                    .iter()
                    .any(|p| p.name == name && (p.envoy_ext_authz_http.is_some() || p.envoy_ext_authz_grpc.is_some()))
            }),
            _ => false,
        })
    }

    fn subset_defined<'a>(
        &self,
        key: &str,
        subset: &str,
        known: impl Iterator<Item = (&'a str, &'a [String])> + Clone,
    ) -> bool {
        self.objects().values().any(|s| match s.resource.as_ref() {
            Resource::DestinationRule(dr) => {
                resolve_host(&dr.spec.host, dr.metadata.namespace(), known.clone()) == key
                    && dr.spec.subsets.iter().any(|s| s.name == subset)
            }
            _ => false,
        })
    }

    fn waypoint_reference(&self, namespace: &str, labels: &Labels, out: &mut Vec<(Option<String>, String)>) {
        let Some(name) = labels.get(USE_WAYPOINT).filter(|n| *n != "none") else { return };
        let ns = labels.get(USE_WAYPOINT_NAMESPACE).map_or(namespace, String::as_str);
        if !self.has(Kind::Gateway, ns, name) {
            out.push((
                Some(format!("metadata.labels[{USE_WAYPOINT}]")),
                format!("waypoint {ns}/{name} is not defined (yet): connections to these services are refused until it is (never sent around it)"),
            ));
        }
    }
}
