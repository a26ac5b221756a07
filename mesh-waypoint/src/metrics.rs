//! Istio's request metrics, as a waypoint reports them (`reporter="waypoint"`):
//! `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes` and `istio_response_bytes`, with Istio's labels and
//! buckets, so existing dashboards' queries work on them. One observation per
//! request, when its response has ended (or the client went away).
use mesh_proxy::state::view::{ServiceInfo, WorkloadInfo};
use mesh_proxy::telemetry::IstioLabels;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// Istio's labels on the request metrics, exactly as Istio names them: the
/// standard set, with the response's code and gRPC status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub istio: IstioLabels,
    pub response_code: String,
    pub grpc_response_status: String,
}

impl RequestLabels {
    /// Sets a standard tag (Telemetry's tagOverrides).
    pub fn set(&mut self, tag: &str, value: String) {
        match tag {
            "response_code" => self.response_code = value,
            "grpc_response_status" => self.grpc_response_status = value,
            _ => self.istio.set(tag, value),
        }
    }
}

/// Istio's duration buckets (milliseconds).
const DURATION_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];
/// Istio's size buckets (bytes): powers of ten up to 10^8.
const BYTES: [f64; 9] = [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0, 100000000.0];

#[derive(Clone)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    request_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    response_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    retries: Counter,
    retries_refused: Counter,
    authz: Family<AuthzLabels, Counter>,
    authz_dry_run: Family<AuthzLabels, Counter>,
    overflows: Counter,
    ejections: Family<EjectionLabels, Counter>,
    rate_limited: Family<RateLimitLabels, Counter>,
    jwt: Family<JwtLabels, Counter>,
    jwks_fetches: Family<JwksLabels, Counter>,
    ext_authz: Family<ExtAuthzLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExtAuthzLabels {
    /// The extension provider's name.
    pub provider: String,
    /// `allowed`, `denied` (by the authorizer), `error` (it could not be asked).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwtLabels {
    /// `namespace/name`.
    pub service: String,
    /// `allowed` (a verified token), `missing` (none: left to authorization), `denied` (401).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwksLabels {
    pub uri: String,
    /// `success` or `failure`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    /// `namespace/name`.
    pub service: String,
    /// `total`, `identity` or `override`.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    /// `namespace/name`.
    pub service: String,
    pub reason: &'static str,
}

/// Authorization decisions, by outcome and deciding policy (as Envoy's RBAC
/// filter counts `allowed`/`denied` and, for dry-run policies,
/// `shadow_allowed`/`shadow_denied`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// `namespace/name` of the deciding policy; empty when none decided.
    pub policy: String,
}

impl RequestMetrics {
    pub fn register(registry: &mut Registry) -> RequestMetrics {
        fn duration() -> Histogram {
            Histogram::new(DURATION_MS)
        }
        fn bytes() -> Histogram {
            Histogram::new(BYTES)
        }
        let m = RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration),
            request_bytes: Family::new_with_constructor(bytes),
            response_bytes: Family::new_with_constructor(bytes),
            retries: Counter::default(),
            retries_refused: Counter::default(),
            authz: Family::default(),
            authz_dry_run: Family::default(),
            overflows: Counter::default(),
            ejections: Family::default(),
            rate_limited: Family::default(),
            jwt: Family::default(),
            jwks_fetches: Family::default(),
            ext_authz: Family::default(),
        };
        registry.register("istio_requests", "Requests handled", m.requests.clone());
        registry.register("istio_request_duration_milliseconds", "Request duration", m.duration.clone());
        registry.register("istio_request_bytes", "Request body sizes", m.request_bytes.clone());
        registry.register("istio_response_bytes", "Response body sizes", m.response_bytes.clone());
        registry.register("mesh_waypoint_retries", "Retries sent to upstreams", m.retries.clone());
        registry.register(
            "mesh_waypoint_retries_over_budget",
            "Retries not sent because the retry budget was spent",
            m.retries_refused.clone(),
        );
        registry.register(
            "mesh_waypoint_authz_decisions",
            "Requests decided by AuthorizationPolicies (only where a policy applies)",
            m.authz.clone(),
        );
        registry.register(
            "mesh_waypoint_authz_dry_run_decisions",
            "What dry-run AuthorizationPolicies (istio.io/dry-run) would have decided; nothing was enforced",
            m.authz_dry_run.clone(),
        );
        registry.register(
            "mesh_waypoint_circuit_breaker_overflows",
            "Requests refused (503 UO) because a cluster's connectionPool limits were reached",
            m.overflows.clone(),
        );
        registry.register(
            "mesh_waypoint_outlier_ejections",
            "Endpoints ejected by outlier detection",
            m.ejections.clone(),
        );
        registry.register(
            "mesh_waypoint_rate_limited",
            "Requests refused (429) by a local rate limit (HTTPLocalRateLimitPolicy)",
            m.rate_limited.clone(),
        );
        registry.register(
            "mesh_waypoint_jwt_authentications",
            "Requests by RequestAuthentication outcome (Envoy's jwt_authn allowed/denied)",
            m.jwt.clone(),
        );
        registry.register("mesh_waypoint_jwks_fetches", "JWKS fetches from jwksUri, by result", m.jwks_fetches.clone());
        registry.register(
            "mesh_waypoint_ext_authz_checks",
            "Requests sent to external authorizers (AuthorizationPolicy CUSTOM), by provider and result",
            m.ext_authz.clone(),
        );
        m
    }

    pub fn ext_authz(&self, provider: &str, result: &'static str) {
        self.ext_authz.get_or_create(&ExtAuthzLabels { provider: provider.to_owned(), result }).inc();
    }

    pub fn jwt(&self, service: &str, result: &'static str) {
        self.jwt.get_or_create(&JwtLabels { service: service.to_owned(), result }).inc();
    }

    pub fn jwks_fetched(&self, uri: &str, result: &'static str) {
        self.jwks_fetches.get_or_create(&JwksLabels { uri: uri.to_owned(), result }).inc();
    }

    pub fn rate_limited(&self, service: &str, limit: &'static str) {
        self.rate_limited.get_or_create(&RateLimitLabels { service: service.to_owned(), limit }).inc();
    }

    pub fn ejected(&self, service: &str, reason: &'static str) {
        self.ejections.get_or_create(&EjectionLabels { service: service.to_owned(), reason }).inc();
    }

    pub fn overflowed(&self) {
        self.overflows.inc();
    }

    /// Counts an authorization decision (`dry_run`: a shadow one).
    pub fn authorized(&self, dry_run: bool, allowed: bool, policy: Option<&str>) {
        let labels = AuthzLabels {
            decision: if allowed { "allow" } else { "deny" },
            policy: policy.unwrap_or_default().to_owned(),
        };
        if dry_run { &self.authz_dry_run } else { &self.authz }.get_or_create(&labels).inc();
    }

    /// The four series of one label set (handles: recording through them
    /// touches no map).
    pub fn series(&self, labels: &RequestLabels) -> Series {
        Series {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }

    pub fn retried(&self, sent: bool) {
        if sent {
            self.retries.inc()
        } else {
            self.retries_refused.inc()
        };
    }
}

/// One label set's request series.
#[derive(Clone)]
pub struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestMetrics {
    /// One request, as a service's Telemetry has it counted: `labels` gives
    /// each family's label set by Istio's metric name (`REQUEST_COUNT`,
    /// ...), `None` for a family it turns off.
    pub fn record_each(
        &self,
        labels: impl Fn(&'static str) -> Option<RequestLabels>,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        if let Some(l) = labels("REQUEST_COUNT") {
            self.requests.get_or_create(&l).inc();
        }
        if let Some(l) = labels("REQUEST_DURATION") {
            self.duration.get_or_create(&l).observe(duration_ms);
        }
        if let Some(l) = labels("REQUEST_SIZE") {
            self.request_bytes.get_or_create(&l).observe(request_bytes as f64);
        }
        if let Some(l) = labels("RESPONSE_SIZE") {
            self.response_bytes.get_or_create(&l).observe(response_bytes as f64);
        }
    }
}

impl Series {
    pub fn record(&self, duration_ms: f64, request_bytes: u64, response_bytes: u64) {
        self.requests.inc();
        self.duration.observe(duration_ms);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

/// What a request's label set depends on beyond its connection: the
/// destination workload and service (by identity of their entries in the
/// configuration in force), the status, the gRPC status and the flags.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    pub destination: usize,
    pub service: usize,
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub flags: &'static str,
    pub grpc: bool,
}

/// What an entry holds on to so that the addresses in its key stay its own
/// (an entry of the configuration cannot be freed, and its address reused,
/// while a key names it).
pub type Pins = (Option<std::sync::Arc<WorkloadInfo>>, Option<std::sync::Arc<ServiceInfo>>);

type Entry = (SeriesKey, Series, std::sync::Arc<RequestLabels>, Pins);

/// A connection's recently used series (its requests mostly share a few), so
/// recording a request builds no label strings and hashes no label set.
#[derive(Default)]
pub struct SeriesCache(std::sync::Mutex<Vec<Entry>>);

/// Entries a connection keeps; beyond them the oldest is dropped.
const CACHED: usize = 16;

impl SeriesCache {
    /// The series (and labels) for `key`, made by `make` on a miss.
    pub fn get(
        &self,
        key: SeriesKey,
        pins: Pins,
        make: impl FnOnce() -> (Series, RequestLabels),
    ) -> (Series, std::sync::Arc<RequestLabels>) {
        let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s, l, _)) = entries.iter().find(|(k, ..)| *k == key) {
            return (s.clone(), l.clone());
        }
        let (series, labels) = make();
        let labels = std::sync::Arc::new(labels);
        if entries.len() == CACHED {
            entries.remove(0);
        }
        entries.push((key, series.clone(), labels.clone(), pins));
        (series, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(code: u16) -> RequestLabels {
        RequestLabels {
            istio: IstioLabels {
                reporter: "waypoint".into(),
                source_workload: "a".into(),
                source_workload_namespace: "ns".into(),
                source_principal: "p".into(),
                source_canonical_service: "a".into(),
                source_canonical_revision: "v1".into(),
                source_app: "a".into(),
                source_version: "v1".into(),
                source_cluster: "Kubernetes".into(),
                destination_workload: "b".into(),
                destination_workload_namespace: "ns".into(),
                destination_principal: "q".into(),
                destination_canonical_service: "b".into(),
                destination_canonical_revision: "latest".into(),
                destination_app: "unknown".into(),
                destination_version: "unknown".into(),
                destination_cluster: "Kubernetes".into(),
                destination_service: "b.ns.svc.cluster.local".into(),
                destination_service_name: "b".into(),
                destination_service_namespace: "ns".into(),
                request_protocol: "http".into(),
                response_flags: "-".into(),
                connection_security_policy: "mutual_tls".into(),
            },
            response_code: code.to_string(),
            grpc_response_status: String::new(),
        }
    }

    #[test]
    fn cached_series_record_into_the_registered_families() {
        let mut registry = Registry::default();
        let m = RequestMetrics::register(&mut registry);
        let cache = SeriesCache::default();
        let key = |status| SeriesKey { destination: 1, service: 2, status, grpc_status: None, flags: "-", grpc: false };
        let mut made = 0;
        for status in [200, 200, 503, 200] {
            let (s, l) = cache.get(key(status), (None, None), || {
                made += 1;
                (m.series(&labels(status)), labels(status))
            });
            assert_eq!(l.response_code, status.to_string());
            s.record(1.0, 10, 20);
        }
        assert_eq!(made, 2, "one label set built per distinct key");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let count = |code: &str| {
            text.lines()
                .find(|l| l.starts_with("istio_requests_total{") && l.contains(&format!("response_code=\"{code}\"")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        };
        assert_eq!((count("200"), count("503")), (Some(3), Some(1)));
        for status in 300..320 {
            cache.get(key(status), (None, None), || (m.series(&labels(status)), labels(status)));
        }
        let mut rebuilt = false;
        cache.get(key(200), (None, None), || {
            rebuilt = true;
            (m.series(&labels(200)), labels(200))
        });
        assert!(rebuilt, "the oldest entries make way");
    }
}
