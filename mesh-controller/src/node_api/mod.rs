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
pub mod registry;
pub mod service_account;
mod session;

use self::auth::{ca_status, same_token, uri_san};
pub use self::{
    auth::{join_token, valid_node_name},
    metrics::{HubMetrics, IstiodCounter, LATENCY_BUCKETS},
    registry::Registry,
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
    /// The older shared join token, when one is configured: any node name
    /// may join with it (nodes so joined are registered, and revocable).
    shared_token: Option<String>,
    /// Per-node tokens and the node certificates in force.
    pub registry: Registry,
    /// Bumped at each revocation, so the revoked node's stream ends at once.
    revocations: watch::Sender<u64>,
    /// Of node certificates: longer than workload ones, so that a node
    /// outlives a controller outage without its single-use token.
    node_lifetime: Duration,
    trust_domain: String,
    pub nodes: Mutex<BTreeMap<String, NodeStatus>>,
    pub metrics: HubMetrics,
    large_updates: Arc<tokio::sync::Semaphore>,
    /// One publication at a time: a revocation republishes the model in
    /// force, which must not undo a configuration published meanwhile.
    publishing: Mutex<()>,
    /// On Kubernetes: nodes may join with their agent's service-account token.
    token_join: Option<service_account::TokenJoin>,
}

/// Updates with this many resources (snapshots, mostly) are sent to at most
/// `LARGE_UPDATES_IN_FLIGHT` nodes at a time.
const LARGE_UPDATE: usize = 1000;
const LARGE_UPDATES_IN_FLIGHT: usize = 8;
/// Resources per update message.
const UPDATE_PART: usize = 500;

impl Hub {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        shared_token: Option<String>,
        registry: Registry,
        trust_domain: String,
        node_lifetime: Duration,
    ) -> Hub {
        let empty = Published { model: Arc::default(), wire: Arc::default(), from_previous: None, at: Instant::now() };
        let (published, _) = watch::channel(Arc::new(empty));
        Hub {
            published,
            ca,
            shared_token,
            registry,
            revocations: watch::channel(0).0,
            node_lifetime,
            trust_domain,
            nodes: Mutex::default(),
            metrics: HubMetrics::default(),
            large_updates: Arc::new(tokio::sync::Semaphore::new(LARGE_UPDATES_IN_FLIGHT)),
            publishing: Mutex::default(),
            token_join: None,
        }
    }

    /// Lets node agents join with their Kubernetes service-account tokens
    /// ([`service_account`]) besides join tokens.
    pub fn with_token_join(mut self, token_join: service_account::TokenJoin) -> Hub {
        self.token_join = Some(token_join);
        self
    }

    /// Makes `model` what nodes get; every connected stream pushes its delta now.
    /// The revoked certificates of removed nodes go with it.
    pub fn publish(&self, model: Arc<MeshModel>) {
        let _one_at_a_time = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        // Only what changed from the previous model is encoded again.
        let previous = self.current();
        let revoked = self.registry.revoked_certificates(unix_now());
        let (wire, delta) = previous.wire.next(&previous.model, &model, &revoked);
        let (wire, from_previous) = (Arc::new(wire), Some((previous.wire.version.clone(), delta)));
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

    /// Refuses for a reason of the registry's, counted by reason.
    fn refuse_node(&self, refusal: registry::Refusal) -> Status {
        self.metrics.node_refusals.get_or_create(&metrics::ReasonLabel { reason: refusal.reason() }).inc();
        let status = match refusal {
            registry::Refusal::Unknown(_) | registry::Refusal::BadToken(_) => Status::unauthenticated,
            _ => Status::permission_denied,
        };
        self.refuse(status(refusal.to_string()))
    }

    /// Registers `node` with a fresh single-use token valid for `ttl`.
    pub fn add_node(&self, node: &str, ttl: Duration) -> Result<registry::NewToken, String> {
        if !valid_node_name(node) {
            return Err(format!("invalid node name {node:?} (a DNS-1123 subdomain, as Kubernetes names nodes)"));
        }
        let token: String =
            ca::random_bytes::<32>().map_err(|e| e.to_string())?.iter().map(|b| format!("{b:02x}")).collect();
        let added = self.registry.add(node, token, ttl.as_secs().max(1), unix_now()).map_err(|e| e.to_string())?;
        info!(node, expires_unix = added.expires_unix, "node registered: a single-use join token was issued");
        Ok(added)
    }

    /// Revokes `node` ([`Registry::remove`]) and ends its stream now.
    pub fn revoke(&self, node: &str) -> std::io::Result<bool> {
        let known = self.registry.remove(node, unix_now())?;
        if known {
            self.revocations.send_modify(|n| *n += 1);
            self.publish(self.current().model.clone());
            warn!(
                node,
                "node revoked: its certificate and token are refused from now on, and every node refuses the \
                 workload certificates it held"
            );
        }
        Ok(known)
    }

    /// Resolves when `node` is revoked.
    async fn revoked(&self, node: &str) {
        let mut revocations = self.revocations.subscribe();
        while revocations.changed().await.is_ok() {
            if self.registry.is_revoked(node) {
                return;
            }
        }
        std::future::pending().await
    }

    /// The node named by the verified client certificate of `req`, which
    /// must be one the registry holds for it (not replaced, not revoked).
    fn node_of<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let node = self.node_named_by(req)?;
        let leaf = req.peer_certs().and_then(|c| c.first().map(|c| ca::serial_of(c))).unwrap_or_default();
        self.registry.check(&node, &leaf).map_err(|r| self.refuse_node(r))?;
        Ok(node)
    }

    fn node_named_by<T>(&self, req: &Request<T>) -> Result<String, Status> {
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
            root_pem: self.ca.trust_bundle(),
        })
    }

    /// Checks a join: the node's own token, or the shared one if configured.
    fn admit_join(&self, node: &str, token: &str) -> Result<(), Status> {
        let now = unix_now();
        match self.registry.redeem(node, token, now) {
            Ok(()) => Ok(()),
            Err(registry::Refusal::Revoked(n)) => Err(self.refuse_node(registry::Refusal::Revoked(n))),
            Err(refusal) => match &self.shared_token {
                Some(shared) if same_token(token, shared) => {
                    self.registry.joined_without_own_token(node, now).map_err(|r| self.refuse_node(r))
                }
                // Neither its own token nor the shared one.
                Some(_) if matches!(refusal, registry::Refusal::Unknown(_)) => {
                    Err(self.refuse_node(registry::Refusal::BadToken(node.into())))
                }
                _ => Err(self.refuse_node(refusal)),
            },
        }
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
        if !valid_node_name(&req.node) {
            return Err(self.refuse(Status::invalid_argument(format!("invalid node name {:?}", req.node))));
        }
        // The CSR first, so a bad one does not use the token up.
        let issued =
            self.ca.issue_uri(&req.csr_pem, &self.node_uri(&req.node), OffsetDateTime::now_utc(), self.node_lifetime);
        let issued = issued.map_err(|e| self.refuse(ca_status(e)))?;
        match &self.token_join {
            Some(token_join) if service_account::is_jwt(&req.token) => {
                let node =
                    token_join.node_of(&req.token).await.map_err(|m| self.refuse(Status::permission_denied(m)))?;
                if node != req.node {
                    let m = format!("the token's pod runs on node {node}, not on {}", req.node);
                    return Err(self.refuse(Status::permission_denied(m)));
                }
                self.registry.joined_without_own_token(&req.node, unix_now()).map_err(|r| self.refuse_node(r))?;
            }
            _ => self.admit_join(&req.node, &req.token)?,
        }
        self.registry.issued(&req.node, &issued.serial);
        info!(node = %req.node, "node joined");
        Ok(self.issued(issued))
    }

    async fn certify(&self, req: Request<api::CertifyRequest>) -> Result<Response<api::CertificateResponse>, Status> {
        let node = self.node_of(&req)?;
        let req = req.into_inner();
        let now = OffsetDateTime::now_utc();
        if req.identity.is_empty() {
            let issued =
                self.ca.issue_uri(&req.csr_pem, &self.node_uri(&node), now, self.node_lifetime).map_err(ca_status)?;
            self.registry.issued(&node, &issued.serial);
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
        let not_after_unix = u64::try_from(issued.not_after.unix_timestamp()).unwrap_or(0);
        let cert = registry::IssuedCert { serial: issued.serial.clone(), not_after_unix };
        self.registry.issued_workload(&node, cert, unix_now());
        info!(node = %node, identity = %identity, "workload certificate issued");
        Ok(self.issued(issued))
    }

    type SubscribeStream = ReceiverStream<Result<api::Update, Status>>;

    async fn subscribe(
        &self,
        req: Request<Streaming<api::NodeMessage>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let node = self.node_of(&req)?;
        let peer = req.remote_addr();
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
                s.metrics_addr = metrics_target(&hello.metrics_addr, peer);
            });
            tokio::select! {
                result = hub.session(&node, hello.known, &mut inbound, &tx) => {
                    if let Err(e) = result {
                        info!(node = %node, "stream ended: {e}");
                    }
                }
                () = hub.revoked(&node) => {
                    let _ = tx.send(Err(Status::permission_denied(format!("node {node:?} was removed from the mesh")))).await;
                    info!(node = %node, "stream ended: the node was revoked");
                }
            }
            hub.status(&node, |s| {
                s.connected = false;
                s.disconnected_unix = unix_now();
            });
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Where to scrape a node's metrics: as announced, an unspecified host
/// taken as the address its stream comes from.
fn metrics_target(announced: &str, peer: Option<std::net::SocketAddr>) -> String {
    match (announced.parse::<std::net::SocketAddr>(), peer) {
        (Ok(a), Some(peer)) if a.ip().is_unspecified() => std::net::SocketAddr::new(peer.ip(), a.port()).to_string(),
        (Ok(a), _) if a.ip().is_unspecified() => String::new(),
        _ => announced.to_owned(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_targets_as_announced_or_from_the_peer() {
        let peer = Some("10.0.0.7:40312".parse().unwrap());
        for (announced, peer, want) in [
            ("10.0.0.9:15020", peer, "10.0.0.9:15020"),
            ("0.0.0.0:15020", peer, "10.0.0.7:15020"),
            ("[::]:15020", peer, "10.0.0.7:15020"),
            ("0.0.0.0:15020", None, ""),
            ("", peer, ""),
            ("pod.example:15020", peer, "pod.example:15020"),
        ] {
            assert_eq!(super::metrics_target(announced, peer), want, "{announced}");
        }
    }
}
