//! The node API's metric families.
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder},
    metrics::{MetricType, TypedMetric, counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// The node API's metric families, owned here; [`HubMetrics::register`]
/// puts them in the process's registry.
#[derive(Clone, Debug)]
pub struct HubMetrics {
    pub pushes: Counter,
    /// From a configuration change to its update sent on a node's stream.
    pub push_latency: Histogram,
    pub nacks: Counter,
    pub resync_resources: Counter,
    pub certificates: Counter,
    pub refused: Counter,
    /// Joins and node certificates refused by the node registry, by reason.
    pub node_refusals: Family<ReasonLabel, Counter>,
}

pub const LATENCY_BUCKETS: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

impl Default for HubMetrics {
    fn default() -> Self {
        HubMetrics {
            pushes: Counter::default(),
            push_latency: Histogram::new(LATENCY_BUCKETS),
            nacks: Counter::default(),
            resync_resources: Counter::default(),
            certificates: Counter::default(),
            refused: Counter::default(),
            node_refusals: Family::default(),
        }
    }
}

impl HubMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("mesh_controller_pushes", "Updates sent to nodes.", self.pushes.clone());
        registry.register(
            "mesh_controller_push_latency_seconds",
            "From a configuration change to its update sent on a node's stream.",
            self.push_latency.clone(),
        );
        registry.register(
            "mesh_controller_resync_resources",
            "Resources sent in the first update of node streams (0 when nodes resume in sync).",
            self.resync_resources.clone(),
        );
        registry.register("mesh_controller_nacks", "Updates nodes rejected.", self.nacks.clone());
        registry.register("mesh_controller_certificates_issued", "Certificates issued.", self.certificates.clone());
        registry.register(
            "mesh_controller_node_requests_refused",
            "Node requests refused (bad token, not a node certificate, identity not on the node).",
            self.refused.clone(),
        );
        // The same counts under istiod's names, for Istio's Control Plane
        // dashboard (istiod's counters carry no `_total`).
        registry.register(
            "pilot_xds_pushes",
            "Updates sent to nodes (istiod's name).",
            IstiodCounter(self.pushes.clone()),
        );
        registry.register(
            "pilot_total_xds_rejects",
            "Updates nodes rejected (istiod's name).",
            IstiodCounter(self.nacks.clone()),
        );
        registry.register(
            "pilot_xds_push_time",
            "From a configuration change to its update sent on a node's stream, seconds (istiod's name).",
            self.push_latency.clone(),
        );
        registry.register(
            "mesh_controller_node_refusals",
            "Joins and node certificates refused by the node registry (unknown_node, bad_token, token_used, \
             token_expired, unknown_certificate, revoked).",
            self.node_refusals.clone(),
        );
    }
}

/// A counter exposed as istiod exposes its own: its plain name, no
/// `_total` (OpenCensus' habit), so Istio's dashboards' queries find it.
/// It shares the value of the counter it wraps.
#[derive(Clone, Debug)]
pub struct IstiodCounter(pub Counter);

impl TypedMetric for IstiodCounter {}

impl EncodeMetric for IstiodCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0.get())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Unknown
    }
}
