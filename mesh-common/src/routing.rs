//! Which HTTP route takes a request, and which backend of it: the decision
//! the waypoint makes for every request, and `mesh-ctl route explain` shows
//! with the same code. Pure: routes come compiled from the wire
//! ([`CompiledRoutes::from_wire`], which the node store also uses to check
//! an update), requests as their attributes ([`RequestFacts`]), randomness
//! as a number the caller rolls.
use regex::Regex;

use crate::api::{self, value_match::Kind};

/// What a route can match on, read from one request.
pub trait Headers {
    /// The first value of header `name` (lower case), if present.
    fn header(&self, name: &str) -> Option<&str>;
}

impl Headers for [(&str, &str)] {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }
}

/// The attributes of one request that routes match.
#[derive(Clone, Copy)]
pub struct RequestFacts<'a, H: Headers + ?Sized> {
    pub method: &'a str,
    /// Path and query, as sent (`/a/b?x=1`).
    pub path: &'a str,
    /// The `Host` header or `:authority`.
    pub authority: &'a str,
    /// The service port the connection addressed.
    pub port: u16,
    pub headers: &'a H,
}

impl<H: Headers + ?Sized> RequestFacts<'_, H> {
    fn path_only(&self) -> &str {
        self.path.split_once('?').map_or(self.path, |(p, _)| p)
    }

    fn query(&self, name: &str) -> Option<&str> {
        let (_, q) = self.path.split_once('?')?;
        q.split('&').find_map(|kv| match kv.split_once('=') {
            Some((k, v)) if k == name => Some(v),
            None if kv == name => Some(""),
            _ => None,
        })
    }
}

/// A [`api::ValueMatch`] ready to evaluate (its regex compiled).
#[derive(Clone, Debug)]
enum Value {
    Exact(String),
    Prefix(String),
    PathPrefix(String),
    Regex(Regex),
    Present,
}

#[derive(Clone, Debug)]
struct ValueMatch {
    value: Value,
    invert: bool,
}

impl ValueMatch {
    fn compile(m: &api::ValueMatch) -> Result<ValueMatch, String> {
        let value = match &m.kind {
            Some(Kind::Exact(s)) => Value::Exact(s.clone()),
            Some(Kind::Prefix(s)) => Value::Prefix(s.clone()),
            Some(Kind::PathPrefix(s)) => Value::PathPrefix(s.trim_end_matches('/').to_owned()),
            // RE2 semantics as Envoy applies them: the whole value must match.
            Some(Kind::Regex(r)) => {
                Value::Regex(Regex::new(&format!("^(?:{r})$")).map_err(|e| format!("regex {r:?}: {e}"))?)
            }
            Some(Kind::Present(_)) | None => Value::Present,
        };
        Ok(ValueMatch { value, invert: m.invert })
    }

    /// Whether `v` (absent: `None`) satisfies the match.
    fn matches(&self, v: Option<&str>) -> bool {
        let hit = match (&self.value, v) {
            (_, None) => false,
            (Value::Present, Some(_)) => true,
            (Value::Exact(e), Some(v)) => v == e,
            (Value::Prefix(p), Some(v)) => v.starts_with(p.as_str()),
            (Value::PathPrefix(p), Some(v)) => {
                p.is_empty() || (v.starts_with(p.as_str()) && matches!(v.as_bytes().get(p.len()), None | Some(b'/')))
            }
            (Value::Regex(r), Some(v)) => r.is_match(v),
        };
        hit != self.invert
    }

    /// The prefix a rewrite replaces, for a path match by prefix.
    fn prefix(&self) -> Option<&str> {
        match &self.value {
            Value::Prefix(p) | Value::PathPrefix(p) => Some(p),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        let not = if self.invert { "not " } else { "" };
        match &self.value {
            Value::Exact(s) => format!("{not}= {s:?}"),
            Value::Prefix(s) => format!("{not}prefix {s:?}"),
            Value::PathPrefix(s) => format!("{not}path prefix {s:?}"),
            Value::Regex(r) => format!("{not}~ {:?}", r.as_str().trim_start_matches("^(?:").trim_end_matches(")$")),
            Value::Present => format!("{not}present"),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Match {
    path: Option<ValueMatch>,
    headers: Vec<(String, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
    method: Option<ValueMatch>,
    authority: Option<ValueMatch>,
    port: u16,
}

/// Why a match did not take a request (for `route explain`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch(pub String);

impl Match {
    fn compile(m: &api::HttpMatch) -> Result<Match, String> {
        let opt = |v: &Option<api::ValueMatch>| v.as_ref().map(ValueMatch::compile).transpose();
        let named = |list: &[api::NamedMatch]| -> Result<Vec<(String, ValueMatch)>, String> {
            list.iter()
                .map(|n| {
                    let v = n.value.as_ref().map(ValueMatch::compile).transpose()?;
                    Ok((n.name.to_ascii_lowercase(), v.unwrap_or(ValueMatch { value: Value::Present, invert: false })))
                })
                .collect()
        };
        Ok(Match {
            path: opt(&m.path)?,
            headers: named(&m.headers)?,
            query: named(&m.query)?,
            method: opt(&m.method)?,
            authority: opt(&m.authority)?,
            port: u16::try_from(m.port).map_err(|_| format!("port {} out of range", m.port))?,
        })
    }

    fn check<H: Headers + ?Sized>(&self, req: &RequestFacts<'_, H>) -> Result<(), Mismatch> {
        let fail = |what: &str, m: &ValueMatch, got: Option<&str>| {
            Mismatch(format!("{what} {} (got {})", m.describe(), got.map_or("nothing".into(), |g| format!("{g:?}"))))
        };
        if self.port != 0 && self.port != req.port {
            return Err(Mismatch(format!("port = {} (got {})", self.port, req.port)));
        }
        if let Some(m) = &self.path
            && !m.matches(Some(req.path_only()))
        {
            return Err(fail("path", m, Some(req.path_only())));
        }
        if let Some(m) = &self.method
            && !m.matches(Some(req.method))
        {
            return Err(fail("method", m, Some(req.method)));
        }
        if let Some(m) = &self.authority
            && !m.matches(Some(req.authority))
        {
            return Err(fail("authority", m, Some(req.authority)));
        }
        for (name, m) in &self.headers {
            let got = req.headers.header(name);
            if !m.matches(got) {
                return Err(fail(&format!("header {name}"), m, got));
            }
        }
        for (name, m) in &self.query {
            let got = req.query(name);
            if !m.matches(got) {
                return Err(fail(&format!("query {name}"), m, got));
            }
        }
        Ok(())
    }
}

/// One route, compiled, with its wire form (what it does once chosen).
#[derive(Clone, Debug)]
pub struct Route {
    pub wire: api::HttpRoute,
    matches: Vec<Match>,
    total_weight: u64,
    /// Each backend's service as `namespace/name`, in `wire.backends` order
    /// (so choosing one per request builds no string).
    backend_keys: Vec<String>,
}

impl Route {
    /// The backend a roll of `roll` (uniform over `u32`) picks by weight,
    /// with its service's `namespace/name`; `None` when the route has no
    /// backend with weight.
    pub fn backend(&self, roll: u32) -> Option<(&api::WeightedBackend, &str)> {
        if self.total_weight == 0 {
            return None;
        }
        let mut at = (u64::from(roll) * self.total_weight) >> 32;
        for (b, key) in self.wire.backends.iter().zip(&self.backend_keys) {
            if at < u64::from(b.weight) {
                return Some((b, key));
            }
            at -= u64::from(b.weight);
        }
        None
    }

    /// The route's retry policy, Istio's default where it sets none.
    pub fn retry(&self) -> &api::Retry {
        static DEFAULT: std::sync::LazyLock<api::Retry> = std::sync::LazyLock::new(default_retry);
        self.wire.retry.as_ref().unwrap_or(&DEFAULT)
    }

    /// The prefix a matched request's path matched by, if by prefix (what
    /// a prefix rewrite or redirect replaces).
    pub fn matched_prefix<H: Headers + ?Sized>(&self, req: &RequestFacts<'_, H>) -> Option<&str> {
        self.matches.iter().find(|m| m.check(req).is_ok())?.path.as_ref()?.prefix()
    }

    fn check<H: Headers + ?Sized>(&self, req: &RequestFacts<'_, H>) -> Result<(), Mismatch> {
        if !self.wire.ports.is_empty() && !self.wire.ports.contains(&u32::from(req.port)) {
            return Err(Mismatch(format!("only for ports {:?} (got {})", self.wire.ports, req.port)));
        }
        if self.matches.is_empty() {
            return Ok(());
        }
        let mut why = Vec::new();
        for m in &self.matches {
            match m.check(req) {
                Ok(()) => return Ok(()),
                Err(Mismatch(w)) => why.push(w),
            }
        }
        Err(Mismatch(why.join("; or ")))
    }
}

/// The routes of one service, in the order they are tried.
#[derive(Clone, Debug, Default)]
pub struct CompiledRoutes {
    pub routes: Vec<Route>,
}

impl CompiledRoutes {
    /// Compiles every match; `Err` names the route and what did not compile.
    pub fn from_wire(wire: &api::HttpRoutes) -> Result<CompiledRoutes, String> {
        let routes = wire
            .routes
            .iter()
            .map(|r| {
                let matches = r
                    .matches
                    .iter()
                    .map(Match::compile)
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("{}: {e}", r.name))?;
                let total_weight = r.backends.iter().map(|b| u64::from(b.weight)).sum();
                let backend_keys = r.backends.iter().map(|b| format!("{}/{}", b.namespace, b.service)).collect();
                Ok(Route { wire: r.clone(), matches, total_weight, backend_keys })
            })
            .collect::<Result<_, String>>()?;
        Ok(CompiledRoutes { routes })
    }

    /// The first route that takes `req`.
    pub fn select<H: Headers + ?Sized>(&self, req: &RequestFacts<'_, H>) -> Option<&Route> {
        self.routes.iter().find(|r| r.check(req).is_ok())
    }

    /// Every route tried for `req`, in order, up to the one that takes it:
    /// its name and why it did not match (`Ok` for the one that did).
    pub fn explain<H: Headers + ?Sized>(&self, req: &RequestFacts<'_, H>) -> Vec<(&str, Result<(), Mismatch>)> {
        let mut out = Vec::new();
        for r in &self.routes {
            let result = r.check(req);
            let done = result.is_ok();
            out.push((r.wire.name.as_str(), result));
            if done {
                break;
            }
        }
        out
    }
}

/// The route a service without routes of its own gets: every request to the
/// service itself, with Istio's default retry policy.
pub fn default_route(namespace: &str, service: &str) -> api::HttpRoute {
    api::HttpRoute {
        name: "default".into(),
        backends: vec![api::WeightedBackend {
            namespace: namespace.into(),
            service: service.into(),
            weight: 1,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Istio's retry policy where a route sets none: 2 retries on connection
/// failures, refused streams, the gRPC `unavailable` and `cancelled`, and 503.
pub fn default_retry() -> api::Retry {
    api::Retry {
        attempts: 2,
        retry_on: ["connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"]
            .map(String::from)
            .to_vec(),
        status_codes: vec![503],
        ..Default::default()
    }
}

/// Header edits in the order Envoy applies them: remove, set, then add.
pub fn edit_headers(ops: &api::HeaderOps) -> impl Iterator<Item = HeaderEdit<'_>> {
    ops.remove
        .iter()
        .map(|n| HeaderEdit::Remove(n))
        .chain(ops.set.iter().map(|(k, v)| HeaderEdit::Set(k, v)))
        .chain(ops.add.iter().map(|(k, v)| HeaderEdit::Add(k, v)))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderEdit<'a> {
    Remove(&'a str),
    Set(&'a str, &'a str),
    Add(&'a str, &'a str),
}

/// The request path after `rewrite`, given the prefix the route matched.
pub fn rewrite_path(path: &str, matched_prefix: Option<&str>, full_path: &str, prefix: &str) -> String {
    let (p, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let new = if !full_path.is_empty() {
        full_path.to_owned()
    } else if !prefix.is_empty()
        && let Some(m) = matched_prefix
        && let Some(rest) = p.strip_prefix(m)
    {
        let joined = format!("{}{}", prefix.trim_end_matches('/'), rest);
        if joined.starts_with('/') { joined } else { format!("/{joined}") }
    } else {
        p.to_owned()
    };
    match query {
        Some(q) => format!("{new}?{q}"),
        None => new,
    }
}

#[cfg(test)]
mod tests;
