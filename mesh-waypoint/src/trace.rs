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
//! batches them; its Zipkin v2 or OTLP/HTTP exporter sends them to the
//! collector Telemetry's provider names, through [`CollectorClient`].
use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, Weak},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt as _, Limited};
use mesh_common::api::{self, trace_collector::Protocol};
use opentelemetry::{
    Context, KeyValue,
    propagation::{TextMapCompositePropagator, TextMapPropagator},
    trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _},
};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, Span, Tracer},
};
// opentelemetry-zipkin is deprecated upstream in favour of OTLP, but Istio's
// `zipkin` providers (and Jaeger's and Zipkin's 9411 endpoints) take Zipkin
// v2 JSON, which only it speaks; B3 is still what Envoy's Zipkin tracer and
// many applications propagate.
#[allow(deprecated)]
use opentelemetry_zipkin::{B3Encoding, Propagator as B3Propagator, ZipkinExporter};

use crate::{Waypoint, body::full, lock, upstream::Sender};

/// How long spans wait to be sent in a batch.
const EXPORT_DELAY: Duration = Duration::from_secs(1);
/// One export's limit (the collector may be down: spans are then dropped).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// A collector's answer is read up to this size, then dropped.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The B3 headers a hop replaces with its own (stale ones would point the
/// next hop at the caller's span).
const B3_HEADERS: [&str; 6] = ["b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags"];

/// The waypoint's tracers, one per collector and sampling setting, made
/// when a service's Telemetry first asks for it.
#[derive(Default)]
pub struct Tracers {
    by_setting: Mutex<HashMap<Setting, Arc<Traced>>>,
}

/// What a tracer provider is built for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Setting {
    collector: Option<(i32, String, u32, String, u32, String)>,
    /// Sampling percentage, in hundredths of a percent (Istio's precision).
    per_10k: u32,
    report: bool,
}

pub struct Traced {
    provider: SdkTracerProvider,
    tracer: Tracer,
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
        let c = tracing.collector.as_ref();
        let report = !tracing.disable_reporting && c.is_some_and(|c| c.protocol() != Protocol::OtlpGrpc);
        let setting = Setting {
            collector: c
                .filter(|_| report)
                .map(|c| (c.protocol, c.host.clone(), c.port, c.path.clone(), c.max_tag_length, c.name.clone())),
            per_10k: (tracing.sampling_percentage.clamp(0.0, 100.0) * 100.0).round() as u32,
            report,
        };
        let mut map = lock(&self.by_setting);
        if let Some(t) = map.get(&setting) {
            return t.clone();
        }
        let traced = Arc::new(build(Some(wp), &setting, c));
        // Settings no service uses any more are dropped (their spans flushed).
        if map.len() >= 16 {
            map.clear();
        }
        map.insert(setting, traced.clone());
        traced
    }

    /// Flushes every batch (at shutdown).
    pub fn flush(&self) {
        for t in lock(&self.by_setting).values() {
            let _ = t.provider.force_flush();
        }
    }
}

fn build(wp: Option<&Arc<Waypoint>>, s: &Setting, collector: Option<&api::TraceCollector>) -> Traced {
    let ratio = f64::from(s.per_10k) / 10_000.0;
    // The caller's decision first; a new trace's by its id.
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)));
    let name = wp.map_or_else(|| "waypoint".into(), |wp| service_name(wp));
    let mut builder = SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_resource(Resource::builder_empty().with_service_name(name.clone()).build());
    if let (Some(c), Some(wp)) = (collector.filter(|_| s.report), wp) {
        let client = CollectorClient {
            wp: Arc::downgrade(wp),
            runtime: tokio::runtime::Handle::current(),
            collector: c.clone(),
            zipkin_service_name: (c.protocol() == Protocol::Zipkin).then_some(name),
        };
        let url = format!("http://{}:{}{}", c.host, c.port, c.path);
        let config = BatchConfigBuilder::default().with_scheduled_delay(EXPORT_DELAY).build();
        match exporter(c.protocol(), client, url) {
            Ok(Exporter::Zipkin(e)) => {
                builder = builder.with_span_processor(BatchSpanProcessor::builder(e).with_batch_config(config).build())
            }
            Ok(Exporter::Otlp(e)) => {
                builder = builder.with_span_processor(BatchSpanProcessor::builder(e).with_batch_config(config).build())
            }
            Err(e) => tracing::warn!(collector = %c.name, "spans will not be reported: {e}"),
        }
    } else if collector.is_some_and(|c| c.protocol() == Protocol::OtlpGrpc) {
        tracing::warn!(
            "OTLP/gRPC is not supported yet: spans are propagated, not reported (set the provider's `http`)"
        );
    }
    let provider = builder.build();
    let tracer = provider.tracer("mesh-waypoint");
    Traced { provider, tracer }
}

#[allow(deprecated)]
enum Exporter {
    Zipkin(ZipkinExporter),
    Otlp(opentelemetry_otlp::SpanExporter),
}

#[allow(deprecated)]
fn exporter(protocol: Protocol, client: CollectorClient, url: String) -> Result<Exporter, String> {
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
    Ok(match protocol {
        Protocol::Zipkin => Exporter::Zipkin(
            ZipkinExporter::builder()
                .with_http_client(client)
                .with_collector_endpoint(url)
                .build()
                .map_err(|e| e.to_string())?,
        ),
        Protocol::OtlpHttp | Protocol::OtlpGrpc => Exporter::Otlp(
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(client)
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url)
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|e| e.to_string())?,
        ),
    })
}

/// `<name>.<namespace>` of the waypoint's identity, as Istio names a proxy's spans.
fn service_name(wp: &Waypoint) -> String {
    wp.identity().map_or_else(|| "waypoint".into(), |id| format!("{}.{}", id.service_account(), id.namespace()))
}

/// A tracer that reports nowhere (for tests of propagation and sampling).
#[cfg(test)]
fn unreported(percentage: f64) -> Arc<Traced> {
    let setting = Setting { collector: None, per_10k: (percentage * 100.0) as u32, report: false };
    Arc::new(build(None, &setting, None))
}

/// Extracts and injects W3C trace context and B3 (single and multi).
#[allow(deprecated)]
fn propagator() -> TextMapCompositePropagator {
    TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(B3Propagator::with_encoding(B3Encoding::SingleAndMultiHeader)),
    ])
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

impl RequestTrace {
    /// Continues (or begins) the request's trace with its SERVER span.
    pub fn start(traced: Arc<Traced>, tracing: &api::Tracing, headers: &HeaderMap, s: Start<'_>) -> Self {
        let parent = propagator().extract(&HeaderExtractor(headers));
        let mut attributes = vec![
            KeyValue::new("http.method", s.method.to_owned()),
            KeyValue::new("http.url", format!("http://{}{}", s.authority, s.path)),
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
        let server = traced
            .tracer
            .span_builder(format!("{}:{}/*", s.service, s.port))
            .with_kind(SpanKind::Server)
            .with_start_time(SystemTime::now())
            .with_attributes(attributes)
            .start_with_context(&traced.tracer, &parent);
        RequestTrace { traced, server, client: None, cluster: None, tags }
    }

    /// The CLIENT span of the request's way upstream to `cluster`; its
    /// context replaces the caller's in `headers`.
    pub fn start_client(&mut self, headers: &mut HeaderMap, cluster: &str, method: &str, url: String) {
        let parent = Context::new().with_remote_span_context(self.server.span_context().clone());
        let mut attributes = vec![
            KeyValue::new("http.method", method.to_owned()),
            KeyValue::new("http.url", url),
            KeyValue::new("upstream_cluster", cluster.to_owned()),
            KeyValue::new("component", "proxy"),
        ];
        attributes.extend(self.tags.iter().cloned());
        let client = self
            .traced
            .tracer
            .span_builder(format!("router {cluster} egress"))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&self.traced.tracer, &parent);
        for h in B3_HEADERS {
            headers.remove(h);
        }
        let cx = Context::new().with_remote_span_context(client.span_context().clone());
        propagator().inject_context(&cx, &mut HeaderInjector(headers));
        self.client = Some(client);
        self.cluster = Some(cluster.to_owned());
    }

    /// Ends the spans (when the response has ended).
    pub fn end(mut self, e: End<'_>) {
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

/// The exporters' HTTP client: the waypoint's own connections (a collector
/// in the mesh is reached over HBONE, with the waypoint's identity, like
/// any endpoint; one outside by its address or DNS name). The exporters
/// run on the SDK's batch thread, outside Tokio, where Tokio's I/O would
/// panic: each request is spawned onto the waypoint's runtime and awaited.
struct CollectorClient {
    wp: Weak<Waypoint>,
    runtime: tokio::runtime::Handle,
    collector: api::TraceCollector,
    /// opentelemetry-zipkin 0.33 writes no `localEndpoint.serviceName`
    /// (Zipkin then shows every span as "unknown") and gives a root span
    /// an all-zero `parentId` where Zipkin wants none: both are mended here.
    zipkin_service_name: Option<String>,
}

impl fmt::Debug for CollectorClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CollectorClient({}:{})", self.collector.host, self.collector.port)
    }
}

#[async_trait::async_trait]
impl HttpClient for CollectorClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let wp = self.wp.upgrade().ok_or("the waypoint has stopped")?;
        let c = self.collector.clone();
        let request = match &self.zipkin_service_name {
            Some(name) => request.map(|b| mend_zipkin(b, name)),
            None => request,
        };
        let send = async move { tokio::time::timeout(EXPORT_TIMEOUT, post(&wp, &c, request)).await };
        match self.runtime.spawn(send).await {
            Ok(Ok(r)) => r.map_err(HttpError::from),
            Ok(Err(_)) => Err("collector timed out".into()),
            Err(e) => Err(e.to_string().into()),
        }
    }
}

async fn post(wp: &Waypoint, c: &api::TraceCollector, request: Request<Bytes>) -> Result<Response<Bytes>, String> {
    let cluster = format!("tracing/{}", c.name);
    let (up, sender, cluster) = crate::upstream::connect_host(wp, &cluster, &c.host, c.port, false).await?;
    let Sender::H1(mut s, uses, permit) = sender else { return Err("expected an HTTP/1.1 connection".into()) };
    let (mut parts, body) = request.into_parts();
    // Origin form, with Host: the collector's own name.
    parts.uri = parts.uri.path_and_query().map_or("/", |p| p.as_str()).parse().map_err(|_| "bad path")?;
    let host = format!("{}:{}", c.host, c.port);
    parts.headers.insert(http::header::HOST, host.parse().map_err(|_| "bad host")?);
    parts.headers.insert(http::header::CONTENT_LENGTH, body.len().into());
    let response = s.send_request(Request::from_parts(parts, full(body))).await;
    wp.upstreams.release(up.addr(), Sender::H1(s, uses + 1, permit), &cluster, None);
    let (parts, body) = response.map_err(|e| e.to_string())?.into_parts();
    let body = Limited::new(body, MAX_ANSWER_BYTES).collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Response::from_parts(parts, body))
}

/// Zipkin v2 JSON spans with `localEndpoint.serviceName` set and no
/// all-zero `parentId`.
fn mend_zipkin(body: Bytes, name: &str) -> Bytes {
    let Ok(serde_json::Value::Array(mut spans)) = serde_json::from_slice(&body) else { return body };
    for span in spans.iter_mut().filter_map(serde_json::Value::as_object_mut) {
        if span.get("parentId").and_then(|p| p.as_str()).is_some_and(|p| p.bytes().all(|b| b == b'0')) {
            span.remove("parentId");
        }
        let endpoint = span.entry("localEndpoint").or_insert_with(|| serde_json::json!({}));
        if let Some(e) = endpoint.as_object_mut() {
            e.entry("serviceName").or_insert_with(|| name.into());
        }
    }
    serde_json::to_vec(&spans).map(Bytes::from).unwrap_or(body)
}

#[cfg(test)]
mod tests;
