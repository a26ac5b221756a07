//! L7 authorization at the waypoint: the AuthorizationPolicies bound to the
//! request's service or to this waypoint (`MeshView::waypoint_policies`),
//! decided by the evaluator the node proxy and `mesh-ctl authz explain`
//! share (`mesh_common::authz`), with the request's method, host, path and
//! headers. Dry-run policies are evaluated beside, counted and logged, and
//! decide nothing.
use std::net::IpAddr;

use http::HeaderMap;
use mesh_common::{
    api,
    authz::{self, Connection, Decision, HttpRequest, RequestAuth},
};
use mesh_proxy::state::view::MeshView;
use tracing::info;

use crate::{Waypoint, engine::Downstream};

/// A request as the evaluator reads it.
pub struct Facts<'a> {
    pub method: &'a str,
    /// Normalized, with the query.
    pub path_and_query: &'a str,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    pub remote: IpAddr,
    /// The JWT RequestAuthentication verified, if the request had one.
    pub auth: Option<&'a RequestAuth>,
}

impl HttpRequest for Facts<'_> {
    fn method(&self) -> &str {
        self.method
    }

    fn path(&self) -> &str {
        self.path_and_query.split('?').next().unwrap_or("/")
    }

    fn host(&self) -> &str {
        self.host
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn remote_ip(&self) -> IpAddr {
        self.remote
    }

    fn auth(&self) -> Option<&RequestAuth> {
        self.auth
    }

    fn query(&self) -> &str {
        self.path_and_query.split_once('?').map_or("", |(_, q)| q)
    }
}

/// The CUSTOM policy (with its provider, `None` while MeshConfig does not
/// define it) whose authorizer is to be asked about the request, or, when
/// the CUSTOM policies here name more than one provider, the denial.
/// `None`: no CUSTOM policy's rules match.
pub fn custom<'v>(
    wp: &Waypoint,
    ds: &Downstream,
    view: &'v MeshView,
    facts: &Facts<'_>,
) -> Option<Result<(String, Option<&'v api::ExtAuthz>), Decision>> {
    let policies = view.waypoint_policies(&ds.service, || instance(wp, ds));
    // Most services have no CUSTOM policy: nothing built for them.
    policies.clone().find(|p| p.action == authz::Action::Custom)?;
    let found = authz::custom(policies, &connection(ds), facts)?;
    Some(found.map(|p| {
        let provider = view.policy_wire(p).and_then(|w| w.ext_authz.as_ref());
        (format!("{}/{}", p.namespace, p.name), provider)
    }))
}

/// This waypoint's own instance (for policies that select its pods, and
/// its locality).
pub(crate) fn instance(
    wp: &Waypoint,
    ds: &Downstream,
) -> Option<std::sync::Arc<mesh_proxy::state::view::WorkloadInfo>> {
    let me = wp.identity()?;
    ds.service.waypoint.as_ref()?.instances.iter().find(|i| i.identity == me).cloned()
}

fn connection(ds: &Downstream) -> Connection {
    Connection {
        source: ds.peer.clone(),
        source_ip: ds.peer_addr.ip(),
        destination_ip: ds.destination.ip(),
        destination_port: ds.port,
    }
}

/// The decision for a request when a policy applies (`None`: none does, and
/// the request goes on); counted, and logged when it denies.
pub fn check(wp: &Waypoint, ds: &Downstream, view: &MeshView, facts: &Facts<'_>, request_id: &str) -> Option<Decision> {
    // Its own instance is looked up once per view.
    let policies = view.waypoint_policies(&ds.service, || instance(wp, ds));
    policies.clone().next()?; // no policy applies: nothing to decide
    let conn = connection(ds);
    let decision = authz::evaluate_request(policies.clone(), &conn, facts);
    wp.metrics.authorized(false, decision.allowed, decision.policy.as_deref());
    if let Some(shadow) = authz::dry_run(policies, &conn, Some(facts)) {
        wp.metrics.authorized(true, shadow.allowed, shadow.policy.as_deref());
        log(ds, facts, request_id, &shadow, "dry-run authorization (not enforced)");
    }
    if !decision.allowed {
        log(ds, facts, request_id, &decision, "request denied by authorization policy");
    }
    Some(decision)
}

/// One log line for a decision worth telling (a denial, a dry-run verdict).
pub fn log(ds: &Downstream, facts: &Facts<'_>, request_id: &str, d: &Decision, what: &str) {
    info!(
        request_id,
        service = ds.service.key(),
        method = facts.method,
        path = facts.path_and_query,
        source = %ds.peer.as_ref().map(ToString::to_string).unwrap_or_default(),
        decision = if d.allowed { "allow" } else { "deny" },
        policy = d.policy.as_deref().unwrap_or(""),
        reason = %d.reason,
        "{what}"
    );
}
