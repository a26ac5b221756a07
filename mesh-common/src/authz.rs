//! Authorization, shared by the controller (which compiles policies), the
//! node proxy (which enforces them at L4), the waypoint (which enforces them
//! at L7, with the request's attributes) and `mesh-ctl authz explain`: one
//! evaluator, so what the CLI explains is what the proxies do. Istio's order:
//! a matching DENY denies; with no ALLOW policy the request is allowed;
//! otherwise an ALLOW must match. AUDIT never changes a decision, and neither
//! does a dry-run policy (`istio.io/dry-run`): [`dry_run`] says what it would
//! have decided.
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::identity::SpiffeId;

#[cfg(feature = "api")]
pub mod admission;
#[cfg(feature = "jwt")]
pub mod jwt;
mod l7;
#[cfg(feature = "api")]
mod wire;
pub use l7::{HttpRequest, RequestAuth, normalize_path};
#[cfg(feature = "api")]
pub use wire::{WaypointTarget, applies_at_waypoint, applies_to, in_scope, scope_of};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
    /// Logged by Istio's proxies; it never changes a decision.
    Audit,
    /// Matching requests are sent to an external authorizer (the waypoint's
    /// `ext_authz`), which decides before DENY and ALLOW do ([`custom`]).
    Custom,
}

impl Action {
    /// Istio's order of evaluation: CUSTOM, DENY, ALLOW; AUDIT only logs.
    pub fn order(self) -> u8 {
        match self {
            Action::Custom => 0,
            Action::Deny => 1,
            Action::Allow => 2,
            Action::Audit => 3,
        }
    }
}

/// A policy the node proxy enforces, ready to evaluate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompiledPolicy {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    /// Empty: the policy matches nothing (for ALLOW, Istio's "allow-nothing").
    pub rules: Vec<CompiledRule>,
    /// `istio.io/dry-run`: evaluated and reported, never enforced.
    pub dry_run: bool,
    /// Action CUSTOM: the extension provider it names.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub provider: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CompiledRule {
    /// Any may match (empty: any source).
    pub from: Vec<SourceMatch>,
    /// Any may match (empty: any operation).
    pub to: Vec<OperationMatch>,
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
    /// L7: the request's JWT principal (`iss/sub`).
    pub request_principals: Vec<StringMatch>,
    pub not_request_principals: Vec<StringMatch>,
    /// L7: the client's address (`remote.ip`).
    pub remote_ip_blocks: Vec<IpNet>,
    pub not_remote_ip_blocks: Vec<IpNet>,
}

/// `to.operation`: ports at L4 and L7; hosts, methods and paths at L7 only.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct OperationMatch {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum ConditionMatch {
    SourceIp {
        values: Vec<IpNet>,
        not_values: Vec<IpNet>,
    },
    SourceNamespace {
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
    SourcePrincipal {
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
    DestinationIp {
        values: Vec<IpNet>,
        not_values: Vec<IpNet>,
    },
    DestinationPort {
        values: Vec<u16>,
        not_values: Vec<u16>,
    },
    /// L7 conditions (waypoints): never true without a request.
    RemoteIp {
        values: Vec<IpNet>,
        not_values: Vec<IpNet>,
    },
    /// `request.headers[name]` (`name` lowercase).
    RequestHeader {
        name: String,
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
    RequestPrincipal {
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
    RequestAudience {
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
    RequestPresenter {
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
    /// `request.auth.claims[a][b]`: the claim at `path` (a string, or any
    /// string of a list).
    RequestClaim {
        path: Vec<String>,
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
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

/// The name prefix of the DENY policy the controller derives for a service
/// with L7 policy: only its waypoint may reach its endpoints' ports.
pub const WAYPOINT_GUARD: &str = "mesh:waypoint-only:";

/// The condition keys the node proxy evaluates (at L4).
pub const L4_CONDITION_KEYS: [&str; 5] =
    ["source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"];

impl ConditionMatch {
    /// A `when` condition from its key and values, as AuthorizationPolicy
    /// writes them; `Err` names the key or value that is not understood.
    pub fn from_key(key: &str, values: &[String], not_values: &[String]) -> Result<ConditionMatch, String> {
        let nets = |l: &[String]| {
            l.iter()
                .map(|s| parse_net(s).ok_or_else(|| format!("{s:?} is not a CIDR or address")))
                .collect::<Result<Vec<_>, String>>()
        };
        let ports = |l: &[String]| -> Result<Vec<u16>, String> {
            l.iter().map(|p| p.parse::<u16>().map_err(|_| format!("{p:?} is not a port"))).collect()
        };
        let patterns = |l: &[String]| l.iter().map(|p| StringMatch::parse(p)).collect::<Vec<_>>();
        let principals = |l: &[String]| l.iter().map(|p| StringMatch::principal(p)).collect::<Vec<_>>();
        Ok(match key {
            "source.ip" => Self::SourceIp { values: nets(values)?, not_values: nets(not_values)? },
            "remote.ip" => Self::RemoteIp { values: nets(values)?, not_values: nets(not_values)? },
            "destination.ip" => Self::DestinationIp { values: nets(values)?, not_values: nets(not_values)? },
            "destination.port" => Self::DestinationPort { values: ports(values)?, not_values: ports(not_values)? },
            "source.namespace" => Self::SourceNamespace { values: patterns(values), not_values: patterns(not_values) },
            "source.principal" => {
                Self::SourcePrincipal { values: principals(values), not_values: principals(not_values) }
            }
            "request.auth.principal" => {
                Self::RequestPrincipal { values: patterns(values), not_values: patterns(not_values) }
            }
            "request.auth.audiences" => {
                Self::RequestAudience { values: patterns(values), not_values: patterns(not_values) }
            }
            "request.auth.presenter" => {
                Self::RequestPresenter { values: patterns(values), not_values: patterns(not_values) }
            }
            _ => {
                if let Some(name) = bracketed(key, "request.headers").and_then(|p| (p.len() == 1).then(|| p[0].clone()))
                {
                    Self::RequestHeader {
                        name: name.to_ascii_lowercase(),
                        values: patterns(values),
                        not_values: patterns(not_values),
                    }
                } else if let Some(path) = bracketed(key, "request.auth.claims") {
                    Self::RequestClaim { path, values: patterns(values), not_values: patterns(not_values) }
                } else {
                    return Err(format!("{key:?} is not a condition key mesh evaluates"));
                }
            }
        })
    }

    /// The key as AuthorizationPolicy writes it.
    pub fn key(&self) -> String {
        match self {
            Self::SourceIp { .. } => "source.ip".into(),
            Self::RemoteIp { .. } => "remote.ip".into(),
            Self::DestinationIp { .. } => "destination.ip".into(),
            Self::DestinationPort { .. } => "destination.port".into(),
            Self::SourceNamespace { .. } => "source.namespace".into(),
            Self::SourcePrincipal { .. } => "source.principal".into(),
            Self::RequestPrincipal { .. } => "request.auth.principal".into(),
            Self::RequestAudience { .. } => "request.auth.audiences".into(),
            Self::RequestPresenter { .. } => "request.auth.presenter".into(),
            Self::RequestHeader { name, .. } => format!("request.headers[{name}]"),
            Self::RequestClaim { path, .. } => {
                format!("request.auth.claims{}", path.iter().map(|p| format!("[{p}]")).collect::<String>())
            }
        }
    }
}

/// `prefix[a][b]` as `[a, b]`; `None` unless `key` is the prefix followed by
/// one or more non-empty bracketed names.
fn bracketed(key: &str, prefix: &str) -> Option<Vec<String>> {
    let mut rest = key.strip_prefix(prefix)?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let (name, after) = inner.split_once(']')?;
        if name.is_empty() || name.contains('[') {
            return None;
        }
        out.push(name.to_owned());
        rest = after;
    }
    (!out.is_empty()).then_some(out)
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

/// Decides a connection against the policies that apply to its destination
/// (at L4: the node proxy).
pub fn evaluate<'a>(policies: impl IntoIterator<Item = &'a CompiledPolicy> + Clone, conn: &Connection) -> Decision {
    decide(policies, conn, None, false)
}

/// Decides an HTTP request (at L7: the waypoint) against the policies that
/// apply to it.
pub fn evaluate_request<'a>(
    policies: impl IntoIterator<Item = &'a CompiledPolicy> + Clone,
    conn: &Connection,
    http: &dyn HttpRequest,
) -> Decision {
    decide(policies, conn, Some(http), false)
}

/// What the decision would be with the dry-run policies enforced too;
/// `None` when no dry-run policy applies.
pub fn dry_run<'a>(
    policies: impl IntoIterator<Item = &'a CompiledPolicy> + Clone,
    conn: &Connection,
    http: Option<&dyn HttpRequest>,
) -> Option<Decision> {
    policies.clone().into_iter().any(|p| p.dry_run).then(|| decide(policies, conn, http, true))
}

/// Istio's order over the policies (the dry-run ones only with `dry_run`).
fn decide<'a>(
    policies: impl IntoIterator<Item = &'a CompiledPolicy> + Clone,
    conn: &Connection,
    http: Option<&dyn HttpRequest>,
    dry_run: bool,
) -> Decision {
    let id = |p: &CompiledPolicy| format!("{}/{}", p.namespace, p.name);
    let live = move |p: &&CompiledPolicy| dry_run || !p.dry_run;
    for p in policies.clone().into_iter().filter(live).filter(|p| p.action == Action::Deny) {
        if p.matches(conn, http) {
            let reason = if p.name.starts_with(WAYPOINT_GUARD) {
                "L7 policy applies to this service, and only its waypoint may connect to its endpoints (no bypass)"
            } else {
                "matched a DENY policy"
            };
            return Decision { allowed: false, policy: Some(id(p)), reason: reason.into() };
        }
    }
    let mut allows = policies.into_iter().filter(live).filter(|p| p.action == Action::Allow).peekable();
    if allows.peek().is_none() {
        return Decision { allowed: true, policy: None, reason: "no ALLOW policy applies".into() };
    }
    for p in allows {
        if p.matches(conn, http) {
            return Decision { allowed: true, policy: Some(id(p)), reason: "matched an ALLOW policy".into() };
        }
    }
    Decision { allowed: false, policy: None, reason: "ALLOW policies apply and none matched".into() }
}

/// Whether a request goes to an external authorizer first: `None` when no
/// CUSTOM policy's rules match it; the policy whose provider is to be asked;
/// or, when the CUSTOM policies that apply name more than one provider
/// (Istio allows one per workload, and denies otherwise), the denial.
/// Dry-run CUSTOM policies are never called.
pub fn custom<'a>(
    policies: impl IntoIterator<Item = &'a CompiledPolicy> + Clone,
    conn: &Connection,
    http: &dyn HttpRequest,
) -> Option<Result<&'a CompiledPolicy, Decision>> {
    let live = |p: &&CompiledPolicy| p.action == Action::Custom && !p.dry_run;
    let matched = policies.clone().into_iter().filter(live).find(|p| p.matches(conn, Some(http)))?;
    let mut providers: Vec<&str> = policies.into_iter().filter(live).map(|p| p.provider.as_str()).collect();
    providers.sort_unstable();
    providers.dedup();
    if providers.len() > 1 {
        return Some(Err(Decision {
            allowed: false,
            policy: Some(format!("{}/{}", matched.namespace, matched.name)),
            reason: format!(
                "CUSTOM policies here name more than one provider ({}); one is allowed per workload",
                providers.join(", ")
            ),
        }));
    }
    Some(Ok(matched))
}

impl CompiledPolicy {
    pub fn matches(&self, conn: &Connection, http: Option<&dyn HttpRequest>) -> bool {
        self.matched_rule(conn, http).is_some()
    }

    /// The index of the first rule that matches. Without a request (at L4)
    /// what a rule asks of one cannot be known, and the rule fails closed,
    /// as in ztunnel: an ALLOW (or AUDIT) rule with L7 fields never matches,
    /// a DENY rule matches whatever they say.
    pub fn matched_rule(&self, conn: &Connection, http: Option<&dyn HttpRequest>) -> Option<usize> {
        let l7_unknown = self.action == Action::Deny;
        self.rules.iter().position(|r| r.matches(conn, http, l7_unknown))
    }
}

impl CompiledRule {
    /// `l7_unknown`: what an L7 field counts as without a request.
    fn matches(&self, conn: &Connection, http: Option<&dyn HttpRequest>, l7_unknown: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(conn, http, l7_unknown)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(conn.destination_port, http, l7_unknown)))
            && self.when.iter().all(|c| c.matches(conn, http, l7_unknown))
    }

    /// Whether the rule reads anything only a request has (hosts, methods,
    /// paths, request principals, remote addresses, request conditions).
    pub fn is_l7(&self) -> bool {
        self.from.iter().any(SourceMatch::is_l7)
            || self.to.iter().any(OperationMatch::is_l7)
            || self.when.iter().any(ConditionMatch::is_l7)
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
    fn matches(&self, conn: &Connection, http: Option<&dyn HttpRequest>, l7_unknown: bool) -> bool {
        let principal = conn.source.as_ref().map(SpiffeId::principal);
        let namespace = conn.source.as_ref().map(SpiffeId::namespace);
        identity_positive(&self.principals, principal.as_deref())
            && identity_negative(&self.not_principals, principal.as_deref())
            && identity_positive(&self.namespaces, namespace)
            && identity_negative(&self.not_namespaces, namespace)
            && positive(&self.ip_blocks, |n| n.contains(&conn.source_ip))
            && negative(&self.not_ip_blocks, |n| n.contains(&conn.source_ip))
            && l7::source_matches(self, http, l7_unknown)
    }

    fn is_l7(&self) -> bool {
        !(self.request_principals.is_empty()
            && self.not_request_principals.is_empty()
            && self.remote_ip_blocks.is_empty()
            && self.not_remote_ip_blocks.is_empty())
    }
}

impl OperationMatch {
    fn matches(&self, port: u16, http: Option<&dyn HttpRequest>, l7_unknown: bool) -> bool {
        positive(&self.ports, |p| *p == port)
            && negative(&self.not_ports, |p| *p == port)
            && l7::operation_matches(self, http, l7_unknown)
    }

    fn is_l7(&self) -> bool {
        [&self.hosts, &self.not_hosts, &self.methods, &self.not_methods, &self.paths, &self.not_paths]
            .iter()
            .any(|l| !l.is_empty())
    }
}

impl ConditionMatch {
    fn matches(&self, conn: &Connection, http: Option<&dyn HttpRequest>, l7_unknown: bool) -> bool {
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
            _ => http.map_or(l7_unknown, |h| l7::condition_matches(self, h)),
        }
    }

    fn is_l7(&self) -> bool {
        !matches!(
            self,
            Self::SourceIp { .. }
                | Self::DestinationIp { .. }
                | Self::DestinationPort { .. }
                | Self::SourceNamespace { .. }
                | Self::SourcePrincipal { .. }
        )
    }
}
