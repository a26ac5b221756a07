//! What the node holds from the controller: workloads, services and policies,
//! each with the version the controller gave it. An update is checked whole
//! before any of it is applied: a bad resource rejects the update (NACK) and
//! the node keeps serving what it had. Pure; tested with tables.
use std::{collections::BTreeMap, net::IpAddr};

use mesh_common::{
    api::{self, ResourceKey, resource::Kind},
    authz::CompiledPolicy,
    identity::SpiffeId,
    routing::CompiledRoutes,
};
use serde::Serialize;

#[derive(Debug, Default, Serialize)]
pub struct NodeStore {
    pub version: String,
    pub workloads: BTreeMap<String, api::Workload>,
    pub services: BTreeMap<String, api::Service>,
    pub policies: BTreeMap<String, api::Authorization>,
    /// HTTP routes by service `namespace/name` (a waypoint's).
    pub routes: BTreeMap<String, api::HttpRoutes>,
    /// The workload certificates of nodes removed from the mesh, by node.
    pub revoked: BTreeMap<String, api::Revoked>,
    #[serde(skip)]
    versions: BTreeMap<String, u64>,
}

/// What an applied update changed (for the log).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub upserted: usize,
    pub removed: usize,
}

/// A pod this node must enroll: the controller schedules it here, in an
/// ambient namespace. Where its network namespace is, only the node knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    /// `namespace/name`, as the agent names enrolled pods.
    pub name: String,
    pub identity: SpiffeId,
}

impl NodeStore {
    /// Key -> version of everything held (sent in `Hello` on reconnect).
    pub fn known(&self) -> BTreeMap<String, u64> {
        self.versions.clone()
    }

    pub fn apply(&mut self, update: &api::Update) -> Result<Applied, String> {
        for r in &update.resources {
            check(r).map_err(|e| format!("{}: {e}", r.key))?;
        }
        if update.full {
            *self = NodeStore::default();
        }
        for key in &update.removed {
            self.versions.remove(key);
            match key.parse::<ResourceKey>() {
                Ok(ResourceKey::Workload(n)) => drop(self.workloads.remove(&n)),
                Ok(ResourceKey::Service(n)) => drop(self.services.remove(&n)),
                Ok(ResourceKey::Policy(n)) => drop(self.policies.remove(&n)),
                Ok(ResourceKey::Routes(n)) => drop(self.routes.remove(&n)),
                Ok(ResourceKey::Revoked(n)) => drop(self.revoked.remove(&n)),
                Err(_) => {} // nothing is held under a key that does not parse
            }
        }
        for r in &update.resources {
            // `check` parsed every key above.
            let Ok(key) = r.key.parse::<ResourceKey>() else { continue };
            let name = key.name().to_owned();
            match r.kind.clone() {
                Some(Kind::Workload(w)) => drop(self.workloads.insert(name, w)),
                Some(Kind::Service(s)) => drop(self.services.insert(name, s)),
                Some(Kind::Authorization(p)) => drop(self.policies.insert(name, p)),
                Some(Kind::Routes(r)) => drop(self.routes.insert(name, r)),
                Some(Kind::Revoked(r)) => drop(self.revoked.insert(name, r)),
                None => {}
            }
            self.versions.insert(r.key.clone(), r.version);
        }
        if !update.more {
            self.version = update.version.clone();
        }
        Ok(Applied { upserted: update.resources.len(), removed: update.removed.len() })
    }

    /// Everything held, as the one full update that rebuilds it (each
    /// resource under its key and version): what the node persists.
    pub fn snapshot(&self) -> api::Update {
        let resources = self
            .versions
            .iter()
            .filter_map(|(key, version)| {
                let kind = match key.parse::<ResourceKey>().ok()? {
                    ResourceKey::Workload(n) => Kind::Workload(self.workloads.get(&n)?.clone()),
                    ResourceKey::Service(n) => Kind::Service(self.services.get(&n)?.clone()),
                    ResourceKey::Policy(n) => Kind::Authorization(self.policies.get(&n)?.clone()),
                    ResourceKey::Routes(n) => Kind::Routes(self.routes.get(&n)?.clone()),
                    ResourceKey::Revoked(n) => Kind::Revoked(self.revoked.get(&n)?.clone()),
                };
                Some(api::Resource { key: key.clone(), version: *version, kind: Some(kind) })
            })
            .collect();
        api::Update { version: self.version.clone(), full: true, resources, ..Default::default() }
    }

    /// The pods this node must enroll: captured pods scheduled on `node`.
    pub fn local_pods(&self, node: &str) -> Vec<LocalPod> {
        self.workloads
            .values()
            .filter(|w| w.captured && w.node == node && w.uid.starts_with("Pod/"))
            .filter_map(|w| {
                Some(LocalPod { name: format!("{}/{}", w.namespace, w.name), identity: w.identity.parse().ok()? })
            })
            .collect()
    }
}

impl NodeStore {
    /// The waypoint instances that joined as `node`: workloads that terminate
    /// HBONE themselves, scheduled on `node`.
    pub fn native_tunnels(&self, node: &str) -> Vec<LocalPod> {
        self.workloads
            .values()
            .filter(|w| w.native_tunnel && w.node == node)
            .filter_map(|w| {
                Some(LocalPod { name: format!("{}/{}", w.namespace, w.name), identity: w.identity.parse().ok()? })
            })
            .collect()
    }
}

/// Checks one resource: its key names its kind, addresses and identities
/// parse, and a policy converts into the matchers the proxy evaluates.
fn check(r: &api::Resource) -> Result<(), String> {
    let ip =
        |what: &str, s: &str| s.parse::<IpAddr>().map(drop).map_err(|_| format!("{what} {s:?} is not an IP address"));
    let key: ResourceKey = r.key.parse()?;
    match (&key, &r.kind) {
        (ResourceKey::Workload(_), Some(Kind::Workload(w))) => {
            w.identity.parse::<SpiffeId>().map_err(|e| format!("identity {:?}: {e}", w.identity))?;
            w.ips.iter().try_for_each(|s| ip("workload IP", s))
        }
        (ResourceKey::Service(_), Some(Kind::Service(s))) => {
            s.vips.iter().try_for_each(|v| ip("VIP", v))?;
            s.endpoints.iter().try_for_each(|e| ip("endpoint", &e.ip))
        }
        // Exactly what the proxy will evaluate: a policy it could not read is rejected here.
        (ResourceKey::Policy(_), Some(Kind::Authorization(p))) => CompiledPolicy::from_wire(p).map(drop),
        // Likewise routes: a regex the waypoint could not run is rejected here.
        (ResourceKey::Routes(_), Some(Kind::Routes(r))) => CompiledRoutes::from_wire(r).map(drop),
        (ResourceKey::Revoked(_), Some(Kind::Revoked(r))) => r.certificates.iter().try_for_each(|c| {
            let ok = mesh_common::identity::is_serial_hex(&c.serial);
            if ok { Ok(()) } else { Err(format!("revoked serial {:?} is not lowercase hex", c.serial)) }
        }),
        (_, kind) => Err(format!("key {key} does not match the content {:?}", kind.as_ref().map(kind_name))),
    }
}

fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::Workload(_) => "workload",
        Kind::Service(_) => "service",
        Kind::Authorization(_) => "authorization",
        Kind::Routes(_) => "routes",
        Kind::Revoked(_) => "revoked",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, node: &str, ip: &str) -> api::Resource {
        api::Resource {
            key: format!("workload/Pod/shop/{name}"),
            version: name.len() as u64 + ip.len() as u64,
            kind: Some(Kind::Workload(api::Workload {
                uid: format!("Pod/shop/{name}"),
                name: name.into(),
                namespace: "shop".into(),
                identity: "spiffe://cluster.local/ns/shop/sa/default".into(),
                ips: vec![ip.into()],
                node: node.into(),
                captured: true,
                ..Default::default()
            })),
        }
    }

    fn update(full: bool, resources: Vec<api::Resource>, removed: &[&str]) -> api::Update {
        api::Update {
            nonce: 1,
            version: format!("v{}", resources.len()),
            full,
            resources,
            removed: removed.iter().map(|s| s.to_string()).collect(),
            more: false,
        }
    }

    #[test]
    fn updates() {
        let mut store = NodeStore::default();
        store
            .apply(&update(true, vec![workload("a", "n1", "10.0.0.1"), workload("b", "n2", "10.0.0.2")], &[]))
            .unwrap();
        assert_eq!(store.workloads.len(), 2);
        assert_eq!(store.local_pods("n1").iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["shop/a"]);

        // A delta: one added, one removed.
        store.apply(&update(false, vec![workload("c", "n1", "10.0.0.3")], &["workload/Pod/shop/b"])).unwrap();
        let names: Vec<&str> = store.workloads.keys().map(String::as_str).collect();
        assert_eq!(names, ["Pod/shop/a", "Pod/shop/c"]);
        assert_eq!(store.known().len(), 2);

        // A full snapshot replaces everything.
        store.apply(&update(true, vec![workload("d", "n1", "10.0.0.4")], &[])).unwrap();
        assert_eq!(store.workloads.keys().collect::<Vec<_>>(), ["Pod/shop/d"]);
    }

    #[test]
    fn a_snapshot_rebuilds_the_store_it_was_taken_of() {
        let mut store = NodeStore::default();
        let service = api::Resource {
            key: "service/shop/web".into(),
            version: 7,
            kind: Some(Kind::Service(api::Service { vips: vec!["10.96.0.1".into()], ..Default::default() })),
        };
        let policy = api::Resource {
            key: "policy/shop/p".into(),
            version: 9,
            kind: Some(Kind::Authorization(api::Authorization::default())),
        };
        store.apply(&update(true, vec![workload("a", "n1", "10.0.0.1"), service, policy], &[])).unwrap();
        store.apply(&update(false, vec![workload("b", "n1", "10.0.0.2")], &["policy/shop/p"])).unwrap();

        let snapshot = store.snapshot();
        assert!(snapshot.full && !snapshot.more);
        // A stale store is replaced whole by it.
        let mut restored = NodeStore::default();
        restored.apply(&update(true, vec![workload("stale", "n1", "10.0.0.9")], &[])).unwrap();
        restored.apply(&snapshot).unwrap();
        assert_eq!(restored.known(), store.known());
        assert_eq!(restored.version, store.version);
        assert_eq!(serde_json::to_value(&restored).unwrap(), serde_json::to_value(&store).unwrap());
    }

    #[test]
    fn bad_updates_are_rejected_whole() {
        let mut bad_policy = api::Resource {
            key: "policy/shop/p".into(),
            version: 1,
            kind: Some(Kind::Authorization(api::Authorization {
                rules: vec![api::Rule {
                    from: vec![api::SourceMatch { ip_blocks: vec!["10.0.0.0/40".into()], ..Default::default() }],
                    ..Default::default()
                }],
                ..Default::default()
            })),
        };
        let mut bad_identity = workload("x", "n1", "10.0.0.9");
        if let Some(Kind::Workload(w)) = &mut bad_identity.kind {
            w.identity = "spiffe://cluster.local/ns/UPPER/sa/x".into();
        }
        let mismatched = api::Resource { key: "service/shop/x".into(), ..workload("y", "n1", "10.0.0.8") };
        let revoked = |serial: &str| api::Resource {
            key: "revoked/n2".into(),
            version: 1,
            kind: Some(Kind::Revoked(api::Revoked {
                node: "n2".into(),
                certificates: vec![api::RevokedCertificate { serial: serial.into(), not_after_unix: 1 }],
            })),
        };
        let cases = [
            (revoked("7A:01"), "revoked/n2: revoked serial \"7A:01\" is not lowercase hex"),
            (workload("e", "n1", "10.0.0.300"), "workload/Pod/shop/e: workload IP \"10.0.0.300\""),
            (bad_identity, "workload/Pod/shop/x: identity"),
            (bad_policy.clone(), "policy/shop/p: \"10.0.0.0/40\""),
            (mismatched, "service/shop/x: key service/shop/x does not match"),
        ];
        for (bad, want) in cases {
            let mut store = NodeStore::default();
            store.apply(&update(true, vec![workload("a", "n1", "10.0.0.1")], &[])).unwrap();
            let before = store.known();
            let err = store.apply(&update(false, vec![workload("b", "n1", "10.0.0.2"), bad], &[])).unwrap_err();
            assert!(err.starts_with(want), "{err} should start with {want}");
            assert_eq!(store.known(), before, "nothing of a rejected update is applied");
        }
        if let Some(Kind::Authorization(p)) = &mut bad_policy.kind {
            p.rules[0].from[0].ip_blocks = vec!["10.0.0.0/8".into(), "10.1.2.3".into()];
        }
        NodeStore::default().apply(&update(false, vec![bad_policy], &[])).unwrap();
        let mut store = NodeStore::default();
        store.apply(&update(false, vec![revoked("7a01")], &[])).unwrap();
        assert_eq!(store.revoked["n2"].certificates[0].serial, "7a01");
        assert_eq!(store.snapshot().resources.len(), 1, "persisted with the rest");
    }
}
