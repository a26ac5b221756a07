//! The mesh's certificate authority. A root generated on first start and
//! persisted (key mode 0600) in the state directory, or a CA the operator
//! supplies. Workload certificates are issued from CSRs: ECDSA P-256 or
//! P-384 keys, or RSA (2048-4096 bits, as Istio's agents make); the SPIFFE
//! URI SAN set by the CA from the authorized identity (never copied from the
//! request), server and client auth, a bounded lifetime.
//! Private keys of workloads never reach the controller.
use std::{
    fs,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_common::identity::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::model::MeshModel;

/// Certificates are valid from a little before issuance: clocks drift.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const ROOT_CERT_FILE: &str = "ca-cert.pem";
const ROOT_KEY_FILE: &str = "ca-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{what}: {source}")]
    Cert { what: String, source: rcgen::Error },
    #[error("certificate signing request: {0}")]
    BadCsr(String),
    #[error("node {node} may not obtain {identity}: no workload with that identity is scheduled on it")]
    NotOnNode { node: String, identity: String },
    #[error("trust bundle {0}")]
    BadBundle(String),
}

/// A certificate issued to a workload, with the chain up to the root.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    /// Intermediates (if any) then the root.
    pub chain_pem: Vec<String>,
    pub not_after: OffsetDateTime,
    /// The certificate's serial number as its DER carries it, in hex.
    pub serial: String,
}

/// A CA's certificate, key and chain (intermediates, then the root; empty
/// for a root), PEM: what is kept in files or in a Kubernetes Secret.
#[derive(Clone, Debug, PartialEq)]
pub struct CaFiles {
    pub cert_pem: String,
    pub key_pem: String,
    pub chain_pem: Vec<String>,
}

/// The keys of a Secret holding a CA, Istio's (`istio-ca-secret`, and the
/// plugged-in `cacerts`): so a Secret made for istiod serves mesh as it is.
pub const SECRET_CERT: &str = "ca-cert.pem";
pub const SECRET_KEY: &str = "ca-key.pem";
pub const SECRET_CHAIN: &str = "cert-chain.pem";
pub const SECRET_ROOT: &str = "root-cert.pem";

impl CaFiles {
    /// A new self-signed root (ECDSA P-256, ten years) for `trust_domain`.
    pub fn new_root(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|source| CaError::Cert { what: "generating the root key".into(), source })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "mesh root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_LIFETIME;
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(|source| CaError::Cert { what: "self-signing the root".into(), source })?;
        Ok(Self { cert_pem: cert.pem(), key_pem: key.serialize_pem(), chain_pem: Vec::new() })
    }

    /// The CA in a Secret's data, laid out as Istio lays it: `ca-cert.pem`
    /// and `ca-key.pem`; for an intermediate, `cert-chain.pem` (Istio writes
    /// the CA's own certificate first, then up to the root) or else
    /// `root-cert.pem`. `None` when the CA's certificate or key is missing.
    pub fn from_secret_data(data: &std::collections::BTreeMap<String, String>) -> Option<Self> {
        let cert_pem = data.get(SECRET_CERT)?.clone();
        let key_pem = data.get(SECRET_KEY)?.clone();
        let own = cert_pem.trim();
        let chain_pem = match (data.get(SECRET_CHAIN), data.get(SECRET_ROOT)) {
            (Some(chain), _) => split_pem(chain).into_iter().filter(|c| c.trim() != own).collect(),
            (None, Some(root)) if root.trim() != own => split_pem(root),
            _ => Vec::new(),
        };
        Some(Self { cert_pem, key_pem, chain_pem })
    }

    /// The Secret's data for this CA (Istio's keys; the root in `root-cert.pem`).
    pub fn secret_data(&self) -> std::collections::BTreeMap<String, String> {
        let root = self.chain_pem.last().unwrap_or(&self.cert_pem).clone();
        let mut data = std::collections::BTreeMap::from([
            (SECRET_CERT.to_owned(), self.cert_pem.clone()),
            (SECRET_KEY.to_owned(), self.key_pem.clone()),
            (SECRET_ROOT.to_owned(), root),
        ]);
        if !self.chain_pem.is_empty() {
            data.insert(SECRET_CHAIN.to_owned(), format!("{}{}", self.cert_pem, self.chain_pem.concat()));
        }
        data
    }

    /// The CA these make, issuing for `lifetime`; `origin` names them in errors.
    pub fn authority(&self, origin: &str, lifetime: Duration) -> Result<CertificateAuthority, CaError> {
        let key = KeyPair::from_pem(&self.key_pem)
            .map_err(|source| CaError::Cert { what: format!("reading the CA key of {origin}"), source })?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, key)
            .map_err(|source| CaError::Cert { what: format!("reading the CA certificate of {origin}"), source })?;
        Ok(CertificateAuthority {
            issuer,
            cert_pem: self.cert_pem.clone(),
            chain_pem: self.chain_pem.clone(),
            lifetime,
            extra_roots: Vec::new(),
        })
    }
}

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    /// What issued certificates chain to, after `cert_pem` (empty for a self-signed root).
    chain_pem: Vec<String>,
    lifetime: Duration,
    /// Roots trusted besides this CA's own (a root rotation in progress).
    extra_roots: Vec<String>,
}

impl CertificateAuthority {
    /// The root in `state_dir`, created there (key 0600) on first start.
    pub fn load_or_create(state_dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<Self, CaError> {
        let (cert_path, key_path) = (state_dir.join(ROOT_CERT_FILE), state_dir.join(ROOT_KEY_FILE));
        if cert_path.exists() || key_path.exists() {
            return Self::from_files(&cert_path, &key_path, None, lifetime);
        }
        fs::create_dir_all(state_dir).map_err(|source| CaError::Io { path: state_dir.into(), source })?;
        let root = CaFiles::new_root(trust_domain)?;
        write_private(&key_path, root.key_pem.as_bytes())
            .map_err(|source| CaError::Io { path: key_path.clone(), source })?;
        fs::write(&cert_path, &root.cert_pem).map_err(|source| CaError::Io { path: cert_path.clone(), source })?;
        Self::from_files(&cert_path, &key_path, None, lifetime)
    }

    /// A CA the operator supplies: its certificate and key, and when it is an
    /// intermediate, the chain up to the root (PEM, intermediates first).
    pub fn from_files(cert: &Path, key: &Path, chain: Option<&Path>, lifetime: Duration) -> Result<Self, CaError> {
        let read = |p: &Path| fs::read_to_string(p).map_err(|source| CaError::Io { path: p.into(), source });
        let files = CaFiles {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            chain_pem: match chain {
                Some(p) => split_pem(&read(p)?),
                None => Vec::new(),
            },
        };
        files.authority(&format!("{} and {}", cert.display(), key.display()), lifetime)
    }

    /// The root this CA's certificates chain to, PEM.
    pub fn root_pem(&self) -> &str {
        self.chain_pem.last().unwrap_or(&self.cert_pem)
    }

    /// Trusts the roots in `pem` too, beside this CA's own: the middle steps
    /// of a root rotation (every node is sent them, and the controller takes
    /// node certificates that chain to them). Each must parse as a certificate.
    pub fn trust_also(&mut self, pem: &str, origin: &Path) -> Result<(), CaError> {
        for root in split_pem(pem) {
            let (_, block) = x509_parser::pem::parse_x509_pem(root.as_bytes())
                .map_err(|e| CaError::BadBundle(format!("{}: {e}", origin.display())))?;
            x509_parser::parse_x509_certificate(&block.contents)
                .map_err(|e| CaError::BadBundle(format!("{}: {e}", origin.display())))?;
            if root.trim() != self.root_pem().trim() && !self.extra_roots.contains(&root) {
                self.extra_roots.push(root);
            }
        }
        Ok(())
    }

    /// Every root nodes and workloads must trust, PEM: this CA's root first,
    /// then those of [`Self::trust_also`].
    pub fn trust_bundle(&self) -> String {
        let mut bundle = self.root_pem().to_owned();
        for root in &self.extra_roots {
            bundle.push_str(root);
        }
        bundle
    }

    /// Issues a certificate for `identity` to the holder of the key in `csr_pem`.
    /// The caller has checked that the requester may hold `identity`.
    pub fn issue(&self, csr_pem: &str, identity: &SpiffeId, now: OffsetDateTime) -> Result<Issued, CaError> {
        self.issue_uri(csr_pem, &identity.to_string(), now, self.lifetime)
    }

    /// Issues a certificate whose only SAN is the URI `uri` (a workload's or a
    /// node's SPIFFE ID), valid for `lifetime`, to the holder of the key in `csr_pem`.
    pub fn issue_uri(
        &self,
        csr_pem: &str,
        uri: &str,
        now: OffsetDateTime,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::BadCsr(e.to_string()))?;
        check_key(csr_pem, &csr)?;
        let san = uri.to_string().try_into().map_err(|source| CaError::Cert { what: format!("SAN {uri}"), source })?;
        self.sign(&csr.public_key, vec![SanType::URI(san)], now, lifetime)
    }

    /// A key and certificate for the controller's own gRPC port, with DNS
    /// names and IP addresses as SANs. The key never leaves the process.
    pub fn serving(
        &self,
        dns_names: &[&str],
        ips: &[IpAddr],
        now: OffsetDateTime,
        lifetime: Duration,
    ) -> Result<(Issued, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|source| CaError::Cert { what: "generating the serving key".into(), source })?;
        let mut sans = Vec::new();
        for name in dns_names {
            let name =
                name.to_string().try_into().map_err(|source| CaError::Cert { what: format!("SAN {name}"), source })?;
            sans.push(SanType::DnsName(name));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let issued = self.sign(&key, sans, now, lifetime)?;
        Ok((issued, key.serialize_pem()))
    }

    fn sign(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        sans: Vec<SanType>,
        now: OffsetDateTime,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyAgreement];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        params.serial_number = Some(random_serial()?);
        let what = format!("{:?}", params.subject_alt_names);
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|source| CaError::Cert { what: format!("signing for {what}"), source })?;
        let mut chain_pem = vec![self.cert_pem.clone()];
        chain_pem.extend(self.chain_pem.iter().cloned());
        Ok(Issued { cert_pem: cert.pem(), chain_pem, not_after: params.not_after, serial: serial_of(cert.der()) })
    }
}

/// Keys mesh issues for: ECDSA P-256 (what node agents make) and P-384, and
/// RSA of 2048 to 4096 bits, what Istio's agents make by default (so their
/// workloads can migrate); the CSR's signature was verified in parsing.
fn check_key(csr_pem: &str, csr: &CertificateSigningRequestParams) -> Result<(), CaError> {
    let alg = csr.public_key.algorithm();
    if *alg == PKCS_ECDSA_P256_SHA256 || *alg == rcgen::PKCS_ECDSA_P384_SHA384 {
        return Ok(());
    }
    if *alg != rcgen::PKCS_RSA_SHA256 {
        return Err(CaError::BadCsr(format!("{alg:?} keys are not issued for: ECDSA P-256 or P-384, or RSA")));
    }
    use x509_parser::prelude::FromDer as _;
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).map_err(|e| CaError::BadCsr(e.to_string()))?;
    let (_, request) = x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
        .map_err(|e| CaError::BadCsr(e.to_string()))?;
    let bits = request.certification_request_info.subject_pki.parsed().map_or(0, |k| k.key_size());
    match bits {
        2048..=4096 => Ok(()),
        _ => Err(CaError::BadCsr(format!("an RSA key of {bits} bits: 2048 to 4096 are issued for"))),
    }
}

/// Whether `node` may obtain a certificate for `identity`: only identities of
/// workloads scheduled on it (a compromised node cannot impersonate others).
pub fn may_issue(model: &MeshModel, node: &str, identity: &SpiffeId) -> Result<(), CaError> {
    if model.workloads_on_node(node).any(|w| &w.identity == identity) {
        Ok(())
    } else {
        Err(CaError::NotOnNode { node: node.into(), identity: identity.to_string() })
    }
}

/// A certificate's serial number (hex of its DER integer); empty when unparseable.
pub fn serial_of(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| mesh_common::identity::serial_hex(c.raw_serial()))
        .unwrap_or_default()
}

/// 128 random bits (RFC 5280 allows up to 20 octets; positive).
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes: [u8; 16] = random_bytes().map_err(|source| CaError::Io { path: "/dev/urandom".into(), source })?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Bytes from the kernel's CSPRNG.
pub(crate) fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    use std::io::Read as _;
    let mut bytes = [0u8; N];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Creates `path` (it must not exist) readable by its owner only, with `bytes`.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?.write_all(bytes)
}

fn split_pem(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END ") {
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An intermediate CA signed by `root`.
    fn intermediate(root: &CaFiles) -> CaFiles {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let issuer = Issuer::from_ca_cert_pem(&root.cert_pem, KeyPair::from_pem(&root.key_pem).unwrap()).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        CaFiles { cert_pem: cert.pem(), key_pem: key.serialize_pem(), chain_pem: vec![root.cert_pem.clone()] }
    }

    #[test]
    fn a_ca_in_a_secret_reads_back_as_itself_and_as_istio_lays_it_out() {
        let root = CaFiles::new_root("cluster.local").unwrap();
        let inter = intermediate(&root);
        let data = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let (cert, key, root_pem) = (inter.cert_pem.as_str(), inter.key_pem.as_str(), root.cert_pem.as_str());
        let istio_chain = format!("{cert}{root_pem}");
        // (what, the Secret's data, the CA read from it)
        let cases = [
            ("mesh's own root", root.secret_data(), Some(root.clone())),
            ("mesh's own intermediate", inter.secret_data(), Some(inter.clone())),
            (
                "istio cacerts, chain with the CA first",
                data(&[(SECRET_CERT, cert), (SECRET_KEY, key), (SECRET_CHAIN, &istio_chain), (SECRET_ROOT, root_pem)]),
                Some(inter.clone()),
            ),
            (
                "istio cacerts, root only",
                data(&[(SECRET_CERT, cert), (SECRET_KEY, key), (SECRET_ROOT, root_pem)]),
                Some(inter.clone()),
            ),
            (
                "istio-ca-secret, a root",
                data(&[(SECRET_CERT, root_pem), (SECRET_KEY, &root.key_pem), (SECRET_ROOT, root_pem)]),
                Some(root.clone()),
            ),
            ("no key", data(&[(SECRET_CERT, cert)]), None),
        ];
        for (what, data, want) in cases {
            let got = CaFiles::from_secret_data(&data);
            assert_eq!(got, want, "{what}");
            if let Some(files) = got {
                let ca = files.authority(what, Duration::from_secs(60)).expect(what);
                assert_eq!(ca.root_pem(), root_pem, "{what}: its root");
            }
        }
    }
}
