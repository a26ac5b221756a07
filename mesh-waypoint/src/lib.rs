//! mesh's waypoint: the L7 proxy that the node proxies send a bound
//! service's connections to over HBONE. It joins the controller like a node
//! (`mesh_proxy::control`), holds its own identity's certificate, and for
//! each tunnel whose CONNECT authority is a service address it terminates
//! HTTP/1.1 or HTTP/2 and decides per request ([`engine`]); other traffic
//! to the service is relayed as TCP to one of its endpoints.
//!
//! - [`server`]: the HBONE listener, protocol choice, the TCP relay;
//! - [`engine`]: authorization, routing, balancing, retries, timeouts, per request;
//! - [`authz`]: L7 AuthorizationPolicies (the shared evaluator);
//! - [`ext_authz`]: external authorizers (CUSTOM), over Envoy's ext_authz protocols;
//! - [`jwt`], [`jwks`]: RequestAuthentication (JWTs, key sets fetched and refreshed);
//! - [`upstream`]: HTTP connections to endpoints over HBONE;
//! - [`retry`]: Istio's `retryOn` conditions and the retry budget;
//! - [`breaker`]: circuit breaking and outlier detection (DestinationRule);
//! - [`balance`]: load balancing (`loadBalancer`: least request, consistent hashing, peak-EWMA, slow start);
//! - [`locality`]: locality-aware balancing (`localityLbSetting`);
//! - [`ratelimit`]: local rate limits (`HTTPLocalRateLimitPolicy`);
//! - [`body`]: replayable request bodies, counted response bodies;
//! - [`metrics`]: Istio's request metrics;
//! - [`trace`]: distributed tracing (W3C and B3 propagation, spans exported to Zipkin or OTLP).
pub mod authz;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod engine;
pub mod ext_authz;
pub mod jwks;
pub mod jwt;
pub mod locality;
pub mod metrics;
pub mod ratelimit;
pub mod retry;
pub mod server;
pub mod trace;
pub mod upstream;

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use mesh_common::identity::SpiffeId;
use mesh_proxy::Proxy;

/// What every request handler shares.
pub struct Waypoint {
    pub proxy: Arc<Proxy>,
    pub upstreams: upstream::Upstreams,
    pub clusters: breaker::Clusters,
    pub rate_limits: ratelimit::RateLimits,
    pub jwks: jwks::Jwks,
    pub verified: jwt::Verified,
    pub metrics: metrics::RequestMetrics,
    pub budget: retry::Budget,
    pub tracers: trace::Tracers,
    /// The identity this waypoint serves as (its instance's), once the
    /// controller has named it and a certificate is held.
    me: RwLock<Option<SpiffeId>>,
    /// Requests whose response has not ended yet.
    in_flight: AtomicUsize,
    /// HBONE connections being served: a response that has ended may still
    /// be on its way out through one.
    hbone_connections: AtomicUsize,
    draining: AtomicBool,
}

/// A mutex's guard; a panic while it was held leaves state that is still
/// consistent for these maps, so the poison is ignored.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts one request in flight until dropped (when its response has ended).
pub struct InFlight(Arc<Waypoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one HBONE connection until dropped (when it has been served).
pub struct Serving(Arc<Waypoint>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.hbone_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Waypoint {
    pub fn new(proxy: Arc<Proxy>, metrics: metrics::RequestMetrics) -> Arc<Waypoint> {
        Arc::new(Waypoint {
            proxy,
            upstreams: upstream::Upstreams::default(),
            clusters: breaker::Clusters::default(),
            rate_limits: ratelimit::RateLimits::default(),
            jwks: jwks::Jwks::default(),
            verified: jwt::Verified::default(),
            metrics,
            budget: retry::Budget::default(),
            tracers: trace::Tracers::default(),
            me: RwLock::default(),
            in_flight: AtomicUsize::new(0),
            hbone_connections: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        })
    }

    /// Counts a request in flight for as long as the guard lives.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts an HBONE connection being served for as long as the guard lives.
    pub fn serving(self: &Arc<Self>) -> Serving {
        self.hbone_connections.fetch_add(1, Ordering::Relaxed);
        Serving(self.clone())
    }

    pub fn hbone_connections(&self) -> usize {
        self.hbone_connections.load(Ordering::Relaxed)
    }

    /// Starts draining: readiness turns false, HBONE peers get GOAWAY (no new
    /// tunnels), client connections close once their request is answered;
    /// requests in flight run on.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.proxy.start_drain();
    }

    pub fn identity(&self) -> Option<SpiffeId> {
        self.me.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_identity(&self, id: Option<SpiffeId>) {
        *self.me.write().unwrap_or_else(|e| e.into_inner()) = id;
    }

    /// Ready: not draining, configuration received and a certificate held for its identity.
    pub fn ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
            && !self.proxy.state.is_empty()
            && self.identity().is_some_and(|id| self.proxy.identities.get(&id).is_some())
    }
}
