//! L4 authorization, shared by the controller (which compiles policies), the
//! node proxy (which enforces them) and `mesh-ctl authz explain`: one
//! evaluator, so what the CLI explains is what the proxy does. Istio's order:
//! a matching DENY denies; with no ALLOW policy the connection is allowed;
//! otherwise an ALLOW must match. AUDIT never changes a decision.
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::identity::SpiffeId;

#[cfg(feature = "api")]
pub mod admission;
#[cfg(feature = "api")]
mod wire;
#[cfg(feature = "api")]
pub use wire::{applies_to, in_scope, scope_of};

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
    pub fn principal(pattern: &str) -> StringMatch {
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

/// A CIDR, or a single address as its /32 (/128): how policies write IP blocks.
pub fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
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
    pub fn matches(&self, conn: &Connection) -> bool {
        self.rules.iter().any(|r| r.matches(conn))
    }
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
