//! The gRPC service nodes talk to (`proto/mesh/v1/node.proto`): joining with a
//! token, certificates for the workloads scheduled on the calling node, and
//! the configuration stream. Everything but `Join` requires mTLS with a node
//! certificate: rustls checks the chain and the validity period at the
//! handshake, and this module checks the certificate names a node.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use mesh_common::{
    admin::NodeStatus,
    api::{self, node_control_server::NodeControl, node_message::Kind as Msg},
    identity::SpiffeId,
};
use prometheus_client::{
    metrics::{counter::Counter, histogram::Histogram},
    registry::Registry,
};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::{
    ca::{self, CertificateAuthority, Issued},
    distribute::{Delta, WireSet},
    model::MeshModel,
};

/// What the controller distributes now, and when it was published.
pub struct Published {
    pub model: Arc<MeshModel>,
    pub wire: Arc<WireSet>,
    /// The change from the previous publication (its version, the delta),
    /// computed once for every node that was in sync with it.
    pub from_previous: Option<(String, Delta)>,
    pub at: Instant,
}

/// What a node holds, as far as its stream knows.
#[derive(Clone)]
enum Held {
    /// What it said in Hello.
    Known(Arc<BTreeMap<String, u64>>),
    /// A set the controller sent (shared by every node that got it).
    Set(Arc<WireSet>),
}

impl Held {
    fn is_empty(&self) -> bool {
        match self {
            Held::Known(k) => k.is_empty(),
            Held::Set(s) => s.resources.is_empty(),
        }
    }

    /// What a node holding this lacks of `p`.
    fn delta_to(&self, p: &Published) -> Delta {
        match self {
            Held::Known(known) => p.wire.delta(known),
            Held::Set(s) if s.version == p.wire.version => Delta::default(),
            Held::Set(s) => match &p.from_previous {
                Some((version, delta)) if *version == s.version => delta.clone(),
                _ => p.wire.delta_from(s),
            },
        }
    }
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
    }
}

/// The node-facing side of the controller.
pub struct Hub {
    published: watch::Sender<Arc<Published>>,
    ca: Arc<CertificateAuthority>,
    join_token: String,
    trust_domain: String,
    pub nodes: Mutex<BTreeMap<String, NodeStatus>>,
    pub metrics: HubMetrics,
    large_updates: Arc<tokio::sync::Semaphore>,
}

/// Updates with this many resources (snapshots, mostly) are sent to at most
/// `LARGE_UPDATES_IN_FLIGHT` nodes at a time.
const LARGE_UPDATE: usize = 1000;
const LARGE_UPDATES_IN_FLIGHT: usize = 8;
/// Resources per update message.
const UPDATE_PART: usize = 500;

impl Hub {
    pub fn new(ca: Arc<CertificateAuthority>, join_token: String, trust_domain: String) -> Hub {
        let empty = Published { model: Arc::default(), wire: Arc::default(), from_previous: None, at: Instant::now() };
        let (published, _) = watch::channel(Arc::new(empty));
        Hub {
            published,
            ca,
            join_token,
            trust_domain,
            nodes: Mutex::default(),
            metrics: HubMetrics::default(),
            large_updates: Arc::new(tokio::sync::Semaphore::new(LARGE_UPDATES_IN_FLIGHT)),
        }
    }

    /// Makes `model` what nodes get; every connected stream pushes its delta now.
    pub fn publish(&self, model: Arc<MeshModel>) {
        let wire = Arc::new(WireSet::from_model(&model));
        let previous = self.current().wire.clone();
        let from_previous = Some((previous.version.clone(), wire.delta_from(&previous)));
        self.published.send_replace(Arc::new(Published { model, wire, from_previous, at: Instant::now() }));
    }

    pub fn current(&self) -> Arc<Published> {
        self.published.borrow().clone()
    }

    /// The SPIFFE ID in node certificates: `spiffe://<trust-domain>/mesh/node/<name>`.
    pub fn node_uri(&self, node: &str) -> String {
        format!("spiffe://{}/mesh/node/{node}", self.trust_domain)
    }

    fn refuse(&self, status: Status) -> Status {
        self.metrics.refused.inc();
        warn!(code = ?status.code(), "refused a node request: {}", status.message());
        status
    }

    /// The node named by the verified client certificate of `req`.
    fn node_of<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let certs = req.peer_certs().ok_or_else(|| {
            self.refuse(Status::unauthenticated("mTLS with a node certificate is required (join with the token first)"))
        })?;
        let leaf = certs.first().ok_or_else(|| self.refuse(Status::unauthenticated("no client certificate")))?;
        let uri =
            uri_san(leaf).ok_or_else(|| self.refuse(Status::permission_denied("client certificate has no URI SAN")))?;
        let prefix = format!("spiffe://{}/mesh/node/", self.trust_domain);
        match uri.strip_prefix(&prefix) {
            Some(node) if valid_node_name(node) => Ok(node.to_owned()),
            _ => {
                Err(self
                    .refuse(Status::permission_denied(format!("{uri} is not a node identity (want {prefix}<node>)"))))
            }
        }
    }

    fn issued(&self, issued: Issued) -> Response<api::CertificateResponse> {
        self.metrics.certificates.inc();
        Response::new(api::CertificateResponse {
            cert_pem: issued.cert_pem,
            chain_pem: issued.chain_pem,
            not_after_unix: issued.not_after.unix_timestamp(),
            root_pem: self.ca.root_pem().to_owned(),
        })
    }

    fn status(&self, node: &str, f: impl FnOnce(&mut NodeStatus)) {
        f(self.nodes.lock().unwrap_or_else(|e| e.into_inner()).entry(node.to_owned()).or_default());
    }
}

fn uri_san(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
        _ => None,
    })
}

/// A Kubernetes node name: a DNS-1123 subdomain.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}

/// Compares without an early exit, so timing does not reveal the token.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn ca_status(e: ca::CaError) -> Status {
    match e {
        ca::CaError::BadCsr(_) => Status::invalid_argument(e.to_string()),
        ca::CaError::NotOnNode { .. } => Status::permission_denied(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// The gRPC service over a shared [`Hub`].
#[derive(Clone)]
pub struct NodeService(pub Arc<Hub>);

impl std::ops::Deref for NodeService {
    type Target = Hub;
    fn deref(&self) -> &Hub {
        &self.0
    }
}

#[tonic::async_trait]
impl NodeControl for NodeService {
    async fn join(&self, req: Request<api::JoinRequest>) -> Result<Response<api::CertificateResponse>, Status> {
        let req = req.into_inner();
        if !same_token(&req.token, &self.join_token) {
            return Err(self.refuse(Status::unauthenticated(format!("node {:?}: invalid join token", req.node))));
        }
        if !valid_node_name(&req.node) {
            return Err(self.refuse(Status::invalid_argument(format!("invalid node name {:?}", req.node))));
        }
        let issued = self.ca.issue_uri(&req.csr_pem, &self.node_uri(&req.node), OffsetDateTime::now_utc());
        let issued = issued.map_err(|e| self.refuse(ca_status(e)))?;
        info!(node = %req.node, "node joined");
        Ok(self.issued(issued))
    }

    async fn certify(&self, req: Request<api::CertifyRequest>) -> Result<Response<api::CertificateResponse>, Status> {
        let node = self.node_of(&req)?;
        let req = req.into_inner();
        let now = OffsetDateTime::now_utc();
        if req.identity.is_empty() {
            let issued = self.ca.issue_uri(&req.csr_pem, &self.node_uri(&node), now).map_err(ca_status)?;
            info!(node = %node, "node certificate renewed");
            return Ok(self.issued(issued));
        }
        let identity: SpiffeId = req
            .identity
            .parse()
            .map_err(|e| self.refuse(Status::invalid_argument(format!("identity {:?}: {e}", req.identity))))?;
        if identity.trust_domain() != self.trust_domain {
            return Err(self.refuse(Status::permission_denied(format!(
                "{identity} is not in trust domain {}",
                self.trust_domain
            ))));
        }
        ca::may_issue(&self.current().model, &node, &identity).map_err(|e| self.refuse(ca_status(e)))?;
        let issued = self.ca.issue(&req.csr_pem, &identity, now).map_err(ca_status)?;
        info!(node = %node, identity = %identity, "workload certificate issued");
        Ok(self.issued(issued))
    }

    type SubscribeStream = ReceiverStream<Result<api::Update, Status>>;

    async fn subscribe(
        &self,
        req: Request<Streaming<api::NodeMessage>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let node = self.node_of(&req)?;
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(api::NodeMessage { kind: Some(Msg::Hello(hello)) }) => hello,
            _ => return Err(Status::invalid_argument("the first message of a stream must be Hello")),
        };
        let (tx, rx) = mpsc::channel(4);
        let hub = self.0.clone();
        tokio::spawn(async move {
            info!(node = %node, known = hello.known.len(), admin = %hello.admin_addr, "node connected");
            hub.status(&node, |s| {
                s.connected = true;
                s.admin_addr = hello.admin_addr;
            });
            if let Err(e) = hub.session(&node, hello.known, &mut inbound, &tx).await {
                info!(node = %node, "stream ended: {e}");
            }
            hub.status(&node, |s| s.connected = false);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl Hub {
    /// One node's stream: an update now (what differs from what it holds),
    /// then one per published change, until either side goes away.
    async fn session(
        &self,
        node: &str,
        known: BTreeMap<String, u64>,
        inbound: &mut Streaming<api::NodeMessage>,
        tx: &mpsc::Sender<Result<api::Update, Status>>,
    ) -> Result<(), String> {
        let mut changes = self.published.subscribe();
        let mut sent = Held::Known(Arc::new(known));
        let mut acked = sent.clone();
        let mut in_flight: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let (mut nonce, mut first) = (0u64, true);
        loop {
            let published = changes.borrow_and_update().clone();
            let delta = sent.delta_to(&published);
            if first || !delta.is_empty() {
                if delta.upserts.len() >= LARGE_UPDATE {
                    // Held until the node acknowledges: bounds the memory of many
                    // nodes (re)connecting at once.
                    let permit = self.large_updates.clone().acquire_owned().await;
                    in_flight = permit.ok();
                }
                let size = delta.upserts.len() + delta.removed.len();
                // Parts of bounded size: each is encoded on its own, so no buffer
                // grows to the size of a whole snapshot.
                let parts: Vec<&[Arc<api::Resource>]> = match delta.upserts.len() {
                    0 => vec![&[]],
                    _ => delta.upserts.chunks(UPDATE_PART).collect(),
                };
                let (last, full) = (parts.len() - 1, sent.is_empty());
                let mut removed = Some(delta.removed);
                for (i, part) in parts.into_iter().enumerate() {
                    nonce += 1;
                    let update = api::Update {
                        nonce,
                        version: published.wire.version.clone(),
                        full: full && i == 0,
                        resources: part.iter().map(|r| (**r).clone()).collect(),
                        removed: if i == last { removed.take().unwrap_or_default() } else { Vec::new() },
                        more: i != last,
                    };
                    tx.send(Ok(update)).await.map_err(|_| "node went away".to_string())?;
                }
                sent = Held::Set(published.wire.clone());
                let latency = published.at.elapsed().as_secs_f64();
                self.metrics.pushes.inc();
                if first {
                    self.metrics.resync_resources.inc_by(size as u64);
                } else {
                    self.metrics.push_latency.observe(latency);
                }
                self.status(node, |s| {
                    s.pushes += 1;
                    s.version_sent = published.wire.version.clone();
                    s.last_push_unix = unix_now();
                    if first {
                        s.resync_resources = size;
                    }
                });
                first = false;
            }
            tokio::select! {
                changed = changes.changed() => changed.map_err(|_| "controller shutting down".to_string())?,
                msg = inbound.message() => match msg.map_err(|e| e.to_string())? {
                    None => return Err("node closed the stream".into()),
                    Some(api::NodeMessage { kind: Some(Msg::Ack(ack)) }) if ack.nonce == nonce => {
                        acked = sent.clone();
                        drop(in_flight.take());
                        self.status(node, |s| s.version_acked = ack.version);
                    }
                    Some(api::NodeMessage { kind: Some(Msg::Nack(nack)) }) => {
                        warn!(node = %node, nonce = nack.nonce, "node rejected an update: {}", nack.reason);
                        // Resend everything it has not acknowledged with the next change.
                        sent = acked.clone();
                        drop(in_flight.take());
                        self.metrics.nacks.inc();
                        self.status(node, |s| {
                            s.nacks += 1;
                            s.last_nack = Some(nack.reason);
                        });
                    }
                    Some(_) => {} // an ACK of an older update, or a stray Hello
                },
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

/// The join token in `path`, created (32 random bytes, hex, mode 0600) when missing.
pub fn join_token(path: &std::path::Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => return Err(std::io::Error::other("the file is empty")),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    let token: String = ca::random_bytes::<32>()?.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    ca::write_private(path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for (name, ok) in [
            ("node1", true),
            ("ip-10-0-0-1.eu-west-1.compute.internal", true),
            ("", false),
            ("Node1", false),
            ("-node", false),
            ("node/evil", false),
            ("node.", false),
        ] {
            assert_eq!(valid_node_name(name), ok, "{name:?}");
        }
    }

    #[test]
    fn tokens() {
        assert!(same_token("abc123", "abc123"));
        assert!(!same_token("abc123", "abc124"));
        assert!(!same_token("abc123", "abc1234"));
        assert!(!same_token("", "x"));
    }
}
