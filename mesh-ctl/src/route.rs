//! `mesh-ctl routes` and `mesh-ctl route explain`: the HTTP routes each
//! waypoint-bound service has, and which one a request would take and why,
//! computed by the waypoint's own matcher (`mesh_common::routing`) on the
//! routes the nodes hold now (the controller sends waypoints the same).
use std::collections::BTreeMap;

use mesh_common::{
    api::{self, value_match::Kind},
    routing::{self, CompiledRoutes, RequestFacts},
};
use serde_json::json;

use crate::{
    api::{Client, CtlError, NodeSelector, Result},
    output::{Report, Table},
};

/// A request's headers, as `--header K=V` gives them.
pub fn parse_headers(headers: &[String]) -> Result<Vec<(String, String)>> {
    headers
        .iter()
        .map(|h| {
            h.split_once(['=', ':'])
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .ok_or_else(|| CtlError::new(format!("--header {h:?}: expected NAME=VALUE")))
        })
        .collect()
}

fn value(m: &Option<api::ValueMatch>) -> String {
    let Some(m) = m else { return "*".into() };
    let not = if m.invert { "!" } else { "" };
    match &m.kind {
        Some(Kind::Exact(s)) => format!("{not}{s}"),
        Some(Kind::Prefix(s)) => format!("{not}{s}*"),
        Some(Kind::PathPrefix(s)) => format!("{not}{s}/*"),
        Some(Kind::Regex(r)) => format!("{not}~{r}"),
        Some(Kind::Present(_)) | None => format!("{not}present"),
    }
}

/// One match as a line: `GET /api/* end-user=jason`.
fn describe_match(m: &api::HttpMatch) -> String {
    let mut parts = Vec::new();
    if m.method.is_some() {
        parts.push(value(&m.method));
    }
    if m.path.is_some() {
        parts.push(value(&m.path));
    }
    if m.authority.is_some() {
        parts.push(format!("host={}", value(&m.authority)));
    }
    parts.extend(m.headers.iter().map(|h| format!("{}={}", h.name, value(&h.value))));
    parts.extend(m.query.iter().map(|q| format!("?{}={}", q.name, value(&q.value))));
    if m.port != 0 {
        parts.push(format!("port {}", m.port));
    }
    if parts.is_empty() { "*".into() } else { parts.join(" ") }
}

fn describe_backends(r: &api::HttpRoute) -> String {
    if let Some(rd) = &r.redirect {
        return format!(
            "redirect {} {}{}",
            rd.status,
            rd.authority,
            if rd.path.is_empty() { &rd.prefix } else { &rd.path }
        );
    }
    let total: u32 = r.backends.iter().map(|b| b.weight).sum();
    r.backends
        .iter()
        .map(|b| {
            let subset = if b.subset.is_empty() { String::new() } else { format!(" ({})", b.subset) };
            let share = if total > 0 { f64::from(b.weight) * 100.0 / f64::from(total) } else { 0.0 };
            let missing = if b.missing.is_empty() { "" } else { " MISSING" };
            format!("{}/{}{subset} {share:.0}%{missing}", b.namespace, b.service)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_retry(r: &Option<api::Retry>) -> String {
    match r {
        None => "Istio's default (2 on connect-failure, refused-stream, unavailable, cancelled, 503)".into(),
        Some(r) if r.attempts == 0 => "none".into(),
        Some(r) => {
            let per_try =
                if r.per_try_timeout_ms > 0 { format!(", {} ms per try", r.per_try_timeout_ms) } else { String::new() };
            let codes = if r.status_codes.is_empty() { String::new() } else { format!(" {:?}", r.status_codes) };
            format!("{} on {}{codes}{per_try}", r.attempts, r.retry_on.join(","))
        }
    }
}

fn describe_fault(f: &api::Fault) -> String {
    let mut parts = Vec::new();
    if f.delay_ms > 0 && f.delay_percent > 0.0 {
        parts.push(format!("delay {} ms for {}% of requests", f.delay_ms, f.delay_percent));
    }
    if f.abort_percent > 0.0 {
        let answer = match f.abort_grpc_status {
            Some(code) => format!("gRPC status {code}"),
            None => format!("HTTP {}", f.abort_http_status),
        };
        parts.push(format!("abort with {answer} for {}% of requests", f.abort_percent));
    }
    if parts.is_empty() { "none (0%)".into() } else { parts.join(", then ") }
}

fn timeout(ms: u64) -> String {
    if ms == 0 { "none".into() } else { format!("{ms} ms") }
}

/// The routes of every service (or of `service`, `namespace/name`), with their waypoints.
pub fn routes(client: &Client, sel: &NodeSelector, service: Option<&str>) -> Result<Report> {
    let dumps = client.dumps(sel)?;
    let (_, dump) = dumps.first().ok_or_else(|| CtlError::new("no node answered"))?;
    let services = dump.services.clone().unwrap_or_default();
    let all = dump.routes.clone().unwrap_or_default();
    let mut table = Table::new(&["SERVICE", "WAYPOINT", "#", "ROUTE", "MATCH", "BACKENDS", "TIMEOUT", "RETRIES"]);
    let mut rows = Vec::new();
    for (key, svc) in &services {
        if service.is_some_and(|s| s != key) {
            continue;
        }
        let waypoint = svc.waypoint.as_ref().map(|w| format!("{}/{}", w.namespace, w.name));
        let wire = all.get(key).map(|r| r.routes.clone());
        let shown = wire.clone().unwrap_or_else(|| vec![routing::default_route(&svc.namespace, &svc.name)]);
        if waypoint.is_none() && wire.is_none() {
            continue; // neither bound nor routed: nothing L7 about it
        }
        for (i, r) in shown.iter().enumerate() {
            let matches = if r.matches.is_empty() {
                "*".into()
            } else {
                r.matches.iter().map(describe_match).collect::<Vec<_>>().join(" | ")
            };
            table.row(vec![
                key.clone(),
                waypoint.clone().unwrap_or_else(|| "NONE (routes not applied)".into()),
                (i + 1).to_string(),
                r.name.clone(),
                matches,
                describe_backends(r),
                timeout(r.timeout_ms),
                describe_retry(&r.retry),
            ]);
        }
        rows.push(json!({ "service": key, "waypoint": waypoint, "routes": shown, "default": wire.is_none() }));
    }
    if let Some(s) = service
        && rows.is_empty()
    {
        return Err(CtlError::new(format!("{s}: no such service bound to a waypoint or routed"))
            .hint("`mesh-ctl services` lists the services; bind one with the istio.io/use-waypoint label"));
    }
    Ok(Report::new(&rows, table.render("no service is bound to a waypoint or has HTTP routes")))
}

/// What a request to `to` (`namespace/name:port`) with these attributes
/// would get at its waypoint.
pub struct Request<'a> {
    pub to: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub authority: Option<&'a str>,
    pub headers: &'a [(String, String)],
}

pub fn explain(client: &Client, sel: &NodeSelector, req: &Request<'_>) -> Result<Report> {
    let dumps = client.dumps(sel)?;
    let (_, dump) = dumps.first().ok_or_else(|| CtlError::new("no node answered"))?;
    let (key, port) =
        req.to.rsplit_once(':').and_then(|(k, p)| Some((k, p.parse::<u16>().ok()?))).ok_or_else(|| {
            CtlError::new(format!("--to {:?}: expected NAMESPACE/SERVICE:PORT", req.to))
                .hint("e.g. --to demo/backend:80")
        })?;
    let services = dump.services.clone().unwrap_or_default();
    let svc = services.get(key).ok_or_else(|| {
        CtlError::new(format!("--to {key}: no such service")).hint("`mesh-ctl services` lists them (namespace/name)")
    })?;
    let routes = dump.routes.as_ref().and_then(|r| r.get(key)).cloned();
    let (data, text) = explain_request(svc, routes.as_ref(), port, req)?;
    Ok(Report::new(data, text))
}

/// The explanation itself (pure): routes tried and why they were passed
/// over, the one taken, its backends, retries and timeouts.
pub fn explain_request(
    svc: &api::Service,
    routes: Option<&api::HttpRoutes>,
    port: u16,
    req: &Request<'_>,
) -> Result<(serde_json::Value, String)> {
    let key = format!("{}/{}", svc.namespace, svc.name);
    if !svc.ports.iter().any(|p| p.port == u32::from(port)) {
        let ports: Vec<String> = svc.ports.iter().map(|p| p.port.to_string()).collect();
        return Err(CtlError::new(format!("service {key} has no port {port} (it has {})", ports.join(", "))));
    }
    let defaulted = routes.is_none();
    let wire = routes.cloned().unwrap_or_else(|| api::HttpRoutes {
        namespace: svc.namespace.clone(),
        service: svc.name.clone(),
        routes: vec![routing::default_route(&svc.namespace, &svc.name)],
    });
    let compiled = CompiledRoutes::from_wire(&wire).map_err(|e| CtlError::new(format!("routes of {key}: {e}")))?;
    let headers: Vec<(&str, &str)> = req.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let authority = req.authority.map_or_else(|| svc.hosts.first().cloned().unwrap_or_default(), String::from);
    let facts = RequestFacts { method: req.method, path: req.path, authority: &authority, port, headers: &headers[..] };
    let mut text = String::new();
    let waypoint = svc.waypoint.as_ref().map(|w| format!("{}/{}", w.namespace, w.name));
    match &waypoint {
        Some(w) => text += &format!("{} {} to {key}:{port} goes through waypoint {w}.\n", req.method, req.path),
        None => {
            text += &format!(
                "{key} is bound to no waypoint: its connections go to its endpoints at L4 and these routes are not applied.\n"
            )
        }
    }
    if defaulted {
        text += "It has no routes of its own: every request goes to the service itself.\n";
    }
    let tried = compiled.explain(&facts);
    let mut trace = Vec::new();
    for (i, (name, result)) in tried.iter().enumerate() {
        match result {
            Ok(()) => text += &format!("  {}. {name}: MATCHES\n", i + 1),
            Err(why) => text += &format!("  {}. {name}: no ({})\n", i + 1, why.0),
        }
        trace.push(json!({ "route": name, "matched": result.is_ok(), "why_not": result.as_ref().err().map(|m| &m.0) }));
    }
    let Some(route) = compiled.select(&facts) else {
        text += "No route matches: the waypoint answers 404 (response flag NR).\n";
        let data = json!({ "service": key, "waypoint": waypoint, "tried": trace, "route": null, "status": 404 });
        return Ok((data, text));
    };
    let r = &route.wire;
    let mut outcome = BTreeMap::new();
    if let Some(rd) = &r.redirect {
        text += &format!("Answered by the waypoint with a redirect ({}): {}\n", rd.status, describe_backends(r));
        outcome.insert("redirect", json!(rd));
    } else {
        text += &format!("Backends by weight: {}\n", describe_backends(r));
        for b in r.backends.iter().filter(|b| !b.subset_labels.is_empty()) {
            let labels: Vec<String> = b.subset_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            text +=
                &format!("  subset {} of {}/{}: pods with {}\n", b.subset, b.namespace, b.service, labels.join(","));
        }
        for b in r.backends.iter().filter(|b| !b.missing.is_empty()) {
            text += &format!("  {}/{}: {}: requests for it get 503 (NR)\n", b.namespace, b.service, b.missing);
        }
    }
    if let Some(rw) = &r.rewrite {
        let path = routing::rewrite_path(req.path, route.matched_prefix(&facts), &rw.full_path, &rw.prefix);
        text += &format!(
            "Rewritten to {path}{}\n",
            if rw.authority.is_empty() { String::new() } else { format!(" on {}", rw.authority) }
        );
        outcome.insert("rewritten_path", json!(path));
    }
    text += &format!("Timeout: {}. Retries: {}.\n", timeout(r.timeout_ms), describe_retry(&r.retry));
    if let Some(f) = &r.fault {
        text += &format!("Fault: {}.\n", describe_fault(f));
    }
    let data = json!({
        "service": key,
        "waypoint": waypoint,
        "tried": trace,
        "route": r,
        "default_routes": defaulted,
        "outcome": outcome,
    });
    Ok((data, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(waypoint: bool) -> api::Service {
        api::Service {
            namespace: "demo".into(),
            name: "backend".into(),
            hosts: vec!["backend.demo.svc.cluster.local".into()],
            ports: vec![api::ServicePort { port: 80, ..Default::default() }],
            waypoint: waypoint.then(|| api::WaypointRef {
                namespace: "demo".into(),
                name: "waypoint".into(),
                workloads: vec![],
            }),
            ..Default::default()
        }
    }

    fn routes() -> api::HttpRoutes {
        let b = |subset: &str, weight| api::WeightedBackend {
            namespace: "demo".into(),
            service: "backend".into(),
            subset: subset.into(),
            weight,
            subset_labels: [("version".to_string(), subset.to_string())].into(),
            ..Default::default()
        };
        api::HttpRoutes {
            namespace: "demo".into(),
            service: "backend".into(),
            routes: vec![
                api::HttpRoute {
                    name: "VirtualService/demo/backend/tester".into(),
                    matches: vec![api::HttpMatch {
                        headers: vec![api::NamedMatch {
                            name: "x-tester".into(),
                            value: Some(api::ValueMatch { kind: Some(Kind::Exact("yes".into())), invert: false }),
                        }],
                        ..Default::default()
                    }],
                    backends: vec![b("v2", 100)],
                    timeout_ms: 500,
                    ..Default::default()
                },
                api::HttpRoute {
                    name: "VirtualService/demo/backend/canary".into(),
                    backends: vec![b("v1", 90), b("v2", 10)],
                    ..Default::default()
                },
            ],
        }
    }

    fn ask(headers: &[(String, String)], waypoint: bool, routed: bool) -> String {
        let r = routes();
        let req = Request { to: "demo/backend:80", method: "GET", path: "/", authority: None, headers };
        explain_request(&svc(waypoint), routed.then_some(&r), 80, &req).unwrap().1
    }

    #[test]
    fn explanations() {
        let marked = ask(&parse_headers(&["x-tester=yes".into()]).unwrap(), true, true);
        assert!(marked.contains("through waypoint demo/waypoint"), "{marked}");
        assert!(marked.contains("1. VirtualService/demo/backend/tester: MATCHES"), "{marked}");
        assert!(marked.contains("demo/backend (v2) 100%") && marked.contains("Timeout: 500 ms"), "{marked}");
        let plain = ask(&[], true, true);
        assert!(plain.contains("tester: no (header x-tester = \"yes\" (got nothing))"), "{plain}");
        assert!(plain.contains("demo/backend (v1) 90%, demo/backend (v2) 10%"), "{plain}");
        assert!(plain.contains("subset v1 of demo/backend: pods with version=v1"), "{plain}");
        assert!(plain.contains("Retries: Istio's default"), "{plain}");
        let unbound = ask(&[], false, false);
        assert!(unbound.contains("bound to no waypoint") && unbound.contains("no routes of its own"), "{unbound}");
        assert!(parse_headers(&["nothing".into()]).is_err());
    }
}
