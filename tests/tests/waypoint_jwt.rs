//! RequestAuthentication through a real waypoint: keys the test generates
//! (RSA and EC, with openssl), a JWKS served by a real HTTP server in a pod
//! of the mesh (fetched by the waypoint over HBONE), curl as the client.
//! A valid token is allowed and sets the request principal authorization
//! reads; expired, not-yet-valid, wrong-issuer, wrong-audience, badly
//! signed, `alg: none` and garbage tokens are 401s; a key rotation at the
//! JWKS server is picked up; with the JWKS server down the last good keys
//! stay in force. `mesh-ctl authz explain --jwt` explains the same way.
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mesh_tests::{
    Pod, Proc,
    mesh::sum_metric,
    run_in,
    waypoint::{BACKEND_VIP, SYSTEM_PYTHON, http_status, l7_setup_with, waypoint_metrics},
};
use serde_json::{Value, json};

const ISSUER: &str = "https://issuer.mesh.test";
const JWKS_PORT: u16 = 8000;

/// A signing key and its public JWK.
struct Key {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn rsa_key(dir: &Path, kid: &str) -> Key {
    let pem = dir.join(format!("{kid}.pem"));
    let pem_s = pem.to_str().unwrap();
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", pem_s]);
    let modulus = String::from_utf8(openssl(&["rsa", "-in", pem_s, "-noout", "-modulus"])).unwrap();
    let n = hex(modulus.trim().trim_start_matches("Modulus="));
    Key {
        kid: kid.into(),
        encoding: EncodingKey::from_rsa_pem(&std::fs::read(&pem).unwrap()).unwrap(),
        jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64(&n), "e": "AQAB"}),
    }
}

fn ec_key(dir: &Path, kid: &str) -> Key {
    let pem = dir.join(format!("{kid}.pem"));
    let pem_s = pem.to_str().unwrap();
    openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", pem_s]);
    let der = openssl(&["pkey", "-in", pem_s, "-pubout", "-outform", "DER"]);
    let point = &der[der.len() - 65..]; // 0x04 || x || y
    Key {
        kid: kid.into(),
        encoding: EncodingKey::from_ec_pem(&std::fs::read(&pem).unwrap()).unwrap(),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": b64(&point[1..33]), "y": b64(&point[33..])}),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn sign(key: &Key, alg: Algorithm, claims: Value) -> String {
    jsonwebtoken::encode(&Header { kid: Some(key.kid.clone()), ..Header::new(alg) }, &claims, &key.encoding).unwrap()
}

fn claims(sub: &str, extra: Value) -> Value {
    let mut c = json!({"iss": ISSUER, "sub": sub, "aud": "backend", "exp": now() + 3600, "groups": ["dev"]});
    c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    c
}

fn publish(dir: &Path, keys: &[&Key]) {
    let set = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
    // Written aside and renamed: the server never serves half a file.
    std::fs::write(dir.join("jwks.json.tmp"), set.to_string()).unwrap();
    std::fs::rename(dir.join("jwks.json.tmp"), dir.join("jwks.json")).unwrap();
}

fn jwks_server(pod: &Pod, dir: &Path) -> Proc {
    let port = JWKS_PORT.to_string();
    let mut proc = Proc::spawn_in(
        "jwks server",
        &pod.netns,
        &[SYSTEM_PYTHON, "-u", "-m", "http.server", &port, "--directory", dir.to_str().unwrap()],
        &dir.join("jwks-server.log"),
    );
    let url = format!("http://127.0.0.1:{JWKS_PORT}/jwks.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while run_in(&pod.netns, &["curl", "-sf", "-o", "/dev/null", &url]).status.code() != Some(0) {
        assert!(Instant::now() < deadline && proc.is_running(), "JWKS server not up:\n{}", proc.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    proc
}

fn status(client: &Pod, token: Option<&str>) -> String {
    let url = format!("http://{BACKEND_VIP}/");
    match token {
        Some(t) => http_status(client, "GET", &url, &["-H", &format!("Authorization: Bearer {t}")]),
        None => http_status(client, "GET", &url, &[]),
    }
}

/// Polls until `token` gets `want` (a change in force takes a moment).
fn eventually(client: &Pod, token: &str, want: &str, what: &str, log: &dyn Fn() -> String) {
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(15));
    loop {
        let got = status(client, Some(token));
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: got {got}, want {want}\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn jwt_request_authentication() {
    let Some(s) = l7_setup_with("wp-jwt", &["--jwks-refresh", "1s"]) else { return };
    let dir = s.mesh.t.dir.join("jwks");
    std::fs::create_dir_all(&dir).unwrap();
    let (rsa, ec) = (rsa_key(&dir, "r1"), ec_key(&dir, "e1"));
    publish(&dir, &[&rsa, &ec]);
    // The JWKS server runs in a pod of the mesh: the waypoint fetches it over HBONE.
    let mut server = jwks_server(&s.other, &dir);
    let jwks_uri = format!("http://{}:{JWKS_PORT}/jwks.json", s.other.ip4);
    s.mesh.apply(
        "jwt.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: backend-jwt, namespace: default}}\n\
             spec:\n  targetRefs: [{{kind: Service, group: '', name: backend}}]\n  jwtRules:\n  - issuer: {ISSUER}\n    \
             audiences: [backend]\n    jwksUri: '{jwks_uri}'\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: backend-users, namespace: default}}\n\
             spec:\n  targetRefs: [{{kind: Service, group: '', name: backend}}]\n  action: ALLOW\n  rules:\n  \
             - from: [{{source: {{requestPrincipals: ['{ISSUER}/alice', '{ISSUER}/carol']}}}}]\n    \
             when: [{{key: 'request.auth.claims[groups]', values: [dev]}}]\n---\n"
        ),
    );
    let log = || s.wp.log_text();
    let alice = sign(&rsa, Algorithm::RS256, claims("alice", json!({})));
    eventually(&s.client, &alice, "200", "a valid RS256 token", &log);

    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(json!({"iss": ISSUER, "sub": "alice", "aud": "backend"}).to_string().as_bytes())
    );
    let forger = ec_key(&dir, "e1"); // the same kid, another key: a bad signature
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("RS256, alice", Some(alice.clone()), "200"),
        ("ES256, alice", Some(sign(&ec, Algorithm::ES256, claims("alice", json!({})))), "200"),
        ("PS256 with the RSA key, carol", Some(sign(&rsa, Algorithm::PS256, claims("carol", json!({})))), "200"),
        ("aud in a list", Some(sign(&ec, Algorithm::ES256, claims("alice", json!({"aud": ["x", "backend"]})))), "200"),
        (
            "valid, but not a principal the policy allows",
            Some(sign(&ec, Algorithm::ES256, claims("bob", json!({})))),
            "403",
        ),
        (
            "valid, claim the policy needs missing",
            Some(sign(&ec, Algorithm::ES256, claims("alice", json!({"groups": ["ops"]})))),
            "403",
        ),
        ("no token: passes authentication, authorization refuses", None, "403"),
        ("expired", Some(sign(&ec, Algorithm::ES256, claims("alice", json!({"exp": now() - 3600})))), "401"),
        ("not yet valid", Some(sign(&ec, Algorithm::ES256, claims("alice", json!({"nbf": now() + 3600})))), "401"),
        (
            "wrong issuer",
            Some(sign(&ec, Algorithm::ES256, claims("alice", json!({"iss": "https://evil.test"})))),
            "401",
        ),
        ("wrong audience", Some(sign(&ec, Algorithm::ES256, claims("alice", json!({"aud": "other"})))), "401"),
        ("bad signature", Some(sign(&forger, Algorithm::ES256, claims("alice", json!({})))), "401"),
        ("alg none", Some(none), "401"),
        ("garbage", Some("not.a.jwt".into()), "401"),
    ];
    for (name, token, want) in &cases {
        assert_eq!(status(&s.client, token.as_deref()), *want, "{name}\n{}", log());
    }
    let metrics = waypoint_metrics(&s.wp_pod);
    let count = |result: &str| sum_metric(&metrics, "mesh_waypoint_jwt_authentications_total", &[("result", result)]);
    assert!(count("denied") >= 7.0 && count("allowed") >= 6.0 && count("missing") >= 1.0, "{metrics}");
    assert!(
        log().contains("request refused by RequestAuthentication (401)") && log().contains("Jwt is expired"),
        "{}",
        log()
    );

    // mesh-ctl explains with the same checks (the signature is the waypoint's: its keys are fetched).
    for (token, allowed, says) in [
        (&alice, true, "principal https://issuer.mesh.test/alice"),
        (&cases[7].1.clone().unwrap(), false, "Jwt is expired"),
    ] {
        let out = s.mesh.ctl(&["authz", "explain", "--from", "client", "--to", "default/backend:80", "--jwt", token]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.success(), allowed, "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains(says), "{text}");
    }

    // Key rotation: the server publishes a new EC key (and drops the old one).
    let ec2 = ec_key(&dir, "e2");
    publish(&dir, &[&rsa, &ec2]);
    let rotated = sign(&ec2, Algorithm::ES256, claims("alice", json!({})));
    eventually(&s.client, &rotated, "200", "a token of the rotated-in key", &log);
    let old = sign(&ec, Algorithm::ES256, claims("alice", json!({})));
    eventually(&s.client, &old, "401", "a token of the rotated-out key", &log);
    // A token verified (and remembered) before the rotation holds no longer.
    let remembered = cases[1].1.clone().unwrap();
    assert_eq!(status(&s.client, Some(&remembered)), "401", "remembered across a rotation\n{}", log());

    // The JWKS server goes down: the last good keys stay in force.
    server.kill();
    let failures =
        || sum_metric(&waypoint_metrics(&s.wp_pod), "mesh_waypoint_jwks_fetches_total", &[("result", "failure")]);
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(15));
    while failures() < 2.0 {
        assert!(Instant::now() < deadline, "no failed refresh counted:\n{}", waypoint_metrics(&s.wp_pod));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status(&s.client, Some(&rotated)), "200", "keys kept with the JWKS server down\n{}", log());
    assert_eq!(status(&s.client, Some(&old)), "401");
    assert!(log().contains("keeping the last good key set"), "{}", log());
}
