//! RequestAuthentication at the waypoint: the request's token (if any) is
//! verified against the service's jwtRules (`mesh_common::authz::jwt`, the
//! checks `mesh-ctl authz explain --jwt` explains); a bad token is a 401, a
//! missing one passes (authorization's `requestPrincipals` decide). After a
//! good token the rule's outputs are applied: the token is removed unless
//! `forwardOriginalToken`, the payload and chosen claims go to headers.
use std::sync::Arc;

use http::{HeaderName, HeaderValue, request::Parts};
use mesh_common::authz::{
    RequestAuth,
    jwt::{self, JwtError, Location},
};
use tracing::info;

use crate::{Waypoint, authz::Facts, engine::Downstream};

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
) -> Result<Option<RequestAuth>, Refused> {
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
        Ok(keys) => jwt::verify(rule, &selected.token, &keys),
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
