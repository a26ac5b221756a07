//! HBONE connections to peers, shared by tunnels. A connection belongs to one
//! (source identity, source IP, destination identity, destination IP): the
//! certificate it presents and the one it accepts are fixed at the handshake,
//! and its socket lives in the source pod's namespace (hence the source IP in
//! the key, beside the identities). A connection carries up to
//! `hbone::MAX_STREAMS` tunnels; past that another is opened. Connections with
//! no tunnel for `IDLE` are dropped, which closes them; a connection whose
//! driver has ended (the peer restarted, went away or failed) leaves the pool
//! at its next look-up, so no tunnel is tried on it. Tunnels that find no
//! room at once share a dial, as many as the connection will have room for;
//! more start another dial beside it: 1000 opened together make ten
//! connections (and perhaps a spare), not 1000 handshakes. A connection
//! presents the certificate its source held when it was dialed: once that
//! certificate is renewed, new tunnels go on
//! connections dialed with the new one, while those in flight on the old
//! connection run on until they end and it is dropped. A connection to a
//! peer whose certificate the controller revoked is closed, with its tunnels.
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
use tokio::sync::watch;

use crate::hbone::{self, Connect, PeerConnection, Tunnel, TunnelError};

pub const IDLE: Duration = Duration::from_secs(60);
/// A connection carrying this many tunnels is busy: the next tunnel to its
/// peer asks for another connection beside it.
const BUSY_AT: usize = 1;

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
    /// Which of the source's certificates it presented (its not-after).
    credentials: i64,
}

/// Holds a pooled connection's stream slot while a tunnel is open.
pub struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Pool {
    /// Connections per key that tunnels are spread over before they share.
    spread: usize,
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    /// Dials in progress, by key: tunnels that find no room wait for one
    /// with room instead of making their own.
    dialing: Mutex<HashMap<PoolKey, Vec<Dialing>>>,
    next_dial: AtomicUsize,
    dials: AtomicUsize,
    /// Tunnels tried on a pooled connection that turned out broken.
    broken: AtomicUsize,
}

impl Default for Pool {
    /// Spreads tunnels over one connection per core (at most 8).
    fn default() -> Self {
        Pool::spreading_over(std::thread::available_parallelism().map_or(1, |n| n.get().min(8)))
    }
}

/// A dial in progress and the tunnels it will carry.
struct Dialing {
    id: usize,
    /// `true` once the dial has ended.
    done: watch::Receiver<bool>,
    /// Its dialer (if a tunnel dials it) and the tunnels waiting for it.
    tunnels: usize,
}

/// Whether this tunnel dials, or waits for another's dial.
enum Dial {
    Mine(DialInProgress),
    Theirs(watch::Receiver<bool>),
}

/// A dial others may wait for; when it ends (or its caller gives up) they
/// are told and look again.
struct DialInProgress {
    pool: Arc<Pool>,
    key: PoolKey,
    id: usize,
    done: watch::Sender<bool>,
}

impl Drop for DialInProgress {
    fn drop(&mut self) {
        let mut dialing = lock(&self.pool.dialing);
        if let Some(list) = dialing.get_mut(&self.key) {
            list.retain(|d| d.id != self.id);
            if list.is_empty() {
                dialing.remove(&self.key);
            }
        }
        self.done.send_replace(true);
    }
}

impl Pool {
    /// A pool that keeps up to `spread` connections per key before tunnels share one.
    pub fn spreading_over(spread: usize) -> Pool {
        Pool {
            spread: spread.max(1),
            conns: Mutex::default(),
            dialing: Mutex::default(),
            next_dial: AtomicUsize::new(0),
            dials: AtomicUsize::new(0),
            broken: AtomicUsize::new(0),
        }
    }

    /// Opens a tunnel with `CONNECT authority` (and `target`'s headers) over a pooled connection for
    /// `key` that presented the source's current certificate (`credentials`:
    /// its not-after), dialing one with `dial` when none has room. A
    /// connection that turns out broken is dropped and one fresh connection
    /// is tried; a refusal by the peer (an HTTP status) is returned as it is.
    pub async fn tunnel<F, Fut>(
        self: &Arc<Self>,
        key: &PoolKey,
        credentials: i64,
        target: impl Into<Connect>,
        dial: F,
    ) -> Result<(Tunnel, StreamSlot), TunnelError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<PeerConnection>> + Send + 'static,
    {
        let target = target.into();
        // A dial shared with others may leave no room for this tunnel (or
        // fail for them all): a few turns, then a dial of its own.
        for _ in 0..3 {
            if let Some((conn, slot, grow)) = self.take_slot(key, credentials) {
                if grow {
                    self.grow(key, credentials, &dial);
                }
                match conn.connect(target.clone()).await {
                    Ok(t) => return Ok((t, slot)),
                    Err(e @ TunnelError::Refused { .. }) => return Err(e),
                    Err(TunnelError::Broken(_)) => {
                        self.broken.fetch_add(1, Ordering::Relaxed);
                        drop(slot);
                        self.forget(key, &conn);
                        break; // that connection is gone: a fresh one
                    }
                }
            }
            match self.dial_or_wait(key) {
                Dial::Theirs(mut done) => {
                    let _ = done.wait_for(|ended| *ended).await;
                }
                Dial::Mine(in_progress) => {
                    let dialed = self.dial_into_pool(key, credentials, &dial).await;
                    drop(in_progress);
                    let (conn, slot) = dialed?;
                    return self.open_on(key, conn, slot, target).await;
                }
            }
        }
        let (conn, slot) = self.dial_into_pool(key, credentials, &dial).await?;
        self.open_on(key, conn, slot, target).await
    }

    /// Joins a dial in progress for `key` that will have room for this
    /// tunnel, or starts one.
    fn dial_or_wait(self: &Arc<Self>, key: &PoolKey) -> Dial {
        let mut dialing = lock(&self.dialing);
        let list = dialing.entry(key.clone()).or_default();
        if let Some(d) = list.iter_mut().find(|d| d.tunnels < hbone::MAX_STREAMS as usize) {
            d.tunnels += 1;
            return Dial::Theirs(d.done.clone());
        }
        Dial::Mine(self.start_dial(key, list, 1))
    }

    /// Records a dial for `key` in `list` (the pool's `dialing`), carrying `tunnels`.
    fn start_dial(self: &Arc<Self>, key: &PoolKey, list: &mut Vec<Dialing>, tunnels: usize) -> DialInProgress {
        let id = self.next_dial.fetch_add(1, Ordering::Relaxed);
        let (done, rx) = watch::channel(false);
        list.push(Dialing { id, done: rx, tunnels });
        DialInProgress { pool: self.clone(), key: key.clone(), id, done }
    }

    /// Dials another connection for `key` in the background, unless one is
    /// being dialed already; tunnels that find no room meanwhile wait for it.
    fn grow<F, Fut>(self: &Arc<Self>, key: &PoolKey, credentials: i64, dial: &F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<PeerConnection>> + Send + 'static,
    {
        let in_progress = {
            let mut dialing = lock(&self.dialing);
            let list = dialing.entry(key.clone()).or_default();
            if !list.is_empty() {
                return;
            }
            self.start_dial(key, list, 0)
        };
        let dialing = dial();
        let (pool, key) = (self.clone(), key.clone());
        tokio::spawn(async move {
            match dialing.await {
                Ok(conn) => drop(pool.pool(&key, conn, credentials, 0)), // no slot taken
                Err(e) => tracing::debug!(peer = %key.dst_ip, "a spare HBONE connection failed: {e}"),
            }
            drop(in_progress);
        });
    }

    /// Dials a connection for `key` and pools it, with a slot taken for the caller.
    async fn dial_into_pool<F, Fut>(
        &self,
        key: &PoolKey,
        credentials: i64,
        dial: &F,
    ) -> Result<(PeerConnection, StreamSlot), TunnelError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<PeerConnection>>,
    {
        let conn = dial().await.map_err(TunnelError::Broken)?;
        let slot = StreamSlot(self.pool(key, conn.clone(), credentials, 1));
        Ok((conn, slot))
    }

    /// Adds a connection just dialed, carrying `streams` tunnels already
    /// (each must hold a [`StreamSlot`] of the count returned).
    fn pool(&self, key: &PoolKey, conn: PeerConnection, credentials: i64, streams: usize) -> Arc<AtomicUsize> {
        self.dials.fetch_add(1, Ordering::Relaxed);
        let streams = Arc::new(AtomicUsize::new(streams));
        let pooled = Pooled { conn, streams: streams.clone(), last_used: Instant::now(), credentials };
        self.lock().entry(key.clone()).or_default().push(pooled);
        streams
    }

    /// A tunnel on a connection just dialed; if it fails, the connection goes.
    async fn open_on(
        &self,
        key: &PoolKey,
        conn: PeerConnection,
        slot: StreamSlot,
        target: Connect,
    ) -> Result<(Tunnel, StreamSlot), TunnelError> {
        match conn.connect(target).await {
            Ok(t) => Ok((t, slot)),
            Err(e) => {
                drop(slot);
                self.forget(key, &conn);
                Err(e)
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Pooled>>> {
        lock(&self.conns)
    }

    /// A slot on the least busy connection for `key` with room, and whether
    /// the pool should grow (every current connection is busy and there are
    /// fewer than `spread`).
    fn take_slot(&self, key: &PoolKey, credentials: i64) -> Option<(PeerConnection, StreamSlot, bool)> {
        let mut conns = self.lock();
        let list = conns.get_mut(key)?;
        // Ended (the peer closed them): no tunnel is tried there. Dialed with
        // a certificate since renewed and carrying no tunnel: closed now.
        list.retain(|p| !p.conn.has_ended() && (p.credentials >= credentials || p.streams.load(Ordering::Relaxed) > 0));
        let current = list.iter_mut().filter(|p| p.credentials >= credentials);
        let (count, least) = current.fold((0, None::<&mut Pooled>), |(n, least), p| {
            let load = p.streams.load(Ordering::Relaxed);
            let less = least.as_ref().is_none_or(|l| load < l.streams.load(Ordering::Relaxed));
            (n + 1, if less { Some(p) } else { least })
        });
        let p = least?;
        let load = p.streams.fetch_add(1, Ordering::Relaxed);
        if load >= hbone::MAX_STREAMS as usize {
            p.streams.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        p.last_used = Instant::now();
        let grow = load >= BUSY_AT && count < self.spread;
        Some((p.conn.clone(), StreamSlot(p.streams.clone()), grow))
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
            list.retain(|p| {
                !p.conn.has_ended() && (p.streams.load(Ordering::Relaxed) > 0 || now.duration_since(p.last_used) < IDLE)
            });
        }
        conns.retain(|_, l| !l.is_empty());
    }

    /// Closes the connections (and their tunnels) to peers that presented a
    /// certificate now revoked; how many.
    pub fn close_revoked(&self, revoked: &crate::hbone::tls::Revocations) -> usize {
        let mut closed = 0;
        let mut conns = self.lock();
        for list in conns.values_mut() {
            list.retain(|p| match revoked.revoked_by(&p.conn.peer_serial) {
                None => true,
                Some(node) => {
                    tracing::warn!(node, serial = %p.conn.peer_serial, "closing an HBONE connection to a peer whose certificate was revoked");
                    p.conn.close();
                    closed += 1;
                    false
                }
            });
        }
        conns.retain(|_, l| !l.is_empty());
        closed
    }

    /// (pooled connections, connections dialed so far).
    pub fn stats(&self) -> (usize, usize) {
        (self.lock().values().map(Vec::len).sum(), self.dials.load(Ordering::Relaxed))
    }

    /// Tunnels tried on a pooled connection that turned out broken (each
    /// cost its caller a failed attempt before a fresh dial).
    pub fn broken_attempts(&self) -> usize {
        self.broken.load(Ordering::Relaxed)
    }
}

/// A mutex's guard; a panic while it was held leaves these maps consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
