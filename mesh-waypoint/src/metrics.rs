//! Istio's request metrics, as a waypoint reports them (`reporter="waypoint"`):
//! `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes` and `istio_response_bytes`, with Istio's labels and
//! buckets, so existing dashboards' queries work on them. One observation per
//! request, when its response has ended (or the client went away).
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// Istio's labels on the request metrics, exactly as Istio names them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_canonical_service: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_canonical_service: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
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
        m
    }

    pub fn record(&self, labels: &RequestLabels, duration_ms: f64, request_bytes: u64, response_bytes: u64) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(duration_ms);
        self.request_bytes.get_or_create(labels).observe(request_bytes as f64);
        self.response_bytes.get_or_create(labels).observe(response_bytes as f64);
    }

    pub fn retried(&self, sent: bool) {
        if sent {
            self.retries.inc()
        } else {
            self.retries_refused.inc()
        };
    }
}
