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
    /// Persistent (imbl): a successor set shares what did not change.
    pub resources: imbl::OrdMap<String, Arc<api::Resource>>,
    /// Changes whenever any resource does; stable for the same content.
    pub version: String,
    /// The sum `version` is written from (commutative: kept up to date
    /// entry by entry).
    sum: u64,
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
        let mut set = Changes::from(&WireSet::default());
        set.revoked(revoked);
        for w in model.workloads.values() {
            set.put(workload_key(w), Kind::Workload(workload(model, w)));
        }
        for (key, s) in &model.services {
            set.put(service_key(key), Kind::Service(service(s)));
        }
        for (key, p) in &model.policies {
            set.put(policy_key(key), Kind::Authorization(p.to_wire()));
        }
        for (key, routes) in &model.routes {
            set.put(routes_key(key), routes_wire(key, routes));
        }
        set.done().0
    }

    /// The set of `new`, the model that followed `old` (this set's), and the
    /// delta from this set to it: only what differs is encoded again, and
    /// imbl's diff skips what the two models share, so a change to a few
    /// pods costs their entries, not the mesh's. Equal to [`Self::from_parts`]
    /// and [`Self::delta_from`] (a table test holds them so).
    pub fn next(
        &self,
        old: &MeshModel,
        new: &MeshModel,
        revoked: &BTreeMap<String, Vec<IssuedCert>>,
    ) -> (WireSet, Delta) {
        use imbl::ordmap::DiffItem;
        let mut set = Changes::from(self);
        set.revoked(revoked);
        // A workload's entry carries its PeerAuthentication modes and Telemetry rules.
        if old.same_peer_authentications(new) && old.same_telemetries(new) {
            for item in old.workloads.diff(&new.workloads) {
                match item {
                    DiffItem::Add(_, w) | DiffItem::Update { new: (_, w), .. } => {
                        set.put(workload_key(w), Kind::Workload(workload(new, w)))
                    }
                    DiffItem::Remove(_, w) => set.remove(&workload_key(w)),
                }
            }
        } else {
            for w in old.workloads.values().filter(|w| !new.workloads.contains_key(&w.uid)) {
                set.remove(&workload_key(w));
            }
            for w in new.workloads.values() {
                set.put(workload_key(w), Kind::Workload(workload(new, w)));
            }
        }
        for item in old.services.diff(&new.services) {
            match item {
                DiffItem::Add(key, s) | DiffItem::Update { new: (key, s), .. } => {
                    set.put(service_key(key), Kind::Service(service(s)))
                }
                DiffItem::Remove(key, _) => set.remove(&service_key(key)),
            }
        }
        for item in old.policies.diff(&new.policies) {
            match item {
                DiffItem::Add(key, p) | DiffItem::Update { new: (key, p), .. } => {
                    set.put(policy_key(key), Kind::Authorization(p.to_wire()))
                }
                DiffItem::Remove(key, _) => set.remove(&policy_key(key)),
            }
        }
        for item in old.routes.diff(&new.routes) {
            match item {
                DiffItem::Add(key, r) | DiffItem::Update { new: (key, r), .. } => {
                    set.put(routes_key(key), routes_wire(key, r))
                }
                DiffItem::Remove(key, _) => set.remove(&routes_key(key)),
            }
        }
        set.done()
    }

    /// What a node holding `known` lacks, and what it holds that is gone.
    pub fn delta(&self, known: &BTreeMap<String, u64>) -> Delta {
        let upserts = self.resources.values().filter(|r| known.get(&r.key) != Some(&r.version)).cloned().collect();
        let removed = known.keys().filter(|k| !self.resources.contains_key(*k)).cloned().collect();
        Delta { upserts, removed }
    }

    /// What changed from `older` to this set (imbl's diff: what the two
    /// sets share is skipped).
    pub fn delta_from(&self, older: &WireSet) -> Delta {
        use imbl::ordmap::DiffItem;
        let mut delta = Delta::default();
        for item in older.resources.diff(&self.resources) {
            match item {
                DiffItem::Add(_, r) => delta.upserts.push(r.clone()),
                DiffItem::Update { old: (_, o), new: (_, n) } if o.version != n.version => {
                    delta.upserts.push(n.clone())
                }
                DiffItem::Update { .. } => {}
                DiffItem::Remove(key, _) => delta.removed.push(key.clone()),
            }
        }
        delta
    }

    /// Key -> version of everything in the set (what a node holds after a full
    /// sync; what a reconnecting node's `Hello` carries).
    pub fn versions(&self) -> BTreeMap<String, u64> {
        self.resources.values().map(|r| (r.key.clone(), r.version)).collect()
    }
}

/// A set being made from another: its resources, its version's sum, and
/// what changed (the delta from the set it started from).
struct Changes {
    resources: imbl::OrdMap<String, Arc<api::Resource>>,
    sum: u64,
    delta: Delta,
}

impl From<&WireSet> for Changes {
    fn from(set: &WireSet) -> Self {
        Changes { resources: set.resources.clone(), sum: set.sum, delta: Delta::default() }
    }
}

impl Changes {
    /// Sets the resource at `key` to `kind`, versioned by its encoding.
    fn put(&mut self, key: api::ResourceKey, kind: Kind) {
        let mut r = api::Resource { key: key.to_string(), version: 0, kind: Some(kind) };
        r.version = fnv1a(&r.encode_to_vec());
        if let Some(old) = self.resources.get(&r.key) {
            if old.version == r.version {
                return;
            }
            self.sum = self.sum.wrapping_sub(contribution(old));
        }
        self.sum = self.sum.wrapping_add(contribution(&r));
        let r = Arc::new(r);
        self.delta.upserts.push(r.clone());
        self.resources.insert(r.key.clone(), r);
    }

    fn remove(&mut self, key: &api::ResourceKey) {
        if let Some(old) = self.resources.remove(&key.to_string()) {
            self.sum = self.sum.wrapping_sub(contribution(&old));
            self.delta.removed.push(old.key.clone());
        }
    }

    /// One entry per removed node, listing the workload certificates it held
    /// ([`Registry::revoked_certificates`]); the entries of nodes no longer
    /// listed go.
    ///
    /// [`Registry::revoked_certificates`]: crate::node_api::Registry::revoked_certificates
    fn revoked(&mut self, revoked: &BTreeMap<String, Vec<IssuedCert>>) {
        let gone: Vec<String> = self
            .resources
            .values()
            .filter_map(|r| match &r.kind {
                Some(Kind::Revoked(v)) if !revoked.contains_key(&v.node) => Some(v.node.clone()),
                _ => None,
            })
            .collect();
        for node in gone {
            self.remove(&api::ResourceKey::Revoked(node));
        }
        for (node, certs) in revoked {
            let certificates = certs
                .iter()
                .map(|c| api::RevokedCertificate {
                    serial: c.serial.clone(),
                    not_after_unix: i64::try_from(c.not_after_unix).unwrap_or(i64::MAX),
                })
                .collect();
            let wire = api::Revoked { node: node.clone(), certificates };
            self.put(api::ResourceKey::Revoked(node.clone()), Kind::Revoked(wire));
        }
    }

    fn done(self) -> (WireSet, Delta) {
        let version = format!("{:016x}", self.sum);
        (WireSet { resources: self.resources, version, sum: self.sum }, self.delta)
    }
}

/// What one resource adds to its set's version.
fn contribution(r: &api::Resource) -> u64 {
    fnv1a(r.key.as_bytes()) ^ r.version
}

fn workload_key(w: &Workload) -> api::ResourceKey {
    api::ResourceKey::Workload(w.uid.clone())
}

fn service_key(key: &str) -> api::ResourceKey {
    api::ResourceKey::Service(key.to_owned())
}

fn policy_key(key: &str) -> api::ResourceKey {
    api::ResourceKey::Policy(key.to_owned())
}

fn routes_key(key: &str) -> api::ResourceKey {
    api::ResourceKey::Routes(key.to_owned())
}

fn routes_wire(key: &str, routes: &[api::HttpRoute]) -> Kind {
    let (namespace, service) = key.split_once('/').unwrap_or_default();
    Kind::Routes(api::HttpRoutes { namespace: namespace.into(), service: service.into(), routes: routes.to_vec() })
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
        telemetry: model.telemetry_for(w),
        workload_name: w.workload_name.clone(),
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
        tracing: s.tracing.clone(),
        telemetry: s.telemetry.clone(),
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

    /// Each model of a sequence (changed by pods, so sharing most of the one
    /// before, or built anew) makes by [`WireSet::next`] the set and the
    /// delta that building its set whole gives.
    #[test]
    fn the_next_set_is_the_set_built_anew() {
        use crate::config::Document;
        let doc = |path: &str, text: &str| Document { file: path.into(), line: 1, text: text.into() };
        let pod = |name: &str, labels: &str, ip: &str| {
            doc(
                &format!("pods/{name}"),
                &format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{{labels}}}}}\n\
                     spec: {{nodeName: n1}}\nstatus: {{podIP: {ip}}}\n"
                ),
            )
        };
        let peer_auth = |mode: &str| {
            doc(
                "pa",
                &format!(
                    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                     metadata: {{name: default, namespace: shop}}\nspec: {{mtls: {{mode: {mode}}}}}\n"
                ),
            )
        };
        let revoked = |serials: &[&str]| -> BTreeMap<String, Vec<IssuedCert>> {
            match serials {
                [] => BTreeMap::new(),
                _ => BTreeMap::from([(
                    "gone-node".to_owned(),
                    serials.iter().map(|s| IssuedCert { serial: (*s).into(), not_after_unix: 9 }).collect(),
                )]),
            }
        };
        let base: Vec<Document> = BASE.split("---").enumerate().map(|(i, t)| doc(&format!("base/{i}"), t)).collect();
        /// What, documents changed, paths removed, serials of a removed node.
        type Step<'a> = (&'a str, Vec<Document>, Vec<&'a str>, &'a [&'a str]);
        let steps: Vec<Step> = vec![
            ("a pod", vec![pod("web-2", "app: web", "10.0.0.2")], vec![], &[]),
            ("a pod of no service", vec![pod("job", "app: job", "10.0.0.3")], vec![], &[]),
            ("a node removed", vec![], vec![], &["aa", "bb"]),
            ("relabelled", vec![pod("web-2", "app: job", "10.0.0.2")], vec![], &["aa", "bb"]),
            ("a PeerAuthentication: every workload's entry", vec![peer_auth("STRICT")], vec![], &["aa"]),
            ("deleted", vec![], vec!["pods/job"], &[]),
            ("the policy deleted", vec![], vec!["base/3"], &[]),
        ];
        let settings = MeshSettings::default();
        let mut store = ConfigStore::default();
        store.apply_changed(&base, &[]);
        let mut model = MeshModel::build(&store, &settings);
        let mut wire = WireSet::from_model(&model);
        let sorted = |mut d: Delta| {
            d.upserts.sort_by(|a, b| a.key.cmp(&b.key));
            d.removed.sort();
            d
        };
        for (what, changed, removed, serials) in steps {
            let removed: Vec<std::path::PathBuf> = removed.into_iter().map(Into::into).collect();
            let report = store.apply_changed(&changed, &removed);
            let next_model = model
                .with_pods_changed(&store, &settings, &report)
                .unwrap_or_else(|| MeshModel::build(&store, &settings));
            let whole = WireSet::from_parts(&next_model, &revoked(serials));
            let (next, delta) = wire.next(&model, &next_model, &revoked(serials));
            assert_eq!(next.version, whole.version, "{what}: version");
            assert_eq!(next.versions(), whole.versions(), "{what}: resources");
            assert_eq!(sorted(delta.clone()), whole.delta_from(&wire), "{what}: delta");
            assert!(!delta.is_empty(), "{what}: something changed");
            (model, wire) = (next_model, next);
        }
    }
}
