//! The node's side of the controller channel: join with the token once, then
//! mTLS with the node certificate; apply the configuration stream; keep the
//! enrolled pods equal to the captured pods scheduled here; hold a certificate
//! for each of their identities, renewed at half-life. When the controller is
//! away the node keeps serving with what it has, and reconnects with backoff.
//!
//! `channel.rs`: joining and the mTLS channel; `stream.rs`: the configuration
//! stream into the proxy's state; `renew.rs`: certificates at half-life; here:
//! the loop that keeps pods and certificates in step with the state.
mod channel;
mod renew;
mod stream;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use mesh_proxy::{
    Proxy,
    identity::{CertView, KeyedCert},
};
use tokio::sync::Notify;
use tonic::transport::Channel;
use tracing::warn;

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

    /// Reconciles on every applied update, and every second (renewals, retries).
    async fn reconcile_loop(self: Arc<Self>, pods: Pods) {
        loop {
            tokio::select! {
                () = self.changed.notified() => {}
                () = pods.reports() => {}
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
        let desired: BTreeSet<String> =
            self.proxy.state.local_pods(&self.config.node).into_iter().map(|p| p.name).collect();
        let pending = pods.reconcile(desired).await;
        let mut status = lock(&self.status);
        for (pod, why) in &pending {
            if status.pending_pods.get(pod) != Some(why) {
                warn!(pod = %pod, "cannot enroll yet: {why}");
            }
        }
        status.pending_pods = pending;
    }
}

/// A gRPC status as one readable line (the message says what was wrong).
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("controller refused: {:?}: {}", s.code(), s.message())
}
