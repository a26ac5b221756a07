//! The TLS material of the workload identities this node serves: the
//! controller channel puts each new or renewed certificate here, and the
//! proxy takes the server config (15008) or builds a client config (HBONE
//! out) from it. Connections already open keep the certificate they
//! started with; new ones get the renewed one.
mod certs;

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use mesh_common::identity::SpiffeId;
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};

pub use self::certs::{CertError, CertView, KeyedCert, key_and_csr};
use crate::hbone::tls;

pub struct LocalIdentity {
    pub credentials: tls::Credentials,
    pub roots: Arc<RootCertStore>,
    /// The controller's revocations, which both directions check peers against.
    pub revoked: Arc<tls::Revocations>,
    pub server: Arc<rustls::ServerConfig>,
    /// The certificate as issued (dates, serial, for renewal).
    pub cert: KeyedCert,
    /// What the config dump shows, chain verified once here rather than on
    /// every dump (`mesh-ctl enroll` polls dumps).
    pub view: CertView,
}

impl LocalIdentity {
    pub fn from_cert(
        identity: &SpiffeId,
        cert: &KeyedCert,
        revoked: &Arc<tls::Revocations>,
    ) -> Result<LocalIdentity, CertError> {
        let bad = |what: &'static str, e: &dyn std::fmt::Display| CertError::Tls {
            what,
            identity: identity.to_string(),
            reason: e.to_string(),
        };
        let chain = CertificateDer::pem_slice_iter(cert.presented_chain().as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("certificate", &e))?;
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).map_err(|e| bad("key", &e))?;
        let mut roots = RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(cert.root_pem.as_bytes()) {
            roots.add(root.map_err(|e| bad("mesh root", &e))?).map_err(|e| bad("mesh root", &e))?;
        }
        let roots = Arc::new(roots);
        let credentials = tls::Credentials { chain, key: Arc::new(key) };
        let server = tls::server_config(&credentials, roots.clone(), revoked.clone(), identity.trust_domain())
            .map_err(|e| bad("server config", &e))?;
        let server = Arc::new(server);
        let view = cert.view(&identity.to_string());
        Ok(LocalIdentity { credentials, roots, revoked: revoked.clone(), server, cert: cert.clone(), view })
    }

    /// A client config that presents this identity and accepts only `peer`.
    pub fn client_config(&self, peer: SpiffeId) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        Ok(Arc::new(tls::client_config(&self.credentials, self.roots.clone(), self.revoked.clone(), peer)?))
    }
}

#[derive(Default)]
pub struct Identities {
    by_id: RwLock<HashMap<SpiffeId, Arc<LocalIdentity>>>,
}

impl Identities {
    /// The identity's certificate, unless it has expired: a peer would refuse
    /// it, so the connection is refused here (never sent in plaintext).
    pub fn get(&self, id: &SpiffeId) -> Option<Arc<LocalIdentity>> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        self.by_id.read().unwrap_or_else(|e| e.into_inner()).get(id).filter(|l| l.cert.not_after_unix > now).cloned()
    }

    /// Every certificate held, expired or not (to persist, and to report expiry).
    pub fn certs(&self) -> Vec<(SpiffeId, KeyedCert)> {
        let map = self.by_id.read().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(id, l)| (id.clone(), l.cert.clone())).collect()
    }

    /// Puts a new or renewed certificate in force; true when it replaced one.
    pub fn set(&self, id: SpiffeId, identity: LocalIdentity) -> bool {
        self.by_id.write().unwrap_or_else(|e| e.into_inner()).insert(id, Arc::new(identity)).is_some()
    }

    /// Every certificate held, by identity (for the config dump).
    pub fn views(&self) -> Vec<CertView> {
        let map = self.by_id.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<CertView> = map.values().map(|l| l.view.clone()).collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Drops identities no pod of this node has any more; true when it dropped any.
    pub fn retain(&self, keep: impl Fn(&SpiffeId) -> bool) -> bool {
        let mut map = self.by_id.write().unwrap_or_else(|e| e.into_inner());
        let held = map.len();
        map.retain(|id, _| keep(id));
        map.len() != held
    }
}
