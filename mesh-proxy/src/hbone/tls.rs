//! TLS for HBONE, as Istio's ztunnel does it: TLS 1.3 only, AES-GCM suites,
//! ALPN `h2`, certificates carrying SPIFFE IDs. A client accepts only the
//! exact identity the destination workload should have (the name it dials is
//! an IP and is not checked); a server accepts only clients that chain to the
//! mesh root and belong to its trust domain. Both checks are in the
//! handshake, so a refused peer never gets a byte of application data.
//! Both also refuse a certificate the controller revoked (the workload
//! certificates of a node the operator removed).
use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use mesh_common::identity::SpiffeId;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

pub const ALPN_H2: &[u8] = b"h2";

/// A workload's certificate chain (leaf first, no root) and key.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
}

/// The certificates the controller revoked: serial (hex, as
/// [`serial_of`] writes it) → the removed node that held it. Shared by every
/// TLS config of the proxy, replaced whole with each configuration.
#[derive(Debug, Default)]
pub struct Revocations(RwLock<Arc<HashMap<String, String>>>);

impl Revocations {
    pub fn replace(&self, revoked: HashMap<String, String>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(revoked);
    }

    /// The removed node that held the certificate with `serial`, if revoked.
    pub fn revoked_by(&self, serial: &str) -> Option<String> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).get(serial).cloned()
    }

    /// Refuses a revoked `cert` as rustls refuses a bad one.
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), Error> {
        let serial = serial_of(cert);
        match self.revoked_by(&serial) {
            None => Ok(()),
            Some(node) => {
                tracing::warn!(serial, node, "refused a revoked certificate (its node was removed from the mesh)");
                Err(Error::InvalidCertificate(rustls::CertificateError::Revoked))
            }
        }
    }
}

/// A certificate's serial number in lowercase hex (its DER content bytes),
/// as the controller names revoked certificates.
pub fn serial_of(cert: &CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, c)| mesh_common::identity::serial_hex(c.raw_serial()))
        .unwrap_or_default()
}

/// ring with only the TLS 1.3 AES-GCM suites.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = ring::default_provider();
    p.cipher_suites = vec![ring::cipher_suite::TLS13_AES_128_GCM_SHA256, ring::cipher_suite::TLS13_AES_256_GCM_SHA384];
    Arc::new(p)
}

/// The SPIFFE ID in a certificate's URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| format!("unparseable certificate: {e}"))?;
    let san = parsed.subject_alternative_name().ok().flatten().ok_or("certificate without a SAN")?;
    let uri = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .ok_or("certificate without a URI SAN")?;
    uri.parse().map_err(|e| format!("URI SAN {uri:?}: {e}"))
}

/// The client side: our certificate, and the one identity the server must present.
pub fn client_config(
    me: &Credentials,
    roots: Arc<RootCertStore>,
    revoked: Arc<Revocations>,
    expect: SpiffeId,
) -> Result<ClientConfig, Error> {
    let provider = provider();
    let verifier =
        ExactServerIdentity { roots, revoked, expect, algorithms: provider.signature_verification_algorithms };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(me.chain.clone(), me.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The server side: our certificate; clients must chain to `roots` and be in `trust_domain`.
pub fn server_config(
    me: &Credentials,
    roots: Arc<RootCertStore>,
    revoked: Arc<Revocations>,
    trust_domain: &str,
) -> Result<ServerConfig, Error> {
    let provider = provider();
    let chain = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| Error::General(format!("client verifier: {e}")))?;
    let verifier = TrustDomainClients { chain, revoked, trust_domain: trust_domain.to_owned() };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(me.chain.clone(), me.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct ExactServerIdentity {
    roots: Arc<RootCertStore>,
    revoked: Arc<Revocations>,
    expect: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ExactServerIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = identity_of(end_entity).map_err(Error::General)?;
        if presented != self.expect {
            return Err(Error::General(format!("server presented {presented}, expected {}", self.expect)));
        }
        self.revoked.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// webpki's client verification (chain, validity, client-auth usage), then the trust domain.
#[derive(Debug)]
struct TrustDomainClients {
    chain: Arc<dyn ClientCertVerifier>,
    revoked: Arc<Revocations>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self.chain.verify_client_cert(end_entity, intermediates, now)?;
        let id = identity_of(end_entity).map_err(Error::General)?;
        if id.trust_domain() != self.trust_domain {
            return Err(Error::General(format!("client {id} is not in trust domain {}", self.trust_domain)));
        }
        self.revoked.check(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}
