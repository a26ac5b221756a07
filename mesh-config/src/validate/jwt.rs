//! What Istio's admission rejects in a RequestAuthentication: an empty
//! issuer or audience, a `jwksUri` that is not an http(s) URL, inline
//! `jwks` that does not parse (or names an algorithm no JWT library knows),
//! empty token locations, output headers that are not header names.
use mesh_common::parse_duration;

use super::{Issues, check_selection};
use crate::objects::{JwtRule, RequestAuthenticationSpec};

/// The JWS algorithms (RFC 7518, RFC 8037) a key may name.
const ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "HS256", "HS384", "HS512",
];

pub(super) fn check_request_authentication(spec: &RequestAuthenticationSpec, out: &mut Issues) {
    let both = "cannot be combined with targetRef/targetRefs";
    check_selection(spec.selector.as_ref(), spec.target_ref.as_ref(), &spec.target_refs, both, out);
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        check_rule(rule, &format!("spec.jwtRules[{i}]"), out);
    }
}

fn check_rule(rule: &JwtRule, at: &str, out: &mut Issues) {
    if rule.issuer.is_empty() {
        out.push((format!("{at}.issuer"), "must be a non-empty string".into()));
    }
    for (i, a) in rule.audiences.iter().enumerate() {
        if a.is_empty() {
            out.push((format!("{at}.audiences[{i}]"), "must be a non-empty string".into()));
        }
    }
    if !rule.jwks_uri.is_empty()
        && let Err(e) = check_uri(&rule.jwks_uri)
    {
        out.push((format!("{at}.jwksUri"), format!("{:?}: {e}", rule.jwks_uri)));
    }
    if !rule.jwks.is_empty()
        && let Err(e) = check_jwks(&rule.jwks)
    {
        out.push((format!("{at}.jwks"), e));
    }
    for (i, h) in rule.from_headers.iter().enumerate() {
        if h.name.is_empty() {
            out.push((format!("{at}.fromHeaders[{i}].name"), "must be a non-empty string".into()));
        }
    }
    for (field, list) in [("fromParams", &rule.from_params), ("fromCookies", &rule.from_cookies)] {
        for (i, v) in list.iter().enumerate() {
            if v.is_empty() {
                out.push((format!("{at}.{field}[{i}]"), "must be a non-empty string".into()));
            }
        }
    }
    if !rule.output_payload_to_header.is_empty() && !is_header_name(&rule.output_payload_to_header) {
        out.push((
            format!("{at}.outputPayloadToHeader"),
            format!("{:?} is not a header name", rule.output_payload_to_header),
        ));
    }
    for (i, c) in rule.output_claim_to_headers.iter().enumerate() {
        let field = format!("{at}.outputClaimToHeaders[{i}]");
        if c.header.is_empty() || c.claim.is_empty() {
            out.push((field, "header and claim must be non-empty strings".into()));
        } else if !is_header_name(&c.header) {
            out.push((format!("{field}.header"), format!("{:?} is not a header name", c.header)));
        }
    }
    if let Some(t) = &rule.timeout {
        match parse_duration(t) {
            Ok(d) if d.is_zero() => out.push((format!("{at}.timeout"), "must be positive".into())),
            Ok(_) => {}
            Err(e) => out.push((format!("{at}.timeout"), e)),
        }
    }
}

/// Istio's `ParseJwksURI`: an absolute http or https URL with a host.
fn check_uri(uri: &str) -> Result<(), String> {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err("expected an absolute http or https URL".into());
    };
    if !matches!(scheme, "http" | "https") {
        return Err(format!("scheme {scheme:?}: expected http or https"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let (host, port) = match host_port.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map(|(h, p)| (h, p.strip_prefix(':'))).ok_or("unclosed IPv6 address")?,
        None => match host_port.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        },
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err("has no host".into());
    }
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return Err(format!("port {p:?} is not a port number"));
    }
    Ok(())
}

/// A JSON Web Key Set (RFC 7517): an object with a `keys` array whose keys
/// have a known `kty` and, when they name one, a known `alg`.
pub fn check_jwks(jwks: &str) -> Result<(), String> {
    let v: serde_json::Value = serde_json::from_str(jwks).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
    let keys = v.get("keys").and_then(|k| k.as_array()).ok_or("not a JSON Web Key Set: no \"keys\" array")?;
    for (i, k) in keys.iter().enumerate() {
        let kty = k.get("kty").and_then(|t| t.as_str()).unwrap_or_default();
        if !matches!(kty, "RSA" | "EC" | "OKP" | "oct") {
            return Err(format!("keys[{i}].kty {kty:?}: expected RSA, EC, OKP or oct"));
        }
        if let Some(alg) = k.get("alg") {
            let alg = alg.as_str().unwrap_or_default();
            if !ALGORITHMS.contains(&alg) {
                return Err(format!(
                    "keys[{i}].alg {alg:?}: unknown algorithm (expected one of {})",
                    ALGORITHMS.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// An HTTP header name (RFC 9110 token).
pub(super) fn is_header_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
