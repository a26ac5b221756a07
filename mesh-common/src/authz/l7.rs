//! The HTTP attributes of the shared evaluator: what a waypoint knows of a
//! request (method, host, path, headers, the client's address, the JWT it
//! proved) and how Istio's AuthorizationPolicy fields match it. Without a
//! request (at L4) an L7 field matches nothing.
use std::net::IpAddr;

use serde::Serialize;

use super::{ConditionMatch, OperationMatch, SourceMatch, StringMatch, identity_negative, identity_positive};

/// A request as the waypoint decides it.
pub trait HttpRequest {
    fn method(&self) -> &str;
    /// The path as [`normalize_path`] leaves it, without the query.
    fn path(&self) -> &str;
    /// The authority (`Host`), with its port if it has one.
    fn host(&self) -> &str;
    /// A header's value (`name` lowercase); the first, if repeated.
    fn header(&self, name: &str) -> Option<&str>;
    /// `remote.ip`: the client's address. Istio's default (no trusted
    /// proxies in front) makes it the connection's source address.
    fn remote_ip(&self) -> IpAddr;
    /// The request's verified JWT, if it carried one.
    fn auth(&self) -> Option<&RequestAuth>;
    /// The query string (after `?`), where a JWT may be (`fromParams`).
    fn query(&self) -> &str {
        ""
    }
}

/// What a verified JWT says, as `request.auth.*` reads it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RequestAuth {
    /// `iss/sub`.
    pub principal: String,
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: String,
    pub claims: serde_json::Value,
}

impl RequestAuth {
    /// What a JWT's payload says: the principal `iss/sub`, `aud` (a string
    /// or a list), `azp`, and every claim.
    pub fn from_claims(claims: serde_json::Value) -> RequestAuth {
        let text = |k: &str| claims.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let audiences = match claims.get("aud") {
            Some(serde_json::Value::String(a)) => vec![a.clone()],
            Some(serde_json::Value::Array(list)) => list.iter().filter_map(|a| a.as_str().map(String::from)).collect(),
            _ => Vec::new(),
        };
        RequestAuth { principal: format!("{}/{}", text("iss"), text("sub")), audiences, presenter: text("azp"), claims }
    }
}

pub(super) fn source_matches(s: &SourceMatch, http: Option<&dyn HttpRequest>, l7_unknown: bool) -> bool {
    if !s.is_l7() {
        return true;
    }
    let Some(h) = http else { return l7_unknown };
    let principal = h.auth().map(|a| a.principal.as_str());
    let remote = h.remote_ip();
    identity_positive(&s.request_principals, principal)
        && identity_negative(&s.not_request_principals, principal)
        && (s.remote_ip_blocks.is_empty() || s.remote_ip_blocks.iter().any(|n| n.contains(&remote)))
        && !s.not_remote_ip_blocks.iter().any(|n| n.contains(&remote))
}

pub(super) fn operation_matches(o: &OperationMatch, http: Option<&dyn HttpRequest>, l7_unknown: bool) -> bool {
    if !o.is_l7() {
        return true;
    }
    let Some(h) = http else { return l7_unknown };
    let host = h.host().to_ascii_lowercase();
    let host_hit = |m: &StringMatch| host_matches(m, &host);
    let any = |list: &[StringMatch], v: &str| list.iter().any(|m| m.matches(v));
    (o.hosts.is_empty() || o.hosts.iter().any(host_hit))
        && !o.not_hosts.iter().any(host_hit)
        && (o.methods.is_empty() || any(&o.methods, h.method()))
        && !any(&o.not_methods, h.method())
        && (o.paths.is_empty() || any(&o.paths, h.path()))
        && !any(&o.not_paths, h.path())
}

/// Hosts match case-insensitively, and a pattern without a port matches the
/// host on any port (as Istio generates its matchers).
fn host_matches(m: &StringMatch, host: &str) -> bool {
    let lower = match m {
        StringMatch::Exact(s) => StringMatch::Exact(s.to_ascii_lowercase()),
        StringMatch::Prefix(s) => StringMatch::Prefix(s.to_ascii_lowercase()),
        StringMatch::Suffix(s) => StringMatch::Suffix(s.to_ascii_lowercase()),
        StringMatch::Any => return true,
    };
    let without_port = match host.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    lower.matches(host) || lower.matches(without_port)
}

pub(super) fn condition_matches(c: &ConditionMatch, h: &dyn HttpRequest) -> bool {
    // A value list: one must match when given; none of `not` may.
    let check = |present: &[&str], values: &[StringMatch], not: &[StringMatch]| {
        let hit = |list: &[StringMatch]| present.iter().any(|v| list.iter().any(|m| m.matches(v)));
        (values.is_empty() || hit(values)) && !hit(not)
    };
    let auth = h.auth();
    match c {
        ConditionMatch::RemoteIp { values, not_values } => {
            let ip = h.remote_ip();
            (values.is_empty() || values.iter().any(|n| n.contains(&ip))) && !not_values.iter().any(|n| n.contains(&ip))
        }
        ConditionMatch::RequestHeader { name, values, not_values } => {
            let v: Vec<&str> = h.header(name).into_iter().collect();
            check(&v, values, not_values)
        }
        ConditionMatch::RequestPrincipal { values, not_values } => {
            let v: Vec<&str> = auth.map(|a| a.principal.as_str()).into_iter().collect();
            check(&v, values, not_values)
        }
        ConditionMatch::RequestAudience { values, not_values } => {
            let v: Vec<&str> = auth.map(|a| a.audiences.iter().map(String::as_str).collect()).unwrap_or_default();
            check(&v, values, not_values)
        }
        ConditionMatch::RequestPresenter { values, not_values } => {
            let v: Vec<&str> = auth.map(|a| a.presenter.as_str()).filter(|p| !p.is_empty()).into_iter().collect();
            check(&v, values, not_values)
        }
        ConditionMatch::RequestClaim { path, values, not_values } => {
            let claim = auth.and_then(|a| path.iter().try_fold(&a.claims, |v, k| v.get(k)));
            let strings = claim.map(claim_strings).unwrap_or_default();
            let v: Vec<&str> = strings.iter().map(String::as_str).collect();
            check(&v, values, not_values)
        }
        // L4 conditions are decided by the caller.
        _ => false,
    }
}

/// A claim's value as strings: a string, or each string of a list (numbers
/// and booleans as written).
fn claim_strings(v: &serde_json::Value) -> Vec<String> {
    use serde_json::Value as V;
    match v {
        V::String(s) => vec![s.clone()],
        V::Array(items) => items.iter().flat_map(claim_strings).collect(),
        V::Bool(_) | V::Number(_) => vec![v.to_string()],
        _ => Vec::new(),
    }
}

/// The path policies and routes see, normalized as Istio's default
/// (`pathNormalization: BASE`, RFC 3986): percent-encoded unreserved
/// characters decoded, other escapes upper-cased, `.` and `..` segments
/// resolved. `/public/../admin` is `/admin` before any rule reads it, so a
/// policy on `/admin*` cannot be stepped around. The query is kept as is.
pub fn normalize_path(path_and_query: &str) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let decoded = decode_unreserved(path);
    let mut out = remove_dot_segments(&decoded);
    if out.is_empty() || !out.starts_with('/') {
        out.insert(0, '/');
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c as char);
                } else {
                    out.push('%');
                    out.push(b[i + 1].to_ascii_uppercase() as char);
                    out.push(b[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
        }
        out.push_str(&path[i..i + utf8_len(b[i])]);
        i += utf8_len(b[i]);
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

/// RFC 3986 section 5.2.4.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path.split('/').collect();
    for (i, seg) in parts.iter().enumerate() {
        let last = i == parts.len() - 1;
        match *seg {
            "." => {
                if last {
                    segments.push("");
                }
            }
            ".." => {
                if segments.len() > 1 {
                    segments.pop();
                }
                if last {
                    segments.push("");
                }
            }
            s => segments.push(s),
        }
    }
    segments.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_as_istio_base() {
        for (raw, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/public/../admin", "/admin"),
            ("/a/./b/", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/../../x", "/x"),
            ("/%61dmin", "/admin"),
            ("/a%2fb", "/a%2Fb"),
            ("/x?y=/../z", "/x?y=/../z"),
            ("/%2e%2e/admin", "/admin"),
            ("//a", "//a"),
            ("/caf\u{e9}", "/caf\u{e9}"),
            ("/bad%zz", "/bad%zz"),
            ("/trail%", "/trail%"),
        ] {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
    }

    struct Req {
        auth: Option<RequestAuth>,
        remote: IpAddr,
    }

    impl HttpRequest for Req {
        fn method(&self) -> &str {
            "GET"
        }
        fn path(&self) -> &str {
            "/"
        }
        fn host(&self) -> &str {
            "web"
        }
        fn header(&self, name: &str) -> Option<&str> {
            (name == "x-user").then_some("alice")
        }
        fn remote_ip(&self) -> IpAddr {
            self.remote
        }
        fn auth(&self) -> Option<&RequestAuth> {
            self.auth.as_ref()
        }
    }

    /// Conditions and sources that read the request's JWT and the client's
    /// address (a waypoint with RequestAuthentication supplies them).
    #[test]
    fn request_auth_and_remote_conditions() {
        let jwt = RequestAuth {
            principal: "https://issuer.example/ann".into(),
            audiences: vec!["api".into(), "web".into()],
            presenter: "cli".into(),
            claims: serde_json::json!({"groups": ["dev", "ops"], "realm": {"role": "admin"}, "level": 3}),
        };
        let with = Req { auth: Some(jwt), remote: "192.0.2.7".parse().unwrap() };
        let without = Req { auth: None, remote: "198.51.100.1".parse().unwrap() };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let cond =
            |key: &str, values: &[&str], not: &[&str]| ConditionMatch::from_key(key, &s(values), &s(not)).unwrap();
        for (what, c, want_with, want_without) in [
            ("claim in a list", cond("request.auth.claims[groups]", &["ops"], &[]), true, false),
            ("nested claim", cond("request.auth.claims[realm][role]", &["adm*"], &[]), true, false),
            ("number claim", cond("request.auth.claims[level]", &["3"], &[]), true, false),
            ("claim absent, notValues", cond("request.auth.claims[nope]", &[], &["x"]), true, true),
            ("principal", cond("request.auth.principal", &["https://issuer.example/*"], &[]), true, false),
            ("audiences", cond("request.auth.audiences", &["web"], &[]), true, false),
            ("presenter", cond("request.auth.presenter", &[], &["cli"]), false, true),
            ("remote.ip", cond("remote.ip", &["192.0.2.0/24"], &[]), true, false),
            ("header", cond("request.headers[X-User]", &["alice"], &[]), true, true),
        ] {
            assert_eq!(condition_matches(&c, &with), want_with, "{what}, with a JWT");
            assert_eq!(condition_matches(&c, &without), want_without, "{what}, without one");
        }
        let source = SourceMatch {
            request_principals: vec![StringMatch::Any],
            not_remote_ip_blocks: vec!["198.51.100.0/24".parse().unwrap()],
            ..Default::default()
        };
        assert!(
            source_matches(&source, Some(&with), false),
            "any authenticated request, from outside the excluded block"
        );
        assert!(!source_matches(&source, Some(&without), false), "requestPrincipals ['*'] needs a JWT");
        assert!(!source_matches(&source, None, false), "at L4 an ALLOW rule's L7 field matches nothing");
        assert!(source_matches(&source, None, true), "at L4 a DENY rule's L7 field matches anything");
    }

    #[test]
    fn hosts_match_case_insensitively_and_on_any_port() {
        for (pattern, host, want) in [
            ("web.shop", "WEB.shop", true),
            ("web.shop", "web.shop:8080", true),
            ("web.shop:8080", "web.shop:8080", true),
            ("web.shop:8080", "web.shop:9090", false),
            ("*.shop", "web.shop:80", true),
            ("web*", "web.shop", true),
            ("other", "web", false),
            ("[fd00::1]", "[fd00::1]:80", true),
        ] {
            assert_eq!(
                host_matches(&StringMatch::parse(pattern), &host.to_ascii_lowercase()),
                want,
                "{pattern} vs {host}"
            );
        }
    }

    /// CUSTOM: the policy whose provider is asked, before DENY and ALLOW;
    /// none when its rules do not match or it is dry-run; a denial when
    /// the CUSTOM policies that apply name two providers (one per workload).
    #[test]
    fn custom_policies_choose_the_authorizer() {
        use crate::authz::{Action, CompiledPolicy, CompiledRule, Connection, OperationMatch, custom};
        let policy = |name: &str, provider: &str, path: &str, dry_run: bool| CompiledPolicy {
            namespace: "shop".into(),
            name: name.into(),
            action: Action::Custom,
            rules: vec![CompiledRule {
                to: vec![OperationMatch { paths: vec![StringMatch::parse(path)], ..Default::default() }],
                ..Default::default()
            }],
            dry_run,
            provider: provider.into(),
        };
        let conn = Connection {
            source: None,
            source_ip: "10.0.0.1".parse().unwrap(),
            destination_ip: "10.0.0.2".parse().unwrap(),
            destination_port: 80,
        };
        let req = Req { auth: None, remote: "10.0.0.1".parse().unwrap() }; // GET / to web
        let root = policy("root", "opa", "/", false);
        let elsewhere = policy("admin", "opa", "/admin", false);
        let other_provider = policy("other", "oauth", "/admin", false);
        let dry = policy("dry", "opa", "/", true);
        let allow_all =
            CompiledPolicy { action: Action::Allow, provider: String::new(), ..policy("all", "", "*", false) };
        type Case<'a> = (&'a str, Vec<&'a CompiledPolicy>, Option<Result<&'a str, ()>>);
        let cases: Vec<Case> = vec![
            ("no CUSTOM policy", vec![&allow_all], None),
            ("its rules match", vec![&allow_all, &root], Some(Ok("root"))),
            ("its rules do not match", vec![&elsewhere], None),
            ("dry-run CUSTOM is never called", vec![&dry], None),
            ("two providers on one workload", vec![&root, &other_provider], Some(Err(()))),
            ("two policies, one provider", vec![&elsewhere, &root], Some(Ok("root"))),
        ];
        for (what, policies, want) in cases {
            let got = custom(policies, &conn, &req).map(|r| r.map(|p| p.name.as_str()).map_err(|_| ()));
            assert_eq!(got, want, "{what}");
        }
    }
}
