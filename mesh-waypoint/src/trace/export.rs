//! Where spans go: opentelemetry's exporters, speaking the protocol the
//! provider names (Zipkin v2 JSON, OTLP/HTTP protobuf, OTLP/gRPC), over the
//! waypoint's own connections: a collector in the mesh is reached over HBONE
//! with the waypoint's identity, like any endpoint; one outside by its
//! address or DNS name.
//!
//! The SDK's batch processor runs exporters on a thread of its own, outside
//! Tokio, where hyper's and tonic's I/O and timers panic ("there is no
//! reactor running"): [`OnRuntime`] runs each export on the waypoint's
//! runtime instead.
use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt as _, Limited};
use hyper_util::rt::TokioIo;
use mesh_common::api::{self, trace_collector::Protocol};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    trace::{SpanData, SpanExporter},
};
// Deprecated upstream in favour of OTLP, but Istio's `zipkin` providers (and
// the 9411 endpoints of Zipkin and Jaeger) take Zipkin v2 JSON, which only
// this exporter speaks.
#[allow(deprecated)]
use opentelemetry_zipkin::ZipkinExporter;

use super::EXPORT_TIMEOUT;
use crate::{Waypoint, body::full, upstream::Sender};

/// A collector's answer is read up to this size, then dropped.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The exporter for collector `c`; the waypoint names itself `service_name`.
pub(super) fn exporter(wp: &Arc<Waypoint>, c: &api::TraceCollector, service_name: &str) -> Result<OnRuntime, String> {
    let runtime = tokio::runtime::Handle::current();
    let client = || CollectorClient {
        wp: Arc::downgrade(wp),
        collector: c.clone(),
        zipkin_service_name: (c.protocol() == Protocol::Zipkin).then(|| service_name.to_owned()),
    };
    let url = format!("http://{}:{}{}", c.host, c.port, c.path);
    let inner = match c.protocol() {
        #[allow(deprecated)]
        Protocol::Zipkin => Inner::Zipkin(
            ZipkinExporter::builder()
                .with_http_client(client())
                .with_collector_endpoint(url)
                .build()
                .map_err(|e| e.to_string())?,
        ),
        Protocol::OtlpHttp => Inner::Otlp(
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(client())
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url)
                .with_headers(headers(c))
                .with_timeout(timeout(c))
                .build()
                .map_err(|e| e.to_string())?,
        ),
        Protocol::OtlpGrpc => Inner::Otlp(
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_channel(grpc_channel(wp, c)?)
                .with_metadata(metadata(c)?)
                .with_timeout(timeout(c))
                .build()
                .map_err(|e| e.to_string())?,
        ),
    };
    Ok(OnRuntime { inner: Arc::new(inner), runtime })
}

/// The provider's `http.timeout`, else [`EXPORT_TIMEOUT`].
fn timeout(c: &api::TraceCollector) -> std::time::Duration {
    match c.timeout_ms {
        0 => EXPORT_TIMEOUT,
        ms => std::time::Duration::from_millis(u64::from(ms)),
    }
}

/// The provider's `http.headers`: a value, or this process's environment
/// variable `envName` (a header whose variable is unset is not sent).
fn headers(c: &api::TraceCollector) -> std::collections::HashMap<String, String> {
    c.headers
        .iter()
        .filter_map(|h| match h.env_name.as_str() {
            "" => Some((h.name.clone(), h.value.clone())),
            var => std::env::var(var).ok().map(|v| (h.name.clone(), v)),
        })
        .collect()
}

/// The headers as gRPC's initial metadata.
fn metadata(c: &api::TraceCollector) -> Result<tonic::metadata::MetadataMap, String> {
    let mut m = tonic::metadata::MetadataMap::new();
    for (name, value) in headers(c) {
        let key = tonic::metadata::MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("{name:?} is not a metadata name"))?;
        let value = value.parse().map_err(|_| format!("the value of {name:?} is not a metadata value"))?;
        m.insert(key, value);
    }
    Ok(m)
}

#[allow(deprecated)]
#[derive(Debug)]
enum Inner {
    Zipkin(ZipkinExporter),
    Otlp(opentelemetry_otlp::SpanExporter),
}

/// An exporter whose exports run on the waypoint's Tokio runtime.
#[derive(Debug)]
pub(super) struct OnRuntime {
    inner: Arc<Inner>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        let export = async move {
            match inner.as_ref() {
                Inner::Zipkin(e) => e.export(batch).await,
                Inner::Otlp(e) => e.export(batch).await,
            }
        };
        self.runtime.spawn(export).await.map_err(|e| OTelSdkError::InternalFailure(e.to_string()))?
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called while the provider is built, before any export shares the exporter.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            match inner {
                Inner::Zipkin(e) => e.set_resource(resource),
                Inner::Otlp(e) => e.set_resource(resource),
            }
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        match self.inner.as_ref() {
            Inner::Zipkin(e) => e.shutdown_with_timeout(timeout),
            Inner::Otlp(e) => e.shutdown_with_timeout(timeout),
        }
    }
}

/// tonic's channel to an OTLP/gRPC collector, its connections opened by
/// the waypoint (lazily, again after a failure).
fn grpc_channel(wp: &Arc<Waypoint>, c: &api::TraceCollector) -> Result<tonic::transport::Channel, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}:{}", c.host, c.port))
        .map_err(|e| e.to_string())?
        .timeout(timeout(c));
    let (wp, c) = (Arc::downgrade(wp), c.clone());
    let connect = tower::service_fn(move |_: Uri| {
        let (wp, c) = (wp.clone(), c.clone());
        async move {
            let wp = wp.upgrade().ok_or("the waypoint has stopped")?;
            let up = crate::upstream::resolve_host(&wp, &c.host, c.port).await?;
            let me = wp.identity().ok_or("this waypoint has no identity yet")?;
            let io = crate::upstream::open(&wp.proxy, &me, &up).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(TokioIo::new(io))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connect))
}

/// The HTTP exporters' client: one request on one of the waypoint's pooled
/// HTTP/1.1 connections to the collector.
struct CollectorClient {
    wp: std::sync::Weak<Waypoint>,
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
        let request = match &self.zipkin_service_name {
            Some(name) => request.map(|b| mend_zipkin(b, name)),
            None => request,
        };
        match tokio::time::timeout(timeout(&self.collector), post(&wp, &self.collector, request)).await {
            Ok(r) => r.map_err(HttpError::from),
            Err(_) => Err("collector timed out".into()),
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
pub(super) fn mend_zipkin(body: Bytes, name: &str) -> Bytes {
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
