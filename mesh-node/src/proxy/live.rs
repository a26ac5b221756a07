//! Policy applies to live connections, as ztunnel's connection manager
//! does: each connection admitted to a pod is held here with what it was
//! admitted on (the pod, its source, how it arrived, its target), and every
//! configuration put in force re-runs the inbound plan for it. One the plan
//! now refuses (an AuthorizationPolicy that denies it, a PeerAuthentication
//! that no longer admits it) is closed at once, its access-log line naming
//! the policy; a failure that is no policy's decision leaves it open.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use mesh_proxy::{
    Proxy,
    error::ProxyError,
    hbone::tls::Revocations,
    plan::{self, Arrival},
    state::view::MeshView,
};
use tokio::sync::oneshot;

use super::PodContext;

struct Admitted {
    pod: Arc<PodContext>,
    src: SocketAddr,
    arrival: Arrival,
    /// The serial of a tunnel's peer certificate.
    serial: Option<Arc<str>>,
    target: SocketAddr,
    /// Taken when the connection is closed by a policy.
    close: Option<oneshot::Sender<ProxyError>>,
}

/// The connections relaying to pods now.
#[derive(Default)]
pub struct LiveInbound {
    conns: Mutex<HashMap<u64, Admitted>>,
    next: AtomicU64,
}

/// A connection's place in [`LiveInbound`], given up when dropped.
pub struct Registration {
    table: Arc<LiveInbound>,
    id: u64,
    closed: oneshot::Receiver<ProxyError>,
}

impl Registration {
    /// Resolves when a new configuration refuses the connection, with why.
    pub async fn closed(&mut self) -> ProxyError {
        match (&mut self.closed).await {
            Ok(why) => why,
            Err(_) => std::future::pending().await, // never closed by policy
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.table.conns).remove(&self.id);
    }
}

impl LiveInbound {
    /// Holds a connection admitted to `pod` while it relays.
    pub fn register(
        self: &Arc<Self>,
        pod: &Arc<PodContext>,
        src: SocketAddr,
        arrival: Arrival,
        serial: Option<Arc<str>>,
        target: SocketAddr,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = oneshot::channel();
        let admitted = Admitted { pod: pod.clone(), src, arrival, serial, target, close: Some(close) };
        lock(&self.conns).insert(id, admitted);
        Registration { table: self.clone(), id, closed }
    }

    /// Decides every open connection again under `view` and `revoked`;
    /// those it now denies are told to close. How many were.
    pub fn recheck(&self, view: &MeshView, revoked: &Revocations) -> usize {
        let decide = |a: &Admitted| {
            unrevoked(revoked, a.serial.as_deref())
                .and_then(|()| plan::inbound(view, a.pod.local(), a.src, a.arrival.clone(), a.target).verdict)
        };
        // The verdict depends on the source's address, not its port: ten
        // thousand connections from one client to one port are decided
        // once, not ten thousand times under the table's lock.
        let mut allowed: HashMap<(*const PodContext, IpAddr, &Arrival, Option<&str>, SocketAddr), bool> =
            HashMap::new();
        let mut closed = 0;
        let mut conns = lock(&self.conns);
        for a in conns.values_mut().filter(|a| a.close.is_some()) {
            let key = (Arc::as_ptr(&a.pod), a.src.ip(), &a.arrival, a.serial.as_deref(), a.target);
            if *allowed.entry(key).or_insert_with(|| !matches!(decide(a), Err(ProxyError::Denied { .. }))) {
                continue;
            }
            // Denied: decided again for the reason it is closed with.
            if let (Err(e), Some(close)) = (decide(a), a.close.take()) {
                let _ = close.send(e);
                closed += 1;
            }
        }
        closed
    }
}

/// Rechecks the open connections each time a configuration is put in force,
/// for as long as the proxy lives, and closes pooled connections to peers
/// whose certificate was revoked.
pub async fn enforce(proxy: Arc<Proxy>, live: Arc<LiveInbound>) {
    let mut changes = proxy.state.changes();
    while changes.changed().await.is_ok() {
        let view = proxy.state.view();
        live.recheck(&view, &proxy.state.revocations);
        proxy.pool.close_revoked(&proxy.state.revocations);
    }
}

/// Refuses a tunnel whose peer certificate (`serial`) the controller
/// revoked: at its `CONNECT`, and while it is open.
pub fn unrevoked(revoked: &Revocations, serial: Option<&str>) -> Result<(), ProxyError> {
    match serial.and_then(|s| revoked.revoked_by(s)) {
        None => Ok(()),
        Some(node) => Err(ProxyError::Denied {
            policy: None,
            reason: format!("the peer's certificate was revoked: node {node} was removed from the mesh"),
        }),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
