//! The node's side of the controller channel: join with the token once, then
//! mTLS with the node certificate; apply the configuration stream; keep the
//! enrolled pods equal to the captured pods scheduled here; hold a certificate
//! for each of their identities, renewed at half-life. When the controller is
//! away the node keeps serving with what it has, and reconnects with backoff.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use mesh_common::api::{self, node_control_client::NodeControlClient, node_message::Kind as Msg};
use tokio::sync::{Notify, mpsc};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::{info, warn};

use mesh_proxy::{
    Proxy,
    identity::{CertView, KeyedCert, LocalIdentity, key_and_csr},
};

use crate::pods::Pods;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const NODE_CERT_FILE: &str = "node-cert.json";

#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// `host:port` of the controller's node API.
    pub address: String,
    pub node: String,
    pub token_file: PathBuf,
    /// The mesh root that signed the controller's serving certificate.
    pub ca_file: PathBuf,
    /// The name the controller's certificate must carry.
    pub server_name: String,
    pub state_dir: PathBuf,
    /// The admin API's address, announced to the controller so `mesh-ctl`
    /// finds this node; `None` when it listens on loopback only.
    pub admin_addr: Option<std::net::SocketAddr>,
}

pub use mesh_common::admin::ControlStatus;

/// The controller client: the only writer of the proxy's state and identities.
pub struct Control {
    config: ControlConfig,
    proxy: Arc<Proxy>,
    pub status: Mutex<ControlStatus>,
    node_cert: Mutex<Option<KeyedCert>>,
    channel: Mutex<Option<Channel>>,
    /// A new update was applied: reconcile pods and certificates now.
    changed: Notify,
    /// The node certificate was renewed: reconnect with it.
    reconnect: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl Control {
    pub fn new(config: ControlConfig, proxy: Arc<Proxy>) -> Arc<Control> {
        let node_cert = KeyedCert::load(&config.state_dir.join(NODE_CERT_FILE));
        let status = ControlStatus { address: config.address.clone(), node: config.node.clone(), ..Default::default() };
        Arc::new(Control {
            config,
            proxy,
            status: Mutex::new(status),
            node_cert: Mutex::new(node_cert),
            channel: Mutex::default(),
            changed: Notify::new(),
            reconnect: Notify::new(),
        })
    }

    /// Starts the stream and the reconciler; each applied configuration and
    /// each certificate goes to the proxy.
    pub fn spawn(self: &Arc<Self>, pods: Pods) {
        tokio::spawn(self.clone().stream_loop());
        tokio::spawn(self.clone().reconcile_loop(pods));
    }

    pub fn node_certificate(&self) -> Option<CertView> {
        let id = format!("node/{}", self.config.node);
        lock(&self.node_cert).as_ref().map(|c| c.view(&id))
    }

    /// Records (and logs once) an error of the channel; `lost` when the stream is gone.
    fn set_error(&self, e: &anyhow::Error, lost: bool) {
        let text = format!("{e:#}");
        let mut s = lock(&self.status);
        if s.last_error.as_ref() != Some(&text) {
            warn!(controller = %self.config.address, "controller channel: {text}");
        }
        if lost {
            s.connected = false;
        }
        s.last_error = Some(text);
    }

    fn trusted_root(&self) -> anyhow::Result<String> {
        if let Some(c) = lock(&self.node_cert).as_ref() {
            return Ok(c.root_pem.clone());
        }
        std::fs::read_to_string(&self.config.ca_file)
            .with_context(|| format!("reading the mesh root {} (--controller-ca)", self.config.ca_file.display()))
    }

    async fn connect(&self, identity: Option<&KeyedCert>) -> anyhow::Result<Channel> {
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
    async fn node_identity(&self) -> anyhow::Result<KeyedCert> {
        let held = lock(&self.node_cert).clone();
        if let Some(c) = held
            && c.not_after_unix > now_unix() + 30
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

    fn keep_node_cert(&self, cert: KeyedCert) {
        let path = self.config.state_dir.join(NODE_CERT_FILE);
        if let Err(e) = cert.store(&path) {
            warn!(file = %path.display(), error = %e, "could not persist the node certificate");
        }
        *lock(&self.node_cert) = Some(cert);
    }

    async fn stream_loop(self: Arc<Self>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.stream_once(&mut backoff).await {
                Ok(()) => {}
                Err(e) => self.set_error(&e, true),
            }
            *lock(&self.channel) = None;
            lock(&self.status).connected = false;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream: Hello with what the node holds, then updates until it ends.
    async fn stream_once(&self, backoff: &mut Duration) -> anyhow::Result<()> {
        let identity = self.node_identity().await?;
        let channel = self.connect(Some(&identity)).await?;
        *lock(&self.channel) = Some(channel.clone());
        let (tx, rx) = mpsc::channel(8);
        let admin_addr = self.config.admin_addr.map(|a| a.to_string()).unwrap_or_default();
        let hello = api::Hello { known: self.proxy.state.known(), admin_addr };
        tx.send(api::NodeMessage { kind: Some(Msg::Hello(hello)) }).await?;
        let mut client = NodeControlClient::new(channel);
        let mut updates =
            client.subscribe(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(status_error)?.into_inner();
        {
            let mut s = lock(&self.status);
            s.connected = true;
            s.connects += 1;
            s.last_error = None;
        }
        info!(controller = %self.config.address, node = %self.config.node, "connected to the controller");
        *backoff = BACKOFF_MIN;
        loop {
            let update = tokio::select! {
                u = updates.message() => u.map_err(status_error)?,
                () = self.reconnect.notified() => return Ok(()),
            };
            let Some(update) = update else { anyhow::bail!("the controller closed the stream") };
            // A complete publication (`more` unset) is in force for new connections at once.
            let reply = match self.proxy.state.apply(&update) {
                Ok(applied) => {
                    info!(
                        version = %update.version, full = update.full, upserted = applied.upserted,
                        removed = applied.removed, "configuration update applied"
                    );
                    Msg::Ack(api::Ack { nonce: update.nonce, version: update.version.clone() })
                }
                Err(reason) => {
                    warn!(version = %update.version, "configuration update rejected: {reason}");
                    lock(&self.status).nacks += 1;
                    Msg::Nack(api::Nack { nonce: update.nonce, reason })
                }
            };
            {
                let mut s = lock(&self.status);
                s.updates += 1;
                s.last_update_unix = Some(now_unix() as u64);
            }
            if !update.more {
                self.changed.notify_one();
            }
            tx.send(api::NodeMessage { kind: Some(reply) }).await?;
        }
    }

    /// Reconciles on every applied update, and every second (renewals, retries).
    async fn reconcile_loop(self: Arc<Self>, pods: Pods) {
        loop {
            tokio::select! {
                () = self.changed.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if self.proxy.state.is_empty() {
                continue; // nothing from the controller yet: keep the restored pods
            }
            self.sync_pods(&pods).await;
            if let Err(e) = self.sync_certificates().await {
                self.set_error(&e, false); // the stream may be fine: retried next second
            }
        }
    }

    /// Enrolls the captured pods scheduled here and unenrolls every other pod.
    async fn sync_pods(&self, pods: &Pods) {
        let desired: BTreeMap<String, PathBuf> =
            self.proxy.state.local_pods(&self.config.node).into_iter().map(|p| (p.name, p.netns)).collect();
        let pending = pods.reconcile(desired).await;
        let mut status = lock(&self.status);
        for (pod, why) in &pending {
            if status.pending_pods.get(pod) != Some(why) {
                warn!(pod = %pod, "cannot enroll yet: {why}");
            }
        }
        status.pending_pods = pending;
    }

    /// Certificates for every identity of the pods scheduled here (new ones and
    /// those past half-life), and the node certificate past its half-life.
    async fn sync_certificates(&self) -> anyhow::Result<()> {
        let proxy = &self.proxy;
        let now = now_unix();
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
        let wanted: Vec<String> = {
            let mut ids: Vec<String> =
                proxy.state.local_pods(&self.config.node).iter().map(|p| p.identity.to_string()).collect();
            ids.sort();
            ids.dedup();
            ids
        };
        proxy.identities.retain(|id| wanted.contains(&id.to_string()));
        for id in wanted {
            let spiffe: mesh_common::identity::SpiffeId = id.parse()?;
            let due = proxy.identities.get(&spiffe).is_none_or(|l| now >= l.cert.renew_at_unix());
            if !due {
                continue;
            }
            let (key, csr) = key_and_csr()?;
            let req = api::CertifyRequest { identity: id.clone(), csr_pem: csr };
            let resp = client.certify(req).await.map_err(status_error)?.into_inner();
            let cert = KeyedCert::from_response(resp, key, now)?;
            let renewed = proxy.identities.set(spiffe.clone(), LocalIdentity::from_cert(&spiffe, &cert)?);
            info!(identity = %id, serial = %cert.serial, not_after = cert.not_after_unix, renewed, "workload certificate");
        }
        Ok(())
    }
}

/// A gRPC status as one readable line (the message says what was wrong).
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("controller refused: {:?}: {}", s.code(), s.message())
}
