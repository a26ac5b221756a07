//! The CA's handling of a certificate signing request from a node: PEM,
//! DER, the CSR's signature and key, then issuance.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_controller::ca::CertificateAuthority;

fn ca() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mesh-fuzz-ca-{}", std::process::id()));
        let ca = CertificateAuthority::load_or_create(&dir, "cluster.local", std::time::Duration::from_secs(3600));
        let _ = std::fs::remove_dir_all(&dir);
        ca.expect("a CA")
    })
}

fuzz_target!(
    init: {
        mesh_fuzz::write_seeds_if_asked(|| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut with_san = rcgen::CertificateParams::new(vec!["web.shop".to_string()]).unwrap();
            with_san.distinguished_name.push(rcgen::DnType::CommonName, "web");
            vec![
                rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap().into_bytes(),
                with_san.serialize_request(&key).unwrap().pem().unwrap().into_bytes(),
            ]
        });
        ca();
    },
    |data: &[u8]| {
        let Ok(pem) = std::str::from_utf8(data) else { return };
        let id = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let _ = ca().issue(pem, &id, time::OffsetDateTime::now_utc());
    }
);
