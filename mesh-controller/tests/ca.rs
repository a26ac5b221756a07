//! The certificate authority: persisted root, issued chains that verify with
//! the right SPIFFE ID, usages and lifetime, refused requests, node rules.
mod common;

use std::{fs, os::unix::fs::PermissionsExt as _, time::Duration};

use ::time::OffsetDateTime;
use common::TempDir;
use mesh_common::identity::SpiffeId;
use mesh_controller::{
    ca::{CaError, CertificateAuthority, may_issue},
    config::{ConfigStore, MeshSettings, Snapshot, split_documents},
    model::MeshModel,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, SanType,
};
use x509_parser::{extensions::GeneralName, pem::parse_x509_pem, prelude::*};

const DAY: Duration = Duration::from_secs(24 * 3600);

/// What a node does: a fresh P-256 key, and a CSR (optionally claiming a SAN).
fn csr(claim: Option<&str>) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    if let Some(uri) = claim {
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    }
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn der(pem: &str) -> Vec<u8> {
    parse_x509_pem(pem.as_bytes()).unwrap().1.contents
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

#[test]
fn the_root_is_created_once_and_persisted_privately() {
    let dir = TempDir::new("persist");
    let first = CertificateAuthority::load_or_create(&dir.0, "cluster.local", DAY).unwrap();
    let again = CertificateAuthority::load_or_create(&dir.0, "cluster.local", DAY).unwrap();
    assert_eq!(first.root_pem(), again.root_pem(), "same root after a restart");
    let mode = fs::metadata(dir.0.join("ca-key.pem")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn issued_certificates_chain_to_the_root_with_the_spiffe_id_usages_and_lifetime() {
    let dir = TempDir::new("issue");
    let ca = CertificateAuthority::load_or_create(&dir.0, "cluster.local", Duration::from_secs(3600)).unwrap();
    let identity = id("spiffe://cluster.local/ns/shop/sa/web");
    let now = OffsetDateTime::now_utc();
    // The CSR claims another identity: the CA ignores what the request claims.
    let issued = ca.issue(&csr(Some("spiffe://cluster.local/ns/kube-system/sa/admin")), &identity, now).unwrap();

    let root_der = der(ca.root_pem());
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    let leaf_der = der(&issued.cert_pem);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    assert_eq!(issued.chain_pem.len(), 1);
    leaf.verify_signature(Some(root.public_key())).expect("signed by the root");
    assert_eq!(leaf.issuer(), root.subject());

    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(sans, vec!["spiffe://cluster.local/ns/shop/sa/web"]);
    assert!(!leaf.is_ca());
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let lifetime = leaf.validity().not_after.timestamp() - now.unix_timestamp();
    assert!((3599..=3601).contains(&lifetime), "lifetime {lifetime} s");
    assert_eq!(issued.not_after.unix_timestamp(), leaf.validity().not_after.timestamp());
    assert!(leaf.validity().not_before.timestamp() < now.unix_timestamp(), "backdated for clock skew");
}

#[test]
fn bad_requests_are_refused() {
    let dir = TempDir::new("bad");
    let ca = CertificateAuthority::load_or_create(&dir.0, "cluster.local", DAY).unwrap();
    let identity = id("spiffe://cluster.local/ns/shop/sa/web");
    let now = OffsetDateTime::now_utc();

    let tampered = {
        // Flip one byte inside the request: its signature no longer verifies.
        let pem = csr(None);
        let body: Vec<&str> = pem.lines().collect();
        let mut line = body[2].to_string().into_bytes();
        line[10] = if line[10] == b'A' { b'B' } else { b'A' };
        let mut lines: Vec<String> = body.iter().map(|l| l.to_string()).collect();
        lines[2] = String::from_utf8(line).unwrap();
        lines.join("\n") + "\n"
    };
    for (what, request, want) in [
        ("tampered", tampered, "certificate signing request"),
        ("not a CSR", "hello".to_string(), "certificate signing request"),
    ] {
        let err = ca.issue(&request, &identity, now).err().unwrap_or_else(|| panic!("{what}: issued"));
        assert!(matches!(err, CaError::BadCsr(_)), "{what}: {err}");
        assert!(err.to_string().contains(want), "{what}: {err}");
    }
}

/// A CSR for a new RSA key of `bits`, made by openssl as Istio's agent
/// makes one (rcgen's crypto cannot make RSA keys).
fn rsa_csr(bits: u32) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("openssl req -new -newkey rsa:{bits} -nodes -keyout /dev/null -subj /O=istio 2>/dev/null"))
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl req");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn keys_of_node_agents_and_of_istios_agents_are_issued_for() {
    let dir = TempDir::new("keys");
    let ca = CertificateAuthority::load_or_create(&dir.0, "cluster.local", DAY).unwrap();
    let identity = id("spiffe://cluster.local/ns/shop/sa/web");
    let now = OffsetDateTime::now_utc();
    let rcgen_csr = |alg| {
        let key = KeyPair::generate_for(alg).unwrap();
        CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap()
    };
    // (key, its CSR, refused with)
    let cases = [
        ("ECDSA P-256", rcgen_csr(&PKCS_ECDSA_P256_SHA256), None),
        ("ECDSA P-384", rcgen_csr(&PKCS_ECDSA_P384_SHA384), None),
        ("RSA 2048 (Istio's agent's default)", rsa_csr(2048), None),
        // Too weak for its signature to be verified (ring's floor is 2048 bits).
        ("RSA 1024", rsa_csr(1024), Some("certificate signing request")),
        ("Ed25519", rcgen_csr(&rcgen::PKCS_ED25519), Some("keys are not issued for")),
    ];
    for (what, request, refused) in cases {
        match (ca.issue(&request, &identity, now), refused) {
            (Ok(issued), None) => {
                let (_, cert) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).unwrap();
                let cert = cert.parse_x509().unwrap();
                let uri = format!("{:?}", cert.subject_alternative_name().unwrap().unwrap().value.general_names);
                assert!(uri.contains("spiffe://cluster.local/ns/shop/sa/web"), "{what}: {uri}");
            }
            (Err(e), Some(why)) => assert!(e.to_string().contains(why), "{what}: {e}"),
            (got, _) => panic!("{what}: {:?}", got.map(|i| i.serial)),
        }
    }
}

#[test]
fn an_operator_supplied_intermediate_issues_with_its_chain() {
    let dir = TempDir::new("intermediate");
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root_params = CertificateParams::default();
    root_params.distinguished_name.push(DnType::CommonName, "corp root");
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let root = root_params.self_signed(&root_key).unwrap();
    let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut int_params = CertificateParams::default();
    int_params.distinguished_name.push(DnType::CommonName, "mesh intermediate");
    int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let int = int_params.signed_by(&int_key, &Issuer::new(root_params, &root_key)).unwrap();
    let (cert, key, chain) = (dir.0.join("int.pem"), dir.0.join("int-key.pem"), dir.0.join("chain.pem"));
    fs::write(&cert, int.pem()).unwrap();
    fs::write(&key, int_key.serialize_pem()).unwrap();
    fs::write(&chain, root.pem()).unwrap();

    let ca = CertificateAuthority::from_files(&cert, &key, Some(&chain), DAY).unwrap();
    assert_eq!(ca.root_pem().trim(), root.pem().trim(), "the operator's root is the trust anchor");
    let issued = ca.issue(&csr(None), &id("spiffe://cluster.local/ns/a/sa/b"), OffsetDateTime::now_utc()).unwrap();
    assert_eq!(issued.chain_pem.len(), 2, "intermediate then root");
    let (leaf_der, int_der, root_der) = (der(&issued.cert_pem), der(&issued.chain_pem[0]), der(&issued.chain_pem[1]));
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let (_, int) = X509Certificate::from_der(&int_der).unwrap();
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    leaf.verify_signature(Some(int.public_key())).expect("leaf signed by the intermediate");
    int.verify_signature(Some(root.public_key())).expect("intermediate signed by the root");
}

#[test]
fn nodes_obtain_only_identities_of_their_own_workloads() {
    let yaml = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec: {serviceAccountName: web, nodeName: node1}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop}
spec: {serviceAccountName: db, nodeName: node2}
";
    let mut store = ConfigStore::default();
    store.apply(Snapshot::from_documents(&split_documents(std::path::Path::new("t.yaml"), yaml), vec![]));
    let model = MeshModel::build(&store, &MeshSettings::default());
    for (node, identity, ok) in [
        ("node1", "spiffe://cluster.local/ns/shop/sa/web", true),
        ("node1", "spiffe://cluster.local/ns/shop/sa/db", false),
        ("node2", "spiffe://cluster.local/ns/shop/sa/db", true),
        ("node3", "spiffe://cluster.local/ns/shop/sa/web", false),
        ("node1", "spiffe://other.domain/ns/shop/sa/web", false),
    ] {
        let result = may_issue(&model, node, &id(identity));
        assert_eq!(result.is_ok(), ok, "{node} asking for {identity}: {result:?}");
    }
}

#[test]
fn the_trust_bundle_is_the_root_then_the_extra_roots() {
    let dir = TempDir::new("ca-bundle");
    let mut ca = CertificateAuthority::load_or_create(&dir.0, "cluster.local", DAY).unwrap();
    assert_eq!(ca.trust_bundle(), ca.root_pem(), "no extra root: the root alone");
    let other = TempDir::new("ca-bundle-other");
    let new = CertificateAuthority::load_or_create(&other.0, "cluster.local", DAY).unwrap();
    let file = std::path::Path::new("new-root.pem");
    // The CA's own root in the file is not repeated; the new one is added once.
    let pem = format!("{}{}{}", new.root_pem(), ca.root_pem(), new.root_pem());
    ca.trust_also(&pem, file).unwrap();
    assert_eq!(ca.trust_bundle(), format!("{}{}", ca.root_pem(), new.root_pem()));
    let bad = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n";
    let e = ca.trust_also(bad, file).unwrap_err();
    assert!(matches!(e, CaError::BadBundle(_)) && e.to_string().contains("new-root.pem"), "{e}");
}
