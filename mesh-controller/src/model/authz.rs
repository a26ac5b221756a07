//! L4 authorization: AuthorizationPolicies compiled into matchers, and the
//! decision for one connection, in Istio's order: a matching DENY denies; with
//! no ALLOW policy the connection is allowed; otherwise an ALLOW must match.
//! The node proxy and `mesh-ctl authz explain` use this same code.
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_common::identity::SpiffeId;
use serde::Serialize;

use crate::config::objects::{AuthorizationPolicy, Condition, Operation, Rule, Source};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
    /// Logged by Istio's proxies; it never changes a decision.
    Audit,
}

/// A policy the node proxy enforces, ready to evaluate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompiledPolicy {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    /// Empty: the policy matches nothing (for ALLOW, Istio's "allow-nothing").
    pub rules: Vec<CompiledRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CompiledRule {
    /// Any may match (empty: any source).
    pub from: Vec<SourceMatch>,
    /// Any may match (empty: any operation).
    pub to: Vec<PortMatch>,
    /// All must match.
    pub when: Vec<ConditionMatch>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SourceMatch {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PortMatch {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum ConditionMatch {
    SourceIp { values: Vec<IpNet>, not_values: Vec<IpNet> },
    SourceNamespace { values: Vec<StringMatch>, not_values: Vec<StringMatch> },
    SourcePrincipal { values: Vec<StringMatch>, not_values: Vec<StringMatch> },
    DestinationIp { values: Vec<IpNet>, not_values: Vec<IpNet> },
    DestinationPort { values: Vec<u16>, not_values: Vec<u16> },
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl StringMatch {
    pub fn parse(pattern: &str) -> StringMatch {
        if pattern == "*" {
            StringMatch::Any
        } else if let Some(p) = pattern.strip_suffix('*') {
            StringMatch::Prefix(p.into())
        } else if let Some(s) = pattern.strip_prefix('*') {
            StringMatch::Suffix(s.into())
        } else {
            StringMatch::Exact(pattern.into())
        }
    }

    /// A principal pattern, with `spiffe://` dropped (Istio compares without it).
    fn principal(pattern: &str) -> StringMatch {
        StringMatch::parse(pattern.strip_prefix("spiffe://").unwrap_or(pattern))
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(e) => v == e,
            StringMatch::Prefix(p) => v.starts_with(p.as_str()),
            StringMatch::Suffix(s) => v.ends_with(s.as_str()),
            StringMatch::Any => true,
        }
    }
}

/// The pattern as written (`*`, `prefix*`, `*suffix`, or exact).
impl std::fmt::Display for StringMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StringMatch::Exact(s) => f.write_str(s),
            StringMatch::Prefix(s) => write!(f, "{s}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
            StringMatch::Any => f.write_str("*"),
        }
    }
}

/// What the proxy knows about a connection when it decides.
#[derive(Clone, Debug)]
pub struct Connection {
    /// The peer's verified identity; `None` for plaintext.
    pub source: Option<SpiffeId>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the deciding policy, if one decided.
    pub policy: Option<String>,
    pub reason: String,
}

/// Decides a connection against the policies that apply to its destination.
pub fn evaluate<'a>(policies: impl IntoIterator<Item = &'a CompiledPolicy> + Clone, conn: &Connection) -> Decision {
    let id = |p: &CompiledPolicy| format!("{}/{}", p.namespace, p.name);
    for p in policies.clone().into_iter().filter(|p| p.action == Action::Deny) {
        if p.matches(conn) {
            return Decision { allowed: false, policy: Some(id(p)), reason: "matched a DENY policy".into() };
        }
    }
    let mut allows = policies.into_iter().filter(|p| p.action == Action::Allow).peekable();
    if allows.peek().is_none() {
        return Decision { allowed: true, policy: None, reason: "no ALLOW policy applies".into() };
    }
    for p in allows {
        if p.matches(conn) {
            return Decision { allowed: true, policy: Some(id(p)), reason: "matched an ALLOW policy".into() };
        }
    }
    Decision { allowed: false, policy: None, reason: "ALLOW policies apply and none matched".into() }
}

impl CompiledPolicy {
    /// Compiles a validated policy. Anything invalid was rejected before; a
    /// value that still does not parse matches nothing (never widens access).
    pub fn compile(policy: &AuthorizationPolicy) -> CompiledPolicy {
        let action = match policy.spec.action.as_deref() {
            Some("DENY") => Action::Deny,
            Some("AUDIT") => Action::Audit,
            _ => Action::Allow,
        };
        CompiledPolicy {
            namespace: policy.metadata.namespace().to_owned(),
            name: policy.metadata.name.clone(),
            action,
            rules: policy.spec.rules.iter().flatten().map(compile_rule).collect(),
        }
    }

    pub fn matches(&self, conn: &Connection) -> bool {
        self.rules.iter().any(|r| r.matches(conn))
    }
}

fn compile_rule(rule: &Rule) -> CompiledRule {
    CompiledRule {
        from: rule.from.iter().map(|f| compile_source(&f.source)).collect(),
        to: rule.to.iter().map(|t| compile_operation(&t.operation)).collect(),
        when: rule.when.iter().filter_map(compile_condition).collect(),
    }
}

fn compile_source(s: &Source) -> SourceMatch {
    let principals = |v: &[String]| v.iter().map(|p| StringMatch::principal(p)).collect();
    let patterns = |v: &[String]| v.iter().map(|p| StringMatch::parse(p)).collect();
    SourceMatch {
        principals: principals(&s.principals),
        not_principals: principals(&s.not_principals),
        namespaces: patterns(&s.namespaces),
        not_namespaces: patterns(&s.not_namespaces),
        ip_blocks: nets(&s.ip_blocks),
        not_ip_blocks: nets(&s.not_ip_blocks),
    }
}

fn compile_operation(o: &Operation) -> PortMatch {
    PortMatch { ports: ports(&o.ports), not_ports: ports(&o.not_ports) }
}

fn compile_condition(c: &Condition) -> Option<ConditionMatch> {
    let patterns = |v: &[String]| v.iter().map(|p| StringMatch::parse(p)).collect();
    let principals = |v: &[String]| v.iter().map(|p| StringMatch::principal(p)).collect();
    Some(match c.key.as_str() {
        "source.ip" => ConditionMatch::SourceIp { values: nets(&c.values), not_values: nets(&c.not_values) },
        "source.namespace" => {
            ConditionMatch::SourceNamespace { values: patterns(&c.values), not_values: patterns(&c.not_values) }
        }
        "source.principal" => {
            ConditionMatch::SourcePrincipal { values: principals(&c.values), not_values: principals(&c.not_values) }
        }
        "destination.ip" => ConditionMatch::DestinationIp { values: nets(&c.values), not_values: nets(&c.not_values) },
        "destination.port" => {
            ConditionMatch::DestinationPort { values: ports(&c.values), not_values: ports(&c.not_values) }
        }
        _ => return None, // L7 keys are rejected for L4 policies by validation
    })
}

fn nets(values: &[String]) -> Vec<IpNet> {
    values
        .iter()
        .filter_map(|v| v.parse::<IpNet>().ok().or_else(|| v.parse::<IpAddr>().ok().map(IpNet::from)))
        .collect()
}

fn ports(values: &[String]) -> Vec<u16> {
    values.iter().filter_map(|v| v.parse().ok()).collect()
}

impl CompiledRule {
    fn matches(&self, conn: &Connection) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(conn)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(conn.destination_port)))
            && self.when.iter().all(|c| c.matches(conn))
    }
}

/// A list that must contain a match when set, and must not when negated.
fn positive<T>(list: &[T], hit: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(hit)
}

fn negative<T>(list: &[T], hit: impl Fn(&T) -> bool) -> bool {
    !list.iter().any(hit)
}

/// A pattern list against the peer's identity. Without one (plaintext) a
/// positive list never matches, and a negative list never excludes, as in
/// ztunnel.
fn identity_positive(list: &[StringMatch], v: Option<&str>) -> bool {
    list.is_empty() || v.is_some_and(|v| list.iter().any(|m| m.matches(v)))
}

fn identity_negative(list: &[StringMatch], v: Option<&str>) -> bool {
    v.is_none_or(|v| !list.iter().any(|m| m.matches(v)))
}

impl SourceMatch {
    fn matches(&self, conn: &Connection) -> bool {
        let principal = conn.source.as_ref().map(SpiffeId::principal);
        let namespace = conn.source.as_ref().map(SpiffeId::namespace);
        identity_positive(&self.principals, principal.as_deref())
            && identity_negative(&self.not_principals, principal.as_deref())
            && identity_positive(&self.namespaces, namespace)
            && identity_negative(&self.not_namespaces, namespace)
            && positive(&self.ip_blocks, |n| n.contains(&conn.source_ip))
            && negative(&self.not_ip_blocks, |n| n.contains(&conn.source_ip))
    }
}

impl PortMatch {
    fn matches(&self, port: u16) -> bool {
        positive(&self.ports, |p| *p == port) && negative(&self.not_ports, |p| *p == port)
    }
}

impl ConditionMatch {
    fn matches(&self, conn: &Connection) -> bool {
        let principal = conn.source.as_ref().map(SpiffeId::principal);
        let namespace = conn.source.as_ref().map(SpiffeId::namespace);
        match self {
            Self::SourceIp { values, not_values } => {
                positive(values, |n| n.contains(&conn.source_ip))
                    && negative(not_values, |n| n.contains(&conn.source_ip))
            }
            Self::DestinationIp { values, not_values } => {
                positive(values, |n| n.contains(&conn.destination_ip))
                    && negative(not_values, |n| n.contains(&conn.destination_ip))
            }
            Self::DestinationPort { values, not_values } => {
                positive(values, |p| *p == conn.destination_port)
                    && negative(not_values, |p| *p == conn.destination_port)
            }
            Self::SourceNamespace { values, not_values } => {
                identity_positive(values, namespace) && identity_negative(not_values, namespace)
            }
            Self::SourcePrincipal { values, not_values } => {
                identity_positive(values, principal.as_deref()) && identity_negative(not_values, principal.as_deref())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::objects::AuthorizationPolicySpec;

    /// A policy from YAML (the `spec` part), as users write it.
    fn policy(name: &str, spec: &str) -> CompiledPolicy {
        let spec: AuthorizationPolicySpec = serde_yaml_ng::from_str(spec).unwrap();
        let meta = serde_yaml_ng::from_str(&format!("name: {name}\nnamespace: shop")).unwrap();
        CompiledPolicy::compile(&AuthorizationPolicy { metadata: meta, spec })
    }

    fn conn(source: Option<&str>, src_ip: &str, port: u16) -> Connection {
        Connection {
            source: source.map(|s| format!("spiffe://cluster.local/{s}").parse().unwrap()),
            source_ip: src_ip.parse().unwrap(),
            destination_ip: "10.0.0.9".parse().unwrap(),
            destination_port: port,
        }
    }

    const FRONTEND: Option<&str> = Some("ns/shop/sa/frontend");
    const OTHER: Option<&str> = Some("ns/shop/sa/other");
    const EVIL: Option<&str> = Some("ns/evil/sa/frontend");

    #[test]
    fn decisions() {
        let allow_frontend =
            policy("allow-fe", "rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]}]");
        let deny_evil = policy("deny-evil", "action: DENY\nrules: [{from: [{source: {namespaces: [evil]}}]}]");
        let allow_all_evil = policy("allow-evil", "rules: [{from: [{source: {namespaces: [evil]}}]}]");
        let allow_nothing = policy("allow-nothing", "{}");
        let allow_all = policy("allow-all", "rules: [{}]");
        let deny_nothing = policy("deny-nothing", "action: DENY");
        let allow_ports = policy("ports", "rules: [{to: [{operation: {ports: ['8080'], notPorts: ['9090']}}]}]");
        let allow_cidr =
            policy("cidr", "rules: [{from: [{source: {ipBlocks: [10.1.0.0/16], notIpBlocks: [10.1.2.0/24]}}]}]");
        let not_principal = policy("not-other", "rules: [{from: [{source: {notPrincipals: ['*/sa/other']}}]}]");
        let when_port = policy(
            "when",
            "rules: [{when: [{key: destination.port, values: ['80']}, {key: source.ip, notValues: [10.9.0.0/16]}]}]",
        );
        let audit = policy("audit", "action: AUDIT\nrules: [{}]");
        let prefix = policy("prefix", "rules: [{from: [{source: {principals: ['cluster.local/ns/shop/*']}}]}]");

        type Case<'a> = (&'a str, Vec<&'a CompiledPolicy>, Connection, bool, Option<&'a str>);
        let cases: Vec<Case> = vec![
            ("no policy: allowed", vec![], conn(None, "10.1.1.1", 80), true, None),
            ("only AUDIT: allowed", vec![&audit], conn(None, "10.1.1.1", 80), true, None),
            (
                "ALLOW by principal admits it",
                vec![&allow_frontend],
                conn(FRONTEND, "10.1.1.1", 80),
                true,
                Some("shop/allow-fe"),
            ),
            ("ALLOW by principal refuses another SA", vec![&allow_frontend], conn(OTHER, "10.1.1.1", 80), false, None),
            ("ALLOW by principal refuses plaintext", vec![&allow_frontend], conn(None, "10.1.1.1", 80), false, None),
            (
                "DENY wins over ALLOW",
                vec![&allow_all_evil, &deny_evil],
                conn(EVIL, "10.1.1.1", 80),
                false,
                Some("shop/deny-evil"),
            ),
            (
                "DENY leaves others alone",
                vec![&allow_frontend, &deny_evil],
                conn(FRONTEND, "10.1.1.1", 80),
                true,
                Some("shop/allow-fe"),
            ),
            ("allow-nothing denies all", vec![&allow_nothing], conn(FRONTEND, "10.1.1.1", 80), false, None),
            (
                "allow-all allows plaintext",
                vec![&allow_all, &allow_nothing],
                conn(None, "10.1.1.1", 80),
                true,
                Some("shop/allow-all"),
            ),
            ("DENY without rules never matches", vec![&deny_nothing], conn(EVIL, "10.1.1.1", 80), true, None),
            ("port allowed", vec![&allow_ports], conn(None, "10.1.1.1", 8080), true, Some("shop/ports")),
            ("port not listed", vec![&allow_ports], conn(None, "10.1.1.1", 80), false, None),
            ("ipBlocks inside", vec![&allow_cidr], conn(None, "10.1.1.1", 80), true, Some("shop/cidr")),
            ("notIpBlocks carve-out", vec![&allow_cidr], conn(None, "10.1.2.7", 80), false, None),
            ("ipBlocks outside", vec![&allow_cidr], conn(None, "10.2.0.1", 80), false, None),
            ("notPrincipals excludes the pattern", vec![&not_principal], conn(OTHER, "10.1.1.1", 80), false, None),
            (
                "notPrincipals admits others",
                vec![&not_principal],
                conn(FRONTEND, "10.1.1.1", 80),
                true,
                Some("shop/not-other"),
            ),
            (
                "notPrincipals does not exclude plaintext",
                vec![&not_principal],
                conn(None, "10.1.1.1", 80),
                true,
                Some("shop/not-other"),
            ),
            ("when: all conditions hold", vec![&when_port], conn(None, "10.1.1.1", 80), true, Some("shop/when")),
            ("when: one condition fails", vec![&when_port], conn(None, "10.9.1.1", 80), false, None),
            ("when: wrong port", vec![&when_port], conn(None, "10.1.1.1", 81), false, None),
            ("prefix principal", vec![&prefix], conn(OTHER, "10.1.1.1", 80), true, Some("shop/prefix")),
            ("prefix principal, other namespace", vec![&prefix], conn(EVIL, "10.1.1.1", 80), false, None),
        ];
        for (what, policies, c, allowed, by) in cases {
            let d = evaluate(policies.iter().copied(), &c);
            assert_eq!(d.allowed, allowed, "{what}: {d:?}");
            assert_eq!(d.policy.as_deref(), by, "{what}: {d:?}");
        }
    }

    #[test]
    fn string_matches() {
        for (pattern, value, want) in [
            ("*", "anything", true),
            ("abc", "abc", true),
            ("abc", "abcd", false),
            ("ab*", "abcd", true),
            ("*cd", "abcd", true),
            ("*cd", "abc", false),
        ] {
            assert_eq!(StringMatch::parse(pattern).matches(value), want, "{pattern} vs {value}");
        }
    }
}
