//! `mesh-ctl authz explain --to NS/SERVICE:PORT --method --path --header --jwt`:
//! the decision the service's waypoint makes for an HTTP request, with the
//! waypoint's own code: the policies bound there
//! (`authz::applies_at_waypoint`) decided by the shared evaluator on the
//! request's attributes, the path normalized as the waypoint normalizes it.
use std::{fmt::Write as _, net::IpAddr};

use mesh_common::{
    admin::ConfigDump,
    api,
    authz::{self, CompiledPolicy, Connection, HttpRequest, RequestAuth, WaypointTarget, jwt},
    identity::SpiffeId,
};
use serde_json::json;

use crate::{
    api::{CtlError, Result},
    output::Report,
};

/// The request to explain.
pub struct Request {
    pub method: String,
    pub path: String,
    pub authority: Option<String>,
    pub headers: Vec<(String, String)>,
}

struct Facts<'a> {
    req: &'a Request,
    path: &'a str,
    host: &'a str,
    remote: IpAddr,
    auth: Option<RequestAuth>,
}

impl HttpRequest for Facts<'_> {
    fn method(&self) -> &str {
        &self.req.method
    }

    fn path(&self) -> &str {
        self.path.split('?').next().unwrap_or("/")
    }

    fn host(&self) -> &str {
        self.host
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.req.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn remote_ip(&self) -> IpAddr {
        self.remote
    }

    fn auth(&self) -> Option<&RequestAuth> {
        self.auth.as_ref()
    }

    fn query(&self) -> &str {
        self.path.split_once('?').map_or("", |(_, q)| q)
    }
}

/// What the waypoint's RequestAuthentication step makes of the request:
/// the verified claims, or the 401 it answers; a line saying so.
fn authenticate(
    rules: &[api::JwtRule],
    facts: &Facts<'_>,
) -> (std::result::Result<Option<RequestAuth>, jwt::JwtError>, String) {
    if rules.is_empty() {
        return (Ok(None), "none: no RequestAuthentication applies".into());
    }
    let selected = match jwt::select(rules, facts) {
        Ok(Some(s)) => s,
        Ok(None) => return (Ok(None), "no token: passes, left to authorization (no request principal)".into()),
        Err(e) => return (Err(e.clone()), format!("401 {e}")),
    };
    let rule = &rules[selected.rule];
    let (checked, how) = if rule.jwks.is_empty() {
        (
            jwt::verify_claims(rule, &selected.token),
            format!("signature not checked here: the waypoint fetches {}", rule.jwks_uri),
        )
    } else {
        let keys = jwt::parse_jwks(&rule.jwks).map_err(|_| jwt::JwtError::KeysUnavailable);
        (keys.and_then(|k| jwt::verify(rule, &selected.token, &k)), "signature checked with the inline jwks".into())
    };
    let line = match &checked {
        Ok(a) => format!(
            "token in {} for {} (issuer {}): principal {} ({how})",
            selected.location, rule.policy, rule.issuer, a.principal
        ),
        Err(e) => format!("401 {e} (token in {}, rule of {})", selected.location, rule.policy),
    };
    (checked.map(Some), line)
}

/// Who sends the request.
pub struct Source<'a> {
    pub workload: Option<&'a api::Workload>,
    pub identity: Option<SpiffeId>,
    pub ip: IpAddr,
}

/// The explanation for `service` (bound to a waypoint) on `port`.
pub fn explain(
    dump: &ConfigDump,
    service: &api::Service,
    port: u16,
    src: &Source<'_>,
    req: &Request,
    policies: &[(api::Authorization, CompiledPolicy)],
) -> Result<Report> {
    let Some(wp) = &service.waypoint else {
        return Err(CtlError::new(format!("{}/{} is not bound to a waypoint", service.namespace, service.name)));
    };
    let workloads = dump.workloads.clone().unwrap_or_default();
    let instance = wp.workloads.iter().find_map(|uid| workloads.get(uid));
    let no_labels = Default::default();
    let at = WaypointTarget {
        gateway_namespace: &wp.namespace,
        gateway_name: &wp.name,
        labels: instance.map_or(&no_labels, |w| &w.labels),
        service_namespace: &service.namespace,
        service_name: &service.name,
    };
    let applying: Vec<&(api::Authorization, CompiledPolicy)> =
        policies.iter().filter(|(wire, _)| authz::applies_at_waypoint(wire, &at)).collect();
    let vip: IpAddr = service.vips.iter().find_map(|v| v.parse().ok()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let path = authz::normalize_path(&req.path);
    let host = req.authority.clone().unwrap_or_else(|| service.hosts.first().cloned().unwrap_or_default());
    let mut facts = Facts { req, path: &path, host: &host, remote: src.ip, auth: None };
    let (authenticated, auth_line) = authenticate(&service.jwt_rules, &facts);
    if let Ok(a) = &authenticated {
        facts.auth = a.clone();
    }
    let conn =
        Connection { source: src.identity.clone(), source_ip: src.ip, destination_ip: vip, destination_port: port };
    let compiled = || applying.iter().map(|(_, c)| c);
    let custom = authz::custom(compiled(), &conn, &facts);
    let decision = match &custom {
        Some(Err(d)) => d.clone(),
        _ => authz::evaluate_request(compiled(), &conn, &facts),
    };
    let shadow = authz::dry_run(compiled(), &conn, Some(&facts));
    // The authorizer a matching CUSTOM policy sends the request to (it is asked first).
    let external = match &custom {
        Some(Ok(p)) => {
            let wire = applying.iter().find(|(_, c)| std::ptr::eq(c, *p)).map(|(w, _)| w);
            Some(match wire.and_then(|w| w.ext_authz.as_ref()) {
                Some(x) => format!(
                    "{}/{} asks external authorizer {:?} ({}:{} over {}) first; if it denies, its answer is the \
                     response{}",
                    p.namespace,
                    p.name,
                    x.name,
                    x.host,
                    x.port,
                    if x.grpc { "gRPC" } else { "HTTP" },
                    if x.fail_open { "; if it cannot be asked, the request goes on (failOpen)" } else { "" }
                ),
                None => format!(
                    "{}/{} names provider {:?}, which MeshConfig.extensionProviders does not define: DENY (403)",
                    p.namespace, p.name, p.provider
                ),
            })
        }
        _ => None,
    };
    let undefined_provider =
        matches!(&custom, Some(Ok(p)) if applying.iter().any(|(w, c)| std::ptr::eq(c, *p) && w.ext_authz.is_none()));

    let mut verdicts: Vec<_> = compiled()
        .map(|p| (format!("{}/{}", p.namespace, p.name), p.action, p.dry_run, p.matched_rule(&conn, Some(&facts))))
        .collect();
    verdicts.sort_by_key(|v| v.1.order());

    let mut text = String::new();
    let from = match (src.workload, &src.identity) {
        (Some(w), Some(id)) => format!("{} ({}), in the mesh: HBONE (mTLS) as {id}", w.uid, src.ip),
        (Some(w), None) => format!("{} ({}), outside the mesh: plaintext, no identity", w.uid, src.ip),
        (None, _) => format!("{}, not a known workload: plaintext, no identity", src.ip),
    };
    let _ = writeln!(text, "from      {from}");
    let _ = writeln!(
        text,
        "to        service {}/{} ({vip}:{port}) through waypoint {}/{} (L7)",
        service.namespace, service.name, wp.namespace, wp.name
    );
    let headers: Vec<String> = req.headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(text, "request   {} {path} host={host} {}", req.method, headers.join(" "));
    let _ = writeln!(text, "jwt       {auth_line}");
    if let Err(e) = &authenticated {
        let _ =
            writeln!(text, "decision  DENY (401 {e}): RequestAuthentication refuses the token before authorization");
        let data = json!({
            "request": { "method": req.method, "path": path, "host": host, "headers": req.headers },
            "authentication": { "error": e.to_string() },
            "decision": { "allowed": false, "status": 401, "reason": e.to_string() },
        });
        let mut report = Report::new(data, text);
        report.failed = true;
        return Ok(report);
    }
    if verdicts.is_empty() {
        let _ = writeln!(text, "policies  none is bound to this service or its waypoint");
    } else {
        let _ = writeln!(text, "policies  (CUSTOM first, then DENY, then ALLOW; AUDIT and dry-run never decide)");
        for (name, action, dry_run, rule) in &verdicts {
            let verdict = rule.map_or("no rule matches".to_owned(), |r| format!("matches (rule {r})"));
            let dry = if *dry_run { " [dry-run]" } else { "" };
            let _ = writeln!(text, "  {:<6} {:<40} {verdict}{dry}", format!("{action:?}").to_uppercase(), name);
        }
    }
    let verdict_line = |d: &authz::Decision| {
        format!(
            "{}{}: {}",
            if d.allowed { "ALLOW" } else { "DENY (403 RBAC: access denied)" },
            d.policy.as_ref().map(|p| format!(" by {p}")).unwrap_or_default(),
            d.reason
        )
    };
    if let Some(line) = &external {
        let _ = writeln!(text, "external  {line}");
    }
    if undefined_provider {
        let _ = writeln!(text, "decision  DENY (403 RBAC: access denied): a CUSTOM policy's provider is not defined");
    } else if external.is_some() && decision.allowed {
        let _ = writeln!(text, "decision  {} (if the external authorizer allows)", verdict_line(&decision));
    } else {
        let _ = writeln!(text, "decision  {}", verdict_line(&decision));
    }
    if let Some(s) = &shadow {
        let _ = writeln!(text, "dry-run   would be {} (not enforced)", verdict_line(s));
    }
    let data = json!({
        "from": { "workload": src.workload.map(|w| &w.uid), "ip": src.ip, "identity": src.identity.as_ref().map(ToString::to_string) },
        "to": { "service": format!("{}/{}", service.namespace, service.name), "vip": vip, "port": port,
                "waypoint": format!("{}/{}", wp.namespace, wp.name) },
        "request": { "method": req.method, "path": path, "host": host, "headers": req.headers },
        "policies": verdicts.iter().map(|(name, action, dry_run, rule)| json!({
            "policy": name, "action": action, "dry_run": dry_run, "matched_rule": rule })).collect::<Vec<_>>(),
        "authentication": { "principal": facts.auth.as_ref().map(|a| &a.principal), "explained": auth_line },
        "decision": decision,
        "external_authorizer": external,
        "dry_run_decision": shadow,
    });
    let mut report = Report::new(data, text);
    report.failed = !decision.allowed || undefined_provider;
    Ok(report)
}
