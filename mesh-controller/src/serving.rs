//! The controller's own TLS on its node API: a serving certificate from its
//! CA, renewed at half-life while the controller runs (new handshakes get
//! the new one; open connections are untouched), and client certificates
//! checked against the whole trust bundle, optional so that a node can
//! `Join` before it has one. TLS is done here, before tonic, so that the
//! certificate can change: tonic's own TLS configuration is fixed at start.
use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::{info, warn};

use crate::ca::{CaError, CertificateAuthority};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The serving certificate in force, swapped at each renewal.
pub struct ServingCert {
    ca: Arc<CertificateAuthority>,
    names: Vec<String>,
    ips: Vec<IpAddr>,
    lifetime: Duration,
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert").field("names", &self.names).field("lifetime", &self.lifetime).finish()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("serving certificate: {0}")]
    Tls(String),
}

impl ServingCert {
    /// Issues the first serving certificate, for `names` and `ips`.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        names: Vec<String>,
        ips: Vec<IpAddr>,
        lifetime: Duration,
    ) -> Result<Arc<ServingCert>, ServingError> {
        let first = issue(&ca, &names, &ips, lifetime)?;
        Ok(Arc::new(ServingCert { ca, names, ips, lifetime, current: RwLock::new(first) }))
    }

    /// Issues a new certificate and serves it from the next handshake on.
    pub fn renew(&self) -> Result<(), ServingError> {
        let next = issue(&self.ca, &self.names, &self.ips, self.lifetime)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// The leaf served now (DER).
    #[cfg(test)]
    fn leaf(&self) -> CertificateDer<'static> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).cert[0].clone()
    }

    /// Renews at half-life, for as long as the controller runs.
    pub async fn renew_forever(self: Arc<Self>) {
        let half = self.lifetime / 2;
        let mut wait = half;
        loop {
            tokio::time::sleep(wait).await;
            wait = match self.renew() {
                Ok(()) => {
                    info!(lifetime = ?self.lifetime, "serving certificate renewed");
                    half
                }
                Err(e) => {
                    warn!(error = %e, "could not renew the serving certificate; retrying in 10 s");
                    half.min(Duration::from_secs(10))
                }
            };
        }
    }
}

fn issue(
    ca: &CertificateAuthority,
    names: &[String],
    ips: &[IpAddr],
    lifetime: Duration,
) -> Result<Arc<CertifiedKey>, ServingError> {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (issued, key_pem) = ca.serving(&names, ips, time::OffsetDateTime::now_utc(), lifetime)?;
    let bad = |e: &dyn std::fmt::Display| ServingError::Tls(e.to_string());
    // The leaf and any intermediates; the root is what nodes already trust.
    let mut chain = vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).map_err(|e| bad(&e))?];
    for pem in issued.chain_pem.iter().take(issued.chain_pem.len().saturating_sub(1)) {
        chain.push(CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| bad(&e))?);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(&e))?;
    let provider = ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| bad(&e))?;
    Ok(Arc::new(certified))
}

/// TLS for the node API: the serving certificate of `cert`, HTTP/2, client
/// certificates optional and, when given, chaining to the trust bundle.
pub fn server_config(ca: &CertificateAuthority, cert: Arc<ServingCert>) -> Result<ServerConfig, ServingError> {
    let bad = |e: &dyn std::fmt::Display| ServingError::Tls(e.to_string());
    let mut roots = RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(ca.trust_bundle().as_bytes()) {
        roots.add(root.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    let provider = Arc::new(ring::default_provider());
    let clients = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| bad(&e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// TLS for the admission webhook (HTTP/1.1): the same serving certificate,
/// no client certificates (the API server authenticates by reaching the
/// address its webhook configuration names, and checks ours against the CA
/// bundle the controller patched into that configuration).
pub fn webhook_config(cert: Arc<ServingCert>) -> Result<ServerConfig, ServingError> {
    let bad = |e: &dyn std::fmt::Display| ServingError::Tls(e.to_string());
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Connections on `listener` after their TLS handshake, for tonic's
/// `serve_with_incoming` (or [`TlsListener`]). A handshake that fails or
/// stalls is dropped; `what` names the service in the log.
pub fn incoming(
    what: &'static str,
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => warn!(peer = %peer, "{what}: TLS handshake failed: {e}"),
                    Err(_) => warn!(peer = %peer, "{what}: TLS handshake not done within {HANDSHAKE_TIMEOUT:?}"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// [`incoming`]'s connections as an axum listener.
pub struct TlsListener {
    pub connections: tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>>,
    pub local: std::net::SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt as _;
        loop {
            match self.connections.next().await {
                Some(Ok(tls)) => {
                    let Ok(peer) = tls.get_ref().0.peer_addr() else { continue };
                    return (tls, peer);
                }
                Some(Err(_)) => continue,
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_serves_a_new_certificate() {
        let dir = std::env::temp_dir().join(format!("mesh-serving-{}", std::process::id()));
        let ca =
            Arc::new(CertificateAuthority::load_or_create(&dir, "cluster.local", Duration::from_secs(60)).unwrap());
        let names = vec!["mesh-controller".to_owned()];
        let cert = ServingCert::new(ca.clone(), names, vec![], Duration::from_secs(60)).unwrap();
        let first = cert.leaf();
        server_config(&ca, cert.clone()).unwrap();
        cert.renew().unwrap();
        assert_ne!(cert.leaf(), first, "a new certificate after renewal");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
