//! What the controller sends nodes: the model as versioned resources (pure).
//! Each resource's version is a hash of its encoded content, so versions are
//! the same across controller restarts for the same configuration, and a
//! reconnecting node that says what it holds gets only what differs.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use mesh_common::api::{self, resource::Kind};
use prost::Message as _;

use crate::{
    config::objects::IntOrString,
    model::{MeshModel, MtlsMode, Service, Workload},
    node_api::registry::IssuedCert,
};

/// Every resource a node receives, by key, with the version of the whole.
#[derive(Clone, Debug, Default)]
pub struct WireSet {
    pub resources: BTreeMap<String, Arc<api::Resource>>,
    /// Changes whenever any resource does; stable for the same content.
    pub version: String,
}

/// An update for a node that holds `known` (key -> version).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    pub upserts: Vec<Arc<api::Resource>>,
    pub removed: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removed.is_empty()
    }
}

impl WireSet {
    pub fn from_model(model: &MeshModel) -> WireSet {
        WireSet::from_parts(model, &BTreeMap::new())
    }

    /// The model's resources, and one per removed node listing the workload
    /// certificates it held ([`Registry::revoked_certificates`]).
    ///
    /// [`Registry::revoked_certificates`]: crate::node_api::Registry::revoked_certificates
    pub fn from_parts(model: &MeshModel, revoked: &BTreeMap<String, Vec<IssuedCert>>) -> WireSet {
        let mut resources = BTreeMap::new();
        let mut add = |key: api::ResourceKey, kind: Kind| {
            let mut r = api::Resource { key: key.to_string(), version: 0, kind: Some(kind) };
            r.version = fnv1a(&r.encode_to_vec());
            resources.insert(r.key.clone(), Arc::new(r));
        };
        for (node, certs) in revoked {
            let certificates = certs
                .iter()
                .map(|c| api::RevokedCertificate {
                    serial: c.serial.clone(),
                    not_after_unix: i64::try_from(c.not_after_unix).unwrap_or(i64::MAX),
                })
                .collect();
            add(
                api::ResourceKey::Revoked(node.clone()),
                Kind::Revoked(api::Revoked { node: node.clone(), certificates }),
            );
        }
        for w in model.workloads.values() {
            add(api::ResourceKey::Workload(w.uid.clone()), Kind::Workload(workload(model, w)));
        }
        for (key, s) in &model.services {
            add(api::ResourceKey::Service(key.clone()), Kind::Service(service(s)));
        }
        for (key, p) in &model.policies {
            add(api::ResourceKey::Policy(key.clone()), Kind::Authorization(p.to_wire()));
        }
        for (key, routes) in &model.routes {
            let (namespace, service) = key.split_once('/').unwrap_or_default();
            let wire = api::HttpRoutes { namespace: namespace.into(), service: service.into(), routes: routes.clone() };
            add(api::ResourceKey::Routes(key.clone()), Kind::Routes(wire));
        }
        let mut whole = 0u64;
        for r in resources.values() {
            whole = whole.wrapping_add(fnv1a(r.key.as_bytes()) ^ r.version);
        }
        WireSet { resources, version: format!("{whole:016x}") }
    }

    /// What a node holding `known` lacks, and what it holds that is gone.
    pub fn delta(&self, known: &BTreeMap<String, u64>) -> Delta {
        let upserts = self.resources.values().filter(|r| known.get(&r.key) != Some(&r.version)).cloned().collect();
        let removed = known.keys().filter(|k| !self.resources.contains_key(*k)).cloned().collect();
        Delta { upserts, removed }
    }

    /// What changed from `older` to this set (one merge walk over both).
    pub fn delta_from(&self, older: &WireSet) -> Delta {
        let mut delta = Delta::default();
        let (mut old, mut new) = (older.resources.values().peekable(), self.resources.values().peekable());
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => return delta,
                (Some(o), Some(n)) if o.key == n.key => {
                    if o.version != n.version {
                        delta.upserts.push((*n).clone());
                    }
                    old.next();
                    new.next();
                }
                (Some(o), Some(n)) if o.key < n.key => {
                    delta.removed.push(o.key.clone());
                    old.next();
                }
                (Some(o), None) => {
                    delta.removed.push(o.key.clone());
                    old.next();
                }
                (_, Some(n)) => {
                    delta.upserts.push((*n).clone());
                    new.next();
                }
            }
        }
    }

    /// Key -> version of everything in the set (what a node holds after a full
    /// sync; what a reconnecting node's `Hello` carries).
    pub fn versions(&self) -> BTreeMap<String, u64> {
        self.resources.values().map(|r| (r.key.clone(), r.version)).collect()
    }
}

/// FNV-1a, 64 bits: stable across builds and restarts (unlike std's hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn ips(ips: &[IpAddr]) -> Vec<String> {
    ips.iter().map(ToString::to_string).collect()
}

fn mtls(m: MtlsMode) -> i32 {
    match m {
        MtlsMode::Permissive => api::MtlsMode::Permissive,
        MtlsMode::Strict => api::MtlsMode::Strict,
        MtlsMode::Disable => api::MtlsMode::Disable,
    }
    .into()
}

fn workload(model: &MeshModel, w: &Workload) -> api::Workload {
    api::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        identity: w.identity.to_string(),
        ips: ips(&w.ips),
        node: w.node.clone().unwrap_or_default(),
        captured: w.captured,
        native_tunnel: w.native_tunnel,
        locality: w.locality.clone(),
        labels: w.labels.clone().into_iter().collect(),
        // The default port 0 never carries traffic: this asks for the workload-wide mode.
        mtls_mode: mtls(model.mtls_mode(w, 0)),
        port_mtls: model.mtls_port_modes(w).into_iter().map(|(p, m)| (u32::from(p), mtls(m))).collect(),
    }
}

fn service(s: &Service) -> api::Service {
    api::Service {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        hosts: s.hosts.clone(),
        vips: ips(&s.vips),
        ports: s
            .ports
            .iter()
            .map(|p| {
                let (target_port, target_port_name) = match &p.target {
                    Some(IntOrString::Int(n)) => (u32::try_from(*n).unwrap_or(0), String::new()),
                    Some(IntOrString::String(name)) => (0, name.clone()),
                    None => (0, String::new()),
                };
                api::ServicePort {
                    port: u32::from(p.port),
                    target_port,
                    target_port_name,
                    protocol: p.protocol.clone(),
                }
            })
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .map(|e| api::Endpoint { workload: e.workload.clone(), ip: e.ip.to_string() })
            .collect(),
        traffic_policy: s.traffic_policy.clone(),
        subset_traffic_policies: s.subset_traffic_policies.clone().into_iter().collect(),
        rate_limit: s.rate_limit.clone(),
        jwt_rules: s.jwt_rules.clone(),
        waypoint: s.waypoint.as_ref().map(|w| {
            let (namespace, name) = w.gateway.split_once('/').unwrap_or_default();
            api::WaypointRef { namespace: namespace.into(), name: name.into(), workloads: w.instances.clone() }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigStore, MeshSettings, Snapshot, split_documents};

    fn set(yaml: &str) -> WireSet {
        let docs = split_documents(std::path::Path::new("t.yaml"), yaml);
        let mut store = ConfigStore::default();
        store.apply(Snapshot::from_documents(&docs, vec![]));
        WireSet::from_model(&MeshModel::build(&store, &MeshSettings::default()))
    }

    const BASE: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web, tier: front, version: v1, team: shop}}
spec: {nodeName: n1, serviceAccountName: web}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-evil, namespace: shop}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}], when: [{key: source.ip, values: [10.9.0.0/16]}]}]}
";

    #[test]
    fn deltas() {
        let base = set(BASE);
        let keys: Vec<&str> = base.resources.keys().map(String::as_str).collect();
        assert_eq!(keys, ["policy/shop/deny-evil", "service/shop/web", "workload/Pod/shop/web"]);
        // Same content, same versions (what makes resumption after a restart cheap).
        assert_eq!(set(BASE).version, base.version);
        assert!(set(BASE).delta(&base.versions()).is_empty());

        let with_pod = set(&format!(
            "{BASE}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: db, namespace: shop}}\nspec: {{nodeName: n2}}\n"
        ));
        let d = with_pod.delta(&base.versions());
        let upserted: Vec<&str> = d.upserts.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(upserted, ["workload/Pod/shop/db"], "only the new pod (the service does not select it)");
        assert!(d.removed.is_empty());
        assert_ne!(with_pod.version, base.version);

        let back = base.delta(&with_pod.versions());
        assert!(back.upserts.is_empty());
        assert_eq!(back.removed, ["workload/Pod/shop/db"]);
        // The merge walk between two sets agrees with the map-based delta.
        assert_eq!(with_pod.delta_from(&base), d);
        assert_eq!(base.delta_from(&with_pod), back);
        assert!(base.delta_from(&set(BASE)).is_empty());
        assert_eq!(base.delta_from(&WireSet::default()).upserts.len(), 3);

        let from_nothing = base.delta(&BTreeMap::new());
        assert_eq!(from_nothing.upserts.len(), 3);
    }

    #[test]
    fn wire_form() {
        let s = set(BASE);
        let Some(Kind::Workload(w)) = &s.resources["workload/Pod/shop/web"].kind else { panic!() };
        assert_eq!(w.identity, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!((w.node.as_str(), w.captured, w.ips.as_slice()), ("n1", true, &["10.0.0.1".to_string()][..]));
        assert_eq!(w.mtls_mode, i32::from(api::MtlsMode::Permissive));
        let Some(Kind::Service(svc)) = &s.resources["service/shop/web"].kind else { panic!() };
        assert_eq!((svc.ports[0].port, svc.ports[0].target_port), (80, 8080));
        assert_eq!(svc.endpoints[0].workload, "Pod/shop/web");
        let Some(Kind::Authorization(p)) = &s.resources["policy/shop/deny-evil"].kind else { panic!() };
        assert_eq!((p.action, p.scope), (i32::from(api::Action::Deny), i32::from(api::Scope::Namespace)));
        assert_eq!(p.rules[0].when[0].values, ["10.9.0.0/16"]);
    }
}
