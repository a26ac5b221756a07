//! What Istio's and Gateway API's admission reject in the L7 kinds: bad
//! regexes, negative weights, malformed durations, unknown match and filter
//! types, a redirect beside a route. References to what is not defined are
//! not checked here: they are warnings of the model, never rejections.
use mesh_common::parse_duration;

use super::{Issues, check_labels, check_port, valid_subdomain};
use crate::objects::routing::{
    BackendRef, ConnectionPool, GRPC_CODES, Gateway, GrpcRouteSpec, HttpRouteFilter, HttpRouteSpec, LoadBalancer,
    NamedTypedMatch, OutlierDetection, Percent, StringMatch, TrafficPolicy, VirtualServiceSpec, VsDestination, VsFault,
    VsHeaderOps, VsHeaders,
};

/// The class of waypoint Gateways, and the label saying what traffic a waypoint takes.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
/// `retryOn` conditions Envoy (and so Istio) knows.
pub const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn check_regex(re: &str, field: &str, out: &mut Issues) {
    if let Err(e) = regex::Regex::new(re) {
        out.push((field.into(), format!("invalid regular expression {re:?}: {}", error_line(&e.to_string()))));
    }
}

/// The line of a regex error that says what is wrong (the last one).
fn error_line(s: &str) -> String {
    s.lines().rfind(|l| !l.trim().is_empty()).unwrap_or(s).trim().to_owned()
}

fn check_duration(d: &str, field: &str, out: &mut Issues) {
    if let Err(e) = parse_duration(d) {
        out.push((field.into(), e));
    }
}

pub(super) fn check_gateway(g: &Gateway, out: &mut Issues) {
    if g.spec.gateway_class_name != WAYPOINT_CLASS {
        return; // another controller's Gateway (an ingress): accepted, not ours to check
    }
    if let Some(v) = g.metadata.labels.get(WAYPOINT_FOR_LABEL)
        && !matches!(v.as_str(), "service" | "workload" | "all" | "none")
    {
        out.push((
            format!("metadata.labels[{WAYPOINT_FOR_LABEL}]"),
            format!("{v:?}: expected service, workload, all or none"),
        ));
    }
    for (i, l) in g.spec.listeners.iter().enumerate() {
        check_port(l.port, &format!("spec.listeners[{i}].port"), out);
    }
    if !g.spec.listeners.iter().any(|l| l.protocol == "HBONE" && l.port == 15008) {
        out.push((
            "spec.listeners".into(),
            "a waypoint needs a listener with protocol HBONE on port 15008 (name: mesh)".into(),
        ));
    }
}

pub(super) fn check_http_route(spec: &HttpRouteSpec, out: &mut Issues) {
    for (i, p) in spec.parent_refs.iter().enumerate() {
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        if !matches!(kind, "Service" | "Gateway" | "ServiceEntry") {
            out.push((format!("spec.parentRefs[{i}].kind"), format!("{kind:?}: expected Service or Gateway")));
        }
        if let Some(port) = p.port {
            check_port(port, &format!("spec.parentRefs[{i}].port"), out);
        }
    }
    for (r, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        for (m, mat) in rule.matches.iter().enumerate() {
            let at = format!("{at}.matches[{m}]");
            if let Some(path) = &mat.path {
                let value = path.value.as_deref().unwrap_or("/");
                match path.type_.as_deref().unwrap_or("PathPrefix") {
                    "Exact" | "PathPrefix" if !value.starts_with('/') => {
                        out.push((format!("{at}.path.value"), format!("{value:?}: must start with '/'")))
                    }
                    "Exact" | "PathPrefix" => {}
                    "RegularExpression" => check_regex(value, &format!("{at}.path.value"), out),
                    t => out.push((
                        format!("{at}.path.type"),
                        format!("{t:?}: expected Exact, PathPrefix or RegularExpression"),
                    )),
                }
            }
            check_named(&mat.headers, &format!("{at}.headers"), out);
            check_named(&mat.query_params, &format!("{at}.queryParams"), out);
            if let Some(method) = &mat.method
                && !METHODS.contains(&method.as_str())
            {
                out.push((format!("{at}.method"), format!("{method:?}: expected one of {}", METHODS.join(", "))));
            }
        }
        check_filters(&rule.filters, &at, out);
        for (b, backend) in rule.backend_refs.iter().enumerate() {
            check_backend(backend, &format!("{at}.backendRefs[{b}]"), out);
            check_filters(&backend.filters, &format!("{at}.backendRefs[{b}]"), out);
        }
        if let Some(t) = &rule.timeouts {
            for (name, v) in [("request", &t.request), ("backendRequest", &t.backend_request)] {
                if let Some(v) = v {
                    check_duration(v, &format!("{at}.timeouts.{name}"), out);
                }
            }
            if let (Some(req), Some(backend)) = (&t.request, &t.backend_request)
                && let (Ok(req), Ok(backend)) = (parse_duration(req), parse_duration(backend))
                && !req.is_zero()
                && backend > req
            {
                out.push((format!("{at}.timeouts.backendRequest"), "must not be longer than timeouts.request".into()));
            }
        }
        if let Some(retry) = &rule.retry {
            if retry.attempts.is_some_and(|a| a < 0) {
                out.push((format!("{at}.retry.attempts"), "must not be negative".into()));
            }
            for (c, code) in retry.codes.iter().enumerate() {
                if !(400..=599).contains(code) {
                    out.push((format!("{at}.retry.codes[{c}]"), format!("{code}: expected 400 to 599")));
                }
            }
            if let Some(b) = &retry.backoff {
                check_duration(b, &format!("{at}.retry.backoff"), out);
            }
        }
    }
}

pub(super) fn check_grpc_route(spec: &GrpcRouteSpec, out: &mut Issues) {
    for (i, p) in spec.parent_refs.iter().enumerate() {
        if let Some(port) = p.port {
            check_port(port, &format!("spec.parentRefs[{i}].port"), out);
        }
    }
    for (r, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        for (m, mat) in rule.matches.iter().enumerate() {
            let at = format!("{at}.matches[{m}]");
            if let Some(method) = &mat.method {
                match method.type_.as_deref().unwrap_or("Exact") {
                    "Exact" => {
                        if method.service.is_none() && method.method.is_none() {
                            out.push((format!("{at}.method"), "one of service or method must be set".into()));
                        }
                        for (field, v) in [("service", &method.service), ("method", &method.method)] {
                            if v.as_deref().is_some_and(|v| v.is_empty() || v.contains('/')) {
                                out.push((format!("{at}.method.{field}"), "must be a name without '/'".into()));
                            }
                        }
                    }
                    "RegularExpression" => {
                        for (field, v) in [("service", &method.service), ("method", &method.method)] {
                            if let Some(v) = v {
                                check_regex(v, &format!("{at}.method.{field}"), out);
                            }
                        }
                    }
                    t => out.push((format!("{at}.method.type"), format!("{t:?}: expected Exact or RegularExpression"))),
                }
            }
            check_named(&mat.headers, &format!("{at}.headers"), out);
        }
        for (i, f) in rule.filters.iter().enumerate() {
            if matches!(f.type_.as_str(), "RequestRedirect" | "URLRewrite") {
                out.push((format!("{at}.filters[{i}].type"), format!("{}: not a GRPCRoute filter", f.type_)));
            }
        }
        check_filters(&rule.filters, &at, out);
        for (b, backend) in rule.backend_refs.iter().enumerate() {
            check_backend(backend, &format!("{at}.backendRefs[{b}]"), out);
            check_filters(&backend.filters, &format!("{at}.backendRefs[{b}]"), out);
        }
    }
}

fn check_named(matches: &[NamedTypedMatch], at: &str, out: &mut Issues) {
    for (i, m) in matches.iter().enumerate() {
        match m.type_.as_deref().unwrap_or("Exact") {
            "Exact" => {}
            "RegularExpression" => check_regex(&m.value, &format!("{at}[{i}].value"), out),
            t => out.push((format!("{at}[{i}].type"), format!("{t:?}: expected Exact or RegularExpression"))),
        }
        if m.name.is_empty() {
            out.push((format!("{at}[{i}].name"), "must not be empty".into()));
        }
    }
}

fn check_backend(b: &BackendRef, at: &str, out: &mut Issues) {
    if let Some(w) = b.weight
        && !(0..=1_000_000).contains(&w)
    {
        out.push((format!("{at}.weight"), format!("{w}: expected 0 to 1000000")));
    }
    let kind = b.kind.as_deref().unwrap_or("Service");
    match b.port {
        Some(p) => check_port(p, &format!("{at}.port"), out),
        None if kind == "Service" => out.push((format!("{at}.port"), "is required for a Service".into())),
        None => {}
    }
}

fn check_filters(filters: &[HttpRouteFilter], at: &str, out: &mut Issues) {
    for (i, f) in filters.iter().enumerate() {
        let at = format!("{at}.filters[{i}]");
        let present = match f.type_.as_str() {
            "RequestHeaderModifier" => f.request_header_modifier.is_some(),
            "ResponseHeaderModifier" => f.response_header_modifier.is_some(),
            "RequestRedirect" => f.request_redirect.is_some(),
            "URLRewrite" => f.url_rewrite.is_some(),
            "RequestMirror" => f.request_mirror.is_some(),
            "ExtensionRef" => f.extension_ref.is_some(),
            "CORS" => f.cors.is_some(),
            t => {
                out.push((
                    format!("{at}.type"),
                    format!(
                        "{t:?}: expected RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, \
                         URLRewrite, RequestMirror, CORS or ExtensionRef"
                    ),
                ));
                continue;
            }
        };
        if !present {
            out.push((at.clone(), format!("type {} needs its configuration field", f.type_)));
        }
        if let Some(r) = &f.request_redirect {
            if let Some(code) = r.status_code
                && !matches!(code, 301 | 302 | 303 | 307 | 308)
            {
                out.push((
                    format!("{at}.requestRedirect.statusCode"),
                    format!("{code}: expected 301, 302, 303, 307 or 308"),
                ));
            }
            if let Some(p) = r.port {
                check_port(p, &format!("{at}.requestRedirect.port"), out);
            }
        }
        if let Some(m) = &f.request_mirror {
            check_backend(&m.backend_ref, &format!("{at}.requestMirror.backendRef"), out);
            if let Some(p) = m.percent
                && !(0..=100).contains(&p)
            {
                out.push((format!("{at}.requestMirror.percent"), format!("{p}: expected 0 to 100")));
            }
        }
    }
}

pub(super) fn check_virtual_service(spec: &VirtualServiceSpec, out: &mut Issues) {
    if spec.hosts.is_empty() {
        out.push(("spec.hosts".into(), "at least one host is required".into()));
    }
    for (r, route) in spec.http.iter().enumerate() {
        let at = format!("spec.http[{r}]");
        for (m, mat) in route.matches.iter().enumerate() {
            let at = format!("{at}.match[{m}]");
            for (name, sm) in
                [("uri", &mat.uri), ("method", &mat.method), ("authority", &mat.authority), ("scheme", &mat.scheme)]
            {
                if let Some(sm) = sm {
                    check_string_match(sm, &format!("{at}.{name}"), false, out);
                }
            }
            for (name, map) in [
                ("headers", &mat.headers),
                ("withoutHeaders", &mat.without_headers),
                ("queryParams", &mat.query_params),
            ] {
                for (k, sm) in map {
                    check_string_match(sm, &format!("{at}.{name}[{k}]"), true, out);
                }
            }
            if let Some(p) = mat.port {
                check_port(p, &format!("{at}.port"), out);
            }
        }
        if route.redirect.is_some() && !route.route.is_empty() {
            out.push((format!("{at}.redirect"), "cannot be combined with route".into()));
        }
        if route.redirect.is_some() && route.rewrite.is_some() {
            out.push((format!("{at}.rewrite"), "cannot be combined with redirect".into()));
        }
        if route.redirect.is_none()
            && route.route.is_empty()
            && route.direct_response.is_none()
            && route.delegate.is_none()
        {
            out.push((format!("{at}.route"), "a route, redirect, directResponse or delegate is required".into()));
        }
        for (d, dst) in route.route.iter().enumerate() {
            let at = format!("{at}.route[{d}]");
            check_destination(&dst.destination, &format!("{at}.destination"), out);
            if let Some(w) = dst.weight
                && w < 0
            {
                out.push((format!("{at}.weight"), format!("{w}: weights must not be negative")));
            }
            check_headers(&dst.headers, &at, out);
        }
        if let Some(rd) = &route.redirect {
            if let Some(code) = rd.redirect_code
                && !(300..=399).contains(&code)
            {
                out.push((format!("{at}.redirect.redirectCode"), format!("{code}: expected a 3xx status")));
            }
            if let Some(p) = rd.port {
                check_port(p, &format!("{at}.redirect.port"), out);
            }
        }
        if let Some(t) = &route.timeout {
            check_duration(t, &format!("{at}.timeout"), out);
        }
        if let Some(retries) = &route.retries {
            if retries.attempts.is_some_and(|a| a < 0) {
                out.push((format!("{at}.retries.attempts"), "must not be negative".into()));
            }
            if let Some(t) = &retries.per_try_timeout {
                check_duration(t, &format!("{at}.retries.perTryTimeout"), out);
            }
            for cond in retries.retry_on.iter().flat_map(|s| s.split(',')).map(str::trim) {
                if !RETRY_ON.contains(&cond) && cond.parse::<u16>().is_err() {
                    out.push((
                        format!("{at}.retries.retryOn"),
                        format!("{cond:?}: not a retry condition ({}) or a status code", RETRY_ON.join(", ")),
                    ));
                }
            }
        }
        check_headers(&route.headers, &at, out);
        if let Some(m) = &route.mirror {
            check_destination(m, &format!("{at}.mirror"), out);
        }
        for (i, m) in route.mirrors.iter().enumerate() {
            check_destination(&m.destination, &format!("{at}.mirrors[{i}].destination"), out);
        }
        if let Some(p) = &route.mirror_percentage
            && !(0.0..=100.0).contains(&p.value)
        {
            out.push((format!("{at}.mirrorPercentage.value"), format!("{}: expected 0 to 100", p.value)));
        }
        if let Some(f) = &route.fault {
            check_fault(f, &format!("{at}.fault"), out);
        }
    }
}

/// Istio's checks on `HTTPFaultInjection`.
fn check_fault(f: &VsFault, at: &str, out: &mut Issues) {
    let percent = |p: &Option<Percent>, field: &str, out: &mut Issues| {
        if let Some(p) = p
            && !(0.0..=100.0).contains(&p.value)
        {
            out.push((format!("{field}.value"), format!("{}: expected 0 to 100", p.value)));
        }
    };
    if f.delay.is_none() && f.abort.is_none() {
        out.push((at.into(), "needs a delay or an abort".into()));
    }
    if let Some(d) = &f.delay {
        percent(&d.percentage, &format!("{at}.delay.percentage"), out);
        if d.percent.is_some_and(|p| !(0..=100).contains(&p)) {
            out.push((format!("{at}.delay.percent"), "expected 0 to 100".into()));
        }
        match (&d.fixed_delay, &d.exponential_delay) {
            (Some(t), _) => match parse_duration(t) {
                Ok(t) if t < std::time::Duration::from_millis(1) => {
                    out.push((format!("{at}.delay.fixedDelay"), "must be at least 1ms".into()));
                }
                Ok(_) => {}
                Err(e) => out.push((format!("{at}.delay.fixedDelay"), e)),
            },
            (None, Some(_)) => out.push((format!("{at}.delay.exponentialDelay"), "not supported yet".into())),
            (None, None) => out.push((format!("{at}.delay.fixedDelay"), "is required".into())),
        }
    }
    if let Some(a) = &f.abort {
        percent(&a.percentage, &format!("{at}.abort.percentage"), out);
        let set = [a.http_status.is_some(), a.grpc_status.is_some(), a.http2_error.is_some()];
        if set.iter().filter(|b| **b).count() != 1 {
            out.push((format!("{at}.abort"), "set exactly one of httpStatus, grpcStatus, http2Error".into()));
        }
        if a.http2_error.is_some() {
            // As Istio's validation.
            out.push((format!("{at}.abort.http2Error"), "HTTP/2 abort fault injection is not supported yet".into()));
        }
        if let Some(s) = a.http_status
            && !(200..=599).contains(&s)
        {
            out.push((format!("{at}.abort.httpStatus"), format!("{s}: expected 200 to 599")));
        }
        if let Some(g) = &a.grpc_status
            && !GRPC_CODES.contains(&g.as_str())
        {
            out.push((
                format!("{at}.abort.grpcStatus"),
                format!("{g:?}: not a gRPC status name (such as UNAVAILABLE)"),
            ));
        }
    }
}

fn check_string_match(sm: &StringMatch, at: &str, presence_ok: bool, out: &mut Issues) {
    let set = [sm.exact.is_some(), sm.prefix.is_some(), sm.regex.is_some()].iter().filter(|b| **b).count();
    if set > 1 {
        out.push((at.into(), "set exactly one of exact, prefix, regex".into()));
    } else if set == 0 && !presence_ok {
        out.push((at.into(), "set one of exact, prefix, regex".into()));
    }
    if let Some(re) = &sm.regex {
        check_regex(re, &format!("{at}.regex"), out);
    }
}

fn check_destination(d: &VsDestination, at: &str, out: &mut Issues) {
    if d.host.is_empty() {
        out.push((format!("{at}.host"), "is required".into()));
    }
    if let Some(s) = &d.subset
        && !valid_subdomain(s)
    {
        out.push((format!("{at}.subset"), format!("{s:?} is not a valid subset name")));
    }
    if let Some(p) = &d.port {
        check_port(p.number, &format!("{at}.port.number"), out);
    }
}

fn check_headers(h: &Option<VsHeaders>, at: &str, out: &mut Issues) {
    let Some(h) = h else { return };
    for (side, ops) in [("request", &h.request), ("response", &h.response)] {
        if let Some(VsHeaderOps { set, add, remove }) = ops {
            for name in set.keys().chain(add.keys()).chain(remove) {
                if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == ':') {
                    out.push((format!("{at}.headers.{side}"), format!("{name:?} is not a header name")));
                }
            }
        }
    }
}

pub(super) fn check_destination_rule(spec: &crate::objects::routing::DestinationRuleSpec, out: &mut Issues) {
    if spec.host.is_empty() {
        out.push(("spec.host".into(), "is required".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        if !valid_subdomain(&s.name) {
            out.push((format!("spec.subsets[{i}].name"), format!("{:?} is not a valid subset name", s.name)));
        }
        if !seen.insert(&s.name) {
            out.push((format!("spec.subsets[{i}].name"), format!("{:?} is defined twice", s.name)));
        }
        check_labels(&s.labels, &format!("spec.subsets[{i}].labels"), out);
        if let Some(tp) = &s.traffic_policy {
            check_traffic_policy(tp, &format!("spec.subsets[{i}].trafficPolicy"), out);
        }
    }
    if let Some(tp) = &spec.traffic_policy {
        check_traffic_policy(tp, "spec.trafficPolicy", out);
    }
}

/// Istio's checks on a TrafficPolicy's connection pools.
fn check_traffic_policy(tp: &TrafficPolicy, at: &str, out: &mut Issues) {
    if let Some(pool) = &tp.connection_pool {
        check_connection_pool(pool, &format!("{at}.connectionPool"), out);
    }
    if let Some(od) = &tp.outlier_detection {
        check_outlier_detection(od, &format!("{at}.outlierDetection"), out);
    }
    if let Some(lb) = &tp.load_balancer {
        check_load_balancer(lb, &format!("{at}.loadBalancer"), out);
    }
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let base = format!("{at}.portLevelSettings[{i}]");
        match &p.port {
            Some(port) => check_port(port.number, &format!("{base}.port.number"), out),
            None => out.push((format!("{base}.port"), "is required".into())),
        }
        if let Some(pool) = &p.connection_pool {
            check_connection_pool(pool, &format!("{base}.connectionPool"), out);
        }
        if let Some(od) = &p.outlier_detection {
            check_outlier_detection(od, &format!("{base}.outlierDetection"), out);
        }
        if let Some(lb) = &p.load_balancer {
            check_load_balancer(lb, &format!("{base}.loadBalancer"), out);
        }
    }
}

/// The `simple` policies Istio has (`LEAST_CONN` is its old name for LEAST_REQUEST).
pub const SIMPLE_LB: [&str; 6] = ["UNSPECIFIED", "LEAST_CONN", "ROUND_ROBIN", "RANDOM", "PASSTHROUGH", "LEAST_REQUEST"];

/// Istio's checks on `LoadBalancerSettings`.
fn check_load_balancer(lb: &LoadBalancer, at: &str, out: &mut Issues) {
    if let Some(simple) = &lb.simple
        && !SIMPLE_LB.contains(&simple.as_str())
    {
        out.push((format!("{at}.simple"), format!("{simple:?}: expected one of {}", SIMPLE_LB.join(", "))));
    }
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        out.push((at.into(), "set one of simple and consistentHash".into()));
    }
    if let Some(ch) = &lb.consistent_hash {
        let at = format!("{at}.consistentHash");
        let keys = [
            ch.http_header_name.is_some(),
            ch.http_cookie.is_some(),
            ch.use_source_ip.is_some(),
            ch.http_query_parameter_name.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() != 1 {
            out.push((
                at.clone(),
                "set exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".into(),
            ));
        }
        if let Some(c) = &ch.http_cookie {
            if c.name.is_empty() {
                out.push((format!("{at}.httpCookie.name"), "is required".into()));
            }
            if let Some(ttl) = &c.ttl
                && let Err(e) = parse_duration(ttl)
            {
                out.push((format!("{at}.httpCookie.ttl"), e));
            }
        }
        if ch.ring_hash.is_some() && ch.maglev.is_some() {
            out.push((at.clone(), "set one of ringHash and maglev".into()));
        }
        if let Some(size) = ch.maglev.as_ref().and_then(|m| m.table_size)
            && !is_prime(size)
        {
            out.push((format!("{at}.maglev.tableSize"), format!("{size}: must be a prime number")));
        }
        for (field, v) in [
            ("ringHash.minimumRingSize", ch.ring_hash.as_ref().and_then(|r| r.minimum_ring_size)),
            ("minimumRingSize", ch.minimum_ring_size),
        ] {
            if v.is_some_and(|v| v < 0) {
                out.push((format!("{at}.{field}"), "must not be negative".into()));
            }
        }
    }
    if let Some(w) = &lb.warmup_duration_secs
        && let Err(e) = parse_duration(w)
    {
        out.push((format!("{at}.warmupDurationSecs"), e));
    }
    if let Some(l) = &lb.locality_lb_setting {
        check_locality_lb(l, &format!("{at}.localityLbSetting"), out);
    }
    if let Some(w) = &lb.warmup {
        match w.duration.as_deref().map(parse_duration) {
            None => out.push((format!("{at}.warmup.duration"), "is required".into())),
            Some(Err(e)) => out.push((format!("{at}.warmup.duration"), e)),
            Some(Ok(_)) => {}
        }
        if w.minimum_percent.is_some_and(|p| !(0.0..=100.0).contains(&p)) {
            out.push((format!("{at}.warmup.minimumPercent"), "must be between 0 and 100".into()));
        }
    }
}

/// Istio's checks on `localityLbSetting`: distribute or failover, not both;
/// locality patterns with `*` only last; distribute's weights add to 100;
/// failover between two different regions.
fn check_locality_lb(l: &crate::objects::routing::LocalityLbSetting, at: &str, out: &mut Issues) {
    if !l.distribute.is_empty() && !l.failover.is_empty() {
        out.push((at.to_owned(), "can not simultaneously set 'distribute' and 'failover'".into()));
    }
    let pattern = |p: &str| {
        let parts: Vec<&str> = p.split('/').collect();
        !p.is_empty()
            && parts.len() <= 3
            && parts.iter().enumerate().all(|(i, s)| !s.is_empty() && (*s != "*" || i == parts.len() - 1))
            && parts.iter().all(|s| *s == "*" || !s.contains('*'))
    };
    for (i, d) in l.distribute.iter().enumerate() {
        let at = format!("{at}.distribute[{i}]");
        if !pattern(&d.from) {
            out.push((format!("{at}.from"), format!("{:?}: expected region[/zone[/subzone]], '*' only last", d.from)));
        }
        for to in d.to.keys().filter(|t| !pattern(t)) {
            out.push((format!("{at}.to"), format!("{to:?}: expected region[/zone[/subzone]], '*' only last")));
        }
        let sum: u64 = d.to.values().map(|w| u64::from(*w)).sum();
        if sum != 100 {
            out.push((format!("{at}.to"), format!("weights add to {sum}: they must add to 100")));
        }
    }
    for (i, f) in l.failover.iter().enumerate() {
        let at = format!("{at}.failover[{i}]");
        for (field, region) in [("from", &f.from), ("to", &f.to)] {
            if region.is_empty() || region.contains('/') || region.contains('*') {
                out.push((format!("{at}.{field}"), format!("{region:?}: failover names a region")));
            }
        }
        if f.from == f.to {
            out.push((at, "from and to must be different regions".into()));
        }
    }
    for (i, label) in l.failover_priority.iter().enumerate() {
        if label.trim().is_empty() {
            out.push((format!("{at}.failoverPriority[{i}]"), "must not be empty".into()));
        }
    }
}

fn is_prime(n: i64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

/// Istio's checks on `OutlierDetection`.
fn check_outlier_detection(od: &OutlierDetection, at: &str, out: &mut Issues) {
    for (name, v) in [
        ("consecutiveErrors", od.consecutive_errors),
        ("consecutive5xxErrors", od.consecutive_5xx_errors),
        ("consecutiveGatewayErrors", od.consecutive_gateway_errors),
        ("consecutiveLocalOriginFailures", od.consecutive_local_origin_failures),
    ] {
        if v.is_some_and(|v| v < 0) {
            out.push((format!("{at}.{name}"), "must not be negative".into()));
        }
    }
    for (name, v) in [("maxEjectionPercent", od.max_ejection_percent), ("minHealthPercent", od.min_health_percent)] {
        if v.is_some_and(|v| !(0..=100).contains(&v)) {
            out.push((format!("{at}.{name}"), "expected 0 to 100".into()));
        }
    }
    for (name, d) in [("interval", &od.interval), ("baseEjectionTime", &od.base_ejection_time)] {
        if let Some(d) = d {
            match parse_duration(d) {
                Ok(t) if t < std::time::Duration::from_millis(1) => {
                    out.push((format!("{at}.{name}"), "must be at least 1ms".into()));
                }
                Ok(_) => {}
                Err(e) => out.push((format!("{at}.{name}"), e)),
            }
        }
    }
}

fn check_connection_pool(pool: &ConnectionPool, at: &str, out: &mut Issues) {
    if pool.tcp.is_none() && pool.http.is_none() {
        out.push((at.into(), "must set tcp or http".into()));
    }
    let non_negative = |v: Option<i64>, field: String, out: &mut Issues| {
        if v.is_some_and(|v| v < 0) {
            out.push((field, "must not be negative".into()));
        }
    };
    let duration = |d: &Option<String>, field: String, out: &mut Issues| {
        if let Some(d) = d {
            match parse_duration(d) {
                Ok(t) if t < std::time::Duration::from_millis(1) => out.push((field, "must be at least 1ms".into())),
                Ok(_) => {}
                Err(e) => out.push((field, e)),
            }
        }
    };
    if let Some(tcp) = &pool.tcp {
        non_negative(tcp.max_connections, format!("{at}.tcp.maxConnections"), out);
        duration(&tcp.connect_timeout, format!("{at}.tcp.connectTimeout"), out);
        duration(&tcp.idle_timeout, format!("{at}.tcp.idleTimeout"), out);
        duration(&tcp.max_connection_duration, format!("{at}.tcp.maxConnectionDuration"), out);
    }
    if let Some(http) = &pool.http {
        non_negative(http.http1_max_pending_requests, format!("{at}.http.http1MaxPendingRequests"), out);
        non_negative(http.http2_max_requests, format!("{at}.http.http2MaxRequests"), out);
        non_negative(http.max_requests_per_connection, format!("{at}.http.maxRequestsPerConnection"), out);
        non_negative(http.max_retries, format!("{at}.http.maxRetries"), out);
        non_negative(http.max_concurrent_streams, format!("{at}.http.maxConcurrentStreams"), out);
        duration(&http.idle_timeout, format!("{at}.http.idleTimeout"), out);
    }
}
