//! Joining (the token, once, for a node certificate kept in the state dir)
//! and the mTLS channel to the controller.
use std::time::Duration;

use anyhow::Context as _;
use mesh_common::api::{self, node_control_client::NodeControlClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::{error, info, warn};

use super::{Control, NODE_CERT_FILE, lock, now_unix, status_error};
use crate::identity::{KeyedCert, key_and_csr};

impl Control {
    fn trusted_root(&self) -> anyhow::Result<String> {
        if let Some(c) = lock(&self.node_cert).as_ref() {
            return Ok(c.root_pem.clone());
        }
        std::fs::read_to_string(&self.config.ca_file)
            .with_context(|| format!("reading the mesh root {} (--controller-ca)", self.config.ca_file.display()))
    }

    pub(super) async fn connect(&self, identity: Option<&KeyedCert>) -> anyhow::Result<Channel> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.trusted_root()?))
            .domain_name(self.config.server_name.clone());
        if let Some(c) = identity {
            tls = tls.identity(Identity::from_pem(c.presented_chain(), &c.key_pem));
        }
        let endpoint = Endpoint::from_shared(format!("https://{}", self.config.address))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        endpoint.connect().await.with_context(|| format!("connecting to {}", self.config.address))
    }

    /// A valid node certificate: the one held, or a new one for the join token.
    pub(super) async fn node_identity(&self) -> anyhow::Result<KeyedCert> {
        // Held while it is valid: it is renewed at half-life over the channel
        // it authenticates; the join token is single-use.
        let held = lock(&self.node_cert).clone();
        if let Some(c) = held
            && c.not_after_unix > now_unix() + 2
        {
            return Ok(c);
        }
        let token = std::fs::read_to_string(&self.config.token_file)
            .with_context(|| format!("reading the join token {}", self.config.token_file.display()))?;
        let (key, csr) = key_and_csr()?;
        let channel = self.connect(None).await?;
        let req = api::JoinRequest { token: token.trim().into(), node: self.config.node.clone(), csr_pem: csr };
        let resp = NodeControlClient::new(channel).join(req).await.map_err(status_error)?.into_inner();
        let cert = KeyedCert::from_response(resp, key, now_unix())?;
        self.keep_node_cert(cert.clone());
        info!(node = %self.config.node, not_after = cert.not_after_unix, "joined the mesh");
        Ok(cert)
    }

    /// A refusal of the node itself. PermissionDenied means the controller
    /// no longer takes this node certificate (the node was removed, or
    /// registered again): it is dropped, so the next attempt joins with
    /// the token file, where the operator puts the node's new token. Its
    /// workload certificates go too: a removed node's are revoked (peers
    /// refuse them), and it obtains new ones once it is back.
    pub(super) fn node_refused(&self, status: tonic::Status) -> anyhow::Error {
        if status.code() == tonic::Code::PermissionDenied && lock(&self.node_cert).take().is_some() {
            let _ = std::fs::remove_file(self.config.state_dir.join(NODE_CERT_FILE));
            if self.proxy.identities.retain(|_| false) {
                self.persist_soon();
            }
            error!(
                node = %self.config.node, token_file = %self.config.token_file.display(),
                "the controller no longer accepts this node's certificate ({}): it joins again with the token \
                 in the token file once the operator has put a new one there (mesh-ctl node add)",
                status.message()
            );
        }
        status_error(status)
    }

    pub(super) fn keep_node_cert(&self, cert: KeyedCert) {
        let path = self.config.state_dir.join(NODE_CERT_FILE);
        if let Err(e) = cert.store(&path) {
            warn!(file = %path.display(), error = %e, "could not persist the node certificate");
        }
        *lock(&self.node_cert) = Some(cert);
    }
}
