//! Certificates: one for every identity the process serves, and the node's
//! own, each renewed at half-life. Keys are made here; only CSRs leave.
use mesh_common::{
    api::{self, node_control_client::NodeControlClient},
    identity::SpiffeId,
};
use tracing::{error, info};

use crate::identity::{KeyedCert, LocalIdentity, key_and_csr};

use super::{Control, lock, now_unix, status_error};

impl Control {
    /// Certificates for every identity in `wanted` (new ones and those past
    /// half-life), and the node certificate past its half-life; certificates
    /// of identities no longer wanted are dropped.
    pub async fn sync_certificates(&self, mut wanted: Vec<SpiffeId>) -> anyhow::Result<()> {
        let proxy = &self.proxy;
        let now = now_unix();
        self.report_expired(now);
        let Some(channel) = lock(&self.channel).clone() else { return Ok(()) };
        let mut client = NodeControlClient::new(channel);
        let node_cert = lock(&self.node_cert).clone();
        if let Some(node) = node_cert
            && now >= node.renew_at_unix()
        {
            let (key, csr) = key_and_csr()?;
            let req = api::CertifyRequest { identity: String::new(), csr_pem: csr };
            let resp = client.certify(req).await.map_err(status_error)?.into_inner();
            let cert = KeyedCert::from_response(resp, key, now)?;
            info!(serial = %cert.serial, not_after = cert.not_after_unix, "node certificate renewed");
            self.keep_node_cert(cert);
            self.reconnect.notify_one();
        }
        wanted.sort();
        wanted.dedup();
        if proxy.identities.retain(|id| wanted.contains(id)) {
            self.persist_soon();
        }
        for spiffe in wanted {
            let id = spiffe.to_string();
            let due = proxy.identities.get(&spiffe).is_none_or(|l| now >= l.cert.renew_at_unix());
            if !due {
                continue;
            }
            let (key, csr) = key_and_csr()?;
            let req = api::CertifyRequest { identity: id.clone(), csr_pem: csr };
            let resp = client.certify(req).await.map_err(status_error)?.into_inner();
            let cert = KeyedCert::from_response(resp, key, now)?;
            let renewed = proxy
                .identities
                .set(spiffe.clone(), LocalIdentity::from_cert(&spiffe, &cert, &proxy.state.revocations)?);
            self.persist_soon();
            info!(identity = %id, serial = %cert.serial, not_after = cert.not_after_unix, renewed, "workload certificate");
        }
        Ok(())
    }

    /// Says once per certificate that it expired before it could be renewed
    /// (the controller away for longer than its second half-life). Its
    /// identity's connections are refused from then on, in both directions,
    /// until a renewal arrives: never sent in plaintext.
    fn report_expired(&self, now: i64) {
        let mut reported = lock(&self.expired_reported);
        for (id, cert) in self.proxy.identities.certs() {
            if cert.not_after_unix <= now && reported.insert(cert.serial.clone()) {
                error!(
                    identity = %id, serial = %cert.serial, expired_unix = cert.not_after_unix,
                    controller_connected = lock(&self.status).connected,
                    "workload certificate expired before it could be renewed: its connections are refused until the controller issues a new one"
                );
            }
        }
    }
}
