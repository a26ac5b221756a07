//! Waypoints and HTTP routing, as the waypoints see them: which Gateways are
//! waypoints and which workloads run them; which services are bound to one
//! (`istio.io/use-waypoint` on the Service, else on its Namespace); and each
//! service's routes, compiled from Gateway API HTTPRoutes (GAMMA, ordered by
//! the specification's precedence) then Istio VirtualServices (first match
//! wins), with DestinationRule subsets resolved to labels. Pure.
use std::collections::BTreeMap;

use mesh_common::{api, parse_duration};

use crate::config::{
    ConfigStore, LOAD_BALANCER_ANNOTATION, PEAK_EWMA, Resource, WAYPOINT_CLASS, WAYPOINT_FOR_LABEL,
    objects::{
        Labels,
        routing::{
            BackendRef, ConnectionPool, DestinationRule, GRPC_CODES, GrpcRoute, GrpcRouteMatch, HeaderModifier,
            HttpRoute, HttpRouteFilter, HttpRouteMatch, LoadBalancer, NamedTypedMatch, OutlierDetection, PathModifier,
            StringMatch, TrafficPolicy, VirtualService, VsDelay, VsDestination, VsFault, VsHeaderOps, VsHttpRoute,
            VsMatch,
        },
    },
};
pub use crate::config::{GATEWAY_NAME_LABEL, USE_WAYPOINT, USE_WAYPOINT_NAMESPACE};

/// A waypoint Gateway.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    /// `service` (the default), `workload`, `all` or `none`.
    pub for_traffic: String,
}

impl Waypoint {
    /// Whether it takes traffic addressed to services.
    pub fn for_services(&self) -> bool {
        matches!(self.for_traffic.as_str(), "service" | "all")
    }
}

/// The waypoint Gateways, by `namespace/name`.
pub fn waypoints(store: &ConfigStore) -> BTreeMap<String, Waypoint> {
    store
        .objects()
        .values()
        .filter_map(|s| match s.resource.as_ref() {
            Resource::Gateway(g) if g.spec.gateway_class_name == WAYPOINT_CLASS => Some(g),
            _ => None,
        })
        .map(|g| {
            let namespace = g.metadata.namespace().to_owned();
            let for_traffic = g.metadata.labels.get(WAYPOINT_FOR_LABEL).cloned().unwrap_or_else(|| "service".into());
            (
                format!("{namespace}/{}", g.metadata.name),
                Waypoint { namespace, name: g.metadata.name.clone(), for_traffic },
            )
        })
        .collect()
}

/// The waypoint (`namespace/name`) a service with `labels` in a namespace
/// with `ns_labels` is bound to: the service's label, else its namespace's;
/// `none` on the service opts it out of its namespace's waypoint.
pub fn binding(service_ns: &str, labels: &Labels, ns_labels: Option<&Labels>) -> Option<String> {
    let from = |l: &Labels| -> Option<Option<String>> {
        let name = l.get(USE_WAYPOINT)?;
        if name == "none" {
            return Some(None);
        }
        let ns = l.get(USE_WAYPOINT_NAMESPACE).map_or(service_ns, String::as_str);
        Some(Some(format!("{ns}/{name}")))
    };
    from(labels).or_else(|| ns_labels.and_then(from)).flatten()
}

/// Istio's protocol of a service port: `appProtocol`, else the name's
/// prefix before `-` (`http-web`, `grpc`); empty when undeclared.
pub fn port_protocol(name: Option<&str>, app_protocol: Option<&str>) -> String {
    let known = |p: &str| -> Option<&'static str> {
        match p.to_ascii_lowercase().as_str() {
            "http" | "http1" => Some("http"),
            "http2" | "kubernetes.io/h2c" | "h2c" => Some("http2"),
            "grpc" | "grpc-web" => Some("grpc"),
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/ws" | "kubernetes.io/wss" => {
                Some("tcp")
            }
            _ => None,
        }
    };
    app_protocol
        .and_then(known)
        .or_else(|| name.and_then(|n| known(n.split('-').next().unwrap_or(n))))
        .unwrap_or("")
        .to_owned()
}

/// Each service's DestinationRule traffic policy (the first DestinationRule
/// for its host), with its subsets', by service `namespace/name`.
pub fn traffic_policies(
    cx: &Context<'_>,
) -> BTreeMap<String, (api::TrafficPolicy, BTreeMap<String, api::TrafficPolicy>)> {
    let mut out = BTreeMap::new();
    for dr in &cx.destination_rules {
        let key = cx.resolve(&dr.spec.host, dr.metadata.namespace());
        if out.contains_key(&key) || !cx.services.contains_key(&key) {
            continue;
        }
        let peak_ewma = dr.metadata.annotations.get(LOAD_BALANCER_ANNOTATION).is_some_and(|v| v == PEAK_EWMA);
        let mut top = dr.spec.traffic_policy.as_deref().map(traffic_policy).unwrap_or_default();
        let mut subsets: BTreeMap<String, api::TrafficPolicy> = dr
            .spec
            .subsets
            .iter()
            .filter_map(|s| Some((s.name.clone(), traffic_policy(s.traffic_policy.as_deref()?))))
            .collect();
        if peak_ewma {
            // Every balancer that is LEAST_REQUEST (Istio's default, so also none set) weighs latency.
            top.load_balancer.get_or_insert_with(Default::default);
            for lb in std::iter::once(&mut top)
                .chain(subsets.values_mut())
                .flat_map(|tp| tp.load_balancer.as_mut().into_iter().chain(tp.port_load_balancers.values_mut()))
            {
                use api::load_balancer::Simple;
                let least = matches!(Simple::try_from(lb.simple), Ok(Simple::Default | Simple::LeastRequest));
                lb.peak_ewma = least && !lb.hashed;
            }
        }
        out.insert(key, (top, subsets));
    }
    out
}

fn traffic_policy(tp: &TrafficPolicy) -> api::TrafficPolicy {
    let port = |p: &crate::config::objects::routing::PortTrafficPolicy| u32::try_from(p.port.as_ref()?.number).ok();
    api::TrafficPolicy {
        connection_pool: tp.connection_pool.as_ref().map(connection_pool),
        port_connection_pools: tp
            .port_level_settings
            .iter()
            .filter_map(|p| Some((port(p)?, connection_pool(p.connection_pool.as_ref()?))))
            .collect(),
        outlier_detection: tp.outlier_detection.as_ref().map(outlier_detection),
        port_outlier_detections: tp
            .port_level_settings
            .iter()
            .filter_map(|p| Some((port(p)?, outlier_detection(p.outlier_detection.as_ref()?))))
            .collect(),
        load_balancer: tp.load_balancer.as_ref().map(load_balancer),
        port_load_balancers: tp
            .port_level_settings
            .iter()
            .filter_map(|p| Some((port(p)?, load_balancer(p.load_balancer.as_ref()?))))
            .collect(),
    }
}

/// Istio's default ring of 1024 entries, and Maglev table of 65537.
fn load_balancer(lb: &LoadBalancer) -> api::LoadBalancer {
    use api::load_balancer::Simple;
    let simple = match lb.simple.as_deref() {
        Some("ROUND_ROBIN") => Simple::RoundRobin,
        Some("RANDOM") => Simple::Random,
        Some("PASSTHROUGH") => Simple::Passthrough,
        Some("LEAST_REQUEST" | "LEAST_CONN") => Simple::LeastRequest,
        _ => Simple::Default,
    };
    let mut out = api::LoadBalancer { simple: simple.into(), ..Default::default() };
    // Envoy's slow start: `warmup` (Istio 1.24) over `warmupDurationSecs`; defaults 10 % and 1.0.
    let warmup = lb.warmup.as_ref().and_then(|w| w.duration.as_ref()).or(lb.warmup_duration_secs.as_ref());
    if lb.consistent_hash.is_none() && warmup.is_some() {
        out.warmup_ms = ms(warmup);
        out.warmup_min_percent = lb.warmup.as_ref().and_then(|w| w.minimum_percent).unwrap_or(10.0);
        out.warmup_aggression = lb.warmup.as_ref().and_then(|w| w.aggression).filter(|a| *a > 0.0).unwrap_or(1.0);
    }
    out.locality = lb.locality_lb_setting.as_ref().filter(|l| l.enabled != Some(false)).map(|l| api::LocalityLb {
        distribute: l
            .distribute
            .iter()
            .map(|d| api::LocalityDistribute { from: d.from.clone(), to: d.to.clone() })
            .collect(),
        failover: l.failover.iter().map(|f| api::LocalityFailover { from: f.from.clone(), to: f.to.clone() }).collect(),
        failover_priority: l.failover_priority.clone(),
    });
    if let Some(ch) = &lb.consistent_hash {
        out.hashed = true;
        out.header = ch.http_header_name.clone().unwrap_or_default().to_ascii_lowercase();
        if let Some(c) = &ch.http_cookie {
            out.cookie = c.name.clone();
            out.cookie_path = c.path.clone().unwrap_or_default();
            out.cookie_ttl_ms = ms(c.ttl.as_ref());
        }
        out.source_ip = ch.use_source_ip.unwrap_or(false);
        out.query_parameter = ch.http_query_parameter_name.clone().unwrap_or_default();
        out.maglev = ch.maglev.is_some();
        let size = if out.maglev {
            ch.maglev.as_ref().and_then(|m| m.table_size).unwrap_or(65537)
        } else {
            ch.ring_hash.as_ref().and_then(|r| r.minimum_ring_size).or(ch.minimum_ring_size).unwrap_or(1024)
        };
        out.table_size = u64::try_from(size).unwrap_or(0);
    }
    out
}

/// With Istio's defaults: 5 consecutive 5xx (or local-origin failures),
/// gateway errors off, every 10 s, 30 s base ejection, at most 10 % ejected.
fn outlier_detection(od: &OutlierDetection) -> api::OutlierDetection {
    let n = |v: Option<i64>, default: u32| v.map_or(default, |v| u32::try_from(v).unwrap_or(0));
    let dur = |d: Option<&String>, default: u64| Some(ms(d)).filter(|m| *m > 0).unwrap_or(default);
    api::OutlierDetection {
        consecutive_5xx: n(od.consecutive_5xx_errors.or(od.consecutive_errors), 5),
        consecutive_gateway: n(od.consecutive_gateway_errors, 0),
        consecutive_local_origin: n(od.consecutive_local_origin_failures, 5),
        split_local_origin: od.split_external_local_origin_errors.unwrap_or(false),
        interval_ms: dur(od.interval.as_ref(), 10_000),
        base_ejection_ms: dur(od.base_ejection_time.as_ref(), 30_000),
        max_ejection_percent: n(od.max_ejection_percent, 10),
        min_health_percent: n(od.min_health_percent, 0),
    }
}

fn connection_pool(p: &ConnectionPool) -> api::ConnectionPool {
    let n = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    let (tcp, http) = (p.tcp.as_ref(), p.http.as_ref());
    api::ConnectionPool {
        max_connections: n(tcp.and_then(|t| t.max_connections)),
        connect_timeout_ms: ms(tcp.and_then(|t| t.connect_timeout.as_ref())),
        max_pending_requests: n(http.and_then(|h| h.http1_max_pending_requests)),
        max_requests: n(http.and_then(|h| h.http2_max_requests)),
        max_requests_per_connection: n(http.and_then(|h| h.max_requests_per_connection)),
        max_retries: n(http.and_then(|h| h.max_retries)),
        idle_timeout_ms: ms(http.and_then(|h| h.idle_timeout.as_ref())),
    }
}

/// What route compilation needs to know of the model.
pub struct Context<'a> {
    /// Every service by `namespace/name`, with its hosts.
    pub services: BTreeMap<&'a String, &'a [String]>,
    pub destination_rules: Vec<&'a DestinationRule>,
}

impl Context<'_> {
    fn resolve(&self, host: &str, from_ns: &str) -> String {
        crate::config::resolve_host(host, from_ns, self.services.iter().map(|(k, v)| (k.as_str(), *v)))
    }

    /// A backend for service `key` (`namespace/name`), subset resolved.
    fn backend(&self, key: &str, port: u32, weight: u32, subset: Option<&str>, from_ns: &str) -> api::WeightedBackend {
        let (namespace, service) = key.split_once('/').unwrap_or((from_ns, key));
        let mut b = api::WeightedBackend {
            namespace: namespace.into(),
            service: service.into(),
            port,
            weight,
            subset: subset.unwrap_or_default().into(),
            ..Default::default()
        };
        if !self.services.contains_key(&key.to_owned()) {
            b.missing = format!("service {key} is not defined");
        } else if let Some(subset) = subset {
            let found = self
                .destination_rules
                .iter()
                .filter(|dr| self.resolve(&dr.spec.host, dr.metadata.namespace()) == key)
                .flat_map(|dr| dr.spec.subsets.iter())
                .find(|s| s.name == subset);
            match found {
                Some(s) => b.subset_labels = s.labels.clone().into_iter().collect(),
                None => b.missing = format!("subset {subset:?} of {key} is not defined in any DestinationRule"),
            }
        }
        b
    }
}

fn ms(d: Option<&String>) -> u64 {
    d.and_then(|d| parse_duration(d).ok()).map_or(0, |d| d.as_millis() as u64)
}

fn value(kind: api::value_match::Kind) -> Option<api::ValueMatch> {
    Some(api::ValueMatch { kind: Some(kind), invert: false })
}

fn string_match(m: &StringMatch) -> Option<api::ValueMatch> {
    use api::value_match::Kind;
    let kind = if let Some(e) = &m.exact {
        Kind::Exact(e.clone())
    } else if let Some(p) = &m.prefix {
        Kind::Prefix(p.clone())
    } else if let Some(r) = &m.regex {
        Kind::Regex(r.clone())
    } else {
        Kind::Present(true) // `{}`: the header is present
    };
    value(kind)
}

fn vs_headers(ops: Option<&VsHeaderOps>) -> Option<api::HeaderOps> {
    let ops = ops?;
    Some(api::HeaderOps {
        set: ops.set.clone().into_iter().collect(),
        add: ops.add.clone().into_iter().collect(),
        remove: ops.remove.clone(),
    })
}

fn vs_match(m: &VsMatch) -> api::HttpMatch {
    fn named(map: &BTreeMap<String, StringMatch>, invert: bool) -> impl Iterator<Item = api::NamedMatch> + '_ {
        map.iter().map(move |(k, v)| {
            let mut value = string_match(v);
            if let Some(v) = &mut value {
                v.invert = invert;
            }
            api::NamedMatch { name: k.to_ascii_lowercase(), value }
        })
    }
    api::HttpMatch {
        path: m.uri.as_ref().and_then(string_match),
        headers: named(&m.headers, false).chain(named(&m.without_headers, true)).collect(),
        query: named(&m.query_params, false).collect(),
        method: m.method.as_ref().and_then(string_match),
        authority: m.authority.as_ref().and_then(string_match),
        port: m.port.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
    }
}

/// The routes of VirtualService `vs` for the services its hosts name, in order.
pub fn virtual_service(vs: &VirtualService, cx: &Context<'_>) -> Vec<(String, api::HttpRoute)> {
    let ns = vs.metadata.namespace();
    // Only mesh routing (no `gateways`, or `mesh` among them) is a waypoint's.
    if !vs.spec.gateways.is_empty() && !vs.spec.gateways.iter().any(|g| g == "mesh") {
        return Vec::new();
    }
    let mut out = Vec::new();
    for host in &vs.spec.hosts {
        let target = cx.resolve(host, ns);
        for (i, r) in vs.spec.http.iter().enumerate() {
            out.push((target.clone(), vs_route(vs, i, r, cx)));
        }
    }
    out
}

fn vs_destination(d: &VsDestination, weight: u32, ns: &str, cx: &Context<'_>) -> api::WeightedBackend {
    let port = d.port.as_ref().and_then(|p| u32::try_from(p.number).ok()).unwrap_or(0);
    cx.backend(&cx.resolve(&d.host, ns), port, weight, d.subset.as_deref(), ns)
}

fn vs_route(vs: &VirtualService, i: usize, r: &VsHttpRoute, cx: &Context<'_>) -> api::HttpRoute {
    let ns = vs.metadata.namespace();
    let label = r.name.clone().unwrap_or_else(|| i.to_string());
    let single = r.route.len() == 1;
    let backends = r
        .route
        .iter()
        .map(|d| {
            // One destination takes everything; several without weights, nothing (Istio's rule: weights sum to 100).
            let weight = d.weight.map_or(if single { 100 } else { 0 }, |w| u32::try_from(w).unwrap_or(0));
            let mut b = vs_destination(&d.destination, weight, ns, cx);
            if let Some(h) = &d.headers {
                b.request_headers = vs_headers(h.request.as_ref());
                b.response_headers = vs_headers(h.response.as_ref());
            }
            b
        })
        .collect();
    let retry = r.retries.as_ref().map(|rt| {
        let on: Vec<String> = rt
            .retry_on
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let (codes, names): (Vec<String>, Vec<String>) = on.into_iter().partition(|c| c.parse::<u16>().is_ok());
        let mut retry_on =
            if names.is_empty() && codes.is_empty() { mesh_common::routing::default_retry().retry_on } else { names };
        if !codes.is_empty() && !retry_on.iter().any(|c| c == "retriable-status-codes") {
            retry_on.push("retriable-status-codes".into());
        }
        api::Retry {
            attempts: rt.attempts.and_then(|a| u32::try_from(a).ok()).unwrap_or(2),
            per_try_timeout_ms: ms(rt.per_try_timeout.as_ref()),
            retry_on,
            status_codes: codes.iter().filter_map(|c| c.parse().ok()).collect(),
            backoff_ms: 0,
        }
    });
    let mut mirrors: Vec<api::Mirror> = r
        .mirrors
        .iter()
        .map(|m| (m.destination.clone(), m.percentage.as_ref().map_or(100.0, |p| p.value)))
        .chain(r.mirror.clone().map(|d| {
            let pct = r.mirror_percentage.as_ref().map(|p| p.value).or(r.mirror_percent.map(|p| p as f64));
            (d, pct.unwrap_or(100.0))
        }))
        .map(|(d, percent)| {
            let b = vs_destination(&d, 0, ns, cx);
            api::Mirror { namespace: b.namespace, service: b.service, port: b.port, percent }
        })
        .collect();
    mirrors.retain(|m| m.percent > 0.0);
    api::HttpRoute {
        name: format!("VirtualService/{ns}/{}/{label}", vs.metadata.name),
        ports: Vec::new(),
        matches: r.matches.iter().map(vs_match).collect(),
        backends,
        request_headers: r.headers.as_ref().and_then(|h| vs_headers(h.request.as_ref())),
        response_headers: r.headers.as_ref().and_then(|h| vs_headers(h.response.as_ref())),
        redirect: r.redirect.as_ref().map(|rd| api::Redirect {
            scheme: rd.scheme.clone().unwrap_or_default(),
            authority: rd.authority.clone().unwrap_or_default(),
            port: rd.port.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
            path: rd.uri.clone().unwrap_or_default(),
            prefix: String::new(),
            status: rd.redirect_code.and_then(|c| u32::try_from(c).ok()).unwrap_or(301),
        }),
        rewrite: r.rewrite.as_ref().map(|rw| api::Rewrite {
            prefix: rw.uri.clone().unwrap_or_default(),
            full_path: String::new(),
            authority: rw.authority.clone().unwrap_or_default(),
        }),
        timeout_ms: ms(r.timeout.as_ref()),
        retry,
        mirrors,
        fault: r.fault.as_ref().map(vs_fault),
    }
}

fn vs_fault(f: &VsFault) -> api::Fault {
    let delay = f.delay.as_ref();
    let abort = f.abort.as_ref();
    api::Fault {
        delay_ms: delay.map_or(0, |d| ms(d.fixed_delay.as_ref())),
        delay_percent: delay.map_or(0.0, VsDelay::share),
        abort_percent: abort.and_then(|a| a.percentage.as_ref()).map_or(0.0, |p| p.value),
        abort_http_status: abort.and_then(|a| a.http_status).and_then(|s| u32::try_from(s).ok()).unwrap_or(0),
        abort_grpc_status: abort
            .and_then(|a| a.grpc_status.as_deref())
            .and_then(|g| GRPC_CODES.iter().position(|c| *c == g))
            .and_then(|i| u32::try_from(i).ok()),
    }
}

/// One route per (rule, match) of HTTPRoute `hr` for each Service parent,
/// with the key the Gateway API orders matches by.
pub fn http_route(hr: &HttpRoute, cx: &Context<'_>) -> Vec<(String, Precedence, api::HttpRoute)> {
    let ns = hr.metadata.namespace();
    let mut out = Vec::new();
    for parent in &hr.spec.parent_refs {
        let is_service = parent.kind.as_deref() == Some("Service") && parent.group.as_deref().unwrap_or("").is_empty();
        if !is_service {
            continue; // a Gateway parent is an ingress route, not a waypoint's
        }
        let target = format!("{}/{}", parent.namespace.as_deref().unwrap_or(ns), parent.name);
        let ports: Vec<u32> = parent.port.and_then(|p| u32::try_from(p).ok()).into_iter().collect();
        for (i, rule) in hr.spec.rules.iter().enumerate() {
            let label = rule.name.clone().unwrap_or_else(|| i.to_string());
            let default_match = [HttpRouteMatch::default()];
            let matches = if rule.matches.is_empty() { &default_match[..] } else { &rule.matches };
            for m in matches {
                let mut route = http_rule(hr, rule, cx);
                route.name = format!("HTTPRoute/{ns}/{}/{label}", hr.metadata.name);
                route.ports = ports.clone();
                route.matches = vec![http_match(m)];
                let precedence = Precedence::of(m, hr, i);
                out.push((target.clone(), precedence, route));
            }
        }
    }
    out
}

/// The Gateway API's order of matches: an exact path, then the longest
/// prefix, then a method, then most headers, then most query parameters;
/// ties go to the route by namespace/name (creation time is not kept), then
/// rule order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Precedence {
    exact: std::cmp::Reverse<bool>,
    prefix_len: std::cmp::Reverse<usize>,
    method: std::cmp::Reverse<bool>,
    headers: std::cmp::Reverse<usize>,
    query: std::cmp::Reverse<usize>,
    route: String,
    rule: usize,
}

impl Precedence {
    fn of(m: &HttpRouteMatch, hr: &HttpRoute, rule: usize) -> Precedence {
        use std::cmp::Reverse;
        let (kind, path) = m.path.as_ref().map_or(("PathPrefix", "/"), |p| {
            (p.type_.as_deref().unwrap_or("PathPrefix"), p.value.as_deref().unwrap_or("/"))
        });
        Precedence {
            exact: Reverse(kind == "Exact"),
            prefix_len: Reverse(if kind == "PathPrefix" || kind == "Exact" { path.len() } else { 0 }),
            method: Reverse(m.method.is_some()),
            headers: Reverse(m.headers.len()),
            query: Reverse(m.query_params.len()),
            route: format!("{}/{}", hr.metadata.namespace(), hr.metadata.name),
            rule,
        }
    }
}

/// One route per (rule, match) of GRPCRoute `gr` for each Service parent: a
/// gRPC method is the path `/<service>/<method>`.
pub fn grpc_route(gr: &GrpcRoute, cx: &Context<'_>) -> Vec<(String, Precedence, api::HttpRoute)> {
    use std::cmp::Reverse;
    let ns = gr.metadata.namespace();
    let mut out = Vec::new();
    for parent in gr.spec.parent_refs.iter().filter(|p| p.kind.as_deref() == Some("Service")) {
        let target = format!("{}/{}", parent.namespace.as_deref().unwrap_or(ns), parent.name);
        let ports: Vec<u32> = parent.port.and_then(|p| u32::try_from(p).ok()).into_iter().collect();
        for (i, rule) in gr.spec.rules.iter().enumerate() {
            let label = rule.name.clone().unwrap_or_else(|| i.to_string());
            let default_match = [GrpcRouteMatch::default()];
            let matches = if rule.matches.is_empty() { &default_match[..] } else { &rule.matches };
            for m in matches {
                let mut route = api::HttpRoute {
                    name: format!("GRPCRoute/{ns}/{}/{label}", gr.metadata.name),
                    ports: ports.clone(),
                    backends: rule.backend_refs.iter().map(|b| backend_ref(b, ns, cx)).collect(),
                    ..Default::default()
                };
                for f in &rule.filters {
                    apply_header_filter(f, &mut route.request_headers, &mut route.response_headers);
                    if let Some(mirror) = &f.request_mirror {
                        let b = backend_ref(&mirror.backend_ref, ns, cx);
                        let percent = mirror.percent.map_or(100.0, |p| p as f64);
                        route.mirrors.push(api::Mirror {
                            namespace: b.namespace,
                            service: b.service,
                            port: b.port,
                            percent,
                        });
                    }
                }
                let (service, method) =
                    m.method.as_ref().map_or((None, None), |x| (x.service.as_deref(), x.method.as_deref()));
                let regex = m.method.as_ref().is_some_and(|x| x.type_.as_deref() == Some("RegularExpression"));
                use api::value_match::Kind;
                let path = match (regex, service, method) {
                    (_, None, None) => None,
                    (false, Some(s), Some(me)) => value(Kind::Exact(format!("/{s}/{me}"))),
                    (false, Some(s), None) => value(Kind::Prefix(format!("/{s}/"))),
                    (false, None, Some(me)) => value(Kind::Regex(format!("/[^/]+/{}", escape(me)))),
                    (true, s, me) => value(Kind::Regex(format!("/{}/{}", s.unwrap_or("[^/]+"), me.unwrap_or("[^/]+")))),
                };
                let headers = m
                    .headers
                    .iter()
                    .map(|n| api::NamedMatch {
                        name: n.name.to_ascii_lowercase(),
                        value: typed(n.type_.as_deref(), &n.value, false),
                    })
                    .collect();
                route.matches = vec![api::HttpMatch { path, headers, ..Default::default() }];
                let precedence = Precedence {
                    exact: Reverse(!regex && service.is_some() && method.is_some()),
                    prefix_len: Reverse(service.map_or(0, str::len) + method.map_or(0, str::len)),
                    method: Reverse(false),
                    headers: Reverse(m.headers.len()),
                    query: Reverse(0),
                    route: format!("{ns}/{}", gr.metadata.name),
                    rule: i,
                };
                out.push((target.clone(), precedence, route));
            }
        }
    }
    out
}

/// `s` as a regex that matches exactly it.
fn escape(s: &str) -> String {
    s.chars().flat_map(|c| (!c.is_ascii_alphanumeric() && c != '_').then_some('\\').into_iter().chain([c])).collect()
}

fn typed(type_: Option<&str>, v: &str, path: bool) -> Option<api::ValueMatch> {
    use api::value_match::Kind;
    value(match type_.unwrap_or(if path { "PathPrefix" } else { "Exact" }) {
        "Exact" => Kind::Exact(v.into()),
        "PathPrefix" => Kind::PathPrefix(v.into()),
        _ => Kind::Regex(v.into()), // RegularExpression (validation admits nothing else)
    })
}

fn http_match(m: &HttpRouteMatch) -> api::HttpMatch {
    let named = |list: &[NamedTypedMatch]| {
        list.iter()
            .map(|n| api::NamedMatch {
                name: n.name.to_ascii_lowercase(),
                value: typed(n.type_.as_deref(), &n.value, false),
            })
            .collect()
    };
    api::HttpMatch {
        path: m.path.as_ref().and_then(|p| typed(p.type_.as_deref(), p.value.as_deref().unwrap_or("/"), true)),
        headers: named(&m.headers),
        query: named(&m.query_params),
        method: m.method.as_ref().and_then(|v| value(api::value_match::Kind::Exact(v.clone()))),
        authority: None,
        port: 0,
    }
}

fn header_ops(h: &HeaderModifier) -> api::HeaderOps {
    api::HeaderOps {
        set: h.set.iter().map(|v| (v.name.to_ascii_lowercase(), v.value.clone())).collect(),
        add: h.add.iter().map(|v| (v.name.to_ascii_lowercase(), v.value.clone())).collect(),
        remove: h.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
    }
}

fn backend_ref(b: &BackendRef, ns: &str, cx: &Context<'_>) -> api::WeightedBackend {
    let key = format!("{}/{}", b.namespace.as_deref().unwrap_or(ns), b.name);
    let port = b.port.and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
    let mut out = cx.backend(&key, port, b.weight.map_or(1, |w| u32::try_from(w).unwrap_or(0)), None, ns);
    for f in &b.filters {
        apply_header_filter(f, &mut out.request_headers, &mut out.response_headers);
    }
    out
}

fn apply_header_filter(f: &HttpRouteFilter, req: &mut Option<api::HeaderOps>, resp: &mut Option<api::HeaderOps>) {
    if let Some(h) = &f.request_header_modifier {
        *req = Some(header_ops(h));
    }
    if let Some(h) = &f.response_header_modifier {
        *resp = Some(header_ops(h));
    }
}

/// A Gateway API path modifier as (full path, prefix): one of them set.
fn path_modifier(p: Option<&PathModifier>) -> (String, String) {
    match p {
        Some(p) if p.type_ == "ReplaceFullPath" => (p.replace_full_path.clone().unwrap_or_default(), String::new()),
        Some(p) => (String::new(), p.replace_prefix_match.clone().unwrap_or_default()),
        None => (String::new(), String::new()),
    }
}

fn http_rule(
    hr: &HttpRoute,
    rule: &crate::config::objects::routing::HttpRouteRule,
    cx: &Context<'_>,
) -> api::HttpRoute {
    let ns = hr.metadata.namespace();
    let mut route = api::HttpRoute {
        backends: rule.backend_refs.iter().map(|b| backend_ref(b, ns, cx)).collect(),
        ..Default::default()
    };
    for f in &rule.filters {
        apply_header_filter(f, &mut route.request_headers, &mut route.response_headers);
        if let Some(rd) = &f.request_redirect {
            let (path, prefix) = path_modifier(rd.path.as_ref());
            route.redirect = Some(api::Redirect {
                scheme: rd.scheme.clone().unwrap_or_default(),
                authority: rd.hostname.clone().unwrap_or_default(),
                port: rd.port.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
                path,
                prefix,
                status: rd.status_code.and_then(|c| u32::try_from(c).ok()).unwrap_or(302),
            });
        }
        if let Some(rw) = &f.url_rewrite {
            let (full_path, prefix) = path_modifier(rw.path.as_ref());
            route.rewrite =
                Some(api::Rewrite { prefix, full_path, authority: rw.hostname.clone().unwrap_or_default() });
        }
        if let Some(m) = &f.request_mirror {
            let b = backend_ref(&m.backend_ref, ns, cx);
            let percent = m.percent.map_or(100.0, |p| p as f64);
            route.mirrors.push(api::Mirror { namespace: b.namespace, service: b.service, port: b.port, percent });
        }
    }
    if let Some(t) = &rule.timeouts {
        route.timeout_ms = ms(t.request.as_ref());
        let backend = ms(t.backend_request.as_ref());
        if backend > 0 {
            route
                .retry
                .get_or_insert_with(|| api::Retry {
                    retry_on: mesh_common::routing::default_retry().retry_on,
                    ..Default::default()
                })
                .per_try_timeout_ms = backend;
        }
    }
    if let Some(r) = &rule.retry {
        let retry = route.retry.get_or_insert_with(api::Retry::default);
        retry.attempts = r.attempts.and_then(|a| u32::try_from(a).ok()).unwrap_or(2);
        retry.status_codes = if r.codes.is_empty() {
            vec![500, 502, 503, 504]
        } else {
            r.codes.iter().filter_map(|c| u32::try_from(*c).ok()).collect()
        };
        retry.retry_on =
            ["connect-failure", "refused-stream", "reset", "retriable-status-codes"].map(String::from).to_vec();
        retry.backoff_ms = ms(r.backoff.as_ref());
    }
    route
}

/// Every service's routes, by `namespace/name`: HTTPRoutes first (in the
/// Gateway API's precedence), then VirtualServices (by namespace/name, each
/// in its own order).
pub fn compile(store: &ConfigStore, cx: &Context<'_>) -> BTreeMap<String, Vec<api::HttpRoute>> {
    let mut gamma: BTreeMap<String, Vec<(Precedence, api::HttpRoute)>> = BTreeMap::new();
    let mut istio: BTreeMap<String, Vec<api::HttpRoute>> = BTreeMap::new();
    for stored in store.objects().values() {
        match stored.resource.as_ref() {
            Resource::HttpRoute(hr) => {
                for (target, p, r) in http_route(hr, cx) {
                    gamma.entry(target).or_default().push((p, r));
                }
            }
            Resource::GrpcRoute(gr) => {
                for (target, p, r) in grpc_route(gr, cx) {
                    gamma.entry(target).or_default().push((p, r));
                }
            }
            Resource::VirtualService(vs) => {
                for (target, r) in virtual_service(vs, cx) {
                    istio.entry(target).or_default().push(r);
                }
            }
            _ => {}
        }
    }
    let mut out: BTreeMap<String, Vec<api::HttpRoute>> = BTreeMap::new();
    for (target, mut routes) in gamma {
        routes.sort_by(|a, b| a.0.cmp(&b.0));
        out.entry(target).or_default().extend(routes.into_iter().map(|(_, r)| r));
    }
    for (target, routes) in istio {
        out.entry(target).or_default().extend(routes);
    }
    out
}

#[cfg(test)]
mod tests;
