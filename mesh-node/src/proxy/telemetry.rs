//! What the proxy reports about each connection: Istio's `istio_tcp_*`
//! metrics with its standard labels, one access-log line when the connection
//! ends, and the table of live connections (with bytes so far) that the admin
//! API shows. Bytes are counted as they move, by wrapping the client-facing
//! side of the relay.
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

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::info;

use super::view::{ServiceInfo, WorkloadInfo};

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
    pub dst_workload: Option<String>,
    pub dst_namespace: Option<String>,
    pub dst_principal: Option<String>,
    pub dst_canonical: Option<String>,
    pub dst_service: Option<String>,
    pub dst_service_name: Option<String>,
    pub dst_service_namespace: Option<String>,
    /// `mutual_tls` or `none`.
    pub security: &'static str,
    /// `allow` or `deny` when a policy decision was made.
    pub decision: Option<&'static str>,
    pub policy: Option<String>,
    pub started_unix_ms: u64,
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
            dst_workload: None,
            dst_namespace: None,
            dst_principal: None,
            dst_canonical: None,
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
        }
    }

    pub fn set_source(&mut self, w: &WorkloadInfo) {
        self.src_workload = Some(w.wire.name.clone());
        self.src_namespace = Some(w.wire.namespace.clone());
        self.src_principal = Some(w.identity.to_string());
        self.src_canonical = Some(w.canonical_service().to_owned());
    }

    pub fn set_destination(&mut self, w: &WorkloadInfo) {
        self.dst_workload = Some(w.wire.name.clone());
        self.dst_namespace = Some(w.wire.namespace.clone());
        self.dst_principal = Some(w.identity.to_string());
        self.dst_canonical = Some(w.canonical_service().to_owned());
    }

    pub fn set_service(&mut self, s: &ServiceInfo) {
        self.dst_service = Some(s.host.clone());
        self.dst_service_name = Some(s.name.clone());
        self.dst_service_namespace = Some(s.namespace.clone());
    }

    fn labels(&self, response_flags: &'static str) -> Vec<(&'static str, String)> {
        let v = |o: &Option<String>| o.clone().unwrap_or_else(|| "unknown".into());
        vec![
            ("reporter", self.direction.reporter().into()),
            ("source_workload", v(&self.src_workload)),
            ("source_workload_namespace", v(&self.src_namespace)),
            ("source_principal", v(&self.src_principal)),
            ("source_canonical_service", v(&self.src_canonical)),
            ("destination_workload", v(&self.dst_workload)),
            ("destination_workload_namespace", v(&self.dst_namespace)),
            ("destination_principal", v(&self.dst_principal)),
            ("destination_canonical_service", v(&self.dst_canonical)),
            ("destination_service", v(&self.dst_service)),
            ("destination_service_name", v(&self.dst_service_name)),
            ("destination_service_namespace", v(&self.dst_service_namespace)),
            ("request_protocol", "tcp".into()),
            ("response_flags", response_flags.into()),
            ("connection_security_policy", self.security.into()),
        ]
    }
}

/// Why a connection failed, as Envoy's response flags name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    /// Refused by an AuthorizationPolicy or PeerAuthentication.
    Denied,
    /// The upstream could not be connected.
    UpstreamFailure,
    /// No endpoint (a service without endpoints).
    NoHealthyUpstream,
    /// No way to carry it (no certificate for the source yet, no original destination).
    NoRoute,
}

impl Flag {
    fn as_str(self) -> &'static str {
        match self {
            Flag::Denied => "RBAC",
            Flag::UpstreamFailure => "UF",
            Flag::NoHealthyUpstream => "UH",
            Flag::NoRoute => "NR",
        }
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
    info: ConnInfo,
    bytes: Arc<Bytes>,
}

/// The connections open now, by id.
#[derive(Default)]
pub struct Connections {
    live: Mutex<BTreeMap<u64, Live>>,
    next: AtomicU64,
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
    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn list(&self) -> Vec<ConnView> {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, l)| ConnView {
                id: *id,
                info: l.info.clone(),
                bytes_received: l.bytes.received.load(Ordering::Relaxed),
                bytes_sent: l.bytes.sent.load(Ordering::Relaxed),
                duration_ms: now.saturating_sub(l.info.started_unix_ms),
            })
            .collect()
    }

    pub fn open(self: &Arc<Self>, info: ConnInfo) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let bytes = Arc::new(Bytes::default());
        count_opened(&info);
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Live { info: info.clone(), bytes: bytes.clone() });
        Tracked { id, table: self.clone(), bytes, started: Instant::now() }
    }
}

/// A connection that is being relayed: it is in the live table until it is
/// finished or dropped, and its bytes count as they move.
pub struct Tracked {
    id: u64,
    table: Arc<Connections>,
    pub bytes: Arc<Bytes>,
    started: Instant,
}

impl Tracked {
    /// Counts the connection closed with its bytes and writes its access-log line.
    pub fn finish(self, info: &ConnInfo, outcome: Result<(), (Flag, String)>) {
        let received = self.bytes.received.load(Ordering::Relaxed);
        let sent = self.bytes.sent.load(Ordering::Relaxed);
        count_closed(info, received, sent, self.started, outcome);
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.table.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

/// A failure before anything was relayed: counted and logged like any
/// connection (opened and closed at once), never in the live table.
pub fn refused(info: &ConnInfo, flag: Flag, error: String) {
    count_opened(info);
    count_closed(info, 0, 0, Instant::now(), Err((flag, error)));
}

fn count_opened(info: &ConnInfo) {
    metrics::counter!("istio_tcp_connections_opened_total", &info.labels("-")).increment(1);
}

fn count_closed(info: &ConnInfo, received: u64, sent: u64, started: Instant, outcome: Result<(), (Flag, String)>) {
    let flags = outcome.as_ref().err().map_or("-", |(f, _)| f.as_str());
    let labels = info.labels(flags);
    metrics::counter!("istio_tcp_connections_closed_total", &labels).increment(1);
    metrics::counter!("istio_tcp_received_bytes_total", &labels).increment(received);
    metrics::counter!("istio_tcp_sent_bytes_total", &labels).increment(sent);
    access_log(info, received, sent, started.elapsed().as_secs_f64() * 1e3, flags, outcome.err());
}

fn access_log(info: &ConnInfo, received: u64, sent: u64, duration_ms: f64, flags: &str, error: Option<(Flag, String)>) {
    let opt = |o: &Option<String>| o.clone().unwrap_or_default();
    let addr = |a: &Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    info!(
        target: "access",
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

    fn counters(&self) -> (&AtomicU64, &AtomicU64) {
        if self.reads_are_requests {
            (&self.bytes.received, &self.bytes.sent)
        } else {
            (&self.bytes.sent, &self.bytes.received)
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counters().0.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.counters().1.fetch_add(n as u64, Ordering::Relaxed);
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
