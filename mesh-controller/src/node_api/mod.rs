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
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

mod auth;
mod metrics;
mod session;

use self::auth::{ca_status, same_token, uri_san};
pub use self::{
    auth::{join_token, valid_node_name},
    metrics::{HubMetrics, LATENCY_BUCKETS},
};
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
                s.disconnected_unix = 0;
                s.admin_addr = hello.admin_addr;
                s.role = hello.role;
            });
            if let Err(e) = hub.session(&node, hello.known, &mut inbound, &tx).await {
                info!(node = %node, "stream ended: {e}");
            }
            hub.status(&node, |s| {
                s.connected = false;
                s.disconnected_unix = unix_now();
            });
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}
