//! Keys and certificates the node holds: its own node certificate (persisted,
//! so a restart does not need the join token) and one per workload identity
//! scheduled on it (in memory only). Keys are ECDSA P-256, made here; only
//! CSRs leave the node.
use std::{fs, path::Path};

pub use mesh_common::admin::CertView;
use mesh_common::api;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyedCert {
    pub cert_pem: String,
    /// Intermediates (if any), then the root.
    pub chain_pem: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub key_pem: String,
    pub root_pem: String,
    pub serial: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    pub issued_at_unix: i64,
}

/// What is wrong with key or certificate material.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("making a key or CSR: {0}")]
    Keygen(#[from] rcgen::Error),
    #[error("certificate PEM: {0}")]
    Pem(String),
    #[error("certificate: {0}")]
    X509(String),
    #[error("{what} of {identity}: {reason}")]
    Tls { what: &'static str, identity: String, reason: String },
}

/// A new P-256 key (PEM) and a CSR for it. The CA sets the identity; the CSR carries none.
pub fn key_and_csr() -> Result<(String, String), CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

impl KeyedCert {
    pub fn from_response(r: api::CertificateResponse, key_pem: String, now_unix: i64) -> Result<KeyedCert, CertError> {
        let der = pem_der(&r.cert_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::X509(e.to_string()))?;
        Ok(KeyedCert {
            serial: cert.tbs_certificate.raw_serial_as_string(),
            not_before_unix: cert.validity().not_before.timestamp(),
            not_after_unix: cert.validity().not_after.timestamp(),
            cert_pem: r.cert_pem,
            chain_pem: r.chain_pem,
            key_pem,
            root_pem: r.root_pem,
            issued_at_unix: now_unix,
        })
    }

    /// Half-way through the lifetime the node had when it got the certificate.
    pub fn renew_at_unix(&self) -> i64 {
        self.issued_at_unix + (self.not_after_unix - self.issued_at_unix) / 2
    }

    pub fn view(&self, identity: &str) -> CertView {
        CertView {
            identity: identity.to_owned(),
            serial: self.serial.clone(),
            not_before_unix: self.not_before_unix,
            not_after_unix: self.not_after_unix,
            renew_at_unix: self.renew_at_unix(),
            chain_len: self.chain_pem.len(),
            chain: self
                .chain_pem
                .iter()
                .map(|pem| subject(pem).unwrap_or_else(|e| format!("unreadable: {e}")))
                .collect(),
            chain_verified: self.verify_chain(),
        }
    }

    /// The leaf, then every issuer, each signed by the next; the last is a
    /// root, self-signed and one of the roots the controller sent.
    fn verify_chain(&self) -> Result<(), String> {
        let ders = std::iter::once(&self.cert_pem)
            .chain(&self.chain_pem)
            .map(|pem| pem_der(pem).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let certs = ders
            .iter()
            .map(|der| x509_parser::parse_x509_certificate(der).map(|(_, c)| c).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, pair) in certs.windows(2).enumerate() {
            pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .map_err(|e| format!("certificate {i} is not signed by {}: {e}", pair[1].subject()))?;
        }
        let root = certs.last().ok_or("no certificate")?;
        root.verify_signature(None).map_err(|e| format!("the last certificate is not self-signed: {e}"))?;
        let last = ders.last().ok_or("no certificate")?;
        use rustls::pki_types::pem::PemObject as _;
        let roots = rustls::pki_types::CertificateDer::pem_slice_iter(self.root_pem.as_bytes());
        if !roots.flatten().any(|root| root.as_ref() == last.as_slice()) {
            return Err("the chain does not end at a mesh root".into());
        }
        Ok(())
    }

    /// The leaf and its intermediates (what TLS presents), without the root.
    pub fn presented_chain(&self) -> String {
        let mut out = self.cert_pem.clone();
        for pem in self.chain_pem.iter().take(self.chain_pem.len().saturating_sub(1)) {
            out.push_str(pem);
        }
        out
    }

    pub fn load(path: &Path) -> Option<KeyedCert> {
        serde_json::from_slice(&fs::read(path).ok()?).ok()
    }

    /// Writes the certificate and its key, readable by root only.
    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        mesh_common::files::write_atomically(
            path,
            &serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
            0o600,
        )
    }
}

fn subject(pem: &str) -> Result<String, CertError> {
    let der = pem_der(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::X509(e.to_string()))?;
    Ok(cert.subject().to_string())
}

fn pem_der(pem: &str) -> Result<Vec<u8>, CertError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| CertError::Pem(e.to_string()))?;
    Ok(p.contents)
}
