//! The node proxy's whole inbound decision for a captured workload:
//! PeerAuthentication (plaintext on a STRICT port is refused), then the
//! AuthorizationPolicies that apply to the workload. The proxy calls
//! [`admit`]; `mesh-ctl authz explain` calls [`explain`], which reports the
//! same decision with the reasoning behind it.
use serde::Serialize;

use super::{Action, CompiledPolicy, Connection, Decision, applies_to, evaluate};
use crate::api;

/// Why plaintext is refused on a STRICT port (also the proxy's log reason).
pub const STRICT_REFUSAL: &str = "PeerAuthentication STRICT: plaintext refused";

/// The workload's PeerAuthentication mode on `port` (port-level overrides first).
pub fn mtls_mode(w: &api::Workload, port: u16) -> api::MtlsMode {
    let mode = w.port_mtls.get(&u32::from(port)).copied().unwrap_or(w.mtls_mode);
    api::MtlsMode::try_from(mode).unwrap_or(api::MtlsMode::Permissive)
}

/// The decision for `conn` to workload `w`, given every policy the node holds
/// (wire form with its compiled matchers).
pub fn admit(w: &api::Workload, policies: &[(api::Authorization, CompiledPolicy)], conn: &Connection) -> Decision {
    if conn.source.is_none() && mtls_mode(w, conn.destination_port) == api::MtlsMode::Strict {
        return Decision { allowed: false, policy: None, reason: STRICT_REFUSAL.into() };
    }
    evaluate(applying(w, policies), conn)
}

fn applying<'a>(
    w: &'a api::Workload,
    policies: &'a [(api::Authorization, CompiledPolicy)],
) -> impl Iterator<Item = &'a CompiledPolicy> + Clone {
    policies.iter().filter(move |(wire, _)| applies_to(wire, w)).map(|(_, c)| c)
}

/// One policy that applies to the destination, and whether it matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyVerdict {
    /// `namespace/name`.
    pub policy: String,
    pub action: Action,
    /// Index of the first rule that matches the connection.
    pub matched_rule: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The destination port's PeerAuthentication mode (`STRICT`, `PERMISSIVE`, ...).
    pub mtls_mode: String,
    /// Every applying policy, DENY first, in the order the proxy checks them.
    pub policies: Vec<PolicyVerdict>,
    /// Exactly what [`admit`] decides.
    pub decision: Decision,
}

pub fn explain(w: &api::Workload, policies: &[(api::Authorization, CompiledPolicy)], conn: &Connection) -> Explanation {
    let mut verdicts: Vec<PolicyVerdict> = applying(w, policies)
        .map(|p| PolicyVerdict {
            policy: format!("{}/{}", p.namespace, p.name),
            action: p.action,
            matched_rule: p.matched_rule(conn, None),
        })
        .collect();
    verdicts.sort_by_key(|v| v.action.order());
    Explanation {
        mtls_mode: mtls_mode(w, conn.destination_port).as_str_name().to_owned(),
        policies: verdicts,
        decision: admit(w, policies, conn),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        authz::{CompiledRule, OperationMatch, SourceMatch, StringMatch},
        identity::SpiffeId,
    };

    fn workload(port_strict: Option<u16>) -> api::Workload {
        api::Workload {
            namespace: "shop".into(),
            name: "db".into(),
            labels: [("app".to_string(), "db".to_string())].into(),
            mtls_mode: api::MtlsMode::Permissive.into(),
            port_mtls: port_strict.map(|p| (u32::from(p), api::MtlsMode::Strict.into())).into_iter().collect(),
            ..Default::default()
        }
    }

    fn policy(
        name: &str,
        action: Action,
        selector: &[(&str, &str)],
        rules: Vec<CompiledRule>,
    ) -> (api::Authorization, CompiledPolicy) {
        let compiled = CompiledPolicy {
            namespace: "shop".into(),
            name: name.into(),
            action,
            rules,
            dry_run: false,
            provider: String::new(),
        };
        let selector: BTreeMap<String, String> = selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let scope = if selector.is_empty() { api::Scope::Namespace } else { api::Scope::WorkloadSelector };
        (compiled.to_wire(scope, selector), compiled)
    }

    fn from_principal(p: &str) -> CompiledRule {
        CompiledRule {
            from: vec![SourceMatch { principals: vec![StringMatch::principal(p)], ..Default::default() }],
            ..Default::default()
        }
    }

    fn conn(source: Option<&str>, port: u16) -> Connection {
        Connection {
            source: source.map(|s| s.parse::<SpiffeId>().unwrap()),
            source_ip: "10.0.0.1".parse().unwrap(),
            destination_ip: "10.0.0.2".parse().unwrap(),
            destination_port: port,
        }
    }

    #[test]
    fn strict_refuses_plaintext_before_any_policy() {
        let w = workload(Some(6379));
        let e = explain(&w, &[], &conn(None, 6379));
        assert_eq!((e.mtls_mode.as_str(), e.decision.allowed), ("STRICT", false));
        assert_eq!(e.decision.reason, STRICT_REFUSAL);
        assert!(admit(&w, &[], &conn(None, 80)).allowed, "the override is per port");
        assert!(admit(&w, &[], &conn(Some("spiffe://cluster.local/ns/shop/sa/a"), 6379)).allowed);
    }

    #[test]
    fn explanation_lists_applying_policies_deny_first_and_agrees_with_admit() {
        let a = "spiffe://cluster.local/ns/shop/sa/a";
        let policies = vec![
            policy(
                "allow-a",
                Action::Allow,
                &[("app", "db")],
                vec![from_principal("cluster.local/ns/shop/sa/b"), from_principal(a)],
            ),
            policy("other-app", Action::Allow, &[("app", "web")], vec![from_principal(a)]),
            policy(
                "no-9000",
                Action::Deny,
                &[],
                vec![CompiledRule {
                    to: vec![OperationMatch { ports: vec![9000], ..Default::default() }],
                    ..Default::default()
                }],
            ),
        ];
        let w = workload(None);
        let e = explain(&w, &policies, &conn(Some(a), 80));
        let names: Vec<(&str, Option<usize>)> =
            e.policies.iter().map(|v| (v.policy.as_str(), v.matched_rule)).collect();
        assert_eq!(names, [("shop/no-9000", None), ("shop/allow-a", Some(1))], "other-app selects another app");
        assert_eq!(e.decision, admit(&w, &policies, &conn(Some(a), 80)));
        assert_eq!(e.decision.policy.as_deref(), Some("shop/allow-a"));
        let denied = explain(&w, &policies, &conn(Some(a), 9000));
        assert_eq!((denied.decision.allowed, denied.decision.policy.as_deref()), (false, Some("shop/no-9000")));
    }
}
