//! The controller client of a process that proxies (a node agent, a
//! waypoint): join with the token once, then mTLS with the node certificate;
//! apply the configuration stream to the proxy's state; hold a certificate
//! for each identity the process serves, renewed at half-life. When the
//! controller is away the process keeps serving with what it has, and
//! reconnects with backoff. What the process serves (the node's pods, a
//! waypoint's own identity) is its own loop's business, woken by
//! [`Control::changed`].
//!
//! `channel.rs`: joining and the mTLS channel; `stream.rs`: the configuration
//! stream into the proxy's state; `renew.rs`: certificates at half-life;
//! `persist.rs`: the configuration and certificates kept across restarts.
mod channel;
mod persist;
mod renew;
mod stream;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use tokio::sync::Notify;
use tonic::transport::Channel;
use tracing::warn;

use crate::{
    Proxy,
    identity::{CertView, KeyedCert},
};

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
    /// Its `/metrics`, announced for the controller's service graph.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Announced to the controller: `waypoint`, or empty for a node agent.
    pub role: &'static str,
}

pub use mesh_common::admin::ControlStatus;

/// The controller client: the only writer of the proxy's state and identities.
pub struct Control {
    config: ControlConfig,
    proxy: Arc<Proxy>,
    status: Mutex<ControlStatus>,
    node_cert: Mutex<Option<KeyedCert>>,
    channel: Mutex<Option<Channel>>,
    /// A new update was applied: reconcile what is served and its certificates now.
    changed: Notify,
    /// The node certificate was renewed: reconnect with it.
    reconnect: Notify,
    /// The configuration or the certificates changed: persist them.
    persist: Notify,
    /// Serials of expired certificates already reported.
    expired_reported: Mutex<std::collections::BTreeSet<String>>,
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
        let status = ControlStatus {
            address: config.address.clone(),
            node: config.node.clone(),
            disconnected_since_unix: Some(now_unix() as u64),
            ..Default::default()
        };
        let control = Arc::new(Control {
            config,
            proxy,
            status: Mutex::new(status),
            node_cert: Mutex::new(node_cert),
            channel: Mutex::default(),
            changed: Notify::new(),
            reconnect: Notify::new(),
            persist: Notify::new(),
            expired_reported: Mutex::default(),
        });
        control.restore();
        control
    }

    /// Starts the configuration stream (each applied configuration goes to
    /// the proxy) and the task that persists it.
    pub fn spawn(self: &Arc<Self>) {
        tokio::spawn(self.clone().stream_loop());
        tokio::spawn(self.clone().persist_loop());
    }

    /// Resolves when an update has been applied (or at once, if one was
    /// applied since the last call).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// The name this process joined as.
    pub fn node(&self) -> &str {
        &self.config.node
    }

    /// What the status says now.
    pub fn status(&self) -> MutexGuard<'_, ControlStatus> {
        lock(&self.status)
    }

    pub fn node_certificate(&self) -> Option<CertView> {
        let id = format!("node/{}", self.config.node);
        lock(&self.node_cert).as_ref().map(|c| c.view(&id))
    }

    /// Records (and logs once) an error of the channel; `lost` when the stream is gone.
    pub fn set_error(&self, e: &anyhow::Error, lost: bool) {
        let text = format!("{e:#}");
        let mut s = lock(&self.status);
        if s.last_error.as_ref() != Some(&text) {
            warn!(controller = %self.config.address, "controller channel: {text}");
        }
        if lost {
            s.connected = false;
            s.disconnected_since_unix.get_or_insert(now_unix() as u64);
        }
        s.last_error = Some(text);
    }
}

/// A gRPC status as one readable line (the message says what was wrong).
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("controller refused: {:?}: {}", s.code(), s.message())
}
