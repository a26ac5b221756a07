//! The compiled matchers in the node API's form and back. The controller
//! sends policies this way; the node and `mesh-ctl` read them back into the
//! same matchers. A value that does not parse on the way back is an error
//! naming it (the node NACKs the update), never a wider match.
use std::collections::BTreeMap;

use ipnet::IpNet;

use super::{Action, CompiledPolicy, CompiledRule, ConditionMatch, PortMatch, SourceMatch, StringMatch, parse_net};
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
                    to: r
                        .to
                        .iter()
                        .map(|p| api::PortMatch {
                            ports: p.ports.iter().map(|p| u32::from(*p)).collect(),
                            not_ports: p.not_ports.iter().map(|p| u32::from(*p)).collect(),
                        })
                        .collect(),
                    when: r.when.iter().map(condition_to_wire).collect(),
                })
                .collect(),
        }
    }

    /// Reads a policy sent by the controller.
    pub fn from_wire(p: &api::Authorization) -> Result<CompiledPolicy, String> {
        let action = match api::Action::try_from(p.action) {
            Ok(api::Action::Allow) => Action::Allow,
            Ok(api::Action::Deny) => Action::Deny,
            Ok(api::Action::Audit) => Action::Audit,
            Err(_) => return Err(format!("unknown action {}", p.action)),
        };
        let rules = p
            .rules
            .iter()
            .map(|r| {
                Ok(CompiledRule {
                    from: r.from.iter().map(source_from_wire).collect::<Result<_, String>>()?,
                    to: r
                        .to
                        .iter()
                        .map(|p| Ok(PortMatch { ports: ports(&p.ports)?, not_ports: ports(&p.not_ports)? }))
                        .collect::<Result<_, String>>()?,
                    when: r.when.iter().map(condition_from_wire).collect::<Result<_, String>>()?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(CompiledPolicy { namespace: p.namespace.clone(), name: p.name.clone(), action, rules })
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
    };
    in_namespace && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether a policy (wire form) applies to a workload.
pub fn applies_to(p: &api::Authorization, w: &api::Workload) -> bool {
    api::Scope::try_from(p.scope).is_ok_and(|scope| in_scope(scope, &p.namespace, &p.selector, &w.namespace, &w.labels))
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
    })
}

fn condition_to_wire(c: &ConditionMatch) -> api::Condition {
    let patterns = |l: &[StringMatch]| l.iter().map(ToString::to_string).collect();
    let port_strings = |l: &[u16]| l.iter().map(ToString::to_string).collect();
    let (key, values, not_values): (&str, Vec<String>, Vec<String>) = match c {
        ConditionMatch::SourceIp { values, not_values } => {
            ("source.ip", nets_to_wire(values), nets_to_wire(not_values))
        }
        ConditionMatch::DestinationIp { values, not_values } => {
            ("destination.ip", nets_to_wire(values), nets_to_wire(not_values))
        }
        ConditionMatch::SourceNamespace { values, not_values } => {
            ("source.namespace", patterns(values), patterns(not_values))
        }
        ConditionMatch::SourcePrincipal { values, not_values } => {
            ("source.principal", patterns(values), patterns(not_values))
        }
        ConditionMatch::DestinationPort { values, not_values } => {
            ("destination.port", port_strings(values), port_strings(not_values))
        }
    };
    api::Condition { key: key.into(), values, not_values }
}

fn condition_from_wire(c: &api::Condition) -> Result<ConditionMatch, String> {
    // Patterns travel as written (principals already without `spiffe://`).
    let patterns = |l: &[String]| l.iter().map(|p| StringMatch::parse(p)).collect::<Vec<_>>();
    let port_list = |l: &[String]| {
        l.iter().map(|p| p.parse::<u16>().map_err(|_| format!("{p:?} is not a port"))).collect::<Result<Vec<_>, _>>()
    };
    Ok(match c.key.as_str() {
        "source.ip" => ConditionMatch::SourceIp { values: nets(&c.values)?, not_values: nets(&c.not_values)? },
        "destination.ip" => {
            ConditionMatch::DestinationIp { values: nets(&c.values)?, not_values: nets(&c.not_values)? }
        }
        "source.namespace" => {
            ConditionMatch::SourceNamespace { values: patterns(&c.values), not_values: patterns(&c.not_values) }
        }
        "source.principal" => {
            ConditionMatch::SourcePrincipal { values: patterns(&c.values), not_values: patterns(&c.not_values) }
        }
        "destination.port" => {
            ConditionMatch::DestinationPort { values: port_list(&c.values)?, not_values: port_list(&c.not_values)? }
        }
        other => return Err(format!("condition key {other:?} cannot be evaluated at L4")),
    })
}
