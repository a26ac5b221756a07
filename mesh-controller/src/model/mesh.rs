//! The mesh as nodes see it: workloads with identities, services with their
//! endpoints, the policies that apply to each workload, and each workload's
//! PeerAuthentication mode. Built from the configuration in force; pure.
use std::{collections::BTreeMap, net::IpAddr};

use mesh_common::{
    authz::{in_scope, scope_of},
    identity::SpiffeId,
};
use serde::Serialize;

use super::{
    authz::{CompiledPolicy, Connection, Decision, evaluate},
    routes::{self, GATEWAY_NAME_LABEL, Waypoint},
};
use crate::config::{
    ConfigStore, Kind, MeshSettings, ObjectKey, Resource,
    objects::{IntOrString, Labels, PeerAuthentication, endpoint_slice::EndpointSlice},
};

const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Workload {
    /// `Pod/<ns>/<name>` or `WorkloadEntry/<ns>/<name>`.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    #[serde(serialize_with = "super::as_display")]
    pub identity: SpiffeId,
    pub ips: Vec<IpAddr>,
    /// The node whose agent serves it (pods only).
    pub node: Option<String>,
    pub labels: Labels,
    /// In the ambient mesh: its node proxy captures its traffic and it speaks HBONE.
    pub captured: bool,
    /// Runs a waypoint: terminates HBONE itself, never captured by a node.
    pub native_tunnel: bool,
    /// `region/zone/subzone`, empty when unknown.
    pub locality: String,
    /// Istio's workload name (a pod's controller, e.g. its Deployment).
    pub workload_name: String,
}

/// Whether a Namespace's labels enrol its pods in the ambient mesh.
pub(super) fn is_ambient(labels: &Labels) -> bool {
    labels.get(DATAPLANE_MODE).map(String::as_str) == Some("ambient")
}

/// What a pod's workload depends on besides the pod itself.
pub(super) struct PodContext<'a> {
    pub trust_domain: &'a str,
    pub waypoints: &'a imbl::OrdMap<String, Waypoint>,
    /// Whether a namespace is ambient (labelled `istio.io/dataplane-mode: ambient`).
    pub ambient: &'a dyn Fn(&str) -> bool,
    /// A node's locality, from its Node's labels.
    pub node_locality: &'a dyn Fn(&str) -> Option<String>,
}

/// The workload a pod is (`None` when its service account makes no identity).
pub(super) fn pod_workload(pod: &crate::config::objects::Pod, cx: &PodContext) -> Option<Workload> {
    let namespace = pod.metadata.namespace().to_owned();
    let sa = pod.spec.service_account_name.clone().unwrap_or_else(|| "default".into());
    let identity = SpiffeId::new(cx.trust_domain, &namespace, &sa).ok()?;
    let mut ips: Vec<IpAddr> = pod.status.pod_ips.iter().filter_map(|i| i.ip.parse().ok()).collect();
    if let Some(ip) = pod.status.pod_ip.as_ref().and_then(|i| i.parse().ok())
        && !ips.contains(&ip)
    {
        ips.insert(0, ip);
    }
    let opted_out = pod.metadata.labels.get(DATAPLANE_MODE).map(String::as_str) == Some("none");
    // A waypoint's pod (labelled with its Gateway, as Kubernetes labels a
    // Gateway's pods) speaks HBONE itself.
    let native_tunnel = pod
        .metadata
        .labels
        .get(GATEWAY_NAME_LABEL)
        .is_some_and(|gw| cx.waypoints.contains_key(&format!("{namespace}/{gw}")));
    let locality = match locality(&pod.metadata.labels) {
        own if own.is_empty() => pod.spec.node_name.as_deref().and_then(cx.node_locality).unwrap_or_default(),
        own => own,
    };
    Some(Workload {
        uid: format!("Pod/{namespace}/{}", pod.metadata.name),
        name: pod.metadata.name.clone(),
        workload_name: pod.workload_name(),
        captured: (cx.ambient)(&namespace) && !opted_out && !native_tunnel,
        native_tunnel,
        namespace,
        service_account: sa,
        identity,
        ips,
        node: pod.spec.node_name.clone(),
        locality,
        labels: pod.metadata.labels.clone(),
    })
}

/// The routable EndpointSlices of Service `namespace/name` (labelled with its name).
pub(super) fn slices_of<'a>(store: &'a ConfigStore, namespace: &str, name: &str) -> Vec<&'a EndpointSlice> {
    let from = ObjectKey { kind: Kind::EndpointSlice, namespace: namespace.to_owned(), name: String::new() };
    store
        .objects()
        .range(from..)
        .take_while(|(k, _)| k.kind == Kind::EndpointSlice && k.namespace == namespace)
        .filter_map(|(_, s)| match s.resource.as_ref() {
            Resource::EndpointSlice(slice) if slice.routable() && slice.service() == Some(name) => Some(slice),
            _ => None,
        })
        .collect()
}

/// The locality `labels` give: `istio-locality` (`region.zone.subzone`, as
/// label values cannot hold `/`), else the topology labels. A pod's own
/// labels come first; without them it is in its Node's locality (on
/// Kubernetes the topology labels are the Node's, as Istio reads them).
pub(super) fn locality(labels: &Labels) -> String {
    if let Some(l) = labels.get("istio-locality") {
        return l.replace('.', "/");
    }
    let get = |k: &str| labels.get(k).map_or("", String::as_str);
    let parts =
        [get("topology.kubernetes.io/region"), get("topology.kubernetes.io/zone"), get("topology.istio.io/subzone")];
    if parts.iter().all(|p| p.is_empty()) { String::new() } else { parts.join("/") }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServicePort {
    pub port: u16,
    /// Resolved per endpoint when the service names the port.
    pub target: Option<IntOrString>,
    /// `http`, `http2`, `grpc`, `tcp`, or empty (undeclared: detected).
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Endpoint {
    pub workload: String,
    pub ip: IpAddr,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `name.namespace.svc.cluster.local`, or a ServiceEntry's hosts.
    pub hosts: Vec<String>,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    /// The waypoint it is bound to, if any.
    pub waypoint: Option<WaypointBinding>,
    /// The labels that select its endpoints (empty: none by selector).
    #[serde(skip)]
    pub selector: Labels,
    /// Its DestinationRule's traffic policy, and its subsets'.
    pub traffic_policy: Option<mesh_common::api::TrafficPolicy>,
    pub subset_traffic_policies: BTreeMap<String, mesh_common::api::TrafficPolicy>,
    /// The HTTPLocalRateLimitPolicy that targets it (the first by name).
    pub rate_limit: Option<mesh_common::api::RateLimit>,
    /// The jwtRules of the RequestAuthentications applying at its waypoint.
    pub jwt_rules: Vec<mesh_common::api::JwtRule>,
    /// Tracing at its waypoint (the Telemetry that applies there).
    pub tracing: Option<mesh_common::api::Tracing>,
    /// Access-log and metric rules at its waypoint (Telemetry).
    pub telemetry: Option<mesh_common::api::TelemetryPolicy>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WaypointBinding {
    /// The waypoint Gateway's `namespace/name`.
    pub gateway: String,
    /// Workload uids of its instances; empty when none runs (or the Gateway
    /// is not defined): its clients are refused, never sent around it.
    pub instances: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum MtlsMode {
    /// HBONE or captured plaintext.
    Permissive,
    /// HBONE only.
    Strict,
    /// Plaintext accepted, no mTLS required.
    Disable,
}

/// Everything the controller knows, derived from the configuration in force.
#[derive(Clone, Debug, Default, Serialize)]
///
/// Its maps are persistent (imbl): a copy is O(1), so a change to a few pods
/// ([`Self::with_pods_changed`]) costs those pods' work, not the mesh's.
pub struct MeshModel {
    pub workloads: imbl::OrdMap<String, Workload>,
    pub services: imbl::OrdMap<String, Service>,
    /// Policies the node proxy enforces, by `namespace/name`, with their scope.
    pub policies: imbl::OrdMap<String, ScopedPolicy>,
    peer_authentications: imbl::Vector<PeerAuthentication>,
    /// Telemetry with `accessLogging` or `metrics` (a workload's entry carries its rules).
    pub(super) telemetries: imbl::Vector<crate::config::objects::telemetry::Telemetry>,
    pub root_namespace: String,
    /// Waypoint Gateways by `namespace/name`.
    pub waypoints: imbl::OrdMap<String, Waypoint>,
    /// HTTP routes by service `namespace/name`, in the order they are tried.
    pub routes: imbl::OrdMap<String, Vec<mesh_common::api::HttpRoute>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScopedPolicy {
    /// Which namespaces it covers (`mesh_common::authz::scope_of`).
    #[serde(serialize_with = "scope_name")]
    pub scope: mesh_common::api::Scope,
    /// `None`: every workload of the namespace (or of the mesh, in the root namespace).
    pub selector: Option<Labels>,
    /// Scope TARGETED: what its targetRefs name (enforced by waypoints).
    pub targets: Vec<PolicyTarget>,
    pub policy: CompiledPolicy,
    /// Action CUSTOM: its provider, as MeshConfig defines it (`None` while
    /// undefined: the waypoint denies what the rules match).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ext_authz: Option<mesh_common::api::ExtAuthz>,
}

/// A policy's targetRef: a waypoint's Gateway, a Service (or ServiceEntry),
/// or, from the root namespace, the `istio-waypoint` GatewayClass.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyTarget {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ScopedPolicy {
    /// The node API's form.
    pub fn to_wire(&self) -> mesh_common::api::Authorization {
        let mut wire = self.policy.to_wire(self.scope, self.selector.clone().unwrap_or_default());
        wire.targets = self
            .targets
            .iter()
            .map(|t| mesh_common::api::PolicyTarget {
                kind: t.kind.clone(),
                namespace: t.namespace.clone(),
                name: t.name.clone(),
            })
            .collect();
        wire.ext_authz = self.ext_authz.clone();
        wire
    }
}

fn scope_name<S: serde::Serializer>(scope: &mesh_common::api::Scope, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(scope.as_str_name())
}

static NO_LABELS: Labels = Labels::new();

impl MeshModel {
    pub fn build(store: &ConfigStore, settings: &MeshSettings) -> MeshModel {
        let mut model = MeshModel { root_namespace: settings.root_namespace.clone(), ..Default::default() };
        let mut ambient_namespaces = Vec::new();
        let mut namespace_labels = BTreeMap::new();
        let mut node_localities = BTreeMap::new();
        for stored in store.objects().values() {
            match stored.resource.as_ref() {
                Resource::Namespace(ns) => {
                    if is_ambient(&ns.metadata.labels) {
                        ambient_namespaces.push(ns.metadata.name.clone());
                    }
                    namespace_labels.insert(ns.metadata.name.clone(), ns.metadata.labels.clone());
                }
                Resource::Node(node) => {
                    node_localities.insert(node.metadata.name.as_str(), locality(&node.metadata.labels));
                }
                _ => {}
            }
        }
        model.waypoints = routes::waypoints(store).into();
        let authorizers = super::ext_authz::providers(store, &model.root_namespace);
        for stored in store.objects().values() {
            match stored.resource.as_ref() {
                Resource::Pod(pod) => {
                    let cx = PodContext {
                        trust_domain: &settings.trust_domain,
                        waypoints: &model.waypoints,
                        ambient: &|ns| ambient_namespaces.iter().any(|a| a == ns),
                        node_locality: &|node| node_localities.get(node).cloned(),
                    };
                    if let Some(w) = pod_workload(pod, &cx) {
                        model.workloads.insert(w.uid.clone(), w);
                    }
                }
                Resource::WorkloadEntry(we) => {
                    let namespace = we.metadata.namespace().to_owned();
                    let sa = we.spec.service_account.clone().unwrap_or_else(|| "default".into());
                    let Ok(identity) = SpiffeId::new(&settings.trust_domain, &namespace, &sa) else { continue };
                    let uid = format!("WorkloadEntry/{namespace}/{}", we.metadata.name);
                    let mut labels = we.metadata.labels.clone();
                    labels.extend(we.spec.labels.clone());
                    model.workloads.insert(
                        uid.clone(),
                        Workload {
                            uid,
                            name: we.metadata.name.clone(),
                            workload_name: we.metadata.name.clone(),
                            namespace,
                            service_account: sa,
                            identity,
                            ips: we.spec.address.iter().filter_map(|a| a.parse().ok()).collect(),
                            node: None,
                            locality: we.spec.locality.clone().unwrap_or_else(|| locality(&labels)),
                            labels,
                            captured: false,
                            native_tunnel: false,
                        },
                    );
                }
                Resource::AuthorizationPolicy(ap) => {
                    let policy = super::authz::compile(ap);
                    // Policies with targetRefs belong to waypoints (L7), not to node proxies.
                    let targets: Vec<PolicyTarget> = ap
                        .spec
                        .target_ref
                        .iter()
                        .chain(&ap.spec.target_refs)
                        // A GatewayClass (every waypoint) is a target only from the root namespace.
                        .filter(|t| t.kind != "GatewayClass" || policy.namespace == model.root_namespace)
                        .map(|t| PolicyTarget {
                            kind: t.kind.clone(),
                            namespace: t.namespace.clone().unwrap_or_else(|| policy.namespace.clone()),
                            name: t.name.clone(),
                        })
                        .collect();
                    let targeted = ap.spec.target_ref.is_some() || !ap.spec.target_refs.is_empty();
                    let selector = ap.spec.selector.as_ref().map(|s| s.match_labels.clone()).filter(|l| !l.is_empty());
                    let scope = if !targeted {
                        scope_of(&policy.namespace, &model.root_namespace, selector.is_some())
                    } else {
                        mesh_common::api::Scope::Targeted
                    };
                    model.policies.insert(
                        format!("{}/{}", policy.namespace, policy.name),
                        ScopedPolicy {
                            scope,
                            selector,
                            targets,
                            ext_authz: (policy.action == super::authz::Action::Custom)
                                .then(|| authorizers.get(&policy.provider).cloned())
                                .flatten(),
                            policy,
                        },
                    );
                }
                Resource::PeerAuthentication(pa) => model.peer_authentications.push_back(pa.clone()),
                _ => {}
            }
        }
        for stored in store.objects().values() {
            match stored.resource.as_ref() {
                Resource::Service(svc) => {
                    let namespace = svc.metadata.namespace().to_owned();
                    let vips = svc
                        .spec
                        .cluster_ips
                        .iter()
                        .chain(svc.spec.cluster_ip.iter())
                        .filter_map(|ip| ip.parse().ok())
                        .fold(Vec::new(), |mut v, ip| {
                            if !v.contains(&ip) {
                                v.push(ip);
                            }
                            v
                        });
                    let key = format!("{namespace}/{}", svc.metadata.name);
                    // Without a selector, the Service's EndpointSlices say
                    // where it is, and on which port of each endpoint.
                    let sliced = match &svc.spec.selector {
                        Some(sel) if !sel.is_empty() => None,
                        _ => Some(slices_of(store, &namespace, &svc.metadata.name)),
                    };
                    let endpoints = match (&sliced, &svc.spec.selector) {
                        (Some(sliced), _) => model.sliced_endpoints(&namespace, sliced),
                        (None, Some(sel)) => model.endpoints(&namespace, sel),
                        (None, None) => Vec::new(),
                    };
                    let ports = svc
                        .spec
                        .ports
                        .iter()
                        .map(|p| ServicePort {
                            port: p.port as u16,
                            target: match &sliced {
                                Some(sliced) => {
                                    let name = p.name.as_deref().unwrap_or_default();
                                    let served = sliced.iter().find_map(|s| s.port_named(name));
                                    served.map(|port| IntOrString::Int(port.into())).or_else(|| p.target_port.clone())
                                }
                                None => p.target_port.clone(),
                            },
                            protocol: routes::port_protocol(p.name.as_deref(), p.app_protocol.as_deref()),
                        })
                        .collect();
                    let hosts = vec![format!("{}.{namespace}.svc.{}", svc.metadata.name, settings.trust_domain)];
                    let name = svc.metadata.name.clone();
                    let waypoint = routes::binding(&namespace, &svc.metadata.labels, namespace_labels.get(&namespace))
                        .map(|gateway| model.waypoint_binding(gateway));
                    let selector = svc.spec.selector.clone().unwrap_or_default();
                    let s = Service {
                        namespace,
                        name,
                        hosts,
                        vips,
                        ports,
                        endpoints,
                        waypoint,
                        selector,
                        ..Default::default()
                    };
                    model.services.insert(key, s);
                }
                Resource::ServiceEntry(se) => {
                    let namespace = se.metadata.namespace().to_owned();
                    let vips = se.spec.addresses.iter().filter_map(|a| a.split('/').next()?.parse().ok()).collect();
                    let endpoints = match &se.spec.workload_selector {
                        Some(sel) => model.endpoints(&namespace, &sel.labels),
                        None => se
                            .spec
                            .endpoints
                            .iter()
                            .filter_map(|e| e.address.as_ref()?.parse().ok())
                            .map(|ip| Endpoint { workload: String::new(), ip })
                            .collect(),
                    };
                    let ports = se
                        .spec
                        .ports
                        .iter()
                        .map(|p| ServicePort {
                            port: p.number as u16,
                            target: p.target_port.map(IntOrString::Int),
                            protocol: routes::port_protocol(p.name.as_deref(), p.protocol.as_deref()),
                        })
                        .collect();
                    let key = format!("{namespace}/{}", se.metadata.name);
                    let name = se.metadata.name.clone();
                    let waypoint = routes::binding(&namespace, &se.metadata.labels, namespace_labels.get(&namespace))
                        .map(|gateway| model.waypoint_binding(gateway));
                    let hosts = se.spec.hosts.clone();
                    let selector = se.spec.workload_selector.as_ref().map(|s| s.labels.clone()).unwrap_or_default();
                    let s = Service {
                        namespace,
                        name,
                        hosts,
                        vips,
                        ports,
                        endpoints,
                        waypoint,
                        selector,
                        ..Default::default()
                    };
                    model.services.insert(key, s);
                }
                _ => {}
            }
        }
        let destination_rules = store
            .objects()
            .values()
            .filter_map(|s| match s.resource.as_ref() {
                Resource::DestinationRule(dr) => Some(dr),
                _ => None,
            })
            .collect();
        let cx = routes::Context {
            services: model.services.iter().map(|(k, s)| (k, s.hosts.as_slice())).collect(),
            destination_rules,
        };
        let compiled = routes::compile(store, &cx);
        let policies = routes::traffic_policies(&cx);
        model.routes = compiled.into();
        for (key, (top, subsets)) in policies {
            if let Some(svc) = model.services.get_mut(&key) {
                svc.traffic_policy = Some(top);
                svc.subset_traffic_policies = subsets;
            }
        }
        for stored in store.objects().values() {
            if let Resource::HttpLocalRateLimitPolicy(r) = stored.resource.as_ref() {
                rate_limit(&mut model, r, &settings.trust_domain);
            }
        }
        for stored in store.objects().values() {
            if let Resource::RequestAuthentication(ra) = stored.resource.as_ref() {
                super::jwt::apply(&mut model, ra);
            }
        }
        model.telemetries = super::telemetry::logging_and_metrics(store);
        super::telemetry::apply(&mut model, store);
        super::bypass::guard_waypoint_services(&mut model);
        model
    }

    /// The binding to waypoint `gateway` (`namespace/name`): the Gateway's
    /// instances, when it is a waypoint Gateway for services.
    fn waypoint_binding(&self, gateway: String) -> WaypointBinding {
        let instances = match self.waypoints.get(&gateway) {
            Some(w) if w.for_services() => self.instances_of(w).map(|i| i.uid.clone()).collect(),
            _ => Vec::new(),
        };
        WaypointBinding { gateway, instances }
    }

    /// The pods of waypoint `w`: in its namespace, labelled with its name,
    /// speaking HBONE themselves.
    fn instances_of<'a>(&'a self, w: &'a Waypoint) -> impl Iterator<Item = &'a Workload> + 'a {
        let prefix = format!("Pod/{}/", w.namespace);
        self.workloads
            .range(prefix.clone()..)
            .take_while(move |(k, _)| k.starts_with(&prefix))
            .map(|(_, wl)| wl)
            .filter(|wl| wl.native_tunnel && wl.labels.get(GATEWAY_NAME_LABEL) == Some(&w.name))
    }

    /// The ready endpoints of `slices` (of a Service in `namespace`), each
    /// the workload its `targetRef` names when that workload holds the address.
    pub(super) fn sliced_endpoints(&self, namespace: &str, slices: &[&EndpointSlice]) -> Vec<Endpoint> {
        let mut out: Vec<Endpoint> = Vec::new();
        for endpoint in slices.iter().flat_map(|s| &s.endpoints) {
            if endpoint.conditions.ready == Some(false) {
                continue;
            }
            let named = endpoint.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).and_then(|r| {
                let ns = r.namespace.as_deref().unwrap_or(namespace);
                self.workloads.get(&format!("Pod/{ns}/{}", r.name.as_deref()?))
            });
            for ip in endpoint.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                let workload = named.filter(|w| w.ips.contains(&ip)).map(|w| w.uid.clone()).unwrap_or_default();
                if !out.iter().any(|e| e.ip == ip) {
                    out.push(Endpoint { workload, ip });
                }
            }
        }
        out
    }

    /// Endpoints of the workloads in `namespace` whose labels match `selector`.
    pub(super) fn endpoints(&self, namespace: &str, selector: &Labels) -> Vec<Endpoint> {
        // Workload keys are `<kind>/<namespace>/<name>`: each namespace is a
        // contiguous range per kind, so a service looks only at its own namespace.
        ["Pod", "WorkloadEntry"]
            .iter()
            .flat_map(|kind| {
                let prefix = format!("{kind}/{namespace}/");
                self.workloads.range(prefix.clone()..).take_while(move |(k, _)| k.starts_with(&prefix))
            })
            .map(|(_, w)| w)
            .filter(|w| selector_matches(selector, &w.labels))
            .flat_map(|w| w.ips.iter().map(|ip| Endpoint { workload: w.uid.clone(), ip: *ip }))
            .collect()
    }

    /// The workload that owns `ip`, if any.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.workloads.values().find(|w| w.ips.contains(&ip))
    }

    /// Workloads a node's agent (or a waypoint process joined under that
    /// node name) serves: its captured pods and its waypoint instances.
    pub fn workloads_on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads.values().filter(move |w| (w.captured || w.native_tunnel) && w.node.as_deref() == Some(node))
    }

    /// The running instances (with an address) of each waypoint Gateway
    /// (`namespace/name`).
    pub fn waypoint_instances(&self) -> BTreeMap<String, usize> {
        let running = |w: &Waypoint| self.instances_of(w).filter(|i| !i.ips.is_empty()).count();
        self.waypoints.iter().map(|(key, w)| (key.clone(), running(w))).collect()
    }

    /// Whether `other` has this model's PeerAuthentications (which every
    /// workload's entry for the nodes carries).
    pub fn same_peer_authentications(&self, other: &MeshModel) -> bool {
        self.peer_authentications == other.peer_authentications
    }

    /// Whether the Telemetry that workloads' entries carry is the same.
    pub fn same_telemetries(&self, other: &MeshModel) -> bool {
        self.telemetries == other.telemetries
    }

    /// Workload `w`'s access-log and metric rules at its node proxy.
    pub fn telemetry_for(&self, w: &Workload) -> Option<mesh_common::api::TelemetryPolicy> {
        super::telemetry::for_workload(&self.telemetries, &self.root_namespace, w)
    }

    /// Policies that apply to `w`: mesh-wide ones in the root namespace, and
    /// those of its namespace, unless their selector does not match it.
    pub fn policies_for<'a>(&'a self, w: &'a Workload) -> Vec<&'a CompiledPolicy> {
        self.policies
            .values()
            .filter(move |p| {
                let selector = p.selector.as_ref().unwrap_or(&NO_LABELS);
                in_scope(p.scope, &p.policy.namespace, selector, &w.namespace, &w.labels)
            })
            .map(|p| &p.policy)
            .collect()
    }

    /// The decision for a connection to `destination`.
    pub fn authorize(&self, destination: &Workload, conn: &Connection) -> Decision {
        evaluate(self.policies_for(destination), conn)
    }

    /// PeerAuthentication for `w` on `port`. The most specific setting wins:
    /// workload port-level, then workload, namespace, mesh (root namespace);
    /// UNSET defers to the next. The default is PERMISSIVE, as in Istio.
    pub fn mtls_mode(&self, w: &Workload, port: u16) -> MtlsMode {
        let workload = self.peer_authentication(&w.namespace, Some(w));
        workload
            .and_then(|pa| pa.spec.port_level_mtls.get(&port.to_string()).and_then(|m| mode(m.mode.as_ref())))
            .or_else(|| workload.and_then(|pa| mode(pa.spec.mtls.as_ref()?.mode.as_ref())))
            .or_else(|| {
                self.peer_authentication(&w.namespace, None).and_then(|pa| mode(pa.spec.mtls.as_ref()?.mode.as_ref()))
            })
            .or_else(|| {
                self.peer_authentication(&self.root_namespace, None)
                    .and_then(|pa| mode(pa.spec.mtls.as_ref()?.mode.as_ref()))
            })
            .unwrap_or(MtlsMode::Permissive)
    }

    /// Ports with a mode of their own for `w` (the workload PeerAuthentication's
    /// portLevelMtls), each with the mode that results.
    pub fn mtls_port_modes(&self, w: &Workload) -> BTreeMap<u16, MtlsMode> {
        let Some(pa) = self.peer_authentication(&w.namespace, Some(w)) else { return BTreeMap::new() };
        pa.spec.port_level_mtls.keys().filter_map(|p| p.parse().ok()).map(|p| (p, self.mtls_mode(w, p))).collect()
    }

    /// The PeerAuthentication of `namespace` that selects `w` (`Some`), or the
    /// namespace-wide one (`None`); by name on conflicts, so deterministic.
    fn peer_authentication(&self, namespace: &str, w: Option<&Workload>) -> Option<&PeerAuthentication> {
        self.peer_authentications
            .iter()
            .filter(|pa| pa.metadata.namespace() == namespace)
            .filter(|pa| match (&pa.spec.selector, w) {
                (Some(s), Some(w)) => !s.match_labels.is_empty() && selector_matches(&s.match_labels, &w.labels),
                (None, None) => true,
                (Some(s), None) => s.match_labels.is_empty(),
                (None, Some(_)) => false,
            })
            .min_by(|a, b| a.metadata.name.cmp(&b.metadata.name))
    }
}

fn mode(m: Option<&String>) -> Option<MtlsMode> {
    match m.map(String::as_str) {
        Some("STRICT") => Some(MtlsMode::Strict),
        Some("PERMISSIVE") => Some(MtlsMode::Permissive),
        Some("DISABLE") => Some(MtlsMode::Disable),
        _ => None, // UNSET or absent: inherit
    }
}

/// Kubernetes `matchLabels`: every selector label present with the same value.
/// An empty selector selects everything.
pub fn selector_matches(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// An HTTPLocalRateLimitPolicy onto the Service it targets (a targetRef of
/// another kind was warned about; a Service that does not exist is a
/// reference that takes effect when it appears).
fn rate_limit(model: &mut MeshModel, r: &crate::config::objects::RateLimitPolicy, trust_domain: &str) {
    let ns = r.metadata.namespace();
    let t = &r.spec.target_ref;
    if t.kind != "Service" {
        return;
    }
    let key = format!("{}/{}", t.namespace.as_deref().unwrap_or(ns), t.name);
    let Some(svc) = model.services.get_mut(&key) else { return };
    if svc.rate_limit.is_some() {
        return; // the first policy by name wins
    }
    let rps = |v: i64| u32::try_from(v).unwrap_or(0);
    svc.rate_limit = Some(mesh_common::api::RateLimit {
        policy: format!("{ns}/{}", r.metadata.name),
        total_rps: r.spec.total.as_ref().map_or(0, |l| rps(l.requests_per_second)),
        identity_rps: r.spec.identity.as_ref().map_or(0, |l| rps(l.requests_per_second)),
        overrides: r
            .spec
            .overrides
            .iter()
            .map(|o| mesh_common::api::RateLimitOverride {
                rps: rps(o.requests_per_second),
                identities: o
                    .client_refs
                    .iter()
                    .filter_map(|c| SpiffeId::new(trust_domain, c.namespace.as_deref().unwrap_or(ns), &c.name).ok())
                    .map(|id| id.to_string())
                    .collect(),
            })
            .collect(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_deployments_pods_are_its_workload_in_metrics() {
        let model = super::super::from_yaml(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: reviews-v1-5f9b8c7d4-x2k4z\n  namespace: shop\n  \
             generateName: reviews-v1-5f9b8c7d4-\n  labels: {app: reviews, pod-template-hash: 5f9b8c7d4}\n  \
             ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1-5f9b8c7d4, uid: u, controller: true}]\n\
             spec: {nodeName: n1, serviceAccountName: reviews}\nstatus: {podIPs: [{ip: 10.0.0.7}]}\n",
        );
        let w = &model.workloads["Pod/shop/reviews-v1-5f9b8c7d4-x2k4z"];
        assert_eq!((w.name.as_str(), w.workload_name.as_str()), ("reviews-v1-5f9b8c7d4-x2k4z", "reviews-v1"));
        let wire = crate::distribute::WireSet::from_model(&model);
        let sent = format!("{:?}", wire);
        assert!(sent.contains("workload_name: \"reviews-v1\""), "{sent}");
    }

    #[test]
    fn selectors() {
        let pod = labels(&[("app", "web"), ("version", "v1")]);
        for (selector, want) in [
            (labels(&[]), true),
            (labels(&[("app", "web")]), true),
            (labels(&[("app", "web"), ("version", "v1")]), true),
            (labels(&[("app", "web"), ("version", "v2")]), false),
            (labels(&[("tier", "web")]), false),
        ] {
            assert_eq!(selector_matches(&selector, &pod), want, "{selector:?}");
        }
    }

    use crate::model::from_yaml as model;

    const MESH: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {serviceAccountName: web, nodeName: node1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {serviceAccountName: web, nodeName: node2}
status: {podIP: 10.0.0.2, podIPs: [{ip: 10.0.0.2}, {ip: 'fd00::2'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db, istio.io/dataplane-mode: none}}
spec: {nodeName: node1}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy, labels: {app: web}}
spec: {nodeName: node1}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-deny, namespace: istio-system}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-only, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-policy, namespace: shop}
spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: shop, namespace: shop}
spec: {mtls: {mode: UNSET}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: shop}
spec: {selector: {matchLabels: {app: db}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {'5432': {mode: DISABLE}}}
";

    #[test]
    fn workloads_identities_and_capture() {
        let m = model(MESH);
        let web1 = &m.workloads["Pod/shop/web-1"];
        assert_eq!(web1.identity.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert!(web1.captured);
        assert_eq!(m.workloads["Pod/shop/web-2"].ips.len(), 2, "podIP and podIPs merged");
        assert!(!m.workloads["Pod/shop/db"].captured, "opted out by label");
        assert!(!m.workloads["Pod/legacy/old"].captured, "namespace not ambient");
        assert_eq!(m.workloads["Pod/shop/db"].service_account, "default");
        let on_node1: Vec<&str> = m.workloads_on_node("node1").map(|w| w.uid.as_str()).collect();
        assert_eq!(on_node1, vec!["Pod/shop/web-1"]);
    }

    #[test]
    fn services_select_endpoints_in_their_namespace() {
        let m = model(MESH);
        let web = &m.services["shop/web"];
        assert_eq!(web.vips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        let eps: Vec<String> = web.endpoints.iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(eps, vec!["10.0.0.1", "10.0.0.2", "fd00::2"], "not legacy/old, which has the same labels");
    }

    #[test]
    fn policies_apply_by_namespace_selector_and_root() {
        let m = model(MESH);
        let names = |uid: &str| -> Vec<String> {
            m.policies_for(&m.workloads[uid]).into_iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect()
        };
        assert_eq!(names("Pod/shop/web-1"), vec!["istio-system/mesh-deny", "shop/web-only"]);
        assert_eq!(names("Pod/shop/db"), vec!["istio-system/mesh-deny"]);
        assert_eq!(names("Pod/legacy/old"), vec!["istio-system/mesh-deny"]);
        let l7 = &m.policies["shop/waypoint-policy"];
        assert_eq!(l7.scope, mesh_common::api::Scope::Targeted, "L7 policies are the waypoints', no workload's");
        assert_eq!(
            l7.targets,
            [PolicyTarget { kind: "Gateway".into(), namespace: "shop".into(), name: "waypoint".into() }]
        );
    }

    #[test]
    fn peer_authentication_precedence() {
        let m = model(MESH);
        let w = |uid: &str| &m.workloads[uid];
        for (uid, port, want) in [
            ("Pod/shop/web-1", 80, MtlsMode::Strict),  // namespace UNSET -> mesh STRICT
            ("Pod/shop/db", 80, MtlsMode::Permissive), // workload policy
            ("Pod/shop/db", 5432, MtlsMode::Disable),  // its port-level override
            ("Pod/legacy/old", 80, MtlsMode::Strict),  // mesh-wide
        ] {
            assert_eq!(m.mtls_mode(w(uid), port), want, "{uid}:{port}");
        }
        assert_eq!(model("").mtls_mode(w("Pod/shop/web-1"), 80), MtlsMode::Permissive, "Istio's default");
    }

    #[test]
    fn a_pods_locality_is_its_own_labels_else_its_nodes() {
        let objects = "\
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-1, topology.istio.io/subzone: rack7}}
---
apiVersion: v1
kind: Node
metadata: {name: n2, labels: {topology.kubernetes.io/region: us}}
---
apiVersion: v1
kind: Node
metadata: {name: n3}
";
        let pod = |name: &str, node: &str, labels: &str| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: a, labels: {{{labels}}}}}\n\
                 spec: {{nodeName: {node}}}\nstatus: {{podIP: 10.0.0.1}}\n"
            )
        };
        // (pod, its node, its labels, locality)
        let cases = [
            ("on-n1", "n1", "", "eu/eu-1/rack7"),
            ("on-n2", "n2", "", "us//"),
            ("on-n3", "n3", "", ""),
            ("on-unknown-node", "gone", "", ""),
            ("own-label", "n1", "istio-locality: ap.ap-2", "ap/ap-2"),
            ("own-topology", "n1", "topology.kubernetes.io/zone: z9", "/z9/"),
        ];
        let mut yaml = objects.to_owned();
        for (name, node, labels, _) in cases {
            yaml += &pod(name, node, labels);
        }
        let m = model(&yaml);
        for (name, node, labels, want) in cases {
            assert_eq!(m.workloads[&format!("Pod/a/{name}")].locality, want, "{name} on {node} with {labels:?}");
        }
    }

    #[test]
    fn a_service_without_a_selector_is_where_its_endpoint_slices_say() {
        let m = model(
            "\
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: a, labels: {app: db}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: a}
spec: {clusterIP: 10.96.0.9, ports: [{name: sql, port: 5432, targetPort: 1}, {name: admin, port: 9000}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-x, namespace: a, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: sql, port: 15432}]
endpoints:
- {addresses: [10.0.0.5], targetRef: {kind: Pod, name: db-0}, nodeName: n1}
- {addresses: [192.168.1.7], conditions: {ready: true}}
- {addresses: [192.168.1.8], conditions: {ready: false}}
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {name: db-y, namespace: a, labels: {kubernetes.io/service-name: db}}
addressType: IPv6
endpoints: [{addresses: ['fd00::7'], topology: {kubernetes.io/hostname: n2}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-dns, namespace: a, labels: {kubernetes.io/service-name: db}}
addressType: FQDN
endpoints: [{addresses: [db.example.com]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-elsewhere, namespace: b, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints: [{addresses: [10.9.9.9]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec: {selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-x, namespace: a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.99]}]
",
        );
        let db = &m.services["a/db"];
        let endpoints: Vec<(String, &str)> =
            db.endpoints.iter().map(|e| (e.ip.to_string(), e.workload.as_str())).collect();
        assert_eq!(
            endpoints,
            [("10.0.0.5".to_owned(), "Pod/a/db-0"), ("192.168.1.7".to_owned(), ""), ("fd00::7".to_owned(), "")],
            "ready IP endpoints of its own namespace's slices; not FQDN ones"
        );
        let targets: Vec<_> = db.ports.iter().map(|p| (p.port, p.target.clone())).collect();
        assert_eq!(
            targets,
            [(5432, Some(IntOrString::Int(15432))), (9000, None)],
            "a slice's port for the Service port of its name"
        );
        assert!(m.services["a/web"].endpoints.is_empty(), "a selector's pods, not slices, make a Service's endpoints");
    }
}
