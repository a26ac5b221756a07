//! One request through the waypoint: the service's routes choose a route
//! (`mesh_common::routing`, the code `mesh-ctl route explain` runs), the
//! route's weights a backend, the backend's endpoints (its subset's) take
//! the attempts in turn; retries follow the route's policy (Istio's default
//! where it has none) within the retry budget; timeouts answer 504. Local
//! answers are Envoy's (status, `response_flags`), gRPC-shaped for gRPC.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_common::{
    api, authz,
    identity::SpiffeId,
    routing::{self, HeaderEdit, Headers, RequestFacts},
};
use mesh_proxy::{
    hbone::headers::DEFAULT_CLUSTER,
    state::{
        telemetry_rules::{Side, TelemetryRules},
        view::{MeshView, ServiceInfo, Upstream, WorkloadInfo},
    },
    telemetry::IstioLabels,
};
use tracing::info;

use crate::{
    Waypoint, balance,
    body::{Counting, Ended, HttpBody, Recorded, Recording, empty, full},
    breaker::Cluster,
    ext_authz,
    metrics::RequestLabels,
    retry::{self, Outcome},
    upstream::Sender,
};

/// The connection a request arrived on: the service address the client
/// dialed (the tunnel's CONNECT authority) and who the client is.
pub struct Downstream {
    pub service: Arc<ServiceInfo>,
    pub port: u16,
    /// The address the client dialed (the service's VIP and port).
    pub destination: SocketAddr,
    /// The port's declared protocol (`http`, `http2`, `grpc`, or empty).
    pub protocol: String,
    /// The client's identity, proved by its certificate (`None` on a
    /// plaintext listener: a client outside the mesh).
    pub peer: Option<SpiffeId>,
    pub peer_addr: SocketAddr,
    /// The id the node proxy that sent the tunnel logs its connection by.
    pub connection_id: Option<String>,
    /// The request series this connection's requests were counted in.
    pub series: crate::metrics::SeriesCache,
}

struct HeaderView<'a>(&'a HeaderMap);

impl Headers for HeaderView<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What a request's record carries into the metrics and the access log.
struct Record {
    started: Instant,
    method: Method,
    authority: String,
    path: String,
    /// `x-request-id`, as the request carries it (cloning shares its bytes).
    request_id: HeaderValue,
    grpc: bool,
    /// The routes the request was matched against and the index of the one
    /// that took it (held, not copied, for the access log).
    route: Option<(Arc<routing::CompiledRoutes>, usize)>,
    upstream: Option<SocketAddr>,
    upstream_workload: Option<Arc<WorkloadInfo>>,
    backend_service: Option<Arc<ServiceInfo>>,
    attempts: u32,
    flags: &'static str,
    /// The AuthorizationPolicy that denied the request, if one did.
    denied_by: Option<String>,
    /// Its place among the cluster's requests in flight (`http2MaxRequests`),
    /// held until its response has ended.
    admitted: Option<crate::breaker::Permit>,
    /// The attempt's load on its endpoint (what LEAST_REQUEST compares),
    /// held until its response has ended.
    load: Option<crate::breaker::Load>,
    /// The cookie a consistent hash by cookie (with a ttl) gave a client
    /// that had none.
    set_cookie: Option<HeaderValue>,
    /// Headers an external authorizer that allowed the request has for its response.
    ext_authz_headers: Vec<(HeaderName, HeaderValue)>,
    /// Its spans, when its service's Telemetry traces it.
    trace: Option<crate::trace::RequestTrace>,
    /// Its service's Telemetry access-log and metric rules, and, when they
    /// have expressions, the request's headers (what those may read).
    rules: Option<Arc<TelemetryRules>>,
    headers: Option<HeaderMap>,
}

pub async fn handle(wp: Arc<Waypoint>, ds: Arc<Downstream>, mut req: Request<Incoming>) -> Response<HttpBody> {
    let in_flight = wp.request_started();
    wp.budget.deposit();
    let view = wp.proxy.state.view();
    // An HTTP/1.1 Upgrade (WebSocket): once the upstream switches protocols,
    // the two upgraded connections are joined byte for byte.
    let client_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let request_id = ensure_request_id(&mut parts.headers);
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(String::from))
        .unwrap_or_default();
    // Normalized once (Istio's BASE): policies, routes and the upstream all see the same path.
    let path = authz::normalize_path(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    let grpc = parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // Telemetry as configured now: a tunnel (and its HTTP/2 connection) may
    // have been opened under an older configuration.
    let current = view.service(ds.service.key()).cloned().unwrap_or_else(|| ds.service.clone());
    let trace = current.tracing.as_ref().map(|tracing| {
        let start = crate::trace::Start {
            service: &ds.service.host,
            port: ds.port,
            method: parts.method.as_str(),
            authority: &authority,
            path: &path,
            protocol: if parts.version == Version::HTTP_2 { "HTTP/2" } else { "HTTP/1.1" },
            request_id: request_id.to_str().unwrap_or_default(),
            peer_addr: ds.peer_addr,
            source_principal: ds.peer.as_ref().map(ToString::to_string),
            connection_id: ds.connection_id.as_deref(),
        };
        crate::trace::RequestTrace::start(wp.tracers.traced(&wp, tracing), tracing, &parts.headers, start)
    });
    let mut rec = Record {
        started: Instant::now(),
        method: parts.method.clone(),
        authority,
        path,
        request_id,
        grpc,
        route: None,
        upstream: None,
        upstream_workload: None,
        backend_service: None,
        attempts: 0,
        flags: "-",
        denied_by: None,
        admitted: None,
        load: None,
        set_cookie: None,
        ext_authz_headers: Vec::new(),
        trace,
        headers: current.telemetry.as_ref().filter(|r| r.has_expressions()).map(|_| parts.headers.clone()),
        rules: current.telemetry.clone(),
    };
    let (body, recorded) = Recording::new(body);
    let mut response = route_and_send(&wp, &ds, &view, &mut parts, body, &recorded, &mut rec).await;
    for (name, value) in rec.ext_authz_headers.drain(..) {
        response.headers_mut().append(name, value);
    }
    if let Some(client) = client_upgrade
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            match tokio::try_join!(client, upstream) {
                Ok((client, upstream)) => {
                    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                    let _ = mesh_proxy::relay::both_ways(&mut client, &mut upstream).await;
                }
                Err(e) => tracing::debug!("upgrade failed: {e}"),
            }
        });
    }
    finish(wp, ds, rec, recorded, response, in_flight)
}

/// Envoy's answer when a circuit breaker refuses a request.
const OVERFLOW: &str = "upstream connect error or disconnect/reset before headers. reset reason: overflow";

/// `Connection: upgrade` with an `Upgrade` protocol (HTTP/1.1 only).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// A local answer, with its response flag.
fn local(rec: &mut Record, status: StatusCode, flag: &'static str, text: &str) -> Response<HttpBody> {
    rec.flags = flag;
    if rec.grpc {
        // gRPC clients read grpc-status, as Envoy's local replies give it
        // (its mapping of HTTP statuses to gRPC codes).
        let code = match status.as_u16() {
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            504 => 4,
            429 | 502 | 503 => 14,
            _ => 2,
        };
        return grpc_local(code, text);
    }
    let mut r = Response::new(full(text.to_owned()));
    *r.status_mut() = status;
    r
}

/// Envoy's jwt_authn refusal: 401 with the reason and a `WWW-Authenticate`
/// challenge (gRPC: UNAUTHENTICATED).
fn unauthenticated(rec: &mut Record, refused: crate::jwt::Refused) -> Response<HttpBody> {
    rec.denied_by = Some(refused.policy.unwrap_or_else(|| "RequestAuthentication".into()));
    let text = refused.error.to_string();
    let mut r = local(rec, StatusCode::UNAUTHORIZED, "-", &text);
    let challenge = format!("Bearer realm=\"http://{}{}\", error=\"invalid_token\"", rec.authority, rec.path);
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// A gRPC answer with status `code` (a trailers-only response).
fn grpc_local(code: u32, text: &str) -> Response<HttpBody> {
    let mut r = Response::new(empty());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    r.headers_mut().insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(text) {
        r.headers_mut().insert("grpc-message", v);
    }
    r
}

/// VirtualService `fault`: a delay (flag `DI`) for its share of requests,
/// then an abort (flag `FI`) for its share: the answer instead of the
/// upstream's. `None`: the request goes on.
async fn inject_fault(rec: &mut Record, f: &api::Fault) -> Option<Response<HttpBody>> {
    let hit = |percent: f64| percent > 0.0 && fastrand::f64() * 100.0 < percent;
    let delayed = f.delay_ms > 0 && hit(f.delay_percent);
    if delayed {
        tokio::time::sleep(Duration::from_millis(f.delay_ms)).await;
        rec.flags = "DI";
    }
    if !hit(f.abort_percent) {
        return None;
    }
    let flag = if delayed { "DI,FI" } else { "FI" };
    if let Some(code) = f.abort_grpc_status {
        rec.flags = flag;
        return Some(grpc_local(code, "fault filter abort"));
    }
    let status = u16::try_from(f.abort_http_status).ok().and_then(|s| StatusCode::from_u16(s).ok());
    Some(local(rec, status.unwrap_or(StatusCode::SERVICE_UNAVAILABLE), flag, "fault filter abort"))
}

/// The request as AuthorizationPolicies read it.
fn policy_facts<'a>(
    ds: &Downstream,
    parts: &'a http::request::Parts,
    rec: &'a Record,
    auth: Option<&'a authz::RequestAuth>,
) -> crate::authz::Facts<'a> {
    crate::authz::Facts {
        method: parts.method.as_str(),
        path_and_query: &rec.path,
        host: &rec.authority,
        headers: &parts.headers,
        remote: ds.peer_addr.ip(),
        auth,
    }
}

/// AuthorizationPolicy CUSTOM, before DENY and ALLOW: the provider's
/// answer when it denies (flag `UAEX`, as Envoy's ext_authz sets it);
/// when it allows, its edits are made to the request, and the headers it
/// has for the client are kept for the response.
async fn external_authorization(
    wp: &Arc<Waypoint>,
    ds: &Downstream,
    view: &MeshView,
    parts: &mut http::request::Parts,
    auth: Option<&authz::RequestAuth>,
    rec: &mut Record,
) -> Option<Response<HttpBody>> {
    let facts = policy_facts(ds, parts, rec, auth);
    // A denial is logged with its facts, counted and recorded by policy.
    let deny = |d: authz::Decision, facts: &crate::authz::Facts<'_>, request_id: &str, what: &str| {
        crate::authz::log(ds, facts, request_id, &d, what);
        wp.metrics.authorized(false, false, d.policy.as_deref());
        d.policy
    };
    let (policy, provider) = match crate::authz::custom(wp, ds, view, &facts)? {
        Ok(found) => found,
        Err(d) => {
            rec.denied_by = deny(d, &facts, rec.request_id(), "request denied by authorization policy");
            return Some(local(rec, StatusCode::FORBIDDEN, "RBAC", "RBAC: access denied"));
        }
    };
    let verdict = match provider {
        Some(p) => {
            let check = ext_authz::Check {
                method: &parts.method,
                path_and_query: &rec.path,
                host: &rec.authority,
                headers: &parts.headers,
                request_id: rec.request_id(),
                protocol: if parts.version == Version::HTTP_2 { "HTTP/2" } else { "HTTP/1.1" },
            };
            ext_authz::check(wp, ds, p, &check).await
        }
        None => ext_authz::undefined(),
    };
    match verdict {
        ext_authz::Verdict::Allow(allowed) => {
            allowed.edit_request(&mut parts.headers);
            rec.ext_authz_headers = allowed.response_headers;
            None
        }
        ext_authz::Verdict::Deny { status, headers, body, why } => {
            let reason = match provider {
                Some(p) => format!("external authorizer {:?} {why}", p.name),
                None => why,
            };
            let d = authz::Decision { allowed: false, policy: Some(policy), reason };
            let facts = policy_facts(ds, parts, rec, auth);
            rec.denied_by = deny(d, &facts, rec.request_id(), "request denied by external authorizer");
            if rec.grpc {
                return Some(local(rec, status, "UAEX", &String::from_utf8_lossy(&body)));
            }
            rec.flags = "UAEX";
            let mut r = Response::new(full(body));
            *r.status_mut() = status;
            for (name, value) in headers {
                r.headers_mut().append(name, value);
            }
            Some(r)
        }
    }
}

async fn route_and_send(
    wp: &Arc<Waypoint>,
    ds: &Downstream,
    view: &MeshView,
    parts: &mut http::request::Parts,
    body: Recording<Incoming>,
    recorded: &Recorded,
    rec: &mut Record,
) -> Response<HttpBody> {
    let auth = if ds.service.jwt_rules.is_empty() {
        None
    } else {
        match crate::jwt::authenticate(wp, ds, parts, &rec.path, rec.request_id()).await {
            Ok(a) => a,
            Err(refused) => return unauthenticated(rec, refused),
        }
    };
    if let Some(denied) = external_authorization(wp, ds, view, parts, auth.as_deref(), rec).await {
        return denied;
    }
    let authz_facts = policy_facts(ds, parts, rec, auth.as_deref());
    if let Some(d) = crate::authz::check(wp, ds, view, &authz_facts, rec.request_id())
        && !d.allowed
    {
        rec.denied_by = d.policy;
        return local(rec, StatusCode::FORBIDDEN, "RBAC", "RBAC: access denied");
    }
    let svc_key = ds.service.key();
    if let Err(l) = wp.rate_limits.check(svc_key, ds.service.rate_limit.as_ref(), ds.peer.as_ref(), ds.peer_addr.ip()) {
        wp.metrics.rate_limited(svc_key, l.limit);
        tracing::debug!(request_id = rec.request_id(), policy = %l.policy, limit = l.limit, "rate limited");
        let mut r = local(rec, StatusCode::TOO_MANY_REQUESTS, "RL", "local rate limited");
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(l.retry_after));
        return r;
    }
    let routes = view.routes(&ds.service);
    let facts = RequestFacts {
        method: parts.method.as_str(),
        path: &rec.path,
        authority: &rec.authority,
        port: ds.port,
        headers: &HeaderView(&parts.headers),
    };
    let Some(route) = routes.select(&facts) else {
        return local(rec, StatusCode::NOT_FOUND, "NR", "no route matched");
    };
    let matched_prefix = route.matched_prefix(&facts).map(String::from);
    rec.route = routes.routes.iter().position(|r| std::ptr::eq(r, route)).map(|i| (routes.clone(), i));
    if let Some(f) = &route.wire.fault
        && let Some(aborted) = inject_fault(rec, f).await
    {
        return aborted;
    }
    if let Some(rd) = &route.wire.redirect {
        return redirect(rec, rd, matched_prefix.as_deref());
    }
    let Some((backend, backend_key)) = route.backend(fastrand::u32(..)) else {
        return local(rec, StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream");
    };
    if !backend.missing.is_empty() {
        return local(rec, StatusCode::SERVICE_UNAVAILABLE, "NR", &backend.missing);
    }
    let Some(svc) = view.service(backend_key) else {
        return local(rec, StatusCode::SERVICE_UNAVAILABLE, "NR", "backend service not defined");
    };
    rec.backend_service = Some(svc.clone());
    let port = u16::try_from(backend.port).ok().filter(|p| *p != 0).unwrap_or(ds.port);
    let subset = &backend.subset_labels;
    let endpoints = match view
        .endpoints(svc, port, |w| subset.iter().all(|(k, v)| w.is_some_and(|w| w.wire.labels.get(k) == Some(v))))
    {
        Ok(e) => e,
        Err(_) => return local(rec, StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream"),
    };
    // Circuit breaking: the cluster's requests in flight, as Envoy counts them;
    // outlier detection: its ejected endpoints get no attempt.
    let pool = svc.connection_pool(&backend.subset, port);
    let cluster = wp.clusters.get(svc.key(), &backend.subset, port);
    let outliers = svc.outlier_detection(&backend.subset, port);
    let total = endpoints.len();
    let lb = svc.load_balancer(&backend.subset, port);
    let endpoints = match lb.and_then(|l| l.locality.as_ref()) {
        Some(locality) => {
            let all = endpoints.clone();
            let healthy = cluster.healthy(endpoints, Upstream::addr, outliers);
            by_locality(wp, ds, locality, &all, healthy, outliers.is_some())
        }
        None => cluster.healthy(endpoints, Upstream::addr, outliers),
    };
    // Load balancing: the first choice first, the others for retries.
    let balancer = balance::policy(lb);
    let hashed = lb.filter(|_| balancer == balance::Policy::Hash).and_then(|lb| {
        let key = hash_key(lb, &parts.headers, &rec.path, ds.peer_addr.ip(), &mut rec.set_cookie)?;
        let addrs: Vec<SocketAddr> = endpoints.iter().map(Upstream::addr).collect();
        let chosen = cluster.table(&addrs, lb.maglev, lb.table_size).lookup(key)?;
        endpoints.iter().position(|e| e.addr() == chosen)
    });
    let load = |u: &Upstream| match balancer {
        balance::Policy::PeakEwma => cluster.latency_cost(u.addr()),
        _ => f64::from(cluster.load_of(u.addr())),
    };
    let mut endpoints = balance::order(endpoints, balancer, load, |n| fastrand::usize(..n), hashed);
    // Slow start (`warmup`): endpoints new to the cluster get a growing share.
    if let Some(lb) = lb.filter(|l| l.warmup_ms > 0 && balancer != balance::Policy::Hash) {
        let addrs: Vec<SocketAddr> = endpoints.iter().map(Upstream::addr).collect();
        let warming = cluster.warming(&addrs, lb);
        if !warming.is_empty() {
            let weight = |u: &Upstream| warming.iter().find(|(a, _)| *a == u.addr()).map_or(1.0, |(_, w)| *w);
            endpoints = balance::slow_start(endpoints, weight, fastrand::f64);
        }
    }
    match cluster.request(pool) {
        Some(permit) => rec.admitted = Some(permit),
        None => {
            wp.metrics.overflowed();
            return local(rec, StatusCode::SERVICE_UNAVAILABLE, "UO", OVERFLOW);
        }
    }
    for ops in [&route.wire.request_headers, &backend.request_headers].into_iter().flatten() {
        edit(&mut parts.headers, ops);
    }
    if let Some(rw) = &route.wire.rewrite {
        rec.path = routing::rewrite_path(&rec.path, matched_prefix.as_deref(), &rw.full_path, &rw.prefix);
        if !rw.authority.is_empty() {
            rec.authority = rw.authority.clone();
        }
    }
    // As Istio: HTTP/2 upstream for ports declared http2 or grpc; for an
    // undeclared (detected) port, the client's own protocol; else HTTP/1.1.
    let h2 = match ds.protocol.as_str() {
        "http2" | "grpc" => true,
        "" => parts.version == Version::HTTP_2,
        _ => false,
    };
    if let Some(t) = &mut rec.trace {
        let upstream =
            || (upstream_cluster(svc, port, &backend.subset), format!("http://{}{}", rec.authority, rec.path));
        t.start_client(&mut parts.headers, parts.method.as_str(), upstream);
    }
    let policy = route.retry();
    let per_try = Duration::from_millis(policy.per_try_timeout_ms);
    let attempts = async {
        let mut body = Some(body.boxed());
        let mut last = None;
        let mut _retrying = None; // a retry in flight (maxRetries), for as long as the attempt runs
        for attempt in 0..=policy.attempts {
            if attempt > 0 {
                let Some(permit) = cluster.retry(pool) else {
                    tracing::debug!(
                        request_id = rec.request_id(),
                        "not retried: the cluster's maxRetries are in flight"
                    );
                    wp.metrics.retried(false);
                    break;
                };
                _retrying = Some(permit);
                let Some(replay) = recorded.replay() else {
                    tracing::debug!(request_id = rec.request_id(), "not retried: the request body was not kept whole");
                    break;
                };
                if !wp.budget.withdraw() {
                    tracing::debug!(request_id = rec.request_id(), "not retried: the retry budget is spent");
                    wp.metrics.retried(false);
                    break;
                }
                wp.metrics.retried(true);
                tokio::time::sleep(retry::backoff(policy, attempt, fastrand::f64())).await;
                body = Some(replay);
            }
            let up = &endpoints[attempt as usize % endpoints.len()];
            rec.attempts = attempt + 1;
            rec.upstream = Some(up.addr());
            rec.upstream_workload = up.workload().cloned();
            let Some(b) = body.take() else { break };
            let request = upstream_request(parts, &rec.authority, &rec.path, h2, b);
            rec.load = Some(cluster.start(up.addr()));
            let to = Attempt {
                up,
                h2,
                per_try,
                cluster: &cluster,
                pool,
                observe_latency: balancer == balance::Policy::PeakEwma,
            };
            let (outcome, response) = attempt_once(wp, to, request).await;
            if let Some(e) = cluster.record(up.addr(), outcome, total, outliers) {
                wp.metrics.ejected(svc.key(), e.reason);
                info!(
                    service = svc.key(),
                    subset = %backend.subset,
                    endpoint = %e.endpoint,
                    ejected_for_ms = e.duration.as_millis() as u64,
                    reason = e.reason,
                    "endpoint ejected by outlier detection"
                );
            }
            let more = attempt < policy.attempts;
            tracing::debug!(request_id = rec.request_id(), attempt, ?outcome, more, "attempt");
            if more && retry::retriable(policy, outcome) {
                last = Some((outcome, response));
                continue;
            }
            return (outcome, response);
        }
        last.unwrap_or((Outcome::ConnectFailure, None))
    };
    let result = if route.wire.timeout_ms > 0 {
        tokio::time::timeout(Duration::from_millis(route.wire.timeout_ms), attempts).await
    } else {
        Ok(attempts.await)
    };
    let mut response = match result {
        Err(_) => return local(rec, StatusCode::GATEWAY_TIMEOUT, "UT", "upstream request timeout"),
        Ok((_, Some(r))) => r,
        Ok((Outcome::PerTryTimeout, None)) => {
            return local(rec, StatusCode::GATEWAY_TIMEOUT, "UT", "upstream request timeout");
        }
        Ok((Outcome::ConnectFailure, None)) => {
            return local(rec, StatusCode::SERVICE_UNAVAILABLE, "UF", "upstream connect error");
        }
        Ok((Outcome::Overflow, None)) => {
            wp.metrics.overflowed();
            return local(rec, StatusCode::SERVICE_UNAVAILABLE, "UO", OVERFLOW);
        }
        Ok((_, None)) => {
            return local(rec, StatusCode::SERVICE_UNAVAILABLE, "UC", "upstream reset before response headers");
        }
    };
    if rec.attempts > 1 && response.status().is_server_error() {
        rec.flags = "URX";
    }
    for ops in [&route.wire.response_headers, &backend.response_headers].into_iter().flatten() {
        edit(response.headers_mut(), ops);
    }
    if let Some(cookie) = rec.set_cookie.take() {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    for m in &route.wire.mirrors {
        if fastrand::f64() * 100.0 < m.percent {
            mirror(wp, view, m, parts, rec, recorded, h2, port);
        }
    }
    response
}

/// localityLbSetting: the healthy endpoints of the locality that takes
/// this request ([`crate::locality::restrict`]), judged from this
/// waypoint's own instance.
fn by_locality(
    wp: &Waypoint,
    ds: &Downstream,
    rules: &api::LocalityLb,
    all: &[Upstream],
    healthy: Vec<Upstream>,
    failover: bool,
) -> Vec<Upstream> {
    let me = crate::authz::instance(wp, ds);
    let here = me.as_ref().map(|w| (w.wire.locality.as_str(), &w.wire.labels));
    fn whereabouts(u: &Upstream) -> crate::locality::Whereabouts<'_> {
        u.workload().map(|w| (w.wire.locality.as_str(), &w.wire.labels))
    }
    crate::locality::restrict(here, rules, all, healthy, failover, whereabouts, fastrand::f64())
}

/// Where and how an attempt goes.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    up: &'a Upstream,
    h2: bool,
    per_try: Duration,
    cluster: &'a Arc<Cluster>,
    pool: Option<&'a api::ConnectionPool>,
    /// Peak-EWMA: the time from the request's sending on a connection to
    /// its response's headers is counted for the endpoint.
    observe_latency: bool,
}

/// One attempt: its outcome, and the response when there is one.
async fn attempt_once(
    wp: &Waypoint,
    a: Attempt<'_>,
    request: Request<HttpBody>,
) -> (Outcome, Option<Response<HttpBody>>) {
    let Attempt { up, h2, per_try, cluster, pool, observe_latency } = a;
    let Some(me) = wp.identity() else { return (Outcome::ConnectFailure, None) };
    let sender = match wp.upstreams.connect(&wp.proxy, &me, up, h2, cluster, pool).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("{e}");
            return (if e.overflow { Outcome::Overflow } else { Outcome::ConnectFailure }, None);
        }
    };
    let sent = Instant::now();
    let send = async {
        match sender {
            Sender::H1(mut s, uses, permit) => {
                let r = s.send_request(request).await;
                wp.upstreams.release(up.addr(), Sender::H1(s, uses + 1, permit), cluster, pool);
                r
            }
            Sender::H2(mut s) => s.send_request(request).await,
        }
    };
    let result = if per_try.is_zero() { Ok(send.await) } else { tokio::time::timeout(per_try, send).await };
    match result {
        Err(_) => (Outcome::PerTryTimeout, None),
        Ok(Err(e)) => (if refused_stream(&e) { Outcome::RefusedStream } else { Outcome::Reset }, None),
        Ok(Ok(resp)) => {
            if observe_latency {
                cluster.observe_latency(up.addr(), sent.elapsed());
            }
            let grpc = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse().ok());
            let outcome = Outcome::Response { status: resp.status().as_u16(), grpc };
            (outcome, Some(resp.map(|b| b.map_err(Into::into).boxed())))
        }
    }
}

/// Whether the upstream refused the HTTP/2 stream (REFUSED_STREAM: it never
/// processed the request, so a retry is safe): an h2 error in hyper's chain.
fn refused_stream(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

/// The request an attempt sends: HTTP/2 with an absolute URI, or HTTP/1.1
/// in origin form with `Host`; hop-by-hop headers dropped.
fn upstream_request(
    parts: &http::request::Parts,
    authority: &str,
    path: &str,
    h2: bool,
    body: HttpBody,
) -> Request<HttpBody> {
    let mut headers = parts.headers.clone();
    // Hop-by-hop headers stay behind, but an HTTP/1.1 upgrade's own.
    let upgrade = !h2 && is_upgrade(&headers);
    for h in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"] {
        if !(upgrade && (h == "connection" || h == "upgrade")) {
            headers.remove(h);
        }
    }
    // The client's URI is kept (its bytes shared) when it already has the
    // form and the values this request goes with; otherwise it is rebuilt.
    let same_path = parts.uri.path_and_query().map(|p| p.as_str()) == Some(path);
    let uri: Uri = if h2 {
        if same_path
            && parts.uri.authority().map(|a| a.as_str()) == Some(authority)
            && parts.uri.scheme() == Some(&http::uri::Scheme::HTTP)
        {
            parts.uri.clone()
        } else {
            format!("http://{authority}{path}").parse().unwrap_or_else(|_| Uri::from_static("/"))
        }
    } else if same_path && parts.uri.authority().is_none() {
        parts.uri.clone()
    } else {
        path.parse().unwrap_or_else(|_| Uri::from_static("/"))
    };
    if !h2
        && headers.get(header::HOST).map(HeaderValue::as_bytes) != Some(authority.as_bytes())
        && let Ok(v) = HeaderValue::from_str(authority)
    {
        headers.insert(header::HOST, v);
    }
    if h2 {
        headers.remove(header::HOST);
    }
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    *req.headers_mut() = headers;
    req
}

#[allow(clippy::too_many_arguments)]
fn mirror(
    wp: &Arc<Waypoint>,
    view: &MeshView,
    m: &api::Mirror,
    parts: &http::request::Parts,
    rec: &Record,
    recorded: &Recorded,
    h2: bool,
    port: u16,
) {
    // Only a body the waypoint holds whole can be copied; Envoy mirrors with "-shadow" hosts.
    let (Some(body), Some(svc)) = (recorded.replay(), view.service(&format!("{}/{}", m.namespace, m.service))) else {
        return;
    };
    let port = u16::try_from(m.port).ok().filter(|p| *p != 0).unwrap_or(port);
    let Ok(endpoints) = view.endpoints(svc, port, |_| true) else { return };
    let host = match rec.authority.split_once(':') {
        Some((h, p)) => format!("{h}-shadow:{p}"),
        None => format!("{}-shadow", rec.authority),
    };
    let request = upstream_request(parts, &host, &rec.path, h2, body);
    let (wp, up) = (wp.clone(), endpoints[fastrand::usize(..endpoints.len())].clone());
    let (pool, cluster) = (svc.connection_pool("", port).cloned(), wp.clusters.get(svc.key(), "", port));
    tokio::spawn(async move {
        let to = Attempt {
            up: &up,
            h2,
            per_try: Duration::from_secs(10),
            cluster: &cluster,
            pool: pool.as_ref(),
            observe_latency: false,
        };
        let (_, response) = attempt_once(&wp, to, request).await;
        if let Some(r) = response {
            let _ = r.into_body().collect().await; // drained and dropped: the client never sees it
        }
    });
}

fn redirect(rec: &mut Record, rd: &api::Redirect, matched_prefix: Option<&str>) -> Response<HttpBody> {
    let path = if !rd.path.is_empty() || !rd.prefix.is_empty() {
        routing::rewrite_path(&rec.path, matched_prefix, &rd.path, &rd.prefix)
    } else {
        rec.path.clone()
    };
    let host = if rd.authority.is_empty() {
        rec.authority.split(':').next().unwrap_or_default().to_owned()
    } else {
        rd.authority.clone()
    };
    let port = if rd.port != 0 { format!(":{}", rd.port) } else { String::new() };
    let scheme = if rd.scheme.is_empty() { "http" } else { &rd.scheme };
    let status = StatusCode::from_u16(u16::try_from(rd.status).unwrap_or(301)).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let mut r = Response::new(empty());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{host}{port}{path}")) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn edit(headers: &mut HeaderMap, ops: &api::HeaderOps) {
    for e in routing::edit_headers(ops) {
        match e {
            HeaderEdit::Remove(n) => {
                headers.remove(n);
            }
            HeaderEdit::Set(n, v) | HeaderEdit::Add(n, v) => {
                let (Ok(name), Ok(value)) = (HeaderName::try_from(n), HeaderValue::from_str(v)) else { continue };
                if matches!(e, HeaderEdit::Set(..)) {
                    headers.insert(name, value);
                } else {
                    headers.append(name, value);
                }
            }
        }
    }
}

/// A consistent hash's key for the request, by the load balancer's
/// `httpHeaderName`, `useSourceIp`, `httpQueryParameterName` or `httpCookie`
/// (a client without the cookie is given one when it has a ttl, as Envoy
/// does); `None`: no key (the request goes to any endpoint).
fn hash_key(
    lb: &api::LoadBalancer,
    headers: &HeaderMap,
    path: &str,
    peer: std::net::IpAddr,
    set_cookie: &mut Option<HeaderValue>,
) -> Option<u64> {
    if !lb.header.is_empty() {
        return headers.get(lb.header.as_str()).map(|v| balance::hash(v.as_bytes()));
    }
    if lb.source_ip {
        return Some(balance::hash(peer));
    }
    if !lb.query_parameter.is_empty() {
        let query = path.split_once('?')?.1;
        return query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == lb.query_parameter).then(|| balance::hash(v))
        });
    }
    if lb.cookie.is_empty() {
        return None;
    }
    let sent =
        headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(
            |c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == lb.cookie).then(|| v.trim_matches('"').to_owned())
            },
        );
    if let Some(v) = sent {
        return Some(balance::hash(v));
    }
    if lb.cookie_ttl_ms == 0 {
        return None;
    }
    let value = format!("{:016x}", fastrand::u64(..));
    let path = if lb.cookie_path.is_empty() { String::new() } else { format!("; Path={}", lb.cookie_path) };
    let cookie = format!("{}=\"{value}\"; Max-Age={}{path}; HttpOnly", lb.cookie, lb.cookie_ttl_ms.div_ceil(1000));
    *set_cookie = HeaderValue::from_str(&cookie).ok();
    Some(balance::hash(value))
}

/// The request's `x-request-id`, generated (a random UUID) when absent.
fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get("x-request-id") {
        return id.clone();
    }
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    // Formatted on the stack: the header value is the one allocation.
    let mut buf = [0u8; 36];
    let _ = std::io::Write::write_fmt(
        &mut &mut buf[..],
        format_args!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            (b >> 48) & 0x3fff | 0x8000,
            b & 0xffff_ffff_ffff
        ),
    );
    let id = HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("-"));
    headers.insert("x-request-id", id.clone());
    id
}

impl Record {
    fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or_default()
    }

    fn route_name(&self) -> &str {
        self.route.as_ref().and_then(|(routes, i)| routes.routes.get(*i)).map_or("", |r| r.wire.name.as_str())
    }
}

/// Wraps the response so that, when its body ends, the request is counted
/// and logged once.
fn finish(
    wp: Arc<Waypoint>,
    ds: Arc<Downstream>,
    mut rec: Record,
    recorded: Recorded,
    response: Response<HttpBody>,
    in_flight: crate::InFlight,
) -> Response<HttpBody> {
    let status = response.status().as_u16();
    let header_grpc = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(String::from);
    let (parts, body) = response.into_parts();
    let body = Counting::new(body, move |ended: Ended| {
        drop(in_flight);
        let grpc_status = ended.grpc_status.or(header_grpc).filter(|_| rec.grpc).unwrap_or_default();
        let flags = if ended.cut && rec.flags == "-" { "DC" } else { rec.flags };
        let key = crate::metrics::SeriesKey {
            destination: rec.upstream_workload.as_ref().map_or(0, |w| Arc::as_ptr(w) as usize),
            service: rec.backend_service.as_ref().map_or(0, |s| Arc::as_ptr(s) as usize),
            status,
            grpc_status: grpc_status.parse().ok(),
            flags,
            grpc: rec.grpc,
        };
        let ms = rec.started.elapsed().as_secs_f64() * 1000.0;
        let sizes = (recorded.bytes(), ended.bytes);
        // What Telemetry's expressions read: made once, when one is evaluated.
        let attributes = std::cell::OnceCell::new();
        let labels = match rec.rules.as_deref() {
            None => {
                let pins = (rec.upstream_workload.clone(), rec.backend_service.clone());
                let (series, labels) = ds.series.get(key, pins, || {
                    let labels = labels(&wp, &ds, &rec, status, grpc_status.clone(), flags);
                    (wp.metrics.series(&labels), labels)
                });
                series.record(ms, sizes.0, sizes.1);
                labels
            }
            // The service's Telemetry edits the label sets (never cached:
            // the rules are the configuration's of the moment).
            Some(rules) => {
                let labels = labels(&wp, &ds, &rec, status, grpc_status.clone(), flags);
                let each = |metric| {
                    let rule = rules.metric(Side::Server, metric);
                    if rule.disabled {
                        return None;
                    }
                    let mut l = labels.clone();
                    for tag in rule.removed {
                        l.set(tag, String::new());
                    }
                    if !rule.upserted.is_empty() {
                        let a = attributes.get_or_init(|| request_attributes(&ds, &rec, status, &grpc_status, sizes));
                        for (tag, e) in rule.upserted {
                            if let Some(v) = a.text(e) {
                                l.set(tag, v);
                            }
                        }
                    }
                    Some(l)
                };
                wp.metrics.record_each(each, ms, sizes.0, sizes.1);
                Arc::new(labels)
            }
        };
        let logged = rec.rules.as_ref().is_none_or(|r| {
            let made = || request_attributes(&ds, &rec, status, &grpc_status, sizes);
            r.logs(Side::Server, || attributes.into_inner().unwrap_or_else(made))
        });
        if let Some(t) = rec.trace.take() {
            t.end(crate::trace::End {
                status,
                response_flags: flags,
                request_size: sizes.0,
                response_size: sizes.1,
                upstream_address: rec.upstream,
                destination_principal: rec
                    .upstream_workload
                    .as_ref()
                    .map(|_| labels.istio.destination_principal.as_str()),
            });
        }
        if !logged {
            return;
        }
        info!(
            target: "access",
            method = %rec.method,
            authority = %rec.authority,
            path = %rec.path,
            protocol = %labels.istio.request_protocol,
            status,
            grpc_status = %grpc_status,
            response_flags = flags,
            duration_ms = ms as u64,
            bytes_received = recorded.bytes(),
            bytes_sent = ended.bytes,
            upstream = %rec.upstream.map(|u| u.to_string()).unwrap_or_default(),
            route = rec.route_name(),
            attempts = rec.attempts,
            denied_by = rec.denied_by.as_deref().unwrap_or(""),
            source = %ds.peer.as_ref().map(ToString::to_string).unwrap_or_default(),
            destination = %labels.istio.destination_principal,
            destination_service = %labels.istio.destination_service,
            request_id = rec.request_id(),
            connection_id = ds.connection_id.as_deref().unwrap_or(""),
            "request"
        );
    });
    Response::from_parts(parts, body.boxed())
}

/// Envoy's attributes of a request that has ended, for Telemetry's
/// expressions (access-log filters, tag values).
fn request_attributes(
    ds: &Downstream,
    rec: &Record,
    status: u16,
    grpc_status: &str,
    (request_size, response_size): (u64, u64),
) -> mesh_common::cel::Attributes {
    let mut a = mesh_common::cel::Attributes::default();
    let url_path = rec.path.split('?').next().unwrap_or_default();
    a.set("request", "method", rec.method.as_str())
        .set("request", "path", rec.path.as_str())
        .set("request", "url_path", url_path)
        .set("request", "host", rec.authority.as_str())
        .set("request", "scheme", "http")
        .set("request", "id", rec.request_id())
        .set("request", "size", request_size)
        .set("request", "duration_ms", rec.started.elapsed().as_secs_f64() * 1000.0)
        .set("response", "code", i64::from(status))
        .set("response", "size", response_size)
        .set("response", "flags", rec.flags)
        .set("source", "address", ds.peer_addr.ip().to_string())
        .set("source", "port", i64::from(ds.peer_addr.port()))
        .set("destination", "address", ds.destination.ip().to_string())
        .set("destination", "port", i64::from(ds.port))
        .set("connection", "mtls", ds.peer.is_some());
    if !grpc_status.is_empty() {
        a.set("response", "grpc_status", grpc_status);
    }
    if let Some(p) = &ds.peer {
        a.set("source", "principal", p.to_string());
    }
    if let Some(u) = rec.upstream {
        a.set("upstream", "address", u.to_string());
    }
    if let Some(h) = &rec.headers {
        a.set_map("request", "headers", h.iter().filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))));
    }
    a
}

/// Envoy's name for the cluster of a service's port (and subset):
/// `outbound|<port>|<subset>|<host>`.
fn upstream_cluster(svc: &ServiceInfo, port: u16, subset: &str) -> String {
    format!("outbound|{port}|{subset}|{}", svc.host)
}

fn labels(
    wp: &Waypoint,
    ds: &Downstream,
    rec: &Record,
    status: u16,
    grpc_response_status: String,
    response_flags: &'static str,
) -> RequestLabels {
    let view = wp.proxy.state.view();
    let unknown = || "unknown".to_string();
    let source = view.workload_by_ip(ds.peer_addr.ip()).filter(|w| Some(&w.identity) == ds.peer.as_ref());
    let dst = rec.upstream_workload.as_ref();
    let svc = rec.backend_service.as_ref().unwrap_or(&ds.service);
    RequestLabels {
        istio: IstioLabels {
            reporter: "waypoint".into(),
            source_workload: source.map_or_else(unknown, |w| w.workload_name().to_owned()),
            source_workload_namespace: ds.peer.as_ref().map_or_else(unknown, |p| p.namespace().to_owned()),
            source_principal: ds.peer.as_ref().map_or_else(unknown, ToString::to_string),
            source_canonical_service: source.map_or_else(unknown, |w| w.canonical_service().to_owned()),
            source_canonical_revision: source.map_or_else(unknown, |w| w.canonical_revision().to_owned()),
            source_app: source.map_or_else(unknown, |w| w.app_and_version().0.to_owned()),
            source_version: source.map_or_else(unknown, |w| w.app_and_version().1.to_owned()),
            source_cluster: DEFAULT_CLUSTER.into(),
            destination_workload: dst.map_or_else(unknown, |w| w.workload_name().to_owned()),
            destination_workload_namespace: dst.map_or_else(unknown, |w| w.wire.namespace.clone()),
            destination_principal: dst.map_or_else(unknown, |w| w.identity.to_string()),
            destination_canonical_service: dst.map_or_else(unknown, |w| w.canonical_service().to_owned()),
            destination_canonical_revision: dst.map_or_else(unknown, |w| w.canonical_revision().to_owned()),
            destination_app: dst.map_or_else(unknown, |w| w.app_and_version().0.to_owned()),
            destination_version: dst.map_or_else(unknown, |w| w.app_and_version().1.to_owned()),
            destination_cluster: DEFAULT_CLUSTER.into(),
            destination_service: svc.host.clone(),
            destination_service_name: svc.name.clone(),
            destination_service_namespace: svc.namespace.clone(),
            request_protocol: if rec.grpc { "grpc" } else { "http" }.into(),
            response_flags: response_flags.into(),
            connection_security_policy: if ds.peer.is_some() { "mutual_tls" } else { "none" }.into(),
        },
        response_code: status.to_string(),
        grpc_response_status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistent_hash_keys() {
        let lb = |f: &dyn Fn(&mut api::LoadBalancer)| {
            let mut lb = api::LoadBalancer { hashed: true, ..Default::default() };
            f(&mut lb);
            lb
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-user", HeaderValue::from_static("ann"));
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; session=\"s42\""));
        let peer: std::net::IpAddr = "10.0.0.7".parse().unwrap();
        let key = |lb: &api::LoadBalancer, path: &str| {
            let mut set = None;
            (hash_key(lb, &headers, path, peer, &mut set), set)
        };
        let by_header = lb(&|l| l.header = "x-user".into());
        assert_eq!(key(&by_header, "/"), (Some(balance::hash(&b"ann"[..])), None));
        assert_eq!(key(&lb(&|l| l.header = "x-none".into()), "/").0, None, "no header: no key");
        assert_eq!(key(&lb(&|l| l.source_ip = true), "/").0, Some(balance::hash(peer)));
        let by_query = lb(&|l| l.query_parameter = "id".into());
        assert_eq!(key(&by_query, "/p?x=1&id=9").0, Some(balance::hash("9")));
        assert_eq!(key(&by_query, "/p?x=1").0, None);
        assert_eq!(key(&lb(&|l| l.cookie = "session".into()), "/").0, Some(balance::hash("s42")));
        let (k, set) = key(
            &lb(&|l| {
                l.cookie = "sticky".into();
                l.cookie_ttl_ms = 60_000;
                l.cookie_path = "/".into();
            }),
            "/",
        );
        let set = set.expect("a client without the cookie is given one");
        let text = set.to_str().unwrap();
        let value = text.strip_prefix("sticky=\"").and_then(|v| v.split('"').next()).unwrap();
        assert_eq!(k, Some(balance::hash(value)), "the new cookie is the key");
        assert!(text.ends_with("; Max-Age=60; Path=/; HttpOnly"), "{text}");
        assert_eq!(key(&lb(&|l| l.cookie = "sticky".into()), "/").0, None, "no ttl: no cookie made");
    }
}
