//! What the proxy reports about each connection: Istio's `istio_tcp_*`
//! metrics with its standard labels, one access-log line when the connection
//! ends, and the table of live connections (with bytes so far) that the admin
//! API shows. Bytes are counted as they move, by wrapping the client-facing
//! side of the relay.
//!
//! Every connection is recorded through one [`Tracked`] guard: opened once,
//! closed once (by [`Tracked::finish`], or by its drop on any early return or
//! cancellation), so the opened and closed counters always pair up.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::info;

use mesh_common::cel::Attributes;

use crate::{
    error::{Flag, ProxyError},
    hbone::headers::{Baggage, DEFAULT_CLUSTER},
    state::{
        telemetry_rules::{Side, TelemetryRules},
        view::{ServiceInfo, WorkloadInfo},
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    /// Istio's `reporter` label: the client's proxy reports as source, the server's as destination.
    fn reporter(self) -> &'static str {
        match self {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        }
    }
}

/// The facts of one connection, filled in as it is handled.
#[derive(Clone, Debug, Serialize)]
pub struct ConnInfo {
    pub direction: Direction,
    /// The enrolled pod whose traffic this is (`namespace/name`).
    pub pod: String,
    /// The proxy's listening address the connection arrived on.
    pub listener: SocketAddr,
    pub src: SocketAddr,
    /// Where the client meant to go.
    pub dst: Option<SocketAddr>,
    /// The upstream actually connected (a service endpoint, the app, ...).
    pub upstream: Option<SocketAddr>,
    /// `hbone`, `tcp` (plain to a known workload or endpoint) or `passthrough`.
    pub route: &'static str,
    pub src_workload: Option<String>,
    pub src_namespace: Option<String>,
    pub src_principal: Option<String>,
    pub src_canonical: Option<String>,
    /// Istio's canonical revision, `app` and `version` of the source.
    pub src_revision: Option<String>,
    pub src_app: Option<String>,
    pub src_version: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_namespace: Option<String>,
    pub dst_principal: Option<String>,
    pub dst_canonical: Option<String>,
    pub dst_revision: Option<String>,
    pub dst_app: Option<String>,
    pub dst_version: Option<String>,
    pub dst_service: Option<String>,
    pub dst_service_name: Option<String>,
    pub dst_service_namespace: Option<String>,
    /// `mutual_tls` or `none`.
    pub security: &'static str,
    /// `allow` or `deny` when a policy decision was made.
    pub decision: Option<&'static str>,
    pub policy: Option<String>,
    pub started_unix_ms: u64,
    /// The connection's id in access logs: this proxy's own, or, for a
    /// tunnel from another mesh proxy, the one that proxy logs it by.
    pub connection_id: String,
    /// The enrolled pod's Telemetry rules (access log, metric overrides).
    #[serde(skip)]
    pub rules: Option<Arc<TelemetryRules>>,
}

impl ConnInfo {
    pub fn new(direction: Direction, pod: &str, listener: SocketAddr, src: SocketAddr) -> ConnInfo {
        ConnInfo {
            direction,
            pod: pod.into(),
            listener,
            src: SocketAddr::new(src.ip().to_canonical(), src.port()),
            dst: None,
            upstream: None,
            route: "passthrough",
            src_workload: None,
            src_namespace: None,
            src_principal: None,
            src_canonical: None,
            src_revision: None,
            src_app: None,
            src_version: None,
            dst_workload: None,
            dst_namespace: None,
            dst_principal: None,
            dst_canonical: None,
            dst_revision: None,
            dst_app: None,
            dst_version: None,
            dst_service: None,
            dst_service_name: None,
            dst_service_namespace: None,
            security: "none",
            decision: None,
            policy: None,
            started_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            connection_id: crate::hbone::headers::new_connection_id(),
            rules: None,
        }
    }

    pub fn set_source(&mut self, w: &WorkloadInfo) {
        self.src_workload = Some(w.workload_name().to_owned());
        self.src_namespace = Some(w.wire.namespace.clone());
        self.src_principal = Some(w.identity.to_string());
        self.src_canonical = Some(w.canonical_service().to_owned());
        self.src_revision = Some(w.canonical_revision().to_owned());
        let (app, version) = w.app_and_version();
        (self.src_app, self.src_version) = (Some(app.to_owned()), Some(version.to_owned()));
    }

    /// The source as a tunnel's `baggage` tells a peer of it.
    pub fn source_baggage(&self) -> Baggage {
        Baggage {
            cluster: Some(DEFAULT_CLUSTER.to_owned()),
            namespace: self.src_namespace.clone(),
            workload: self.src_workload.clone(),
            service: self.src_canonical.clone(),
            revision: None,
        }
    }

    /// Fills in what the configuration did not say, from what the peer's
    /// `CONNECT` said (a stock Istio peer's workload mesh has no record of):
    /// the source workload only within the namespace its verified identity
    /// proves, and the service its client addressed.
    pub fn complete_from_peer(&mut self, baggage: Option<&Baggage>, service_host: Option<&str>) {
        if let Some(b) = baggage
            && self.src_workload.is_none()
            && b.namespace.is_some()
            && b.namespace == self.src_namespace
        {
            self.src_workload = b.workload.clone();
            self.src_canonical = b.service.clone();
            self.src_revision = b.revision.clone();
        }
        if self.dst_service.is_none() {
            self.dst_service = service_host.map(str::to_owned);
        }
    }

    pub fn set_destination(&mut self, w: &WorkloadInfo) {
        self.dst_workload = Some(w.workload_name().to_owned());
        self.dst_namespace = Some(w.wire.namespace.clone());
        self.dst_principal = Some(w.identity.to_string());
        self.dst_canonical = Some(w.canonical_service().to_owned());
        self.dst_revision = Some(w.canonical_revision().to_owned());
        let (app, version) = w.app_and_version();
        (self.dst_app, self.dst_version) = (Some(app.to_owned()), Some(version.to_owned()));
    }

    pub fn set_service(&mut self, s: &ServiceInfo) {
        self.dst_service = Some(s.host.clone());
        self.dst_service_name = Some(s.name.clone());
        self.dst_service_namespace = Some(s.namespace.clone());
    }

    /// Istio's labels for this connection (built once per connection).
    fn labels(&self) -> IstioLabels {
        let v = |o: &Option<String>| o.clone().unwrap_or_else(|| "unknown".into());
        IstioLabels {
            reporter: self.direction.reporter().into(),
            source_workload: v(&self.src_workload),
            source_workload_namespace: v(&self.src_namespace),
            source_principal: v(&self.src_principal),
            source_canonical_service: v(&self.src_canonical),
            source_canonical_revision: v(&self.src_revision),
            source_app: v(&self.src_app),
            source_version: v(&self.src_version),
            source_cluster: DEFAULT_CLUSTER.into(),
            destination_workload: v(&self.dst_workload),
            destination_workload_namespace: v(&self.dst_namespace),
            destination_principal: v(&self.dst_principal),
            destination_canonical_service: v(&self.dst_canonical),
            destination_canonical_revision: v(&self.dst_revision),
            destination_app: v(&self.dst_app),
            destination_version: v(&self.dst_version),
            destination_cluster: DEFAULT_CLUSTER.into(),
            destination_service: v(&self.dst_service),
            destination_service_name: v(&self.dst_service_name),
            destination_service_namespace: v(&self.dst_service_namespace),
            request_protocol: "tcp".into(),
            response_flags: "-".into(),
            connection_security_policy: self.security.into(),
        }
    }

    /// The side the enrolled pod is on: an outbound connection's client, an
    /// inbound one's server.
    fn side(&self) -> Side {
        match self.direction {
            Direction::Outbound => Side::Client,
            Direction::Inbound => Side::Server,
        }
    }

    /// Envoy's attributes of this connection, for Telemetry's expressions.
    fn attributes(&self, received: u64, sent: u64) -> Attributes {
        let mut a = Attributes::default();
        a.set("source", "address", self.src.ip().to_string())
            .set("source", "port", i64::from(self.src.port()))
            .set("connection", "mtls", self.security == "mutual_tls")
            .set("connection", "id", self.connection_id.clone())
            .set("connection", "received_bytes", received)
            .set("connection", "sent_bytes", sent);
        if let Some(dst) = self.dst {
            a.set("destination", "address", dst.ip().to_string()).set("destination", "port", i64::from(dst.port()));
        }
        if let Some(up) = self.upstream {
            a.set("upstream", "address", up.to_string());
        }
        a
    }

    /// [`Self::labels`] for `metric` (Istio's name) as the pod's Telemetry
    /// has it: `None` when it is not counted, removed tags emptied,
    /// upserted ones given their expression's value.
    fn labels_for(&self, metric: &str, flags: &str, received: u64, sent: u64) -> Option<IstioLabels> {
        let mut labels = IstioLabels { response_flags: flags.into(), ..self.labels() };
        let Some(rules) = &self.rules else { return Some(labels) };
        let rule = rules.metric(self.side(), metric);
        if rule.disabled {
            return None;
        }
        for tag in rule.removed {
            labels.set(tag, String::new());
        }
        if !rule.upserted.is_empty() {
            let attributes = self.attributes(received, sent);
            for (tag, e) in rule.upserted {
                if let Some(v) = attributes.text(e) {
                    labels.set(tag, v);
                }
            }
        }
        Some(labels)
    }

    /// Whether the pod's Telemetry has this connection's access-log line written.
    fn logged(&self, received: u64, sent: u64) -> bool {
        self.rules.as_ref().is_none_or(|r| r.logs(self.side(), || self.attributes(received, sent)))
    }
}

/// Istio's standard labels, exactly as Istio names them: the whole set of
/// `istio_tcp_*`, and of `istio_requests_*` but the response's code and gRPC
/// status (the waypoint's `RequestLabels` adds them).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IstioLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

impl IstioLabels {
    /// Sets a standard tag (Telemetry's tagOverrides); other names are not Istio's tags.
    pub fn set(&mut self, tag: &str, value: String) {
        let field = match tag {
            "reporter" => &mut self.reporter,
            "source_workload" => &mut self.source_workload,
            "source_workload_namespace" => &mut self.source_workload_namespace,
            "source_principal" => &mut self.source_principal,
            "source_canonical_service" => &mut self.source_canonical_service,
            "source_canonical_revision" => &mut self.source_canonical_revision,
            "source_app" => &mut self.source_app,
            "source_version" => &mut self.source_version,
            "source_cluster" => &mut self.source_cluster,
            "destination_workload" => &mut self.destination_workload,
            "destination_workload_namespace" => &mut self.destination_workload_namespace,
            "destination_principal" => &mut self.destination_principal,
            "destination_canonical_service" => &mut self.destination_canonical_service,
            "destination_canonical_revision" => &mut self.destination_canonical_revision,
            "destination_app" => &mut self.destination_app,
            "destination_version" => &mut self.destination_version,
            "destination_cluster" => &mut self.destination_cluster,
            "destination_service" => &mut self.destination_service,
            "destination_service_name" => &mut self.destination_service_name,
            "destination_service_namespace" => &mut self.destination_service_namespace,
            "request_protocol" => &mut self.request_protocol,
            "response_flags" => &mut self.response_flags,
            "connection_security_policy" => &mut self.connection_security_policy,
            _ => return,
        };
        *field = value;
    }
}

/// Istio's `istio_build` labels: which component runs, which version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

/// `istio_build{component, tag} 1`, as every Istio component exposes it
/// (the Mesh dashboard's "Istio Component Versions"): `ztunnel` for a node
/// proxy, `proxy` for a waypoint, as Istio's ambient mode names them.
pub fn register_build(registry: &mut Registry, component: &'static str) {
    let build = Family::<BuildLabels, prometheus_client::metrics::gauge::Gauge>::default();
    build.get_or_create(&BuildLabels { component, tag: env!("CARGO_PKG_VERSION") }).set(1);
    registry.register("istio_build", "The running build.", build);
}

/// The `istio_tcp_*` families, owned here and registered in the process's registry.
#[derive(Clone, Default)]
pub struct TcpMetrics {
    opened: Family<IstioLabels, Counter>,
    closed: Family<IstioLabels, Counter>,
    received: Family<IstioLabels, Counter>,
    sent: Family<IstioLabels, Counter>,
}

impl TcpMetrics {
    pub fn register(registry: &mut Registry) -> TcpMetrics {
        let m = TcpMetrics::default();
        // prometheus-client adds `_total` to counters: these are Istio's names.
        registry.register("istio_tcp_connections_opened", "TCP connections opened", m.opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", m.closed.clone());
        registry.register("istio_tcp_sent_bytes", "Bytes sent to the client (the response side)", m.sent.clone());
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (the request side)",
            m.received.clone(),
        );
        m
    }
}

/// The live part of a connection: bytes so far. `received` goes from the
/// client to the server (the request), `sent` back (the response), as in Istio.
#[derive(Debug, Default)]
pub struct Bytes {
    pub received: AtomicU64,
    pub sent: AtomicU64,
}

struct Live {
    info: Arc<ConnInfo>,
    bytes: Arc<Bytes>,
}

/// The connections open now, by id, and the counters they report to.
pub struct Connections {
    live: Mutex<BTreeMap<u64, Live>>,
    next: AtomicU64,
    metrics: TcpMetrics,
}

/// A live connection as the admin API shows it.
#[derive(Serialize)]
pub struct ConnView {
    pub id: u64,
    #[serde(flatten)]
    pub info: ConnInfo,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration_ms: u64,
}

impl Connections {
    pub fn new(metrics: TcpMetrics) -> Connections {
        Connections { live: Mutex::default(), next: AtomicU64::new(0), metrics }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub fn list(&self) -> Vec<ConnView> {
        let now = unix_ms();
        self.lock()
            .iter()
            .map(|(id, l)| ConnView {
                id: *id,
                info: (*l.info).clone(),
                bytes_received: l.bytes.received.load(Ordering::Relaxed),
                bytes_sent: l.bytes.sent.load(Ordering::Relaxed),
                duration_ms: now.saturating_sub(l.info.started_unix_ms),
            })
            .collect()
    }

    /// Starts recording a connection, at its accept: `info` holds what the
    /// socket says; the plan fills in the rest ([`Tracked::info_mut`]). It is
    /// counted opened, with its labels, once they are final (when relaying
    /// starts, or when it ends first), and closed exactly once.
    pub fn track(self: &Arc<Self>, info: ConnInfo) -> Tracked {
        Tracked(Box::new(Record {
            id: None,
            table: self.clone(),
            info: Arc::new(info),
            opened: false,
            bytes: Arc::default(),
            started: Instant::now(),
            recorded: false,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// One connection being recorded, from its accept. While it relays it is in
/// the live table and its bytes count as they move. Its close is recorded
/// once: by [`Tracked::finish`] or [`Tracked::refuse`], or, on any other way
/// out (an early return, a panic, a cancelled task), by its drop.
///
/// Boxed: a record is almost a kilobyte, and a connection's task would
/// otherwise hold it two or three times over (rustc keeps an async fn's
/// arguments beside the locals they move into, and a matched value beside
/// the future it was moved into), for the connection's whole life.
pub struct Tracked(Box<Record>);

struct Record {
    /// Set while it is in the live table.
    id: Option<u64>,
    table: Arc<Connections>,
    /// Shared with the live table once relaying starts (a connection's
    /// strings once, not twice). Its labels are not kept: made again at the
    /// close, they are the same, as their facts are fixed by then.
    info: Arc<ConnInfo>,
    /// Set once it is counted opened (its facts are fixed from then on).
    opened: bool,
    bytes: Arc<Bytes>,
    started: Instant,
    recorded: bool,
}

impl Tracked {
    pub fn info(&self) -> &ConnInfo {
        &self.0.info
    }

    /// The connection's facts, while they are still being decided (before
    /// relaying starts: the labels' facts are fixed from then on; what is
    /// set later, a denial's policy, is for the access log).
    pub fn info_mut(&mut self) -> &mut ConnInfo {
        Arc::make_mut(&mut self.0.info)
    }

    /// Counts it opened (once), with the labels its facts give now.
    fn opened(&mut self) {
        if !std::mem::replace(&mut self.0.opened, true)
            && let Some(labels) = self.0.info.labels_for("TCP_OPENED_CONNECTIONS", "-", 0, 0)
        {
            self.0.table.metrics.opened.get_or_create(&labels).inc();
        }
    }

    /// Relaying starts: counted opened, and shown in the live table.
    pub fn relaying(&mut self) -> Arc<Bytes> {
        self.opened();
        if self.0.id.is_none() {
            let id = self.0.table.next.fetch_add(1, Ordering::Relaxed);
            let live = Live { info: self.0.info.clone(), bytes: self.0.bytes.clone() };
            self.0.table.lock().insert(id, live);
            self.0.id = Some(id);
        }
        self.0.bytes.clone()
    }

    /// The connection ended: counts it closed with its bytes and writes its access-log line.
    pub fn finish(self, outcome: Result<(), ProxyError>) {
        self.finish_with(outcome.as_ref().map(drop));
    }

    /// [`Self::finish`], for an outcome another record owns (the same-node
    /// path ends two records, the source's and the destination's, with one).
    pub fn finish_with(mut self, outcome: Result<(), &ProxyError>) {
        self.record(outcome.err().map(|e| (e.flag(), e.to_string())));
    }

    /// Refused before anything was relayed.
    pub fn refuse(self, error: ProxyError) {
        self.finish(Err(error));
    }

    fn record(&mut self, error: Option<(Flag, String)>) {
        if std::mem::replace(&mut self.0.recorded, true) {
            return;
        }
        if let Some(id) = self.0.id.take() {
            self.0.table.lock().remove(&id);
        }
        let received = self.0.bytes.received.load(Ordering::Relaxed);
        let sent = self.0.bytes.sent.load(Ordering::Relaxed);
        let flags = error.as_ref().map_or("-", |(f, _)| f.as_str());
        self.opened();
        let (info, m) = (&self.0.info, &self.0.table.metrics);
        let families = [
            (&m.closed, "TCP_CLOSED_CONNECTIONS", 1),
            (&m.received, "TCP_RECEIVED_BYTES", received),
            (&m.sent, "TCP_SENT_BYTES", sent),
        ];
        if info.rules.is_none() {
            // No Telemetry for the pod: one label set for the three.
            let labels = IstioLabels { response_flags: flags.into(), ..info.labels() };
            for (family, _, n) in families {
                family.get_or_create(&labels).inc_by(n);
            }
        } else {
            for (family, metric, n) in families {
                if let Some(labels) = info.labels_for(metric, flags, received, sent) {
                    family.get_or_create(&labels).inc_by(n);
                }
            }
        }
        if info.logged(received, sent) {
            access_log(info, received, sent, self.0.started.elapsed().as_secs_f64() * 1e3, flags, error);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let why = "the proxy stopped carrying the connection before it ended (cancelled or shut down)";
        self.record(Some((Flag::Cancelled, why.into())));
    }
}

fn access_log(info: &ConnInfo, received: u64, sent: u64, duration_ms: f64, flags: &str, error: Option<(Flag, String)>) {
    let opt = |o: &Option<String>| o.clone().unwrap_or_default();
    let addr = |a: &Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    info!(
        target: "access",
        connection_id = %info.connection_id,
        direction = info.direction.as_str(),
        pod = %info.pod,
        listener = %info.listener,
        listener_port = info.listener.port(),
        src = %info.src,
        original_dst = addr(&info.dst),
        upstream = addr(&info.upstream),
        route = info.route,
        src_identity = opt(&info.src_principal),
        dst_identity = opt(&info.dst_principal),
        dst_workload = opt(&info.dst_workload),
        dst_service = opt(&info.dst_service),
        security = info.security,
        decision = info.decision.unwrap_or(""),
        policy = opt(&info.policy),
        bytes_received = received,
        bytes_sent = sent,
        duration_ms,
        response_flags = flags,
        outcome = if error.is_none() { "ok" } else { "error" },
        error = error.map(|(_, e)| e).unwrap_or_default(),
        "connection"
    );
}

/// A stream whose reads and writes are counted into two counters.
pub struct Counted<S> {
    inner: S,
    bytes: Arc<Bytes>,
    /// Reads count as `received` (the client side) or as `sent` (the app side of inbound).
    reads_are_requests: bool,
}

impl<S> Counted<S> {
    /// The client's socket: what it sends is the request.
    pub fn client(inner: S, bytes: Arc<Bytes>) -> Self {
        Counted { inner, bytes, reads_are_requests: true }
    }

    /// The server's socket: what it sends is the response.
    pub fn server(inner: S, bytes: Arc<Bytes>) -> Self {
        Counted { inner, bytes, reads_are_requests: false }
    }

    /// The stream, for I/O that bypasses these counts (which then calls
    /// [`Self::count_read`] and [`Self::count_written`] itself).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Counts `n` bytes read from the stream.
    pub fn count_read(&self, n: usize) {
        self.counters().0.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts `n` bytes written to the stream.
    pub fn count_written(&self, n: usize) {
        self.counters().1.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn counters(&self) -> (&AtomicU64, &AtomicU64) {
        if self.reads_are_requests {
            (&self.bytes.received, &self.bytes.sent)
        } else {
            (&self.bytes.sent, &self.bytes.received)
        }
    }
}

impl<S: crate::relay::ReadReady> crate::relay::ReadReady for Counted<S> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.poll_read_ready(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.count_read(buf.filled().len() - before);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.count_written(n);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn a_peers_baggage_fills_in_only_what_the_configuration_did_not_say() {
        let peer = Baggage {
            namespace: Some("shop".into()),
            workload: Some("reviews-v2".into()),
            service: Some("reviews".into()),
            ..Baggage::default()
        };
        let info = |workload: Option<&str>, namespace: &str| {
            let mut i = ConnInfo::new(
                Direction::Inbound,
                "shop/b",
                "10.0.0.2:15008".parse().unwrap(),
                "10.0.0.1:1".parse().unwrap(),
            );
            i.src_workload = workload.map(str::to_owned);
            i.src_namespace = Some(namespace.to_owned());
            i
        };
        // (what the configuration said, the namespace the identity proves, what the labels end up saying)
        let cases = [
            (None, "shop", Some("reviews-v2"), Some("reviews")),
            // Known from the configuration: kept.
            (Some("reviews-v1"), "shop", Some("reviews-v1"), None),
            // Baggage naming another namespace than the peer's identity: ignored.
            (None, "other", None, None),
        ];
        for (known, namespace, workload, service) in cases {
            let mut i = info(known, namespace);
            i.complete_from_peer(Some(&peer), Some("reviews.shop.svc.cluster.local"));
            assert_eq!(
                (i.src_workload.as_deref(), i.src_canonical.as_deref()),
                (workload, service),
                "{known:?} {namespace}"
            );
            assert_eq!(i.dst_service.as_deref(), Some("reviews.shop.svc.cluster.local"));
        }
        let mut i = info(Some("a-1"), "shop");
        i.src_canonical = Some("a".into());
        let sent = i.source_baggage().to_header().unwrap();
        assert_eq!(
            sent.to_str().unwrap(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.pod.name=a-1,service.name=a"
        );
    }

    fn connections() -> (Registry, Arc<Connections>) {
        let mut registry = Registry::default();
        let conns = Arc::new(Connections::new(TcpMetrics::register(&mut registry)));
        (registry, conns)
    }

    /// Sums a counter over its series with `response_flags` = `flags`.
    fn count(registry: &Registry, name: &str, flags: &str) -> u64 {
        let mut text = String::new();
        encode(&mut text, registry).unwrap();
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&format!("response_flags=\"{flags}\"")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    fn info() -> ConnInfo {
        ConnInfo::new(Direction::Inbound, "shop/b", "[::]:15008".parse().unwrap(), "10.0.0.1:4000".parse().unwrap())
    }

    #[test]
    fn every_way_out_counts_one_open_and_one_close() {
        let (registry, conns) = connections();
        // Finished after relaying.
        let mut t = conns.track(info());
        t.relaying().received.fetch_add(10, Ordering::Relaxed);
        assert_eq!(conns.len(), 1, "in the live table while relaying");
        t.finish(Ok(()));
        // Refused before relaying.
        conns.track(info()).refuse(ProxyError::NoOriginalDestination);
        // Dropped mid-way (an early return, a cancelled task): still closed once.
        let mut t = conns.track(info());
        t.relaying().sent.fetch_add(5, Ordering::Relaxed);
        drop(t);
        // Dropped before relaying.
        drop(conns.track(info()));
        assert!(conns.is_empty(), "nothing left in the live table");
        assert_eq!(count(&registry, "istio_tcp_connections_opened_total", "-"), 4);
        assert_eq!(count(&registry, "istio_tcp_connections_closed_total", "-"), 1);
        assert_eq!(count(&registry, "istio_tcp_connections_closed_total", "NR"), 1);
        assert_eq!(count(&registry, "istio_tcp_connections_closed_total", "DC"), 2);
        assert_eq!(count(&registry, "istio_tcp_received_bytes_total", "-"), 10);
        assert_eq!(count(&registry, "istio_tcp_sent_bytes_total", "DC"), 5);
    }

    #[test]
    fn a_cancelled_task_records_its_close() {
        let (registry, conns) = connections();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let c = conns.clone();
            let task = tokio::spawn(async move {
                let mut t = c.track(info());
                t.relaying();
                std::future::pending::<()>().await;
                t.finish(Ok(()));
            });
            tokio::task::yield_now().await;
            task.abort();
            let _ = task.await;
        });
        assert_eq!(count(&registry, "istio_tcp_connections_opened_total", "-"), 1);
        assert_eq!(count(&registry, "istio_tcp_connections_closed_total", "DC"), 1);
        assert!(conns.is_empty());
    }
}
