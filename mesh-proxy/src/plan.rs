//! What to do with one connection, decided from state alone before any I/O:
//! where to dial, what to `CONNECT` to, which identity to present and which
//! to accept, which policy decision applies. Pure functions of the
//! [`MeshView`] (and of which certificates the node holds), tested with
//! tables; the listeners then do the I/O a plan says and record its outcome.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use mesh_common::{HBONE_PORT, authz::Connection, identity::SpiffeId};

use crate::{
    error::ProxyError,
    pool::PoolKey,
    state::view::{MeshView, ServiceInfo, Upstream, WorkloadInfo},
    telemetry::ConnInfo,
};

/// The local pod a connection belongs to.
#[derive(Clone, Copy, Debug)]
pub struct LocalPod<'a> {
    /// `namespace/name`.
    pub name: &'a str,
    pub addresses: &'a [IpAddr],
}

impl LocalPod<'_> {
    /// The pod's workload in the controller's configuration (uid `Pod/<ns>/<name>`).
    pub fn workload(&self, view: &MeshView) -> Option<Arc<WorkloadInfo>> {
        view.workload(&format!("Pod/{}", self.name)).cloned()
    }
}

/// How a hop carries the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// HTTP/2 CONNECT inside mutual TLS to the peer's 15008.
    Hbone,
    /// Plain TCP to a workload or endpoint the mesh knows (outside the ambient mesh).
    Tcp,
    /// Plain TCP to an address the mesh does not know.
    Passthrough,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Hbone => "hbone",
            Route::Tcp => "tcp",
            Route::Passthrough => "passthrough",
        }
    }

    /// Istio's `connection_security_policy`.
    pub fn security(self) -> &'static str {
        match self {
            Route::Hbone => "mutual_tls",
            Route::Tcp | Route::Passthrough => "none",
        }
    }
}

/// The identities of an HBONE hop, fixed at the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mtls {
    /// The certificate presented (the source pod's identity).
    pub source: SpiffeId,
    /// The only server identity accepted.
    pub peer: SpiffeId,
    /// Which pooled connections may carry it.
    pub pool: PoolKey,
}

/// One way to reach the destination.
#[derive(Clone, Debug)]
pub struct Hop {
    pub route: Route,
    /// The socket's destination: the peer's 15008 for HBONE, else the upstream itself.
    pub dial: SocketAddr,
    /// The upstream: the `CONNECT` authority for HBONE, the dialed address otherwise.
    pub target: SocketAddr,
    pub workload: Option<Arc<WorkloadInfo>>,
    /// Set exactly for HBONE.
    pub mtls: Option<Mtls>,
}

/// Where an outbound connection goes.
#[derive(Debug)]
pub struct OutboundPlan {
    /// Where the app meant to go.
    pub dst: SocketAddr,
    pub source: Option<Arc<WorkloadInfo>>,
    /// The service it addressed, if it addressed a VIP.
    pub service: Option<Arc<ServiceInfo>>,
    /// In the order to try them; never empty. A hop that cannot be used is
    /// its error, and ends the attempt when reached (it is never retryable);
    /// a destination that cannot be reached at all is a single error.
    pub hops: Vec<Result<Hop, ProxyError>>,
}

impl OutboundPlan {
    /// Fills what the plan knows into the connection's record, for `hop` (the
    /// one tried last, if any).
    pub fn describe(&self, info: &mut ConnInfo, hop: Option<&Hop>) {
        info.dst = Some(self.dst);
        if let Some(w) = &self.source {
            info.set_source(w);
            // The source is this node's pod: its Telemetry decides what is logged and counted.
            info.rules.clone_from(&w.telemetry);
        }
        if let Some(s) = &self.service {
            info.set_service(s);
        }
        if let Some(hop) = hop {
            info.upstream = Some(hop.target);
            info.route = hop.route.as_str();
            info.security = hop.route.security();
            if let Some(w) = &hop.workload {
                info.set_destination(w);
            }
        }
    }
}

/// The plan for an app's connection to `dst` from `pod`. `has_certificate`
/// says whether the node holds a certificate for an identity: without one,
/// an HBONE hop is refused (never sent in plaintext).
pub fn outbound(
    view: &MeshView,
    pod: LocalPod<'_>,
    dst: SocketAddr,
    has_certificate: impl Fn(&SpiffeId) -> bool,
) -> OutboundPlan {
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    let source = pod.workload(view);
    let destination = match view.destination(dst) {
        Ok(d) => d,
        Err(e) => return OutboundPlan { dst, source, service: None, hops: vec![Err(e)] },
    };
    let via_service = destination.service.is_some();
    let hops = destination
        .candidates
        .into_iter()
        .map(|candidate| match candidate {
            Upstream::Plain { workload, addr } => {
                let route = if workload.is_none() && !via_service { Route::Passthrough } else { Route::Tcp };
                Ok(Hop { route, dial: addr, target: addr, workload, mtls: None })
            }
            Upstream::Hbone { workload, addr } => hbone_hop(
                pod,
                source.as_ref(),
                &has_certificate,
                workload,
                SocketAddr::new(addr.ip(), HBONE_PORT),
                addr,
            ),
            Upstream::Waypoint { workload, addr, authority } => {
                hbone_hop(pod, source.as_ref(), &has_certificate, workload, addr, authority)
            }
        })
        .collect();
    OutboundPlan { dst, source, service: destination.service, hops }
}

/// An HBONE hop from `pod` to `workload`: dial `dial` (its 15008), CONNECT
/// `target`, present the source's certificate, accept only `workload`'s.
fn hbone_hop(
    pod: LocalPod<'_>,
    source: Option<&Arc<WorkloadInfo>>,
    has_certificate: &impl Fn(&SpiffeId) -> bool,
    workload: Arc<WorkloadInfo>,
    dial: SocketAddr,
    target: SocketAddr,
) -> Result<Hop, ProxyError> {
    let source = source.ok_or_else(|| ProxyError::UnknownSource(pod.name.into()))?;
    if !has_certificate(&source.identity) {
        return Err(ProxyError::NoCertificate(source.identity.clone()));
    }
    // The socket is made in the source pod's namespace: its address of the
    // peer's family is the pooled connection's source.
    let src_ip = pod.addresses.iter().copied().find(|ip| ip.is_ipv4() == dial.is_ipv4());
    let pool = PoolKey {
        src: source.identity.clone(),
        src_ip: src_ip.unwrap_or(dial.ip()),
        dst: workload.identity.clone(),
        dst_ip: dial.ip(),
    };
    let mtls = Mtls { source: source.identity.clone(), peer: workload.identity.clone(), pool };
    Ok(Hop { route: Route::Hbone, dial, target, workload: Some(workload), mtls: Some(mtls) })
}

/// How a connection arrived at a pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Arrival {
    /// Plain TCP steered to 15006: no identity.
    Plaintext,
    /// A tunnel on 15008 from a peer whose certificate proved this identity.
    Hbone(SpiffeId),
}

/// What to do with a connection arriving for a local pod.
#[derive(Debug)]
pub struct InboundPlan {
    pub arrival: Arrival,
    pub src: SocketAddr,
    /// The app's address and port, where the proxy connects from inside the pod.
    pub target: SocketAddr,
    /// The source workload, when the mesh knows its address.
    pub source: Option<Arc<WorkloadInfo>>,
    /// This pod's workload, when the configuration has it.
    pub destination: Option<Arc<WorkloadInfo>>,
    /// `allow`/`deny` and the deciding policy, when a decision was made.
    pub decision: Option<(bool, Option<String>)>,
    /// `Ok`: connect to `target`. `Err`: refuse, for this reason.
    pub verdict: Result<(), ProxyError>,
}

impl InboundPlan {
    /// Fills what the plan knows into the connection's record.
    pub fn describe(&self, info: &mut ConnInfo) {
        info.dst = Some(self.target);
        let route = match self.arrival {
            Arrival::Plaintext => Route::Tcp,
            Arrival::Hbone(_) => Route::Hbone,
        };
        (info.route, info.security) = (route.as_str(), route.security());
        match (&self.arrival, &self.source) {
            // The source's labels only when its verified identity is the workload's.
            (Arrival::Hbone(id), Some(w)) if &w.identity == id => info.set_source(w),
            (Arrival::Hbone(id), _) => {
                info.src_principal = Some(id.to_string());
                info.src_namespace = Some(id.namespace().to_owned());
            }
            (Arrival::Plaintext, Some(w)) => {
                info.src_workload = Some(w.workload_name().to_owned());
                info.src_namespace = Some(w.wire.namespace.clone());
            }
            (Arrival::Plaintext, None) => {}
        }
        if let Some(w) = &self.destination {
            info.set_destination(w);
            // The destination is this node's pod: its Telemetry decides.
            info.rules.clone_from(&w.telemetry);
        }
        if let Some((allowed, policy)) = &self.decision {
            info.decision = Some(if *allowed { "allow" } else { "deny" });
            info.policy = policy.clone();
        }
        if self.verdict.is_ok() {
            info.upstream = Some(self.target);
        }
    }
}

/// The plan for a connection from `src` to `target` arriving at `pod`: the
/// target must be the pod's (for a tunnel), then PeerAuthentication (STRICT
/// refuses plaintext) and AuthorizationPolicy decide.
pub fn inbound(
    view: &MeshView,
    pod: LocalPod<'_>,
    src: SocketAddr,
    arrival: Arrival,
    target: SocketAddr,
) -> InboundPlan {
    let src = SocketAddr::new(src.ip().to_canonical(), src.port());
    let target = SocketAddr::new(target.ip().to_canonical(), target.port());
    let mut plan = InboundPlan {
        source: view.workload_by_ip(src.ip()).cloned(),
        destination: pod.workload(view),
        decision: None,
        verdict: Ok(()),
        arrival,
        src,
        target,
    };
    if matches!(plan.arrival, Arrival::Hbone(_)) && !pod.addresses.contains(&target.ip()) {
        plan.verdict = Err(ProxyError::WrongTarget { target, pod: pod.name.into() });
        return plan;
    }
    if let Some(w) = &plan.destination {
        let conn = Connection {
            source: match &plan.arrival {
                Arrival::Hbone(id) => Some(id.clone()),
                Arrival::Plaintext => None,
            },
            source_ip: src.ip(),
            destination_ip: target.ip(),
            destination_port: target.port(),
        };
        let decision = view.authorize(w, &conn);
        plan.decision = Some((decision.allowed, decision.policy.clone()));
        if !decision.allowed {
            plan.verdict = Err(ProxyError::Denied { policy: decision.policy, reason: decision.reason });
        }
    }
    plan
}

#[cfg(test)]
mod tests;
