//! HBONE connections to peers, shared by tunnels. A connection belongs to one
//! (source identity, source IP, destination identity, destination IP): the
//! certificate it presents and the one it accepts are fixed at the handshake,
//! and its socket lives in the source pod's namespace (hence the source IP in
//! the key, beside the identities). A connection carries up to
//! `hbone::MAX_STREAMS` tunnels; past that another is opened. Connections with
//! no tunnel for `IDLE` are dropped, which closes them.
use std::{
    collections::HashMap,
    future::Future,
    io,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_common::identity::SpiffeId;

use crate::hbone::{self, PeerConnection, Tunnel, TunnelError};

pub const IDLE: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: SpiffeId,
    pub src_ip: IpAddr,
    pub dst: SpiffeId,
    pub dst_ip: IpAddr,
}

struct Pooled {
    conn: PeerConnection,
    streams: Arc<AtomicUsize>,
    last_used: Instant,
}

/// Holds a pooled connection's stream slot while a tunnel is open.
pub struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    dials: AtomicUsize,
}

impl Pool {
    /// Opens a tunnel with `CONNECT authority` over a pooled connection for
    /// `key`, dialing one with `dial` when none has room. A connection that
    /// turns out broken is dropped and one fresh connection is tried; a
    /// refusal by the peer (an HTTP status) is returned as it is.
    pub async fn tunnel<F, Fut>(
        &self,
        key: &PoolKey,
        authority: std::net::SocketAddr,
        dial: F,
    ) -> Result<(Tunnel, StreamSlot), TunnelError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<PeerConnection>>,
    {
        if let Some((conn, slot)) = self.take_slot(key) {
            match conn.connect(authority).await {
                Ok(t) => return Ok((t, slot)),
                Err(e @ TunnelError::Refused { .. }) => return Err(e),
                Err(TunnelError::Broken(_)) => {
                    drop(slot);
                    self.forget(key, &conn);
                }
            }
        }
        let conn = dial().await.map_err(TunnelError::Broken)?;
        self.dials.fetch_add(1, Ordering::Relaxed);
        let streams = Arc::new(AtomicUsize::new(1));
        let slot = StreamSlot(streams.clone());
        self.lock().entry(key.clone()).or_default().push(Pooled {
            conn: conn.clone(),
            streams,
            last_used: Instant::now(),
        });
        match conn.connect(authority).await {
            Ok(t) => Ok((t, slot)),
            Err(e) => {
                drop(slot);
                self.forget(key, &conn);
                Err(e)
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Pooled>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_slot(&self, key: &PoolKey) -> Option<(PeerConnection, StreamSlot)> {
        let mut conns = self.lock();
        let p =
            conns.get_mut(key)?.iter_mut().find(|p| p.streams.load(Ordering::Relaxed) < hbone::MAX_STREAMS as usize)?;
        p.streams.fetch_add(1, Ordering::Relaxed);
        p.last_used = Instant::now();
        Some((p.conn.clone(), StreamSlot(p.streams.clone())))
    }

    fn forget(&self, key: &PoolKey, conn: &PeerConnection) {
        let mut conns = self.lock();
        if let Some(list) = conns.get_mut(key) {
            list.retain(|p| !p.conn.same(conn));
            if list.is_empty() {
                conns.remove(key);
            }
        }
    }

    /// Drops connections without tunnels that have been idle for `IDLE`.
    pub fn reap(&self) {
        let now = Instant::now();
        let mut conns = self.lock();
        for list in conns.values_mut() {
            list.retain(|p| p.streams.load(Ordering::Relaxed) > 0 || now.duration_since(p.last_used) < IDLE);
        }
        conns.retain(|_, l| !l.is_empty());
    }

    /// (pooled connections, connections dialed so far).
    pub fn stats(&self) -> (usize, usize) {
        (self.lock().values().map(Vec::len).sum(), self.dials.load(Ordering::Relaxed))
    }
}
