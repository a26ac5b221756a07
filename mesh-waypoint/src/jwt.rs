//! RequestAuthentication at the waypoint: the request's token (if any) is
//! verified against the service's jwtRules (`mesh_common::authz::jwt`, the
//! checks `mesh-ctl authz explain --jwt` explains); a bad token is a 401, a
//! missing one passes (authorization's `requestPrincipals` decide). After a
//! good token the rule's outputs are applied: the token is removed unless
//! `forwardOriginalToken`, the payload and chosen claims go to headers.
//!
//! A verified token is remembered (as Envoy's `jwt_cache_config` does), so
//! a client that sends the same token on every request pays for its
//! signature once: the entry holds only while the same rule and the same
//! key set are in force and the token's `exp`/`nbf` still allow it.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use http::{HeaderName, HeaderValue, request::Parts};
use jsonwebtoken::jwk::JwkSet;
use mesh_common::api;
use mesh_common::authz::{
    RequestAuth,
    jwt::{self, JwtError, Location},
};
use tracing::info;

/// Tokens remembered at most; when full the cache starts over (bounded,
/// and cheap: a hit is one lookup).
const CACHE_ENTRIES: usize = 4096;

/// Tokens verified recently, by token.
#[derive(Default)]
pub struct Verified {
    map: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    /// The rule (issuer, audiences) and key set it was verified under.
    issuer: String,
    audiences: Vec<String>,
    /// Weak: it holds the allocation, so no later set can take its address.
    keys: std::sync::Weak<JwkSet>,
    auth: Arc<RequestAuth>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

impl Verified {
    fn get(&self, token: &str, rule: &api::JwtRule, keys: &Arc<JwkSet>) -> Option<Arc<RequestAuth>> {
        let map = lock(&self.map);
        let e = map.get(token)?;
        let now = now_secs();
        let in_time = e.exp.is_none_or(|exp| now <= exp + jwt::CLOCK_SKEW_SECS)
            && e.nbf.is_none_or(|nbf| now + jwt::CLOCK_SKEW_SECS >= nbf);
        let same = std::sync::Weak::ptr_eq(&e.keys, &Arc::downgrade(keys))
            && e.issuer == rule.issuer
            && e.audiences == rule.audiences;
        (in_time && same).then(|| e.auth.clone())
    }

    fn put(&self, token: &str, rule: &api::JwtRule, keys: &Arc<JwkSet>, auth: Arc<RequestAuth>) {
        let time = |k: &str| auth.claims.get(k).and_then(|v| v.as_u64());
        let entry = Entry {
            issuer: rule.issuer.clone(),
            audiences: rule.audiences.clone(),
            keys: Arc::downgrade(keys),
            exp: time("exp"),
            nbf: time("nbf"),
            auth,
        };
        let mut map = lock(&self.map);
        if map.len() >= CACHE_ENTRIES {
            map.clear();
        }
        map.insert(token.to_owned(), entry);
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

use crate::{Waypoint, authz::Facts, engine::Downstream, lock};

/// A refusal: why, and the RequestAuthentication whose rule refused (when
/// one was chosen).
pub struct Refused {
    pub error: JwtError,
    pub policy: Option<String>,
}

pub async fn authenticate(
    wp: &Arc<Waypoint>,
    ds: &Downstream,
    parts: &mut Parts,
    path_and_query: &str,
    request_id: &str,
) -> Result<Option<Arc<RequestAuth>>, Refused> {
    let rules = &ds.service.jwt_rules;
    let facts = Facts {
        method: parts.method.as_str(),
        path_and_query,
        host: "",
        headers: &parts.headers,
        remote: ds.peer_addr.ip(),
        auth: None,
    };
    let service = ds.service.key();
    let refuse = |error: JwtError, policy: Option<&str>| {
        wp.metrics.jwt(service, "denied");
        info!(request_id, service, policy = policy.unwrap_or(""), reason = %error, "request refused by RequestAuthentication (401)");
        Refused { error, policy: policy.map(String::from) }
    };
    let selected = match jwt::select(rules, &facts) {
        Ok(Some(s)) => s,
        Ok(None) => {
            wp.metrics.jwt(service, "missing");
            return Ok(None);
        }
        Err(e) => return Err(refuse(e, None)),
    };
    let rule = &rules[selected.rule];
    let checked = match wp.jwks.keys(wp, rule).await {
        Ok(keys) => match wp.verified.get(&selected.token, rule, &keys) {
            Some(auth) => Ok(auth),
            None => jwt::verify(rule, &selected.token, &keys).map(|auth| {
                let auth = Arc::new(auth);
                wp.verified.put(&selected.token, rule, &keys, auth.clone());
                auth
            }),
        },
        Err(e) => Err(e),
    };
    let auth = checked.map_err(|e| refuse(e, Some(&rule.policy)))?;
    wp.metrics.jwt(service, "allowed");
    if !rule.forward_original_token
        && let Location::Header { name, .. } = &selected.location
    {
        parts.headers.remove(name.as_str());
    }
    let mut set = |name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            parts.headers.insert(n, v);
        }
    };
    if !rule.output_payload_to_header.is_empty() {
        set(&rule.output_payload_to_header, jwt::payload_segment(&selected.token));
    }
    for c in &rule.output_claim_to_headers {
        if let Some(v) = jwt::claim_header(&auth.claims, &c.claim) {
            set(&c.header, &v);
        }
    }
    Ok(Some(auth))
}
