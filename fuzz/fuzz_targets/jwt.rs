//! The waypoint's L7 parsers of what a request (or an issuer) sends: the
//! path as policies match it, the token's place and issuer, a JWKS
//! document, and the token's verification against it. Input: JWKS, 0xff,
//! token, 0xff, path. Seeds: a real ES256 token and its key set.
#![no_main]
use std::net::{IpAddr, Ipv4Addr};

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use mesh_common::{
    api,
    authz::{HttpRequest, RequestAuth, jwt, normalize_path},
};

const ISSUER: &str = "https://issuer.example";

struct Request {
    path: String,
    authorization: String,
}

impl HttpRequest for Request {
    fn method(&self) -> &str {
        "GET"
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn host(&self) -> &str {
        "web.shop"
    }
    fn header(&self, name: &str) -> Option<&str> {
        (name == "authorization").then_some(self.authorization.as_str())
    }
    fn remote_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }
    fn auth(&self) -> Option<&RequestAuth> {
        None
    }
}

fn seed() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = key.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
        "x": b64(&point[1..33]), "y": b64(&point[33..])}]});
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let claims = serde_json::json!({"iss": ISSUER, "sub": "jason", "aud": "web", "exp": 4_000_000_000u64,
        "groups": ["dev"], "nested": {"k": "v"}});
    let signing = jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der());
    let token = jsonwebtoken::encode(&header, &claims, &signing).unwrap();
    [jwks.to_string().as_bytes(), &[0xff], token.as_bytes(), &[0xff], b"/api/v1/../items%2F1?x=1"].concat()
}

fuzz_target!(
    init: {
        mesh_fuzz::write_seeds_if_asked(|| vec![seed()]);
    },
    |data: &[u8]| {
        let mut parts = data.split(|b| *b == 0xff).map(String::from_utf8_lossy);
        let (Some(jwks), Some(token), Some(path)) = (parts.next(), parts.next(), parts.next()) else { return };
        let request = Request { path: normalize_path(&path), authorization: format!("Bearer {token}") };
        let rule = api::JwtRule { issuer: ISSUER.into(), audiences: vec!["web".into()], ..Default::default() };
        let Ok(Some(selected)) = jwt::select(std::slice::from_ref(&rule), &request) else { return };
        let _ = jwt::verify_claims(&rule, &selected.token);
        if let Ok(keys) = jwt::parse_jwks(&jwks) {
            let _ = jwt::verify(&rule, &selected.token, &keys);
        }
    }
);
