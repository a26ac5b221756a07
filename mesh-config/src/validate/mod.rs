//! What the schema cannot say: valid names, addresses, ports, selectors,
//! principals, enum values, and L7 attributes in policies enforced at L4.
//! Returns `(field path, message)` pairs; the parser adds file and line.
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_common::identity::valid_segment;

use super::{
    Resource,
    objects::{
        AuthorizationPolicySpec, IntOrString, Labels, ObjectMeta, PolicyTargetReference, Rule, WorkloadEntrySpec,
        WorkloadSelector,
    },
};

mod jwt;
mod mesh_config;
mod routing;
mod telemetry;

pub use routing::{WAYPOINT_CLASS, WAYPOINT_FOR_LABEL};

type Issues = Vec<(String, String)>;

/// Label that opts a namespace (or a pod, to opt out) into the ambient mesh.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// `when` keys ztunnel-style L4 enforcement can evaluate.
use mesh_common::authz::L4_CONDITION_KEYS;

/// Keys Istio accepts that mesh's waypoint does not evaluate (a warning
/// says what happens instead; see `enforced.rs`).
pub fn unevaluated_condition_key(key: &str) -> bool {
    key == "connection.sni" || key.starts_with("experimental.envoy.filters.")
}

pub fn validate(resource: &Resource) -> Issues {
    let mut out = Issues::new();
    let meta = resource.metadata();
    check_meta(meta, resource.kind().namespaced(), &mut out);
    match resource {
        Resource::Namespace(ns) => {
            if let Some(mode) = ns.metadata.labels.get(DATAPLANE_MODE_LABEL)
                && !matches!(mode.as_str(), "ambient" | "none")
            {
                out.push((
                    format!("metadata.labels[{DATAPLANE_MODE_LABEL}]"),
                    format!("{mode:?}: expected \"ambient\" or \"none\""),
                ));
            }
        }
        Resource::ServiceAccount(_) | Resource::Node(_) => {}
        Resource::Pod(pod) => {
            if let Some(sa) = &pod.spec.service_account_name
                && !valid_segment(sa)
            {
                out.push(("spec.serviceAccountName".into(), format!("{sa:?} is not a valid name")));
            }
            if let Some(node) = &pod.spec.node_name
                && !valid_subdomain(node)
            {
                out.push(("spec.nodeName".into(), format!("{node:?} is not a valid node name")));
            }
            if let Some(ip) = &pod.status.pod_ip {
                check_ip(ip, "status.podIP", &mut out);
            }
            for (i, ip) in pod.status.pod_ips.iter().enumerate() {
                check_ip(&ip.ip, &format!("status.podIPs[{i}].ip"), &mut out);
            }
        }
        Resource::Service(svc) => {
            for (i, port) in svc.spec.ports.iter().enumerate() {
                check_port(port.port, &format!("spec.ports[{i}].port"), &mut out);
                match &port.target_port {
                    Some(IntOrString::Int(p)) => check_port(*p, &format!("spec.ports[{i}].targetPort"), &mut out),
                    Some(IntOrString::String(name)) if !valid_port_name(name) => out.push((
                        format!("spec.ports[{i}].targetPort"),
                        format!("{name:?}: expected a port number or a port name"),
                    )),
                    _ => {}
                }
                if let Some(proto) = &port.protocol
                    && !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP")
                {
                    out.push((format!("spec.ports[{i}].protocol"), format!("{proto:?}: expected TCP, UDP or SCTP")));
                }
            }
            if let Some(ip) = &svc.spec.cluster_ip
                && ip != "None"
                && !ip.is_empty()
            {
                check_ip(ip, "spec.clusterIP", &mut out);
            }
            for (i, ip) in svc.spec.cluster_ips.iter().enumerate() {
                check_ip(ip, &format!("spec.clusterIPs[{i}]"), &mut out);
            }
            if let Some(selector) = &svc.spec.selector {
                check_labels(selector, "spec.selector", &mut out);
            }
        }
        Resource::EndpointSlice(slice) => endpoint_slice(slice, &mut out),
        Resource::PeerAuthentication(pa) => {
            let check_mode = |mode: &Option<String>, field: String, out: &mut Issues| {
                if let Some(m) = mode
                    && !matches!(m.as_str(), "UNSET" | "DISABLE" | "PERMISSIVE" | "STRICT")
                {
                    out.push((field, format!("{m:?}: expected UNSET, DISABLE, PERMISSIVE or STRICT")));
                }
            };
            if let Some(mtls) = &pa.spec.mtls {
                check_mode(&mtls.mode, "spec.mtls.mode".into(), &mut out);
            }
            if let Some(sel) = &pa.spec.selector {
                check_labels(&sel.match_labels, "spec.selector.matchLabels", &mut out);
            }
            for (port, mtls) in &pa.spec.port_level_mtls {
                let field = format!("spec.portLevelMtls[{port}]");
                match port.parse::<i64>() {
                    Ok(p) => check_port(p, &field, &mut out),
                    Err(_) => out.push((field.clone(), format!("{port:?} is not a port number"))),
                }
                check_mode(&mtls.mode, format!("{field}.mode"), &mut out);
            }
            if !pa.spec.port_level_mtls.is_empty() && pa.spec.selector.is_none() {
                out.push((
                    "spec.portLevelMtls".into(),
                    "needs spec.selector: port-level mTLS applies to selected workloads only".into(),
                ));
            }
        }
        Resource::AuthorizationPolicy(ap) => check_authorization(&ap.spec, &mut out),
        Resource::RequestAuthentication(ra) => jwt::check_request_authentication(&ra.spec, &mut out),
        Resource::Telemetry(t) => telemetry::check_telemetry(&t.spec, &mut out),
        Resource::ServiceEntry(se) => {
            if se.spec.hosts.is_empty() {
                out.push(("spec.hosts".into(), "at least one host is required".into()));
            }
            for (i, a) in se.spec.addresses.iter().enumerate() {
                check_cidr(a, &format!("spec.addresses[{i}]"), &mut out);
            }
            for (i, p) in se.spec.ports.iter().enumerate() {
                check_port(p.number, &format!("spec.ports[{i}].number"), &mut out);
                if let Some(t) = p.target_port {
                    check_port(t, &format!("spec.ports[{i}].targetPort"), &mut out);
                }
            }
            if let Some(loc) = &se.spec.location
                && !matches!(loc.as_str(), "MESH_EXTERNAL" | "MESH_INTERNAL")
            {
                out.push(("spec.location".into(), format!("{loc:?}: expected MESH_EXTERNAL or MESH_INTERNAL")));
            }
            if let Some(res) = &se.spec.resolution
                && !matches!(res.as_str(), "NONE" | "STATIC" | "DNS" | "DNS_ROUND_ROBIN")
            {
                out.push(("spec.resolution".into(), format!("{res:?}: expected NONE, STATIC, DNS or DNS_ROUND_ROBIN")));
            }
            if se.spec.workload_selector.is_some() && !se.spec.endpoints.is_empty() {
                out.push(("spec.workloadSelector".into(), "cannot be combined with spec.endpoints".into()));
            }
            let is_static = se.spec.resolution.as_deref() == Some("STATIC");
            for (i, ep) in se.spec.endpoints.iter().enumerate() {
                check_entry(ep, &format!("spec.endpoints[{i}]"), is_static, &mut out);
            }
        }
        Resource::WorkloadEntry(we) => check_entry(&we.spec, "spec", true, &mut out),
        Resource::Gateway(g) => routing::check_gateway(g, &mut out),
        Resource::HttpRoute(r) => routing::check_http_route(&r.spec, &mut out),
        Resource::GrpcRoute(r) => routing::check_grpc_route(&r.spec, &mut out),
        Resource::HttpLocalRateLimitPolicy(r) => check_rate_limit(&r.spec, &mut out),
        Resource::VirtualService(vs) => routing::check_virtual_service(&vs.spec, &mut out),
        Resource::DestinationRule(dr) => routing::check_destination_rule(&dr.spec, &mut out),
        Resource::ConfigMap(cm) => mesh_config::check_config_map(cm, &mut out),
        Resource::Opaque(_) => {}
    }
    out
}

fn check_meta(meta: &ObjectMeta, namespaced: bool, out: &mut Issues) {
    if !valid_subdomain(&meta.name) {
        out.push(("metadata.name".into(), format!("{:?}: expected lowercase letters, digits, '-' and '.'", meta.name)));
    }
    if namespaced
        && let Some(ns) = &meta.namespace
        && !valid_segment(ns)
    {
        out.push(("metadata.namespace".into(), format!("{ns:?} is not a valid namespace name")));
    }
    check_labels(&meta.labels, "metadata.labels", out);
}

/// Linkerd's checks on `HTTPLocalRateLimitPolicy`: positive limits, a
/// limit to enforce, overrides that name service accounts.
fn check_rate_limit(spec: &crate::objects::RateLimitSpec, out: &mut Issues) {
    if spec.target_ref.name.is_empty() {
        out.push(("spec.targetRef.name".into(), "is required".into()));
    }
    for (name, limit) in [("total", &spec.total), ("identity", &spec.identity)] {
        if let Some(l) = limit
            && l.requests_per_second <= 0
        {
            out.push((format!("spec.{name}.requestsPerSecond"), "must be positive".into()));
        }
    }
    if spec.total.is_none() && spec.identity.is_none() && spec.overrides.is_empty() {
        out.push(("spec".into(), "needs total, identity or overrides".into()));
    }
    for (i, o) in spec.overrides.iter().enumerate() {
        if o.requests_per_second <= 0 {
            out.push((format!("spec.overrides[{i}].requestsPerSecond"), "must be positive".into()));
        }
        if o.client_refs.is_empty() {
            out.push((format!("spec.overrides[{i}].clientRefs"), "names no client".into()));
        }
        for (j, c) in o.client_refs.iter().enumerate() {
            if c.kind.as_deref().is_some_and(|k| k != "ServiceAccount") {
                out.push((format!("spec.overrides[{i}].clientRefs[{j}].kind"), "expected ServiceAccount".into()));
            }
        }
    }
}

fn check_authorization(spec: &AuthorizationPolicySpec, out: &mut Issues) {
    let action = spec.action.as_deref().unwrap_or("ALLOW");
    if !matches!(action, "ALLOW" | "DENY" | "AUDIT" | "CUSTOM") {
        out.push(("spec.action".into(), format!("{action:?}: expected ALLOW, DENY, AUDIT or CUSTOM")));
    }
    let both = "cannot be combined with targetRef/targetRefs";
    check_selection(spec.selector.as_ref(), spec.target_ref.as_ref(), &spec.target_refs, both, out);
    if action == "CUSTOM" {
        if spec.provider.as_ref().is_none_or(|p| p.name.is_empty()) {
            out.push((
                "spec.provider.name".into(),
                "is required with action CUSTOM (an extensionProviders name)".into(),
            ));
        }
    } else if spec.provider.is_some() {
        out.push(("spec.provider".into(), "is only valid with action CUSTOM".into()));
    }
    for (r, rule) in spec.rules.iter().flatten().enumerate() {
        check_rule(rule, &format!("spec.rules[{r}]"), out);
    }
}

fn check_rule(rule: &Rule, at: &str, out: &mut Issues) {
    for (f, from) in rule.from.iter().enumerate() {
        let src = &from.source;
        let base = format!("{at}.from[{f}].source");
        for (name, values) in [("principals", &src.principals), ("notPrincipals", &src.not_principals)] {
            for (i, v) in values.iter().enumerate() {
                if let Err(m) = check_principal(v) {
                    out.push((format!("{base}.{name}[{i}]"), m));
                }
            }
        }
        for (name, values) in [("namespaces", &src.namespaces), ("notNamespaces", &src.not_namespaces)] {
            for (i, v) in values.iter().enumerate() {
                if !valid_pattern(v, valid_segment) {
                    out.push((format!("{base}.{name}[{i}]"), format!("{v:?} is not a namespace or a '*' pattern")));
                }
            }
        }
        for (name, values) in [
            ("ipBlocks", &src.ip_blocks),
            ("notIpBlocks", &src.not_ip_blocks),
            ("remoteIpBlocks", &src.remote_ip_blocks),
            ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
        ] {
            for (i, v) in values.iter().enumerate() {
                check_cidr(v, &format!("{base}.{name}[{i}]"), out);
            }
        }
    }
    for (t, to) in rule.to.iter().enumerate() {
        let op = &to.operation;
        let base = format!("{at}.to[{t}].operation");
        for (name, values) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
            for (i, v) in values.iter().enumerate() {
                match v.parse::<i64>() {
                    Ok(p) => check_port(p, &format!("{base}.{name}[{i}]"), out),
                    Err(_) => out.push((format!("{base}.{name}[{i}]"), format!("{v:?} is not a port number"))),
                }
            }
        }
    }
    for (w, cond) in rule.when.iter().enumerate() {
        let base = format!("{at}.when[{w}]");
        if cond.values.is_empty() && cond.not_values.is_empty() {
            out.push((base.clone(), "needs values or notValues".into()));
        }
        if !L4_CONDITION_KEYS.contains(&cond.key.as_str()) {
            if let Err(e) = mesh_common::authz::ConditionMatch::from_key(&cond.key, &[], &[])
                && !unevaluated_condition_key(&cond.key)
            {
                out.push((format!("{base}.key"), format!("{e}: unknown attribute")));
            } else if cond.key == "remote.ip" {
                for (name, values) in [("values", &cond.values), ("notValues", &cond.not_values)] {
                    for (i, v) in values.iter().enumerate() {
                        check_cidr(v, &format!("{base}.{name}[{i}]"), out);
                    }
                }
            }
            continue;
        }
        for (name, values) in [("values", &cond.values), ("notValues", &cond.not_values)] {
            for (i, v) in values.iter().enumerate() {
                let field = format!("{base}.{name}[{i}]");
                match cond.key.as_str() {
                    "source.ip" | "destination.ip" => check_cidr(v, &field, out),
                    "destination.port" => match v.parse::<i64>() {
                        Ok(p) => check_port(p, &field, out),
                        Err(_) => out.push((field, format!("{v:?} is not a port number"))),
                    },
                    "source.principal" => {
                        if let Err(m) = check_principal(v) {
                            out.push((field, m));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

fn check_entry(ep: &WorkloadEntrySpec, at: &str, needs_ip: bool, out: &mut Issues) {
    match &ep.address {
        Some(a) if needs_ip => check_ip(a, &format!("{at}.address"), out),
        None if needs_ip => out.push((format!("{at}.address"), "is required".into())),
        _ => {}
    }
    for (name, port) in &ep.ports {
        check_port(*port, &format!("{at}.ports[{name}]"), out);
    }
    if let Some(sa) = &ep.service_account
        && !valid_segment(sa)
    {
        out.push((format!("{at}.serviceAccount"), format!("{sa:?} is not a valid name")));
    }
    check_labels(&ep.labels, &format!("{at}.labels"), out);
}

/// Istio's principal syntax (`<trust-domain>/ns/<ns>/sa/<sa>`, or a
/// `spiffe://` URI), with at most one `*` at the start or the end.
fn check_principal(p: &str) -> Result<(), String> {
    let body = p.strip_prefix("spiffe://").unwrap_or(p);
    if body.is_empty() || body.chars().any(char::is_whitespace) {
        return Err(format!("{p:?} is not a principal: expected <trust-domain>/ns/<namespace>/sa/<service-account>"));
    }
    if body == "*" {
        return Ok(());
    }
    let stars = body.matches('*').count();
    if stars > 1 || (stars == 1 && !body.starts_with('*') && !body.ends_with('*')) {
        return Err(format!("{p:?}: '*' may only stand at the start or the end of a principal"));
    }
    if stars == 0 {
        let parts: Vec<&str> = body.split('/').collect();
        let ok = matches!(parts.as_slice(), [td, "ns", ns, "sa", sa] if !td.is_empty() && valid_segment(ns) && valid_segment(sa));
        if !ok {
            return Err(format!(
                "{p:?} is not a principal: expected <trust-domain>/ns/<namespace>/sa/<service-account>"
            ));
        }
    }
    Ok(())
}

/// A value or an Istio match pattern (`*`, `prefix*`, `*suffix`).
fn valid_pattern(v: &str, valid: impl Fn(&str) -> bool) -> bool {
    if v == "*" {
        return true;
    }
    let core = v.strip_prefix('*').or_else(|| v.strip_suffix('*')).unwrap_or(v);
    !core.is_empty()
        && !core.contains('*')
        && (valid(core) || core.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
}

/// The API server's checks on an EndpointSlice that mesh relies on: the
/// address type, addresses of that type, port numbers.
fn endpoint_slice(slice: &crate::objects::endpoint_slice::EndpointSlice, out: &mut Issues) {
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(true),
        "IPv6" => Some(false),
        "FQDN" => None,
        other => {
            out.push(("addressType".into(), format!("{other:?}: expected IPv4, IPv6 or FQDN")));
            return;
        }
    };
    for (i, e) in slice.endpoints.iter().enumerate() {
        for (j, a) in e.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            match (family, a.parse::<IpAddr>()) {
                (None, _) => {}
                (Some(v4), Ok(ip)) if ip.is_ipv4() == v4 => {}
                (Some(_), _) => out.push((field, format!("{a:?} is not an {} address", slice.address_type))),
            }
        }
    }
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if let Some(port) = p.port {
            check_port(port, &format!("ports[{i}].port"), out);
        }
    }
}

fn check_ip(v: &str, field: &str, out: &mut Issues) {
    if v.parse::<IpAddr>().is_err() {
        out.push((field.into(), format!("{v:?} is not an IP address")));
    }
}

fn check_cidr(v: &str, field: &str, out: &mut Issues) {
    if v.parse::<IpAddr>().is_err() && v.parse::<IpNet>().is_err() {
        out.push((field.into(), format!("{v:?} is not an IP address or CIDR block")));
    }
}

pub(super) fn check_port(p: i64, field: &str, out: &mut Issues) {
    if !(1..=65535).contains(&p) {
        out.push((field.into(), format!("{p} is not a port (1-65535)")));
    }
}

/// A policy's workload selector and its targetRefs: Istio takes one or the
/// other (`both` is its message when both are set), and a reference names
/// something.
pub(super) fn check_selection(
    selector: Option<&WorkloadSelector>,
    target_ref: Option<&PolicyTargetReference>,
    target_refs: &[PolicyTargetReference],
    both: &str,
    out: &mut Issues,
) {
    if selector.is_some() && (target_ref.is_some() || !target_refs.is_empty()) {
        out.push(("spec.selector".into(), both.into()));
    }
    if let Some(sel) = selector {
        check_labels(&sel.match_labels, "spec.selector.matchLabels", out);
    }
    for (i, t) in target_ref.into_iter().chain(target_refs).enumerate() {
        let field = if target_ref.is_some() { "spec.targetRef".to_owned() } else { format!("spec.targetRefs[{i}]") };
        if t.name.is_empty() {
            out.push((format!("{field}.name"), "is required".into()));
        }
    }
}

pub(super) fn check_labels(labels: &Labels, field: &str, out: &mut Issues) {
    for (k, v) in labels {
        let (prefix, name) = k.rsplit_once('/').map_or((None, k.as_str()), |(p, n)| (Some(p), n));
        let name_ok = !name.is_empty() && name.len() <= 63 && label_chars(name);
        if !name_ok || prefix.is_some_and(|p| !valid_subdomain(p)) {
            out.push((format!("{field}[{k}]"), format!("{k:?} is not a valid label key")));
        }
        if v.len() > 63 || (!v.is_empty() && !label_chars(v)) {
            out.push((format!("{field}[{k}]"), format!("{v:?} is not a valid label value")));
        }
    }
}

fn label_chars(s: &str) -> bool {
    s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

pub(super) fn valid_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(valid_segment)
}

fn valid_port_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 15 && valid_segment(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals() {
        let cases = [
            ("cluster.local/ns/default/sa/web", true),
            ("spiffe://cluster.local/ns/default/sa/web", true),
            ("*", true),
            ("cluster.local/ns/default/*", true),
            ("*/ns/default/sa/web", true),
            ("cluster.local/*/sa/web", false),
            ("cluster.local/ns/default", false),
            ("web", false),
            ("", false),
            ("cluster.local/ns/Default/sa/web", false),
            ("a b", false),
        ];
        for (p, ok) in cases {
            assert_eq!(check_principal(p).is_ok(), ok, "{p}");
        }
    }

    #[test]
    fn labels() {
        let mut out = Issues::new();
        let labels: Labels = [
            ("app", "web"),
            ("istio.io/dataplane-mode", "ambient"),
            ("bad key!", "x"),
            ("app2", "-bad"),
            ("UPPER.example.com/x", "y"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        check_labels(&labels, "metadata.labels", &mut out);
        let fields: Vec<&str> = out.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            vec!["metadata.labels[UPPER.example.com/x]", "metadata.labels[app2]", "metadata.labels[bad key!]"]
        );
    }

    #[test]
    fn addresses_and_ports() {
        let mut out = Issues::new();
        check_cidr("10.0.0.0/8", "a", &mut out);
        check_cidr("fd00::1", "b", &mut out);
        check_cidr("10.0.0.0/33", "c", &mut out);
        check_cidr("ten", "d", &mut out);
        check_port(0, "e", &mut out);
        check_port(65535, "f", &mut out);
        let fields: Vec<&str> = out.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, vec!["c", "d", "e"]);
    }
}
