//! What the proxy decides with: the controller's configuration indexed for
//! lookups on every connection (workloads by IP, services by VIP, policies
//! compiled), rebuilt whole after each applied update and swapped in. Pure:
//! where a connection goes, which mTLS mode a port has and whether policy
//! admits a connection are functions of this view, tested with tables.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use mesh_common::{
    HBONE_PORT, api,
    authz::{self, CompiledPolicy, Connection, Decision},
    identity::SpiffeId,
    routing::CompiledRoutes,
};

use super::{store::NodeStore, telemetry_rules::TelemetryRules};
use crate::error::ProxyError;

/// A workload as the proxy uses it.
#[derive(Debug)]
pub struct WorkloadInfo {
    pub wire: api::Workload,
    pub identity: SpiffeId,
    /// Its Telemetry access-log and metric rules (at its node proxy).
    pub telemetry: Option<Arc<TelemetryRules>>,
}

impl WorkloadInfo {
    /// Istio's canonical service: the `service.istio.io/canonical-name` label,
    /// else `app.kubernetes.io/name`, else `app`, else the workload's name.
    pub fn canonical_service(&self) -> &str {
        let l = &self.wire.labels;
        l.get("service.istio.io/canonical-name")
            .or_else(|| l.get("app.kubernetes.io/name"))
            .or_else(|| l.get("app"))
            .unwrap_or(&self.wire.name)
    }

    /// Istio's workload name (a pod's Deployment, ...), as metrics and
    /// access logs name the workload; the pod's own from older controllers.
    pub fn workload_name(&self) -> &str {
        if self.wire.workload_name.is_empty() { &self.wire.name } else { &self.wire.workload_name }
    }

    /// Istio's canonical revision: `service.istio.io/canonical-revision`,
    /// else `app.kubernetes.io/version`, else `version`, else `latest`.
    pub fn canonical_revision(&self) -> &str {
        let l = &self.wire.labels;
        l.get("service.istio.io/canonical-revision")
            .or_else(|| l.get("app.kubernetes.io/version"))
            .or_else(|| l.get("version"))
            .map_or("latest", String::as_str)
    }

    /// Istio's `*_app` and `*_version` labels: the workload's `app` and
    /// `version` labels, else `unknown`.
    pub fn app_and_version(&self) -> (&str, &str) {
        let get = |k: &str| self.wire.labels.get(k).map_or("unknown", String::as_str);
        (get("app"), get("version"))
    }
}

#[derive(Debug)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// `namespace/name`, kept so per-request lookups build no string.
    key: String,
    /// The first host (`name.namespace.svc.<domain>`, or a ServiceEntry's).
    pub host: String,
    pub ports: Vec<api::ServicePort>,
    endpoints: Vec<IpAddr>,
    /// The waypoint its clients' connections go through, if bound to one.
    pub waypoint: Option<WaypointInfo>,
    /// Round robin position.
    next: AtomicUsize,
    /// The routes of a service that has none of its own, compiled on first use.
    default_routes: std::sync::OnceLock<Arc<CompiledRoutes>>,
    /// The policies a waypoint enforces for it (indexes into the view's),
    /// found on first use.
    waypoint_policies: std::sync::OnceLock<Vec<usize>>,
    /// Its DestinationRule's traffic policy, and its subsets'.
    traffic_policy: Option<api::TrafficPolicy>,
    subset_traffic_policies: HashMap<String, api::TrafficPolicy>,
    /// The local rate limit its waypoint enforces.
    pub rate_limit: Option<api::RateLimit>,
    /// The JWTs its waypoint accepts (RequestAuthentication jwtRules).
    pub jwt_rules: Vec<api::JwtRule>,
    /// How its waypoint traces its requests (Telemetry), if it does.
    pub tracing: Option<api::Tracing>,
    /// Its Telemetry access-log and metric rules (at its waypoint).
    pub telemetry: Option<Arc<TelemetryRules>>,
}

/// A service's waypoint: its Gateway (`namespace/name`) and running instances.
#[derive(Debug)]
pub struct WaypointInfo {
    pub gateway: String,
    pub instances: Vec<Arc<WorkloadInfo>>,
}

impl ServiceInfo {
    /// `namespace/name`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The connection pool (circuit-breaker limits) for requests to
    /// `subset` (empty: none) on service port `port`, as Istio merges a
    /// DestinationRule: the subset's connectionPool replaces the service's,
    /// the subset's portLevelSettings (when it has any) replace the
    /// service's, and a port's setting wins over either pool.
    pub fn connection_pool(&self, subset: &str, port: u16) -> Option<&api::ConnectionPool> {
        self.merged(subset, port, |t| &t.port_connection_pools, |t| t.connection_pool.as_ref())
    }

    /// The outlier detection for `subset` on `port`, merged as
    /// [`Self::connection_pool`].
    pub fn outlier_detection(&self, subset: &str, port: u16) -> Option<&api::OutlierDetection> {
        self.merged(subset, port, |t| &t.port_outlier_detections, |t| t.outlier_detection.as_ref())
    }

    /// The load balancer for `subset` on `port`, merged as
    /// [`Self::connection_pool`].
    pub fn load_balancer(&self, subset: &str, port: u16) -> Option<&api::LoadBalancer> {
        self.merged(subset, port, |t| &t.port_load_balancers, |t| t.load_balancer.as_ref())
    }

    /// Istio's merge of one section of the traffic policy.
    fn merged<'a, T>(
        &'a self,
        subset: &str,
        port: u16,
        by_port: impl Fn(&'a api::TrafficPolicy) -> &'a std::collections::BTreeMap<u32, T>,
        whole: impl Fn(&'a api::TrafficPolicy) -> Option<&'a T>,
    ) -> Option<&'a T> {
        let top = self.traffic_policy.as_ref();
        let sub = (!subset.is_empty()).then(|| self.subset_traffic_policies.get(subset)).flatten();
        let ports = match sub {
            Some(s) if !by_port(s).is_empty() => Some(by_port(s)),
            _ => top.map(&by_port),
        };
        ports.and_then(|p| p.get(&u32::from(port))).or_else(|| sub.and_then(&whole)).or_else(|| top.and_then(&whole))
    }

    /// The service's port `port`.
    pub fn port(&self, port: u16) -> Result<&api::ServicePort, ProxyError> {
        self.ports
            .iter()
            .find(|p| p.port == u32::from(port))
            .ok_or_else(|| ProxyError::NoServicePort { service: self.key().to_owned(), port })
    }

    /// The round robin's next start.
    fn rotate(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// How the proxy reaches one candidate upstream.
#[derive(Clone, Debug)]
pub enum Upstream {
    /// A workload in the mesh: HBONE to its 15008, CONNECT `addr`.
    Hbone { workload: Arc<WorkloadInfo>, addr: SocketAddr },
    /// The service's waypoint: HBONE to the instance's 15008 (`addr`),
    /// CONNECT `authority` (the service address the client dialed).
    Waypoint { workload: Arc<WorkloadInfo>, addr: SocketAddr, authority: SocketAddr },
    /// Plain TCP: a workload outside the ambient mesh, a ServiceEntry
    /// endpoint, or a destination the mesh does not know (passthrough).
    Plain { workload: Option<Arc<WorkloadInfo>>, addr: SocketAddr },
}

impl Upstream {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Upstream::Hbone { addr, .. } | Upstream::Plain { addr, .. } | Upstream::Waypoint { addr, .. } => *addr,
        }
    }

    pub fn workload(&self) -> Option<&Arc<WorkloadInfo>> {
        match self {
            Upstream::Hbone { workload, .. } | Upstream::Waypoint { workload, .. } => Some(workload),
            Upstream::Plain { workload, .. } => workload.as_ref(),
        }
    }
}

/// Where an outbound connection goes: the service it addressed (if any) and
/// its upstreams in the order to try them (a service's endpoints from the
/// round robin position on; one entry otherwise).
#[derive(Clone, Debug)]
pub struct Destination {
    pub service: Option<Arc<ServiceInfo>>,
    pub candidates: Vec<Upstream>,
}

#[derive(Debug, Default)]
pub struct MeshView {
    pub version: String,
    by_uid: HashMap<String, Arc<WorkloadInfo>>,
    by_ip: HashMap<IpAddr, Arc<WorkloadInfo>>,
    by_vip: HashMap<IpAddr, Arc<ServiceInfo>>,
    by_service: HashMap<String, Arc<ServiceInfo>>,
    policies: Vec<(api::Authorization, CompiledPolicy)>,
    /// HTTP routes by service `namespace/name`.
    routes: HashMap<String, Arc<CompiledRoutes>>,
}

impl MeshView {
    /// Indexes what the store holds. The store checked every resource, so a
    /// resource that still does not convert is left out (and logged).
    pub fn build(store: &NodeStore) -> MeshView {
        let mut view = MeshView { version: store.version.clone(), ..MeshView::default() };
        for w in store.workloads.values() {
            let Ok(identity) = w.identity.parse() else { continue };
            let telemetry = w.telemetry.as_ref().map(|t| Arc::new(TelemetryRules::new(t)));
            let info = Arc::new(WorkloadInfo { wire: w.clone(), identity, telemetry });
            for ip in w.ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()) {
                view.by_ip.insert(ip, info.clone());
            }
            view.by_uid.insert(w.uid.clone(), info);
        }
        for s in store.services.values() {
            let waypoint = s.waypoint.as_ref().map(|w| WaypointInfo {
                gateway: format!("{}/{}", w.namespace, w.name),
                // Only instances that terminate HBONE themselves: nothing else may stand in for a waypoint.
                instances: w
                    .workloads
                    .iter()
                    .filter_map(|uid| view.by_uid.get(uid))
                    .filter(|w| w.wire.native_tunnel)
                    .cloned()
                    .collect(),
            });
            let info = Arc::new(ServiceInfo {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                key: format!("{}/{}", s.namespace, s.name),
                host: s.hosts.first().cloned().unwrap_or_else(|| format!("{}.{}", s.name, s.namespace)),
                ports: s.ports.clone(),
                endpoints: s.endpoints.iter().filter_map(|e| e.ip.parse().ok()).collect(),
                waypoint,
                next: AtomicUsize::new(0),
                default_routes: std::sync::OnceLock::new(),
                waypoint_policies: std::sync::OnceLock::new(),
                traffic_policy: s.traffic_policy.clone(),
                subset_traffic_policies: s.subset_traffic_policies.clone().into_iter().collect(),
                rate_limit: s.rate_limit.clone(),
                jwt_rules: s.jwt_rules.clone(),
                tracing: s.tracing.clone(),
                telemetry: s.telemetry.as_ref().map(|t| Arc::new(TelemetryRules::new(t))),
            });
            for vip in s.vips.iter().filter_map(|v| v.parse::<IpAddr>().ok()) {
                view.by_vip.insert(vip, info.clone());
            }
            view.by_service.insert(info.key.clone(), info);
        }
        for (key, r) in &store.routes {
            match CompiledRoutes::from_wire(r) {
                Ok(compiled) => drop(view.routes.insert(key.clone(), Arc::new(compiled))),
                Err(e) => tracing::warn!(routes = %key, "routes ignored: {e}"),
            }
        }
        for p in store.policies.values() {
            match CompiledPolicy::from_wire(p) {
                Ok(compiled) => view.policies.push((p.clone(), compiled)),
                Err(e) => tracing::warn!(policy = %format!("{}/{}", p.namespace, p.name), "policy ignored: {e}"),
            }
        }
        view
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<WorkloadInfo>> {
        self.by_uid.get(uid)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<WorkloadInfo>> {
        self.by_ip.get(&ip.to_canonical())
    }

    /// The service with `namespace/name` `key`.
    pub fn service(&self, key: &str) -> Option<&Arc<ServiceInfo>> {
        self.by_service.get(key)
    }

    /// The service whose VIP is `ip`.
    /// Every service.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceInfo>> {
        self.by_service.values()
    }

    /// The service a host name names: its first host, or the short forms
    /// `name.namespace` and `name.namespace.svc` (a lookup for occasional
    /// callers, such as a JWKS fetch; requests go by VIP).
    pub fn service_by_host(&self, host: &str) -> Option<&Arc<ServiceInfo>> {
        let host = host.trim_end_matches('.');
        self.by_service.values().find(|s| {
            s.host == host
                || host.strip_prefix(s.name.as_str()).and_then(|r| r.strip_prefix('.')).is_some_and(|r| {
                    r.strip_prefix(s.namespace.as_str()).is_some_and(|rest| rest.is_empty() || rest == ".svc")
                })
        })
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<ServiceInfo>> {
        self.by_vip.get(&ip.to_canonical())
    }

    /// The HTTP routes of `svc`: its own, else the default route (every
    /// request to the service itself), compiled once per view.
    pub fn routes<'a>(&'a self, svc: &'a ServiceInfo) -> &'a Arc<CompiledRoutes> {
        self.routes.get(svc.key()).unwrap_or_else(|| {
            svc.default_routes.get_or_init(|| {
                let wire = api::HttpRoutes {
                    namespace: svc.namespace.clone(),
                    service: svc.name.clone(),
                    routes: vec![mesh_common::routing::default_route(&svc.namespace, &svc.name)],
                };
                Arc::new(CompiledRoutes::from_wire(&wire).unwrap_or_default())
            })
        })
    }

    /// Where a connection to `dst` goes. `Err` names why it cannot go
    /// anywhere. A service bound to a waypoint goes to the waypoint.
    pub fn destination(&self, dst: SocketAddr) -> Result<Destination, ProxyError> {
        let ip = dst.ip().to_canonical();
        if let Some(svc) = self.by_vip.get(&ip) {
            svc.port(dst.port())?;
            let candidates = match &svc.waypoint {
                Some(w) => waypoint_candidates(svc, w, SocketAddr::new(ip, dst.port()))?,
                None => self.endpoints(svc, dst.port(), |_| true)?,
            };
            return Ok(Destination { service: Some(svc.clone()), candidates });
        }
        Ok(Destination { service: None, candidates: vec![self.upstream(SocketAddr::new(ip, dst.port()))] })
    }

    /// The endpoints of `svc` for its port `port` whose workloads `select`
    /// admits (a subset's labels), from the round robin's position on, each
    /// at the port's target port.
    pub fn endpoints(
        &self,
        svc: &ServiceInfo,
        port: u16,
        select: impl Fn(Option<&WorkloadInfo>) -> bool,
    ) -> Result<Vec<Upstream>, ProxyError> {
        // A named target port needs the pods' container ports, which the
        // local configuration does not carry: it means the same port.
        let target = match u16::try_from(svc.port(port)?.target_port) {
            Ok(p) if p != 0 => p,
            _ => port,
        };
        let chosen: Vec<IpAddr> =
            svc.endpoints.iter().copied().filter(|ip| select(self.by_ip.get(ip).map(|w| w.as_ref()))).collect();
        if chosen.is_empty() {
            return Err(ProxyError::NoEndpoints(svc.key().to_owned()));
        }
        let (start, n) = (svc.rotate(), chosen.len());
        Ok((0..n).map(|i| self.upstream(SocketAddr::new(chosen[(start + i) % n], target))).collect())
    }

    fn upstream(&self, addr: SocketAddr) -> Upstream {
        match self.by_ip.get(&addr.ip()) {
            Some(w) if w.wire.speaks_hbone() => Upstream::Hbone { workload: w.clone(), addr },
            w => Upstream::Plain { workload: w.cloned(), addr },
        }
    }

    /// The policies that apply to `w`, then the decision for `conn`.
    pub fn authorize(&self, w: &WorkloadInfo, conn: &Connection) -> Decision {
        authz::admission::admit(&w.wire, &self.policies, conn)
    }

    /// The policies a waypoint whose own workload is `me` enforces for
    /// requests to `svc` (`authz::applies_at_waypoint`), dry-run ones
    /// included (the evaluator keeps them from deciding).
    /// `me` is asked only the first time, when the policies are found.
    pub fn waypoint_policies<'a>(
        &'a self,
        svc: &'a ServiceInfo,
        me: impl FnOnce() -> Option<Arc<WorkloadInfo>>,
    ) -> impl Iterator<Item = &'a CompiledPolicy> + Clone + 'a {
        let indexes = svc.waypoint_policies.get_or_init(|| {
            let me = me();
            let me = me.as_deref();
            let no_labels = std::collections::BTreeMap::new();
            let (gateway_namespace, gateway_name) =
                svc.waypoint.as_ref().and_then(|w| w.gateway.split_once('/')).unwrap_or_default();
            let at = authz::WaypointTarget {
                gateway_namespace,
                gateway_name,
                labels: me.map_or(&no_labels, |w| &w.wire.labels),
                service_namespace: &svc.namespace,
                service_name: &svc.name,
            };
            (0..self.policies.len()).filter(|i| authz::applies_at_waypoint(&self.policies[*i].0, &at)).collect()
        });
        indexes.iter().map(|i| &self.policies[*i].1)
    }

    /// The wire form of a policy this view holds (a CUSTOM policy's provider).
    pub fn policy_wire(&self, p: &CompiledPolicy) -> Option<&api::Authorization> {
        self.policies.iter().find(|(_, c)| std::ptr::eq(c, p)).map(|(w, _)| w)
    }

    /// Counts for the config dump.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.by_uid.len(), self.by_vip.len(), self.policies.len())
    }
}

/// A waypoint's instances, from the round robin's position on; none is an
/// error: the connection is refused rather than sent around the waypoint.
fn waypoint_candidates(
    svc: &ServiceInfo,
    w: &WaypointInfo,
    authority: SocketAddr,
) -> Result<Vec<Upstream>, ProxyError> {
    let n = w.instances.len();
    if n == 0 {
        return Err(ProxyError::NoWaypoint { service: svc.key().to_owned(), waypoint: w.gateway.clone() });
    }
    let start = svc.rotate();
    let family = authority.is_ipv4();
    let candidates: Vec<Upstream> = (0..n)
        .map(|i| &w.instances[(start + i) % n])
        .filter_map(|wl| {
            let ips = wl.wire.ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok());
            let ip = ips.clone().find(|ip| ip.is_ipv4() == family).or_else(|| ips.clone().next())?;
            Some(Upstream::Waypoint { workload: wl.clone(), addr: SocketAddr::new(ip, HBONE_PORT), authority })
        })
        .collect();
    if candidates.is_empty() {
        return Err(ProxyError::NoWaypoint { service: svc.key().to_owned(), waypoint: w.gateway.clone() });
    }
    Ok(candidates)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::fixtures::workload;

    fn max_requests(n: u32) -> api::ConnectionPool {
        api::ConnectionPool { max_requests: n, ..Default::default() }
    }

    fn store() -> NodeStore {
        let mut store = NodeStore::default();
        for w in [
            workload("a", "10.0.0.1", true, &[("app", "front")]),
            workload("b1", "10.0.0.2", true, &[("app", "back")]),
            workload("b2", "10.0.0.3", false, &[("app", "back")]),
            workload("b3", "10.0.0.4", true, &[("app", "back")]),
        ] {
            store.workloads.insert(w.uid.clone(), w);
        }
        store.services.insert(
            "shop/back".into(),
            api::Service {
                namespace: "shop".into(),
                name: "back".into(),
                hosts: vec!["back.shop.svc.cluster.local".into()],
                vips: vec!["10.96.0.10".into()],
                ports: vec![api::ServicePort { port: 80, target_port: 8080, ..Default::default() }],
                endpoints: ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
                    .iter()
                    .map(|ip| api::Endpoint { workload: String::new(), ip: ip.to_string() })
                    .collect(),
                waypoint: None,
                traffic_policy: Some(api::TrafficPolicy {
                    connection_pool: Some(max_requests(5)),
                    port_connection_pools: [(80, max_requests(7))].into(),
                    ..Default::default()
                }),
                subset_traffic_policies: [
                    (
                        "v1".to_string(),
                        api::TrafficPolicy { connection_pool: Some(max_requests(3)), ..Default::default() },
                    ),
                    (
                        "v2".to_string(),
                        api::TrafficPolicy {
                            connection_pool: Some(max_requests(4)),
                            port_connection_pools: [(80, max_requests(9))].into(),
                            ..Default::default()
                        },
                    ),
                ]
                .into(),
                rate_limit: None,
                jwt_rules: vec![],
                tracing: None,
                telemetry: None,
            },
        );
        store.services.insert(
            "shop/empty".into(),
            api::Service {
                namespace: "shop".into(),
                name: "empty".into(),
                vips: vec!["10.96.0.11".into()],
                ports: vec![api::ServicePort { port: 80, ..Default::default() }],
                ..Default::default()
            },
        );
        let policy = |name: &str, action: api::Action, scope: api::Scope, selector: &[(&str, &str)], ns: &str| {
            api::Authorization {
                namespace: ns.into(),
                name: name.into(),
                action: action.into(),
                scope: scope.into(),
                selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
                rules: vec![api::Rule {
                    from: vec![api::SourceMatch {
                        namespaces: vec![api::StringMatch {
                            kind: Some(api::string_match::Kind::Exact("evil".into())),
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }
        };
        for p in [
            policy("deny-evil-back", api::Action::Deny, api::Scope::WorkloadSelector, &[("app", "back")], "shop"),
            policy("allow-evil-mesh", api::Action::Allow, api::Scope::Global, &[], "istio-system"),
            policy("other-ns", api::Action::Deny, api::Scope::Namespace, &[], "other"),
        ] {
            store.policies.insert(format!("{}/{}", p.namespace, p.name), p);
        }
        store
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn services_by_host_name() {
        let view = MeshView::build(&store());
        for (host, want) in [
            ("back.shop.svc.cluster.local", true),
            ("back.shop.svc.cluster.local.", true),
            ("back.shop", true),
            ("back.shop.svc", true),
            ("back.shopx", false),
            ("backx.shop", false),
            ("back", false),
        ] {
            assert_eq!(view.service_by_host(host).map(|s| s.key()), want.then_some("shop/back"), "{host}");
        }
    }

    #[test]
    fn destinations() {
        let view = MeshView::build(&store());
        // (destination, expected candidates as "hbone|plain addr", or an error fragment)
        let cases: Vec<(&str, Result<Vec<&str>, &str>)> = vec![
            ("10.0.0.2:8080", Ok(vec!["hbone 10.0.0.2:8080"])),
            ("10.0.0.3:8080", Ok(vec!["plain 10.0.0.3:8080"])),
            ("192.0.2.1:443", Ok(vec!["plain 192.0.2.1:443"])),
            ("[::ffff:10.0.0.2]:8080", Ok(vec!["hbone 10.0.0.2:8080"])),
            ("10.96.0.10:81", Err("has no port 81")),
            ("10.96.0.11:80", Err("has no endpoints")),
        ];
        for (dst, want) in cases {
            let got = view.destination(addr(dst)).map(|d| {
                d.candidates
                    .iter()
                    .map(|u| match u {
                        Upstream::Hbone { addr, .. } => format!("hbone {addr}"),
                        Upstream::Plain { addr, .. } => format!("plain {addr}"),
                        Upstream::Waypoint { addr, authority, .. } => format!("waypoint {addr} {authority}"),
                    })
                    .collect::<Vec<_>>()
            });
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{dst}"),
                (Err(e), Err(fragment)) => assert!(e.to_string().contains(fragment), "{dst}: {e}"),
                (got, want) => panic!("{dst}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn service_round_robin_covers_every_endpoint_and_orders_fallbacks() {
        let view = MeshView::build(&store());
        let mut firsts = BTreeMap::new();
        for _ in 0..300 {
            let d = view.destination(addr("10.96.0.10:80")).unwrap();
            assert_eq!(d.service.as_ref().unwrap().host, "back.shop.svc.cluster.local");
            assert_eq!(d.candidates.len(), 3, "every endpoint is a fallback");
            *firsts.entry(d.candidates[0].addr().to_string()).or_insert(0) += 1;
            // The unenrolled endpoint is reached in plain TCP, the others over HBONE.
            for c in &d.candidates {
                assert_eq!(matches!(c, Upstream::Hbone { .. }), c.addr().ip().to_string() != "10.0.0.3");
                assert_eq!(c.addr().port(), 8080, "target port");
            }
        }
        assert_eq!(firsts.values().copied().collect::<Vec<_>>(), [100, 100, 100], "{firsts:?}");
    }

    /// Istio's merge of a DestinationRule: a subset's pool replaces the
    /// service's, a subset's port settings replace the service's, and a
    /// port's setting wins over either pool.
    #[test]
    fn connection_pools_merge_as_istio_merges_them() {
        let view = MeshView::build(&store());
        let svc = view.service("shop/back").unwrap();
        let limit = |subset: &str, port: u16| svc.connection_pool(subset, port).map(|p| p.max_requests);
        for (subset, port, want) in [
            ("", 80, Some(7)),   // the service's port setting
            ("", 81, Some(5)),   // the service's pool
            ("v1", 80, Some(7)), // the service's port setting beats the subset's pool
            ("v1", 81, Some(3)), // the subset's pool
            ("v2", 80, Some(9)), // the subset's own port settings replace the service's
            ("v2", 81, Some(4)),
            ("v9", 81, Some(5)), // an unknown subset: the service's
        ] {
            assert_eq!(limit(subset, port), want, "{subset:?} port {port}");
        }
        assert_eq!(view.service("shop/empty").unwrap().connection_pool("", 80), None);
    }

    #[test]
    fn policies_apply_by_scope_and_selector() {
        let view = MeshView::build(&store());
        let evil = Connection {
            source: Some("spiffe://cluster.local/ns/evil/sa/x".parse().unwrap()),
            source_ip: "10.9.0.1".parse().unwrap(),
            destination_ip: "10.0.0.2".parse().unwrap(),
            destination_port: 8080,
        };
        let friend =
            Connection { source: Some("spiffe://cluster.local/ns/shop/sa/a".parse().unwrap()), ..evil.clone() };
        let back = view.workload("Pod/shop/b1").unwrap();
        let front = view.workload("Pod/shop/a").unwrap();
        // back: the selector DENY applies and wins over the mesh-wide ALLOW.
        let d = view.authorize(back, &evil);
        assert_eq!((d.allowed, d.policy.as_deref()), (false, Some("shop/deny-evil-back")));
        // front: only the mesh-wide ALLOW (the other namespace's DENY never applies).
        let d = view.authorize(front, &evil);
        assert_eq!((d.allowed, d.policy.as_deref()), (true, Some("istio-system/allow-evil-mesh")));
        // an ALLOW applies to front, and the friend does not match it.
        assert!(!view.authorize(front, &friend).allowed);
    }

    #[test]
    fn mtls_modes_and_canonical_names() {
        let view = MeshView::build(&store());
        let a = view.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(authz::admission::mtls_mode(&a.wire, 80), api::MtlsMode::Permissive);
        assert_eq!(authz::admission::mtls_mode(&a.wire, 9000), api::MtlsMode::Strict, "portLevelMtls");
        assert_eq!(a.canonical_service(), "front");
    }
}
