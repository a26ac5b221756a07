//! The compiled matchers in the node API's form and back. The controller
//! sends policies this way; the node and `mesh-ctl` read them back into the
//! same matchers. A value that does not parse on the way back is an error
//! naming it (the node NACKs the update), never a wider match.
use std::collections::BTreeMap;

use ipnet::IpNet;

use super::{
    Action, CompiledPolicy, CompiledRule, ConditionMatch, OperationMatch, SourceMatch, StringMatch, parse_net,
};
use crate::api;

impl CompiledPolicy {
    /// The wire form; `scope` and `selector` say which workloads it applies to.
    pub fn to_wire(
        &self,
        scope: api::Scope,
        selector: impl IntoIterator<Item = (String, String)>,
    ) -> api::Authorization {
        let action = match self.action {
            Action::Allow => api::Action::Allow,
            Action::Deny => api::Action::Deny,
            Action::Audit => api::Action::Audit,
            Action::Custom => api::Action::Custom,
        };
        api::Authorization {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            action: action.into(),
            scope: scope.into(),
            selector: selector.into_iter().collect(),
            rules: self
                .rules
                .iter()
                .map(|r| api::Rule {
                    from: r.from.iter().map(source_to_wire).collect(),
                    to: r.to.iter().map(operation_to_wire).collect(),
                    when: r.when.iter().map(condition_to_wire).collect(),
                })
                .collect(),
            targets: Vec::new(),
            dry_run: self.dry_run,
            provider: self.provider.clone(),
            ext_authz: None,
        }
    }

    /// Reads a policy sent by the controller.
    pub fn from_wire(p: &api::Authorization) -> Result<CompiledPolicy, String> {
        let action = match api::Action::try_from(p.action) {
            Ok(api::Action::Allow) => Action::Allow,
            Ok(api::Action::Deny) => Action::Deny,
            Ok(api::Action::Audit) => Action::Audit,
            Ok(api::Action::Custom) => Action::Custom,
            Err(_) => return Err(format!("unknown action {}", p.action)),
        };
        let rules = p
            .rules
            .iter()
            .map(|r| {
                Ok(CompiledRule {
                    from: r.from.iter().map(source_from_wire).collect::<Result<_, String>>()?,
                    to: r.to.iter().map(operation_from_wire).collect::<Result<_, String>>()?,
                    when: r.when.iter().map(condition_from_wire).collect::<Result<_, String>>()?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(CompiledPolicy {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            action,
            rules,
            dry_run: p.dry_run,
            provider: p.provider.clone(),
        })
    }
}

/// The scope of a policy: one in Istio's root namespace is mesh-wide (with or
/// without a selector); elsewhere it is its namespace's, narrowed by a selector.
pub fn scope_of(policy_namespace: &str, root_namespace: &str, has_selector: bool) -> api::Scope {
    if policy_namespace == root_namespace {
        api::Scope::Global
    } else if has_selector {
        api::Scope::WorkloadSelector
    } else {
        api::Scope::Namespace
    }
}

/// Whether a policy of `scope` in `policy_namespace` with `selector` applies
/// to a workload of `namespace` with `labels`. GLOBAL applies in every
/// namespace, the others in their own; a selector (empty: every workload)
/// must match the workload's labels. The controller and the node both decide
/// with this function.
pub fn in_scope(
    scope: api::Scope,
    policy_namespace: &str,
    selector: &BTreeMap<String, String>,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let in_namespace = match scope {
        api::Scope::Global => true,
        api::Scope::Namespace | api::Scope::WorkloadSelector => policy_namespace == namespace,
        // Bound to waypoints and services by targetRefs: no workload's.
        api::Scope::Targeted => return false,
    };
    in_namespace && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether a policy (wire form) applies to a workload.
pub fn applies_to(p: &api::Authorization, w: &api::Workload) -> bool {
    api::Scope::try_from(p.scope).is_ok_and(|scope| in_scope(scope, &p.namespace, &p.selector, &w.namespace, &w.labels))
}

/// The waypoint a request arrived at and the service it was sent to.
pub struct WaypointTarget<'a> {
    /// The waypoint's Gateway.
    pub gateway_namespace: &'a str,
    pub gateway_name: &'a str,
    /// The labels of the waypoint's own workload (for policies that select it).
    pub labels: &'a BTreeMap<String, String>,
    pub service_namespace: &'a str,
    pub service_name: &'a str,
}

/// Whether a policy applies at a waypoint to a request for a service, as
/// Istio binds them: targetRefs naming the waypoint's Gateway, the service
/// (Service or ServiceEntry), or the GatewayClass `istio-waypoint` (every
/// waypoint; the controller keeps that target only on root-namespace
/// policies); or a selector that selects the waypoint's own pods. The
/// controller, the waypoint and `mesh-ctl authz explain` decide with this.
pub fn applies_at_waypoint(p: &api::Authorization, at: &WaypointTarget<'_>) -> bool {
    match api::Scope::try_from(p.scope) {
        Ok(api::Scope::Targeted) => p.targets.iter().any(|t| match t.kind.as_str() {
            "Gateway" => t.namespace == at.gateway_namespace && t.name == at.gateway_name,
            "Service" | "ServiceEntry" => t.namespace == at.service_namespace && t.name == at.service_name,
            "GatewayClass" => t.name == "istio-waypoint",
            _ => false,
        }),
        Ok(api::Scope::WorkloadSelector) => {
            !p.selector.is_empty()
                && p.namespace == at.gateway_namespace
                && p.selector.iter().all(|(k, v)| at.labels.get(k) == Some(v))
        }
        _ => false,
    }
}

fn operation_to_wire(o: &OperationMatch) -> api::OperationMatch {
    api::OperationMatch {
        ports: o.ports.iter().map(|p| u32::from(*p)).collect(),
        not_ports: o.not_ports.iter().map(|p| u32::from(*p)).collect(),
        hosts: patterns_to_wire(&o.hosts),
        not_hosts: patterns_to_wire(&o.not_hosts),
        methods: patterns_to_wire(&o.methods),
        not_methods: patterns_to_wire(&o.not_methods),
        paths: patterns_to_wire(&o.paths),
        not_paths: patterns_to_wire(&o.not_paths),
    }
}

fn operation_from_wire(o: &api::OperationMatch) -> Result<OperationMatch, String> {
    Ok(OperationMatch {
        ports: ports(&o.ports)?,
        not_ports: ports(&o.not_ports)?,
        hosts: patterns_from_wire(&o.hosts)?,
        not_hosts: patterns_from_wire(&o.not_hosts)?,
        methods: patterns_from_wire(&o.methods)?,
        not_methods: patterns_from_wire(&o.not_methods)?,
        paths: patterns_from_wire(&o.paths)?,
        not_paths: patterns_from_wire(&o.not_paths)?,
    })
}

fn patterns_to_wire(list: &[StringMatch]) -> Vec<api::StringMatch> {
    use api::string_match::Kind as K;
    list.iter()
        .map(|m| api::StringMatch {
            kind: Some(match m {
                StringMatch::Exact(s) => K::Exact(s.clone()),
                StringMatch::Prefix(s) => K::Prefix(s.clone()),
                StringMatch::Suffix(s) => K::Suffix(s.clone()),
                StringMatch::Any => K::Any(true),
            }),
        })
        .collect()
}

fn patterns_from_wire(list: &[api::StringMatch]) -> Result<Vec<StringMatch>, String> {
    use api::string_match::Kind as K;
    list.iter()
        .map(|m| match &m.kind {
            Some(K::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
            Some(K::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
            Some(K::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
            Some(K::Any(_)) => Ok(StringMatch::Any),
            None => Err("string match without a kind".to_string()),
        })
        .collect()
}

fn nets_to_wire(list: &[IpNet]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

fn nets(list: &[String]) -> Result<Vec<IpNet>, String> {
    list.iter().map(|s| parse_net(s).ok_or_else(|| format!("{s:?} is not a CIDR or address"))).collect()
}

fn ports(list: &[u32]) -> Result<Vec<u16>, String> {
    list.iter().map(|p| u16::try_from(*p).map_err(|_| format!("port {p} out of range"))).collect()
}

fn source_to_wire(s: &SourceMatch) -> api::SourceMatch {
    api::SourceMatch {
        principals: patterns_to_wire(&s.principals),
        not_principals: patterns_to_wire(&s.not_principals),
        namespaces: patterns_to_wire(&s.namespaces),
        not_namespaces: patterns_to_wire(&s.not_namespaces),
        ip_blocks: nets_to_wire(&s.ip_blocks),
        not_ip_blocks: nets_to_wire(&s.not_ip_blocks),
        request_principals: patterns_to_wire(&s.request_principals),
        not_request_principals: patterns_to_wire(&s.not_request_principals),
        remote_ip_blocks: nets_to_wire(&s.remote_ip_blocks),
        not_remote_ip_blocks: nets_to_wire(&s.not_remote_ip_blocks),
    }
}

fn source_from_wire(s: &api::SourceMatch) -> Result<SourceMatch, String> {
    Ok(SourceMatch {
        principals: patterns_from_wire(&s.principals)?,
        not_principals: patterns_from_wire(&s.not_principals)?,
        namespaces: patterns_from_wire(&s.namespaces)?,
        not_namespaces: patterns_from_wire(&s.not_namespaces)?,
        ip_blocks: nets(&s.ip_blocks)?,
        not_ip_blocks: nets(&s.not_ip_blocks)?,
        request_principals: patterns_from_wire(&s.request_principals)?,
        not_request_principals: patterns_from_wire(&s.not_request_principals)?,
        remote_ip_blocks: nets(&s.remote_ip_blocks)?,
        not_remote_ip_blocks: nets(&s.not_remote_ip_blocks)?,
    })
}

fn condition_to_wire(c: &ConditionMatch) -> api::Condition {
    let patterns = |l: &[StringMatch]| l.iter().map(ToString::to_string).collect();
    let port_strings = |l: &[u16]| l.iter().map(ToString::to_string).collect();
    let (values, not_values): (Vec<String>, Vec<String>) = match c {
        ConditionMatch::SourceIp { values, not_values }
        | ConditionMatch::DestinationIp { values, not_values }
        | ConditionMatch::RemoteIp { values, not_values } => (nets_to_wire(values), nets_to_wire(not_values)),
        ConditionMatch::DestinationPort { values, not_values } => (port_strings(values), port_strings(not_values)),
        ConditionMatch::SourceNamespace { values, not_values }
        | ConditionMatch::SourcePrincipal { values, not_values }
        | ConditionMatch::RequestPrincipal { values, not_values }
        | ConditionMatch::RequestAudience { values, not_values }
        | ConditionMatch::RequestPresenter { values, not_values }
        | ConditionMatch::RequestHeader { values, not_values, .. }
        | ConditionMatch::RequestClaim { values, not_values, .. } => (patterns(values), patterns(not_values)),
    };
    api::Condition { key: c.key(), values, not_values }
}

fn condition_from_wire(c: &api::Condition) -> Result<ConditionMatch, String> {
    // Patterns travel as written (principals already without `spiffe://`).
    ConditionMatch::from_key(&c.key, &c.values, &c.not_values)
}
