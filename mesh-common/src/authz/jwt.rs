//! RequestAuthentication: where a request's JWT is, which jwtRule it is
//! for, and whether it holds (Envoy's `jwt_authn` as Istio configures it:
//! any one rule may verify the token, a request without one passes and is
//! left to authorization). Signatures, `exp`, `nbf` and `aud` are checked by
//! the `jsonwebtoken` crate; this module chooses the rule and the key.
//! The waypoint runs it per request; `mesh-ctl authz explain --jwt` runs
//! [`select`] and [`claims`] to explain the same choice.
use std::collections::HashSet;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};

use super::{HttpRequest, RequestAuth};
use crate::api::JwtRule;

/// Envoy's allowance for clocks that disagree (`clock_skew_seconds`).
pub const CLOCK_SKEW_SECS: u64 = 60;

/// Why a token was refused: Envoy's texts (the 401's body).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwtError {
    Malformed,
    Algorithm(String),
    UnknownIssuer,
    Expired,
    NotYetValid,
    Audience,
    Signature,
    NoKey,
    /// The rule's key set has never been fetched.
    KeysUnavailable,
}

impl std::fmt::Display for JwtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtError::Malformed => {
                f.write_str("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")
            }
            JwtError::Algorithm(a) => write!(f, "Jwt header [alg] {a:?} is not supported"),
            JwtError::UnknownIssuer => f.write_str("Jwt issuer is not configured"),
            JwtError::Expired => f.write_str("Jwt is expired"),
            JwtError::NotYetValid => f.write_str("Jwt not yet valid"),
            JwtError::Audience => f.write_str("Audiences in Jwt are not allowed"),
            JwtError::Signature => f.write_str("Jwt verification fails"),
            JwtError::NoKey => f.write_str("Jwks doesn't have key to match kid or alg from Jwt"),
            JwtError::KeysUnavailable => f.write_str("Jwks remote fetch is failed"),
        }
    }
}

impl std::error::Error for JwtError {}

/// Where a token may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A header (lowercase), the token after `prefix`.
    Header {
        name: String,
        prefix: String,
    },
    Param(String),
    Cookie(String),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Header { name, .. } => write!(f, "header {name}"),
            Location::Param(p) => write!(f, "query parameter {p}"),
            Location::Cookie(c) => write!(f, "cookie {c}"),
        }
    }
}

/// A rule's token locations; with none set, Istio's default:
/// `Authorization: Bearer <token>` and the `access_token` query parameter.
pub fn locations(rule: &JwtRule) -> Vec<Location> {
    places(rule).map(Place::to_owned).collect()
}

/// A [`Location`] borrowed from its rule: finding a token allocates nothing
/// until one is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place<'a> {
    Header { name: &'a str, prefix: &'a str },
    Param(&'a str),
    Cookie(&'a str),
}

impl Place<'_> {
    fn to_owned(self) -> Location {
        match self {
            Place::Header { name, prefix } => Location::Header { name: name.into(), prefix: prefix.into() },
            Place::Param(p) => Location::Param(p.into()),
            Place::Cookie(c) => Location::Cookie(c.into()),
        }
    }
}

fn places(rule: &JwtRule) -> Box<dyn Iterator<Item = Place<'_>> + '_> {
    if rule.from_headers.is_empty() && rule.from_params.is_empty() && rule.from_cookies.is_empty() {
        return Box::new(
            [Place::Header { name: "authorization", prefix: "Bearer " }, Place::Param("access_token")].into_iter(),
        );
    }
    let headers = rule.from_headers.iter().map(|h| Place::Header { name: &h.name, prefix: &h.prefix });
    let params = rule.from_params.iter().map(|p| Place::Param(p));
    Box::new(headers.chain(params).chain(rule.from_cookies.iter().map(|c| Place::Cookie(c))))
}

/// The token at `loc`, if the request has one there.
pub fn token_at(req: &dyn HttpRequest, loc: &Location) -> Option<String> {
    let place = match loc {
        Location::Header { name, prefix } => Place::Header { name, prefix },
        Location::Param(p) => Place::Param(p),
        Location::Cookie(c) => Place::Cookie(c),
    };
    token_in(req, place).map(str::to_owned)
}

fn token_in<'r>(req: &'r dyn HttpRequest, place: Place<'_>) -> Option<&'r str> {
    let token = match place {
        Place::Header { name, prefix } => {
            let v = req.header(name)?;
            // Envoy compares the prefix case-insensitively for `Bearer`.
            let head = v.get(..prefix.len())?;
            if !head.eq_ignore_ascii_case(prefix) {
                return None;
            }
            v[prefix.len()..].trim()
        }
        Place::Param(p) => req.query().split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == p).then_some(v)
        })?,
        Place::Cookie(c) => req.header("cookie")?.split(';').find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == c).then_some(v)
        })?,
    };
    (!token.is_empty()).then_some(token)
}

/// The request's token and the rule it is for.
#[derive(Clone, Debug, PartialEq)]
pub struct Selected {
    pub rule: usize,
    pub token: String,
    pub location: Location,
}

/// The first token found in any rule's locations, and the rule for its
/// issuer among those that look there. `Ok(None)`: the request has no
/// token (it passes authentication; authorization decides). Per request:
/// nothing is allocated but the token, and of the payload only `iss` is
/// read.
pub fn select(rules: &[JwtRule], req: &dyn HttpRequest) -> Result<Option<Selected>, JwtError> {
    for place in rules.iter().flat_map(places) {
        let Some(token) = token_in(req, place) else { continue };
        let iss = issuer(token)?;
        let rule = rules
            .iter()
            .position(|r| r.issuer == iss && places(r).any(|p| p == place))
            .ok_or(JwtError::UnknownIssuer)?;
        return Ok(Some(Selected { rule, token: token.to_owned(), location: place.to_owned() }));
    }
    Ok(None)
}

/// A token's `iss`, unverified (empty when it has none): the payload must be
/// a JSON object; its other claims are skipped, not built.
fn issuer(token: &str) -> Result<String, JwtError> {
    #[derive(serde::Deserialize)]
    struct Iss<'a> {
        #[serde(default, borrow)]
        iss: Option<std::borrow::Cow<'a, str>>,
    }
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| JwtError::Malformed)?;
    let v: Iss<'_> = serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    Ok(v.iss.map(|i| i.into_owned()).unwrap_or_default())
}

/// Verifies `token` for `rule` with the rule's key set: a key of the
/// token's `kid` (keys without one are tried too) and of its algorithm's
/// family, the signature, `exp` and `nbf` within [`CLOCK_SKEW_SECS`], the
/// issuer, and `aud` against the rule's audiences when it names any.
pub fn verify(rule: &JwtRule, token: &str, keys: &JwkSet) -> Result<RequestAuth, JwtError> {
    let (header, validation) = validation(rule, token)?;
    let candidates = keys.keys.iter().filter(|k| match (&header.kid, &k.common.key_id) {
        (Some(want), Some(have)) => want == have,
        _ => true,
    });
    let mut tried = false;
    for jwk in candidates {
        let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
        match jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation) {
            Ok(data) => return Ok(RequestAuth::from_claims(data.claims)),
            // Another key may be the one (a rotation publishes two).
            Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => tried = true,
            Err(e) if is_key_mismatch(e.kind()) => {}
            Err(e) => return Err(claim_error(e.kind())),
        }
    }
    Err(if tried { JwtError::Signature } else { JwtError::NoKey })
}

/// [`verify`] without the signature: what `mesh-ctl authz explain --jwt`
/// can check when the key set is fetched by the waypoint (`jwksUri`).
pub fn verify_claims(rule: &JwtRule, token: &str) -> Result<RequestAuth, JwtError> {
    let (_, mut validation) = validation(rule, token)?;
    validation.insecure_disable_signature_validation();
    jsonwebtoken::decode::<serde_json::Value>(token, &DecodingKey::from_secret(&[]), &validation)
        .map(|data| RequestAuth::from_claims(data.claims))
        .map_err(|e| claim_error(e.kind()))
}

/// The token's header and the checks for it under `rule`.
fn validation(rule: &JwtRule, token: &str) -> Result<(jsonwebtoken::Header, Validation), JwtError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| header_error(token))?;
    let mut validation = Validation::new(header.alg);
    validation.leeway = CLOCK_SKEW_SECS;
    validation.validate_nbf = true;
    validation.required_spec_claims = HashSet::new();
    validation.set_issuer(&[&rule.issuer]);
    if rule.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&rule.audiences);
        validation.required_spec_claims.insert("aud".into()); // Envoy refuses a token without one
    }
    Ok((header, validation))
}

fn is_key_mismatch(kind: &ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::InvalidAlgorithm
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_)
    )
}

fn claim_error(kind: &ErrorKind) -> JwtError {
    match kind {
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidAudience | ErrorKind::MissingRequiredClaim(_) => JwtError::Audience,
        ErrorKind::InvalidIssuer => JwtError::UnknownIssuer,
        _ => JwtError::Malformed,
    }
}

/// Why a header did not decode: an algorithm the library does not take
/// (`none` among them), or a malformed token.
fn header_error(token: &str) -> JwtError {
    let alg = token
        .split('.')
        .next()
        .and_then(|h| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(h).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|h| h.get("alg").and_then(|a| a.as_str()).map(String::from));
    match alg {
        Some(a) if a.parse::<Algorithm>().is_err() => JwtError::Algorithm(a),
        _ => JwtError::Malformed,
    }
}

/// A key set as a JWKS document holds it.
pub fn parse_jwks(text: &str) -> Result<JwkSet, String> {
    serde_json::from_str(text).map_err(|e| format!("not a JSON Web Key Set: {e}"))
}

/// The value `outputClaimToHeaders` puts in its header: a string claim as
/// it is, a number or boolean as JSON; nested claims by `a.b`.
pub fn claim_header(claims: &serde_json::Value, claim: &str) -> Option<String> {
    let v = claim.split('.').try_fold(claims, |v, k| v.get(k))?;
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(_) | serde_json::Value::Bool(_) => Some(v.to_string()),
        _ => None,
    }
}

/// The payload segment of a token, as `outputPayloadToHeader` forwards it.
pub fn payload_segment(token: &str) -> &str {
    token.split('.').nth(1).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use jsonwebtoken::{EncodingKey, Header};
    use ring::{
        rand::SystemRandom,
        signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair},
    };
    use serde_json::json;

    use super::*;
    use crate::api::JwtHeader;

    struct Req {
        headers: Vec<(&'static str, String)>,
        query: String,
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
            self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
        }
        fn remote_ip(&self) -> IpAddr {
            IpAddr::from([127, 0, 0, 1])
        }
        fn auth(&self) -> Option<&RequestAuth> {
            None
        }
        fn query(&self) -> &str {
            &self.query
        }
    }

    fn bearer(token: &str) -> Req {
        Req { headers: vec![("authorization", format!("Bearer {token}"))], query: String::new() }
    }

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// A P-256 key: how to sign with it and its JWK.
    fn ec_key(kid: &str) -> (EncodingKey, serde_json::Value) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let public = pair.public_key().as_ref(); // 0x04 || x || y
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "x": b64(&public[1..33]), "y": b64(&public[33..])});
        (EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
    }

    fn ed_key() -> (EncodingKey, serde_json::Value) {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(pair.public_key().as_ref())});
        (EncodingKey::from_ed_der(pkcs8.as_ref()), jwk)
    }

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: serde_json::Value) -> String {
        let header = Header { kid: Some(kid.into()), ..Header::new(alg) };
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    fn rule(issuer: &str, audiences: &[&str]) -> JwtRule {
        JwtRule {
            issuer: issuer.into(),
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            ..JwtRule::default()
        }
    }

    type Checked = Result<Option<String>, JwtError>;

    /// Select, then verify: the waypoint's order.
    fn check(rules: &[JwtRule], req: &Req, keys: &JwkSet) -> Result<Option<String>, JwtError> {
        let Some(sel) = select(rules, req)? else { return Ok(None) };
        verify(&rules[sel.rule], &sel.token, keys).map(|a| Some(a.principal))
    }

    #[test]
    fn tokens_decided_as_envoy_does() {
        let (ec, ec_jwk) = ec_key("k1");
        let (other, _) = ec_key("k1");
        let (ed, ed_jwk) = ed_key();
        let keys: JwkSet = serde_json::from_value(json!({"keys": [ec_jwk, ed_jwk]})).unwrap();
        let rules = [rule("https://issuer.example", &["web"]), rule("other-issuer", &[])];
        let t = now();
        let claims = |extra: serde_json::Value| {
            let mut c = json!({"iss": "https://issuer.example", "sub": "alice", "aud": "web", "exp": t + 600});
            c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            c
        };
        let es = |c: serde_json::Value| sign(Algorithm::ES256, "k1", &ec, c);
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(br#"{"iss":"https://issuer.example","sub":"alice"}"#)
        );
        let ok = Ok(Some("https://issuer.example/alice".to_owned()));
        let cases: Vec<(&str, Req, Checked)> = vec![
            ("valid", bearer(&es(claims(json!({})))), ok.clone()),
            ("aud in a list", bearer(&es(claims(json!({"aud": ["x", "web"]})))), ok.clone()),
            ("EdDSA", bearer(&sign(Algorithm::EdDSA, "ed", &ed, claims(json!({})))), ok.clone()),
            ("expired within skew", bearer(&es(claims(json!({"exp": t - 30})))), ok.clone()),
            ("no exp", bearer(&es(json!({"iss": "https://issuer.example", "sub": "alice", "aud": "web"}))), ok.clone()),
            ("expired", bearer(&es(claims(json!({"exp": t - 3600})))), Err(JwtError::Expired)),
            ("not yet valid", bearer(&es(claims(json!({"nbf": t + 3600})))), Err(JwtError::NotYetValid)),
            ("wrong issuer", bearer(&es(claims(json!({"iss": "evil"})))), Err(JwtError::UnknownIssuer)),
            ("wrong audience", bearer(&es(claims(json!({"aud": "db"})))), Err(JwtError::Audience)),
            ("no audience", bearer(&es(json!({"iss": "https://issuer.example", "sub": "a"}))), Err(JwtError::Audience)),
            (
                "any audience",
                bearer(&es(json!({"iss": "other-issuer", "sub": "b"}))),
                Ok(Some("other-issuer/b".into())),
            ),
            (
                "bad signature",
                bearer(&sign(Algorithm::ES256, "k1", &other, claims(json!({})))),
                Err(JwtError::Signature),
            ),
            ("unknown kid", bearer(&sign(Algorithm::ES256, "k9", &ec, claims(json!({})))), Err(JwtError::NoKey)),
            ("alg none", bearer(&none), Err(JwtError::Algorithm("none".into()))),
            ("garbage", bearer("not-a-token"), Err(JwtError::Malformed)),
            ("four parts", bearer("a.b.c.d"), Err(JwtError::Malformed)),
            ("no token", Req { headers: vec![], query: String::new() }, Ok(None)),
            (
                "other scheme",
                Req { headers: vec![("authorization", "Basic YTpi".into())], query: String::new() },
                Ok(None),
            ),
            (
                "query param",
                Req { headers: vec![], query: format!("x=1&access_token={}", es(claims(json!({})))) },
                ok.clone(),
            ),
        ];
        for (name, req, want) in cases {
            assert_eq!(check(&rules, &req, &keys), want, "{name}");
        }
    }

    #[test]
    fn configured_locations() {
        let (ec, jwk) = ec_key("k1");
        let keys: JwkSet = serde_json::from_value(json!({"keys": [jwk]})).unwrap();
        let token = sign(Algorithm::ES256, "k1", &ec, json!({"iss": "i", "sub": "s", "exp": now() + 60}));
        let r = JwtRule {
            from_headers: vec![JwtHeader { name: "x-jwt".into(), prefix: "Token ".into() }],
            from_cookies: vec!["session".into()],
            ..rule("i", &[])
        };
        let ok = Ok(Some("i/s".to_owned()));
        let hdr = |k: &'static str, v: String| Req { headers: vec![(k, v)], query: String::new() };
        assert_eq!(check(std::slice::from_ref(&r), &hdr("x-jwt", format!("Token {token}")), &keys), ok);
        assert_eq!(check(std::slice::from_ref(&r), &hdr("cookie", format!("a=b; session={token}")), &keys), ok);
        // Only the configured locations are read.
        assert_eq!(check(std::slice::from_ref(&r), &bearer(&token), &keys), Ok(None));
        assert_eq!(check(&[r], &hdr("x-jwt", token.clone()), &keys), Ok(None));
    }

    #[test]
    fn claims_to_headers() {
        let c = json!({"sub": "a", "n": 3, "ok": true, "nested": {"group": "admins"}, "list": [1]});
        assert_eq!(claim_header(&c, "sub").as_deref(), Some("a"));
        assert_eq!(claim_header(&c, "n").as_deref(), Some("3"));
        assert_eq!(claim_header(&c, "ok").as_deref(), Some("true"));
        assert_eq!(claim_header(&c, "nested.group").as_deref(), Some("admins"));
        assert_eq!(claim_header(&c, "list"), None);
        assert_eq!(claim_header(&c, "missing"), None);
    }
}
