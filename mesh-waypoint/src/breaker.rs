//! Circuit breaking (DestinationRule `connectionPool`), per upstream cluster
//! (a service, subset and port) at this waypoint, as Envoy's circuit
//! breakers count: requests in flight (`http2MaxRequests`), retries in
//! flight (`maxRetries`), HTTP/1.1 connections (`tcp.maxConnections`) and the
//! requests waiting for one (`http1MaxPendingRequests`). What overflows is
//! refused at once (503, flag `UO`), never queued without bound. The limits
//! are read from the configuration in force on each use; the counters live
//! here, so a configuration change keeps them.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use mesh_common::api;
use tokio::sync::Notify;

/// A cluster: `namespace/name` of the service, the subset (or empty), the port.
pub type ClusterKey = (String, String, u16);

#[derive(Default)]
pub struct Clusters {
    by_key: Mutex<HashMap<ClusterKey, Arc<Cluster>>>,
    next_id: AtomicU64,
}

impl Clusters {
    pub fn get(&self, service: &str, subset: &str, port: u16) -> Arc<Cluster> {
        let mut map = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        let key = (service.to_owned(), subset.to_owned(), port);
        map.entry(key)
            .or_insert_with(|| {
                Arc::new(Cluster { id: self.next_id.fetch_add(1, Ordering::Relaxed), ..Cluster::default() })
            })
            .clone()
    }
}

#[derive(Default)]
pub struct Cluster {
    /// Tells the cluster's connections apart in the idle pool.
    pub id: u64,
    requests: AtomicU32,
    retries: AtomicU32,
    connections: AtomicU32,
    pending: AtomicU32,
    /// Wakes requests waiting for a connection when one is released.
    released: Notify,
}

/// One of a counted resource, given back when dropped.
pub struct Permit {
    cluster: Arc<Cluster>,
    which: Counter,
}

#[derive(Clone, Copy)]
enum Counter {
    Request,
    Retry,
    Connection,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let c = &self.cluster;
        match self.which {
            Counter::Request => c.requests.fetch_sub(1, Ordering::AcqRel),
            Counter::Retry => c.retries.fetch_sub(1, Ordering::AcqRel),
            Counter::Connection => {
                let n = c.connections.fetch_sub(1, Ordering::AcqRel);
                c.released.notify_one();
                n
            }
        };
    }
}

/// Takes one of `counter` if fewer than `limit` are taken (0: no limit).
fn take(counter: &AtomicU32, limit: u32) -> bool {
    counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (limit == 0 || n < limit).then_some(n + 1)).is_ok()
}

impl Cluster {
    /// A request in flight, unless `http2MaxRequests` are.
    pub fn request(self: &Arc<Self>, pool: Option<&api::ConnectionPool>) -> Option<Permit> {
        let limit = pool.map_or(0, |p| p.max_requests);
        take(&self.requests, limit).then(|| Permit { cluster: self.clone(), which: Counter::Request })
    }

    /// A retry in flight, unless `maxRetries` are.
    pub fn retry(self: &Arc<Self>, pool: Option<&api::ConnectionPool>) -> Option<Permit> {
        let limit = pool.map_or(0, |p| p.max_retries);
        take(&self.retries, limit).then(|| Permit { cluster: self.clone(), which: Counter::Retry })
    }

    /// A new HTTP/1.1 connection, held for the connection's life. Without a
    /// free one (`tcp.maxConnections`) the request waits for one to be
    /// released or made idle (`idle_released`), unless
    /// `http1MaxPendingRequests` already wait: then `None` (overflow).
    pub fn connection(self: &Arc<Self>, pool: Option<&api::ConnectionPool>) -> Option<Permit> {
        let limit = pool.map_or(0, |p| p.max_connections);
        take(&self.connections, limit).then(|| Permit { cluster: self.clone(), which: Counter::Connection })
    }

    /// Waits to be told a connection was released or became idle; `false`
    /// (at once) when `http1MaxPendingRequests` requests wait already.
    pub async fn wait_for_connection(&self, pool: Option<&api::ConnectionPool>) -> bool {
        let limit = pool.map_or(0, |p| p.max_pending_requests);
        if !take(&self.pending, limit) {
            return false;
        }
        self.released.notified().await;
        self.pending.fetch_sub(1, Ordering::AcqRel);
        true
    }

    /// Whether more HTTP/1.1 connections are open than `tcp.maxConnections`
    /// allows (after the limit was lowered).
    pub fn connections_over(&self, pool: Option<&api::ConnectionPool>) -> bool {
        let limit = pool.map_or(0, |p| p.max_connections);
        limit > 0 && self.connections.load(Ordering::Acquire) > limit
    }

    /// A connection of the cluster became idle: a waiting request may take it.
    pub fn idle_released(&self) {
        self.released.notify_one();
    }

    pub fn requests_in_flight(&self) -> u32 {
        self.requests.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max_requests: u32, max_retries: u32, max_connections: u32, max_pending: u32) -> api::ConnectionPool {
        api::ConnectionPool {
            max_requests,
            max_retries,
            max_connections,
            max_pending_requests: max_pending,
            ..Default::default()
        }
    }

    #[test]
    fn limits_count_what_is_held_and_zero_is_no_limit() {
        let clusters = Clusters::default();
        let c = clusters.get("shop/web", "", 80);
        let p = pool(2, 1, 1, 0);
        let a = c.request(Some(&p)).expect("first");
        let b = c.request(Some(&p)).expect("second");
        assert!(c.request(Some(&p)).is_none(), "a third overflows");
        drop(a);
        let _c = c.request(Some(&p)).expect("room again once one ends");
        drop(b);
        assert_eq!(c.requests_in_flight(), 1);
        let r = c.retry(Some(&p)).expect("one retry");
        assert!(c.retry(Some(&p)).is_none(), "maxRetries 1");
        drop(r);
        assert!(c.retry(Some(&p)).is_some());
        let _conn = c.connection(Some(&p)).expect("one connection");
        assert!(c.connection(Some(&p)).is_none(), "maxConnections 1");
        let unlimited: Vec<_> = (0..1000).filter_map(|_| c.request(None)).collect();
        assert_eq!(unlimited.len(), 1000, "no pool: no limit");
        assert!(Arc::ptr_eq(&c, &clusters.get("shop/web", "", 80)), "one cluster per key");
        assert!(!Arc::ptr_eq(&c, &clusters.get("shop/web", "v1", 80)), "a subset is its own cluster");
    }

    #[tokio::test(start_paused = true)]
    async fn pending_requests_wait_within_their_bound() {
        let c = Clusters::default().get("shop/web", "", 80);
        let p = pool(0, 0, 1, 1);
        let held = c.connection(Some(&p)).unwrap();
        let waiter = {
            let (c, p) = (c.clone(), p);
            tokio::spawn(async move { c.wait_for_connection(Some(&p)).await })
        };
        tokio::task::yield_now().await;
        assert!(!c.wait_for_connection(Some(&p)).await, "a second pending request overflows");
        drop(held);
        assert!(waiter.await.unwrap(), "the waiting request is woken when the connection is released");
        assert!(c.connection(Some(&p)).is_some());
    }
}
