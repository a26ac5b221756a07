//! Circuit breaking (DestinationRule `connectionPool`), per upstream cluster
//! (a service, subset and port) at this waypoint, as Envoy's circuit
//! breakers count: requests in flight (`http2MaxRequests`), retries in
//! flight (`maxRetries`), HTTP/1.1 connections (`tcp.maxConnections`) and the
//! requests waiting for one (`http1MaxPendingRequests`). What overflows is
//! refused at once (503, flag `UO`), never queued without bound. And outlier
//! detection (`outlierDetection`): each endpoint's consecutive failures, and
//! its ejection from the cluster's rotation. The limits are read from the
//! configuration in force on each use; the counters live here, so a
//! configuration change keeps them.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use mesh_common::api;
use tokio::{sync::Notify, time::Instant};

use crate::{
    balance::{PeakEwma, Table, warmup_weight},
    lock,
    retry::Outcome,
};

/// Envoy's longest ejection (`max_ejection_time`'s default).
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// The clusters by service (`namespace/name`), then subset (or empty) and
/// port: found per request with the borrowed names, no key built.
#[derive(Default)]
pub struct Clusters {
    by_service: Mutex<BTreeMap<String, Vec<SubsetPort>>>,
    next_id: AtomicU64,
}

/// One cluster of a service: its subset (or empty) and port.
type SubsetPort = (String, u16, Arc<Cluster>);

impl Clusters {
    /// Every cluster's counters and each endpoint's outlier state, for
    /// `/debug/endpoints` (what `mesh-ctl` and an operator read).
    pub fn describe(&self) -> serde_json::Value {
        let map = self.by_service.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let clusters: Vec<serde_json::Value> = map
            .iter()
            .flat_map(|(service, list)| list.iter().map(move |(subset, port, c)| (service, subset, port, c)))
            .map(|(service, subset, port, c)| {
                let hosts: Vec<serde_json::Value> = c
                    .hosts()
                    .into_iter()
                    .map(|(addr, h)| {
                        let left = h.ejected_until.filter(|u| *u > now).map(|u| (u - now).as_millis() as u64);
                        serde_json::json!({
                            "endpoint": addr.to_string(),
                            "active_requests": c.load_of(addr),
                            "ejected": left.is_some(),
                            "ejected_for_ms": left,
                            "ejections": h.ejections,
                            "consecutive_5xx": h.consecutive_5xx,
                            "consecutive_gateway_errors": h.consecutive_gateway,
                            "consecutive_local_origin_failures": h.consecutive_local_origin,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "service": service,
                    "subset": subset,
                    "port": port,
                    "requests_in_flight": c.requests.load(Ordering::Acquire),
                    "retries_in_flight": c.retries.load(Ordering::Acquire),
                    "connections": c.connections.load(Ordering::Acquire),
                    "pending": c.pending.load(Ordering::Acquire),
                    "connections_opened": c.opened.load(Ordering::Relaxed),
                    "endpoints": hosts,
                })
            })
            .collect();
        serde_json::json!({ "clusters": clusters })
    }

    pub fn get(&self, service: &str, subset: &str, port: u16) -> Arc<Cluster> {
        let mut map = self.by_service.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, c)) = map.get(service).and_then(|l| l.iter().find(|(s, p, _)| s == subset && *p == port)) {
            return c.clone();
        }
        let c = Arc::new(Cluster { id: self.next_id.fetch_add(1, Ordering::Relaxed), ..Cluster::default() });
        let list = map.entry(service.to_owned()).or_default();
        list.push((subset.to_owned(), port, c.clone()));
        list.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        c
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
    /// Connections opened to its endpoints, ever (Envoy's `upstream_cx_total`).
    opened: AtomicU64,
    /// Wakes requests waiting for a connection when one is released.
    released: Notify,
    /// Outlier detection, by endpoint.
    hosts: Mutex<HashMap<SocketAddr, Host>>,
    /// Requests in flight, by endpoint (what LEAST_REQUEST compares).
    load: Mutex<HashMap<SocketAddr, u32>>,
    /// The consistent-hash table, with the endpoint set and settings it was built for.
    table: Mutex<Option<CachedTable>>,
    /// Slow start: since when each endpoint has been in the cluster (`None`:
    /// since before the cluster's first request, so not new); `None` until then.
    seen: Mutex<Option<HashMap<SocketAddr, Option<Instant>>>>,
    /// Peak-EWMA latency estimates, by endpoint.
    latency: Mutex<HashMap<SocketAddr, PeakEwma>>,
}

/// A table with the endpoints, Maglev or not, and size it was built for.
type CachedTable = (Vec<SocketAddr>, bool, u64, Arc<Table>);

/// A request in flight at an endpoint, until dropped.
pub struct Load {
    cluster: Arc<Cluster>,
    endpoint: SocketAddr,
}

impl Drop for Load {
    fn drop(&mut self) {
        let mut load = self.cluster.load.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = load.get_mut(&self.endpoint) {
            *n = n.saturating_sub(1);
        }
    }
}

/// What outlier detection knows of one endpoint.
#[derive(Clone, Debug, Default)]
pub struct Host {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_local_origin: u32,
    /// Ejected until then.
    pub ejected_until: Option<Instant>,
    /// How many times it was ejected (each ejection lasts that many base times).
    pub ejections: u32,
}

/// An ejection outlier detection decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Ejection {
    pub endpoint: SocketAddr,
    pub duration: Duration,
    pub reason: &'static str,
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

    pub fn connection_opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    pub fn requests_in_flight(&self) -> u32 {
        self.requests.load(Ordering::Acquire)
    }

    /// Counts a request in flight at `endpoint` while the guard lives.
    pub fn start(self: &Arc<Self>, endpoint: SocketAddr) -> Load {
        *self.load.lock().unwrap_or_else(|e| e.into_inner()).entry(endpoint).or_default() += 1;
        Load { cluster: self.clone(), endpoint }
    }

    pub fn load_of(&self, endpoint: SocketAddr) -> u32 {
        self.load.lock().unwrap_or_else(|e| e.into_inner()).get(&endpoint).copied().unwrap_or(0)
    }

    /// The slow-start weights (below 1) of the endpoints among `endpoints`
    /// that are still warming up under `lb`: those that came into the
    /// cluster after its first request, for the window's length. An endpoint
    /// that leaves and comes back warms up again.
    pub fn warming(&self, endpoints: &[SocketAddr], lb: &api::LoadBalancer) -> Vec<(SocketAddr, f64)> {
        let now = Instant::now();
        let mut seen = lock(&self.seen);
        let first = seen.is_none();
        let map = seen.get_or_insert_with(HashMap::new);
        if map.len() != endpoints.len() || endpoints.iter().any(|e| !map.contains_key(e)) {
            map.retain(|a, _| endpoints.contains(a));
            for e in endpoints {
                map.entry(*e).or_insert((!first).then_some(now));
            }
        }
        endpoints
            .iter()
            .filter_map(|e| {
                let since = (*map.get(e)?)?;
                let w = warmup_weight(now - since, lb);
                (w < 1.0).then_some((*e, w))
            })
            .collect()
    }

    /// Counts an answer from `endpoint` that took `rtt` (peak-EWMA).
    pub fn observe_latency(&self, endpoint: SocketAddr, rtt: Duration) {
        let now = Instant::now();
        lock(&self.latency).entry(endpoint).or_insert_with(|| PeakEwma::new(now)).observe(rtt, now);
    }

    /// What a request to `endpoint` would cost under peak-EWMA.
    pub fn latency_cost(&self, endpoint: SocketAddr) -> f64 {
        let now = Instant::now();
        let in_flight = self.load_of(endpoint);
        lock(&self.latency).get(&endpoint).copied().unwrap_or_else(|| PeakEwma::new(now)).cost(in_flight, now)
    }

    /// The consistent-hash table over `endpoints`, built once per endpoint
    /// set and settings.
    pub fn table(&self, endpoints: &[SocketAddr], maglev: bool, size: u64) -> Arc<Table> {
        let mut set = endpoints.to_vec();
        set.sort_unstable();
        set.dedup();
        let mut cached = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, m, z, t)) = cached.as_ref()
            && *s == set
            && *m == maglev
            && *z == size
        {
            return t.clone();
        }
        let t = Arc::new(Table::build(&set, maglev, size));
        *cached = Some((set, maglev, size, t.clone()));
        t
    }

    /// `endpoints` without the ejected ones, unless that would leave fewer
    /// healthy than `minHealthPercent` (then outlier detection stands aside,
    /// as Envoy's does) or none at all (then every endpoint, rather than no
    /// answer).
    pub fn healthy<T>(
        &self,
        endpoints: Vec<T>,
        addr: impl Fn(&T) -> SocketAddr,
        od: Option<&api::OutlierDetection>,
    ) -> Vec<T> {
        let Some(od) = od else { return endpoints };
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let ejected = |a: SocketAddr| hosts.get(&a).and_then(|h| h.ejected_until).is_some_and(|until| until > now);
        let healthy = endpoints.iter().filter(|e| !ejected(addr(e))).count();
        if healthy == endpoints.len()
            || healthy == 0
            || healthy * 100 < od.min_health_percent as usize * endpoints.len()
        {
            return endpoints;
        }
        endpoints.into_iter().filter(|e| !ejected(addr(e))).collect()
    }

    /// Counts an attempt's outcome against its endpoint; an ejection when
    /// it reaches a threshold and `maxEjectionPercent` of the `total`
    /// endpoints allows one more (always at least one, as Envoy).
    pub fn record(
        &self,
        endpoint: SocketAddr,
        outcome: Outcome,
        total: usize,
        od: Option<&api::OutlierDetection>,
    ) -> Option<Ejection> {
        let od = od?;
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let ejected_now = hosts.values().filter(|h| h.ejected_until.is_some_and(|u| u > now)).count();
        let host = hosts.entry(endpoint).or_default();
        if host.ejected_until.is_some_and(|u| u <= now) {
            host.ejected_until = None; // back in rotation; its count of ejections stays
        }
        let (server_5xx, gateway, local) = match outcome {
            Outcome::Response { status, .. } => (status >= 500, (502..=504).contains(&status), false),
            Outcome::ConnectFailure | Outcome::Reset | Outcome::RefusedStream | Outcome::PerTryTimeout => {
                (!od.split_local_origin, !od.split_local_origin, od.split_local_origin)
            }
            Outcome::Overflow => return None, // the waypoint's own limit, not the endpoint's failure
        };
        let bump = |n: &mut u32, hit: bool| *n = if hit { *n + 1 } else { 0 };
        bump(&mut host.consecutive_5xx, server_5xx);
        bump(&mut host.consecutive_gateway, gateway);
        if matches!(outcome, Outcome::Response { .. }) {
            host.consecutive_local_origin = 0;
        }
        if local {
            host.consecutive_local_origin += 1;
        }
        let reached = |n: u32, threshold: u32| threshold > 0 && n >= threshold;
        let reason = if reached(host.consecutive_gateway, od.consecutive_gateway) {
            "consecutive gateway errors"
        } else if reached(host.consecutive_5xx, od.consecutive_5xx) {
            "consecutive 5xx errors"
        } else if od.split_local_origin && reached(host.consecutive_local_origin, od.consecutive_local_origin) {
            "consecutive local-origin failures"
        } else {
            return None;
        };
        if host.ejected_until.is_some() {
            return None;
        }
        let allowed = ejected_now == 0 || (ejected_now + 1) * 100 <= od.max_ejection_percent as usize * total;
        if !allowed {
            return None;
        }
        host.ejections += 1;
        let duration = (Duration::from_millis(od.base_ejection_ms) * host.ejections).min(MAX_EJECTION);
        host.ejected_until = Some(now + duration);
        (host.consecutive_5xx, host.consecutive_gateway, host.consecutive_local_origin) = (0, 0, 0);
        Some(Ejection { endpoint, duration, reason })
    }

    /// Each endpoint outlier detection has seen, with what it knows.
    pub fn hosts(&self) -> Vec<(SocketAddr, Host)> {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = hosts.iter().map(|(a, h)| (*a, h.clone())).collect();
        all.sort_by_key(|(a, _)| *a);
        all
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

    fn od(consecutive_5xx: u32, max_ejection_percent: u32) -> api::OutlierDetection {
        api::OutlierDetection {
            consecutive_5xx,
            consecutive_local_origin: 5,
            interval_ms: 10_000,
            base_ejection_ms: 30_000,
            max_ejection_percent,
            ..Default::default()
        }
    }

    /// Ejection after the threshold, for the base time times the ejections
    /// so far; back afterwards; maxEjectionPercent (at least one) and the
    /// rule that ejection never leaves no endpoint; on paused time.
    #[tokio::test(start_paused = true)]
    async fn outliers_are_ejected_and_come_back() {
        let c = Clusters::default().get("shop/web", "", 80);
        let (a, b, d): (SocketAddr, SocketAddr, SocketAddr) =
            ("10.0.0.1:80".parse().unwrap(), "10.0.0.2:80".parse().unwrap(), "10.0.0.3:80".parse().unwrap());
        let p = od(3, 50);
        let fail = Outcome::Response { status: 503, grpc: None };
        let ok = Outcome::Response { status: 200, grpc: None };
        assert_eq!(c.record(a, fail, 3, Some(&p)), None);
        assert_eq!(c.record(a, ok, 3, Some(&p)), None, "a success starts the count over");
        assert_eq!(c.record(a, fail, 3, Some(&p)), None);
        assert_eq!(c.record(a, fail, 3, Some(&p)), None);
        let e = c.record(a, fail, 3, Some(&p)).expect("third consecutive 5xx ejects");
        assert_eq!((e.duration, e.reason), (Duration::from_secs(30), "consecutive 5xx errors"));
        let all = vec![a, b, d];
        assert_eq!(c.healthy(all.clone(), |x| *x, Some(&p)), vec![b, d], "ejected: no traffic");
        assert_eq!(c.healthy(all.clone(), |x| *x, None), all, "no outlier detection: every endpoint");
        // 50 % of 3: one more ejection would make 2 of 3 (67 %): held.
        for _ in 0..3 {
            assert_eq!(c.record(b, fail, 3, Some(&p)), None, "maxEjectionPercent holds");
        }
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(c.healthy(all.clone(), |x| *x, Some(&p)), all, "back after the base ejection time");
        for _ in 0..2 {
            c.record(a, fail, 3, Some(&p));
        }
        let again = c.record(a, fail, 3, Some(&p)).expect("ejected again");
        assert_eq!(again.duration, Duration::from_secs(60), "twice the base time the second time");
        // Local-origin failures count as 5xx unless split.
        let c2 = Clusters::default().get("shop/web", "", 81);
        for _ in 0..2 {
            assert_eq!(c2.record(d, Outcome::ConnectFailure, 3, Some(&p)), None);
        }
        assert!(c2.record(d, Outcome::ConnectFailure, 3, Some(&p)).is_some());
        // Every endpoint ejected would leave none: all are used.
        let c3 = Clusters::default().get("shop/one", "", 80);
        let p100 = od(1, 100);
        c3.record(a, fail, 1, Some(&p100)).expect("the only endpoint may be ejected");
        assert_eq!(c3.healthy(vec![a], |x| *x, Some(&p100)), vec![a], "but never to no endpoint at all");
    }

    /// Endpoints there at the cluster's first request are not new; one that
    /// comes later ramps up over the window; one that leaves and comes back
    /// warms up again; on paused time.
    #[tokio::test(start_paused = true)]
    async fn new_endpoints_warm_up() {
        let c = Clusters::default().get("shop/web", "", 80);
        let lb = api::LoadBalancer {
            warmup_ms: 10_000,
            warmup_min_percent: 10.0,
            warmup_aggression: 1.0,
            ..Default::default()
        };
        let (a, b, n): (SocketAddr, SocketAddr, SocketAddr) =
            ("10.0.0.1:80".parse().unwrap(), "10.0.0.2:80".parse().unwrap(), "10.0.0.3:80".parse().unwrap());
        assert!(c.warming(&[a, b], &lb).is_empty(), "there from the start");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(c.warming(&[a, b, n], &lb), [(n, 0.1)], "new: the floor");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(c.warming(&[a, b, n], &lb), [(n, 0.5)]);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(c.warming(&[a, b, n], &lb).is_empty(), "warm after the window");
        assert!(c.warming(&[a, b], &lb).is_empty());
        assert_eq!(c.warming(&[a, b, n], &lb), [(n, 0.1)], "back again: warming again");
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
