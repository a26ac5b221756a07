//! The proxy's state pipeline, as ztunnel has it: source (the controller's
//! stream, written by the control client only) → check and store
//! ([`store::NodeStore`]: an update is checked whole, then applied) → the
//! typed view the data path reads ([`view::MeshView`]: converted once from
//! the wire types, indexed by IP and VIP).
//!
//! Locks: the store's mutex is taken by the writer and by the admin dump,
//! never by a connection. A connection takes the view's lock only to clone
//! an `Arc`; a new view is built under the store's lock, outside it, then
//! swapped in.
#[cfg(test)]
pub(crate) mod fixtures;
pub mod store;
pub mod telemetry_rules;
pub mod view;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, RwLock},
};

use mesh_common::api;

use crate::hbone::tls::Revocations;

use self::{
    store::{Applied, LocalPod, NodeStore},
    view::MeshView,
};

pub struct State {
    store: Mutex<NodeStore>,
    view: RwLock<Arc<MeshView>>,
    /// Counts the views put in force, for those that act on a change
    /// (re-deciding open connections).
    generation: tokio::sync::watch::Sender<u64>,
    /// The revoked certificates of the configuration in force, which the
    /// TLS configs check peers against.
    pub revocations: Arc<Revocations>,
}

impl Default for State {
    fn default() -> Self {
        State {
            store: Mutex::default(),
            view: RwLock::default(),
            generation: tokio::sync::watch::Sender::new(0),
            revocations: Arc::default(),
        }
    }
}

impl State {
    /// The configuration in force (a snapshot: later updates do not change it).
    pub fn view(&self) -> Arc<MeshView> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies one update from the controller. When it completes a
    /// publication (`more` unset), the new view is built and put in force for
    /// new connections. `Err` is the reason to NACK: nothing was applied.
    pub fn apply(&self, update: &api::Update) -> Result<Applied, String> {
        let (view, revoked, applied) = {
            let mut store = self.store();
            let applied = store.apply(update)?;
            if update.more {
                return Ok(applied); // act on the whole, not on a part
            }
            let revoked =
                store.revoked.values().flat_map(|r| r.certificates.iter().map(|c| (c.serial.clone(), r.node.clone())));
            (MeshView::build(&store), revoked.collect(), applied)
        };
        self.revocations.replace(revoked);
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
        self.generation.send_modify(|g| *g += 1);
        Ok(applied)
    }

    /// Told each time a new view is put in force.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Key → version of everything held (sent in `Hello` on reconnect).
    pub fn known(&self) -> BTreeMap<String, u64> {
        self.store().known()
    }

    /// Everything held, as one full update (what the process persists).
    pub fn snapshot(&self) -> api::Update {
        self.store().snapshot()
    }

    /// Whether anything has come from the controller yet.
    pub fn is_empty(&self) -> bool {
        self.store().version.is_empty()
    }

    /// The pods node `node` must enroll.
    pub fn local_pods(&self, node: &str) -> Vec<LocalPod> {
        self.store().local_pods(node)
    }

    /// The addresses the controller gives each of `pods` (`namespace/name`):
    /// their `status.podIPs`; an unparsable one is left out.
    pub fn pod_addresses(&self, pods: &BTreeSet<String>) -> BTreeMap<String, Vec<IpAddr>> {
        let mut found: BTreeMap<String, Vec<IpAddr>> = pods.iter().map(|p| (p.clone(), Vec::new())).collect();
        for w in self.store().workloads.values() {
            if let Some(ips) = w.uid.strip_prefix("Pod/").and_then(|name| found.get_mut(name)) {
                *ips = w.ips.iter().filter_map(|ip| ip.parse().ok()).collect();
            }
        }
        found
    }

    /// Where the controller places pod `namespace/name`: its node, and
    /// whether it is captured; `None` while the controller has not told of it.
    pub fn pod_placement(&self, pod: &str) -> Option<(String, bool)> {
        let uid = format!("Pod/{pod}");
        self.store().workloads.values().find(|w| w.uid == uid).map(|w| (w.node.clone(), w.captured))
    }

    /// The waypoint instances `node` runs.
    pub fn native_tunnels(&self, node: &str) -> Vec<LocalPod> {
        self.store().native_tunnels(node)
    }

    /// What the store holds, for the config dump.
    pub fn dump(&self) -> StoreDump {
        let s = self.store();
        StoreDump {
            version: s.version.clone(),
            workloads: s.workloads.clone(),
            services: s.services.clone(),
            policies: s.policies.clone(),
            routes: s.routes.clone(),
        }
    }

    fn store(&self) -> MutexGuard<'_, NodeStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A copy of the store's resources, by name within their kind.
#[derive(Clone, Debug, Default)]
pub struct StoreDump {
    pub version: String,
    pub workloads: BTreeMap<String, api::Workload>,
    pub services: BTreeMap<String, api::Service>,
    pub policies: BTreeMap<String, api::Authorization>,
    pub routes: BTreeMap<String, api::HttpRoutes>,
}
