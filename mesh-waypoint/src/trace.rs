//! Distributed tracing at the waypoint, as Istio's proxies trace: the
//! caller's trace is continued from W3C `traceparent`/`tracestate` or B3
//! (single `b3` or multi `x-b3-*` headers), or one is begun; each request
//! gets a SERVER span and, when it goes upstream, a CLIENT span under it,
//! whose context travels on in both formats so that the next hop (another
//! waypoint, an application) continues the same trace.
//!
//! Sampling follows the caller's decision when there is one, else
//! Telemetry's `randomSamplingPercentage` (by trace id, so every hop of an
//! undecided trace agrees). The OpenTelemetry SDK makes the spans and
//! batches them; its Zipkin v2, OTLP/HTTP or OTLP/gRPC exporter sends them
//! to the collector Telemetry's provider names ([`export`]).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use http::HeaderMap;
use mesh_common::api;
use opentelemetry::{
    Context, KeyValue,
    propagation::{TextMapCompositePropagator, TextMapPropagator},
    trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _},
};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, Span, Tracer},
};
// opentelemetry-zipkin is deprecated upstream in favour of OTLP; B3 is still
// what Envoy's Zipkin tracer and many applications propagate.
#[allow(deprecated)]
use opentelemetry_zipkin::{B3Encoding, Propagator as B3Propagator};

use crate::{Waypoint, lock};

/// How long spans wait to be sent in a batch.
const EXPORT_DELAY: Duration = Duration::from_secs(1);
/// One export's limit (the collector may be down: spans are then dropped).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The B3 headers a hop replaces with its own (stale ones would point the
/// next hop at the caller's span).
const B3_HEADERS: [&str; 6] = ["b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags"];

/// The waypoint's tracers, one per collector and sampling setting, made
/// when a service's Telemetry first asks for it.
#[derive(Default)]
pub struct Tracers {
    /// By the setting's hash, the setting beside (a lookup allocates nothing).
    by_setting: Mutex<HashMap<u64, (Setting, Arc<Traced>)>>,
}

/// What a tracer provider is built for.
#[derive(Clone, Debug)]
struct Setting {
    /// Unset when spans are not reported.
    collector: Option<api::TraceCollector>,
    /// Sampling percentage, in hundredths of a percent (Istio's precision).
    per_10k: u32,
}

pub struct Traced {
    provider: SdkTracerProvider,
    tracer: Tracer,
    /// The provider's `maxTagLength` (Istio: "currently only controls max
    /// length of the path tag"), else Envoy's default.
    max_path_tag: usize,
}

impl Drop for Traced {
    fn drop(&mut self) {
        // Flushes what is batched, off the runtime's threads.
        let provider = self.provider.clone();
        std::thread::spawn(move || {
            let _ = provider.shutdown_with_timeout(EXPORT_TIMEOUT);
        });
    }
}

impl Tracers {
    /// The tracer for a service's `tracing`.
    pub fn traced(&self, wp: &Arc<Waypoint>, tracing: &api::Tracing) -> Arc<Traced> {
        use std::hash::{Hash as _, Hasher as _};
        let collector = tracing.collector.as_ref().filter(|_| !tracing.disable_reporting);
        let per_10k = (tracing.sampling_percentage.clamp(0.0, 100.0) * 100.0).round() as u32;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let fields = collector.map(|c| (c.protocol, &c.host, c.port, &c.path, c.max_tag_length, &c.name));
        (fields, per_10k).hash(&mut h);
        let key = h.finish();
        let mut map = lock(&self.by_setting);
        if let Some((s, t)) = map.get(&key)
            && s.per_10k == per_10k
            && s.collector.as_ref() == collector
        {
            return t.clone();
        }
        let setting = Setting { collector: collector.cloned(), per_10k };
        let traced = Arc::new(build(Some(wp), &setting));
        // Settings no service uses any more are dropped (their spans flushed).
        if map.len() >= 16 {
            map.clear();
        }
        map.insert(key, (setting, traced.clone()));
        traced
    }

    /// Flushes every batch (at shutdown).
    pub fn flush(&self) {
        for (_, t) in lock(&self.by_setting).values() {
            let _ = t.provider.force_flush();
        }
    }
}

fn build(wp: Option<&Arc<Waypoint>>, s: &Setting) -> Traced {
    let ratio = f64::from(s.per_10k) / 10_000.0;
    // The caller's decision first; a new trace's by its id.
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)));
    let name = wp.map_or_else(|| "waypoint".into(), |wp| service_name(wp));
    let mut builder = SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_resource(Resource::builder_empty().with_service_name(name.clone()).build());
    if let (Some(c), Some(wp)) = (&s.collector, wp) {
        match export::exporter(wp, c, &name) {
            Ok(exporter) => {
                let config = BatchConfigBuilder::default().with_scheduled_delay(EXPORT_DELAY).build();
                builder = builder
                    .with_span_processor(BatchSpanProcessor::builder(exporter).with_batch_config(config).build());
            }
            Err(e) => tracing::warn!(collector = %c.name, "spans will not be reported: {e}"),
        }
    }
    let provider = builder.build();
    let tracer = provider.tracer("mesh-waypoint");
    let max_path_tag =
        s.collector.as_ref().map(|c| c.max_tag_length as usize).filter(|n| *n > 0).unwrap_or(MAX_PATH_TAG_LENGTH);
    Traced { provider, tracer, max_path_tag }
}

/// `<name>.<namespace>` of the waypoint's identity, as Istio names a proxy's spans.
fn service_name(wp: &Waypoint) -> String {
    wp.identity().map_or_else(|| "waypoint".into(), |id| format!("{}.{}", id.service_account(), id.namespace()))
}

/// A tracer that reports nowhere (for tests of propagation and sampling).
#[cfg(test)]
fn unreported(percentage: f64) -> Arc<Traced> {
    let setting = Setting { collector: None, per_10k: (percentage * 100.0) as u32 };
    Arc::new(build(None, &setting))
}

/// Extracts and injects W3C trace context and B3 (single and multi).
#[allow(deprecated)]
fn propagator() -> &'static TextMapCompositePropagator {
    static PROPAGATOR: std::sync::LazyLock<TextMapCompositePropagator> = std::sync::LazyLock::new(|| {
        TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(B3Propagator::with_encoding(B3Encoding::SingleAndMultiHeader)),
        ])
    });
    &PROPAGATOR
}

/// One request's spans.
pub struct RequestTrace {
    traced: Arc<Traced>,
    server: Span,
    client: Option<Span>,
    /// The upstream cluster the CLIENT span went to.
    cluster: Option<String>,
    tags: Vec<KeyValue>,
}

/// What the request's spans say about it at their start.
pub struct Start<'a> {
    pub service: &'a str,
    pub port: u16,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub request_id: &'a str,
    pub peer_addr: std::net::SocketAddr,
    pub source_principal: Option<String>,
    /// The id the sending node's access log gives the tunnel's connection.
    pub connection_id: Option<&'a str>,
}

/// What they say at the end.
pub struct End<'a> {
    pub status: u16,
    pub response_flags: &'a str,
    pub request_size: u64,
    pub response_size: u64,
    pub upstream_address: Option<std::net::SocketAddr>,
    pub destination_principal: Option<&'a str>,
}

/// Envoy's default `max_path_tag_length`: a span's `http.url` is cut there
/// (or at the provider's `maxTagLength`), so a long query string does not
/// bloat every span.
const MAX_PATH_TAG_LENGTH: usize = 256;

fn url_tag(mut url: String, max: usize) -> String {
    if url.len() > max {
        let mut end = max;
        while !url.is_char_boundary(end) {
            end -= 1;
        }
        url.truncate(end);
    }
    url
}

impl RequestTrace {
    /// Continues (or begins) the request's trace with its SERVER span.
    pub fn start(traced: Arc<Traced>, tracing: &api::Tracing, headers: &HeaderMap, s: Start<'_>) -> Self {
        let parent = propagator().extract(&HeaderExtractor(headers));
        let mut server = traced
            .tracer
            .span_builder(format!("{}:{}/*", s.service, s.port))
            .with_kind(SpanKind::Server)
            .with_start_time(SystemTime::now())
            .start_with_context(&traced.tracer, &parent);
        // An unsampled span only carries the trace on: its attributes would be dropped.
        if !server.is_recording() {
            return RequestTrace { traced, server, client: None, cluster: None, tags: Vec::new() };
        }
        let mut attributes = vec![
            KeyValue::new("http.method", s.method.to_owned()),
            KeyValue::new("http.url", url_tag(format!("http://{}{}", s.authority, s.path), traced.max_path_tag)),
            KeyValue::new("http.protocol", s.protocol.to_owned()),
            KeyValue::new("guid:x-request-id", s.request_id.to_owned()),
            KeyValue::new("peer.address", s.peer_addr.ip().to_string()),
            KeyValue::new("component", "proxy"),
        ];
        if let Some(ua) = headers.get(http::header::USER_AGENT).and_then(|v| v.to_str().ok()) {
            attributes.push(KeyValue::new("user_agent", ua.to_owned()));
        }
        if let Some(p) = s.source_principal {
            attributes.push(KeyValue::new("source.principal", p));
        }
        if let Some(id) = s.connection_id {
            attributes.push(KeyValue::new("connection_id", id.to_owned()));
        }
        let tags: Vec<KeyValue> = tracing.custom_tags.iter().filter_map(|t| custom_tag(t, headers)).collect();
        attributes.extend(tags.iter().cloned());
        server.set_attributes(attributes);
        RequestTrace { traced, server, client: None, cluster: None, tags }
    }

    /// The CLIENT span of the request's way upstream (`upstream` gives its
    /// cluster and URL, asked only for a sampled request); its context
    /// replaces the caller's in `headers`.
    pub fn start_client(&mut self, headers: &mut HeaderMap, method: &str, upstream: impl FnOnce() -> (String, String)) {
        let parent = Context::new().with_remote_span_context(self.server.span_context().clone());
        let tracer = &self.traced.tracer;
        let client = if self.server.is_recording() {
            let (cluster, url) = upstream();
            let mut attributes = vec![
                KeyValue::new("http.method", method.to_owned()),
                KeyValue::new("http.url", url_tag(url, self.traced.max_path_tag)),
                KeyValue::new("upstream_cluster", cluster.clone()),
                KeyValue::new("component", "proxy"),
            ];
            attributes.extend(self.tags.iter().cloned());
            let client = tracer
                .span_builder(format!("router {cluster} egress"))
                .with_kind(SpanKind::Client)
                .with_attributes(attributes)
                .start_with_context(tracer, &parent);
            self.cluster = Some(cluster);
            client
        } else {
            tracer.span_builder("egress").with_kind(SpanKind::Client).start_with_context(tracer, &parent)
        };
        for h in B3_HEADERS {
            headers.remove(h);
        }
        let cx = Context::new().with_remote_span_context(client.span_context().clone());
        propagator().inject_context(&cx, &mut HeaderInjector(headers));
        self.client = Some(client);
    }

    /// Ends the spans (when the response has ended).
    pub fn end(mut self, e: End<'_>) {
        if !self.server.is_recording() {
            return; // dropped unsampled: nothing is exported
        }
        let now = SystemTime::now();
        let status = i64::from(e.status);
        let failed = e.status >= 500 || e.status == 0;
        let mut common = vec![
            KeyValue::new("http.status_code", status),
            KeyValue::new("response_flags", e.response_flags.to_owned()),
        ];
        if let Some(c) = self.cluster.take() {
            common.push(KeyValue::new("upstream_cluster", c));
        }
        if let Some(a) = e.upstream_address {
            common.push(KeyValue::new("upstream_address", a.to_string()));
        }
        if let Some(p) = e.destination_principal {
            common.push(KeyValue::new("destination.principal", p.to_owned()));
        }
        if let Some(mut client) = self.client.take() {
            client.set_attributes(common.iter().cloned());
            if failed {
                client.set_status(Status::error(format!("{}", e.status)));
            }
            client.end_with_timestamp(now);
        }
        self.server.set_attributes(common);
        self.server.set_attributes([
            KeyValue::new("request_size", e.request_size as i64),
            KeyValue::new("response_size", e.response_size as i64),
        ]);
        if failed {
            self.server.set_status(Status::error(format!("{}", e.status)));
        }
        self.server.end_with_timestamp(now);
    }
}

/// A custom tag's value: a literal, the waypoint's environment, or a request header.
fn custom_tag(t: &api::CustomTag, headers: &HeaderMap) -> Option<KeyValue> {
    use api::custom_tag::Value;
    let value = match t.value.as_ref()? {
        Value::Literal(v) => Some(v.clone()),
        Value::Environment(name) => std::env::var(name).ok(),
        Value::Header(name) => headers.get(name.as_str()).and_then(|v| v.to_str().ok()).map(String::from),
    };
    let value = value.or_else(|| (!t.default_value.is_empty()).then(|| t.default_value.clone()))?;
    Some(KeyValue::new(t.name.clone(), value))
}

mod export;
#[cfg(test)]
mod tests;
