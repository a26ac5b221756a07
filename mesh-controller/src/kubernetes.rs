//! The controller's Kubernetes source: every kind mesh reads, watched on the
//! API server (kube-rs reflectors' watcher), kept as one document per object,
//! and fed to the same parse → validate → store → model pipeline as the YAML
//! directory. Both sources produce the same model from the same objects
//! because past this module they are the same code.
//!
//! Watching is split from deciding: [`Objects`] is the pure state of what the
//! server holds (tested with tables of watch events); [`watch`] is the I/O
//! that feeds it.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use futures::StreamExt as _;
use kube::{
    Api, Client, Discovery, ResourceExt as _,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt as _, watcher},
};
use mesh_config::{Document, Kind, objects::mesh_config::MESH_CONFIG_MAP};

use crate::ca::{CaFiles, SECRET_CERT, SECRET_KEY};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// A client from `--kubeconfig`, or else the usual places (in-cluster
/// service account, `$KUBECONFIG`, `~/.kube/config`).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    mesh_common::kube_client::client(kubeconfig).await.map_err(anyhow::Error::msg)
}

/// Runs `attempt` until it succeeds, backing off from 200 ms to 10 s and
/// saying why each time: for what the controller writes to the API server,
/// whose objects (a namespace, a webhook configuration) may come later.
pub async fn until_done<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        match attempt().await {
            Ok(done) => return done,
            Err(e) => warn!("{what}: not yet: {e:#}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(10));
    }
}

/// Publishes the mesh's trust bundle in the ConfigMap `namespace/name`
/// (key `root-cert.pem`, as Istio's `istio-ca-root-cert`): node agents mount
/// it to verify the controller before they have joined.
pub async fn publish_trust_bundle(client: &Client, namespace: &str, name: &str, pem: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Patch, PatchParams};
    let config_map = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "mesh"}},
        "data": {"root-cert.pem": pem},
    });
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    api.patch(name, &PatchParams::apply("mesh-controller").force(), &Patch::Apply(&config_map)).await?;
    info!(config_map = %format!("{namespace}/{name}"), "trust bundle published");
    Ok(())
}

/// The CA kept in Secret `namespace/name` (Istio's keys, [`CaFiles`]):
/// read when it exists (another replica made it, or the operator did, such
/// as the `cacerts` Secret made for istiod), else made with a new root for
/// `trust_domain`. Replicas starting together race to create it: one
/// creation wins, the others read what it made, so every replica and every
/// restart issues from one root, with no state on the controller's disk.
pub async fn ca_in_secret(client: &Client, namespace: &str, name: &str, trust_domain: &str) -> anyhow::Result<CaFiles> {
    use k8s_openapi::{ByteString, api::core::v1::Secret};
    use kube::api::PostParams;
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let read = |secret: Secret| {
        let data = secret.data.unwrap_or_default();
        let text = data.into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned())).collect();
        CaFiles::from_secret_data(&text).ok_or_else(|| {
            anyhow::anyhow!("Secret {namespace}/{name} has no {SECRET_CERT} and {SECRET_KEY}: not a CA's Secret")
        })
    };
    if let Some(secret) = api.get_opt(name).await? {
        info!(secret = %format!("{namespace}/{name}"), "certificate authority read from its Secret");
        return read(secret);
    }
    let files = CaFiles::new_root(trust_domain)?;
    let data = files.secret_data().into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect();
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([("app.kubernetes.io/part-of".to_owned(), "mesh".to_owned())].into()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(secret = %format!("{namespace}/{name}"), "new root CA created, kept in its Secret");
            Ok(files)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => read(api.get(name).await?),
        Err(e) => Err(e.into()),
    }
}

/// One kind as this API server serves it.
#[derive(Clone, Debug)]
pub struct Served {
    pub kind: Kind,
    pub resource: ApiResource,
}

/// The kinds the server serves, each at the first of mesh's versions it has;
/// and the kinds it does not serve (their CRDs are not installed).
pub async fn discover(client: &Client) -> anyhow::Result<(Vec<Served>, Vec<Kind>)> {
    let groups: BTreeSet<&str> = Kind::all().map(Kind::group).collect();
    let groups: Vec<&str> = groups.into_iter().collect();
    let discovery = Discovery::new(client.clone()).filter(&groups).run().await?;
    let mut served = Vec::new();
    let mut missing = Vec::new();
    for kind in Kind::all() {
        let found = kind.api_versions().iter().find_map(|api_version| {
            let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
            let group = discovery.get(group)?;
            let resources = group.versioned_resources(version);
            resources.into_iter().map(|(r, _)| r).find(|r| r.kind == kind.written())
        });
        match found {
            Some(resource) => served.push(Served { kind, resource }),
            None => missing.push(kind),
        }
    }
    Ok((served, missing))
}

/// What a watcher reports, with its objects already made documents.
#[derive(Debug)]
pub enum Change {
    /// A (re)list of `kind` begins: what it does not list again is gone.
    Relist(Kind),
    Apply(Kind, Document),
    Delete(Kind, Document),
    /// The (re)list of `kind` is complete.
    Listed(Kind),
}

/// How a failed watch is retried: from 0.5 s, doubling, at most 5 s apart
/// (with jitter), the schedule starting over after two quiet minutes.
/// kube's default (client-go's) waits up to 30 s: an API server back from a
/// restart took 15 s to be watched again in the restart test, during which
/// edits did not reach the nodes. Some twenty watches retried every 5 s are
/// no load for a server.
fn retry_schedule() -> impl kube::runtime::utils::Backoff {
    let schedule = backon::ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(500))
        .with_max_delay(std::time::Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    kube::runtime::utils::ResetTimerBackoff::new(
        watcher::ExponentialBackoff::from(schedule),
        std::time::Duration::from_secs(120),
    )
}

/// Who manages an EndpointSlice, and the value of Kubernetes' own controller.
const SLICE_MANAGER_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
const KUBERNETES_SLICE_MANAGER: &str = "endpointslice-controller.k8s.io";

/// Watches every served kind, sending [`Change`]s until the receiver is gone.
/// A failed watch is retried ([`retry_schedule`]) and resumes from its last
/// resourceVersion, or relists when that expired.
pub fn watch(client: Client, served: Vec<Served>, root_namespace: String) -> mpsc::Receiver<Change> {
    let (tx, rx) = mpsc::channel(1024);
    for Served { kind, resource } in served {
        let tx = tx.clone();
        let (api, config) = if kind == Kind::ConfigMap {
            // The one ConfigMap mesh reads: MeshConfig, in the root namespace.
            let api = Api::<DynamicObject>::namespaced_with(client.clone(), &root_namespace, &resource);
            (api, watcher::Config::default().fields(&format!("metadata.name={MESH_CONFIG_MAP}")))
        } else if kind == Kind::EndpointSlice {
            // Not the slices Kubernetes makes for Services with a selector
            // (one per Service, rewritten at each pod change): mesh reads
            // those Services' pods. The rest: written by hand, by other
            // controllers, or mirrored from hand-written Endpoints.
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            (api, watcher::Config::default().labels(&format!("{SLICE_MANAGER_LABEL}!={KUBERNETES_SLICE_MANAGER}")))
        } else {
            (Api::<DynamicObject>::all_with(client.clone(), &resource), watcher::Config::default())
        };
        tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(api, config).backoff(retry_schedule()));
            while let Some(event) = events.next().await {
                let change = match event {
                    Ok(watcher::Event::Init) => Change::Relist(kind),
                    Ok(watcher::Event::InitApply(o) | watcher::Event::Apply(o)) => {
                        Change::Apply(kind, document(kind, &resource, o))
                    }
                    Ok(watcher::Event::Delete(o)) => Change::Delete(kind, document(kind, &resource, o)),
                    Ok(watcher::Event::InitDone) => Change::Listed(kind),
                    Err(e) => {
                        warn!(kind = kind.name(), "watch failed, retrying: {e}");
                        continue;
                    }
                };
                if tx.send(change).await.is_err() {
                    return;
                }
            }
        });
    }
    info!("watching the API server");
    rx
}

/// The object as a document the parser reads: YAML, with the type fields a
/// list's items lack, without `managedFields` (bookkeeping, often larger than
/// the object). Problems name it by its API path, which `kubectl get --raw`
/// reads, and a line of this rendering: keys in alphabetical order, as
/// `kubectl get -o yaml` prints a custom resource, so the lines agree.
pub fn document(kind: Kind, resource: &ApiResource, object: DynamicObject) -> Document {
    let namespace = object.namespace();
    let name = object.name_any();
    let mut value = serde_json::to_value(&object).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), resource.api_version.clone().into());
        map.insert("kind".into(), kind.written().into());
        if let Some(meta) = map.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.remove("managedFields");
        }
        if kind == Kind::Node {
            // Mesh reads a Node's labels only; its status (the images it
            // holds, conditions) is most of it and changes with heartbeats.
            map.remove("spec");
            map.remove("status");
        }
    }
    let text = serde_yaml_ng::to_string(&value).unwrap_or_default();
    let base = if resource.group.is_empty() {
        format!("/api/{}", resource.version)
    } else {
        format!("/apis/{}/{}", resource.group, resource.version)
    };
    let path = match namespace {
        Some(ns) => format!("{base}/namespaces/{ns}/{}/{name}", resource.plural),
        None => format!("{base}/{}/{name}", resource.plural),
    };
    Document { file: PathBuf::from(path), line: 1, text }
}

/// What the API server holds, as documents, by kind. Pure: the watch tasks'
/// changes are applied here in order.
#[derive(Debug, Default)]
pub struct Objects {
    by_kind: BTreeMap<Kind, BTreeMap<PathBuf, Document>>,
    /// Kinds being relisted, with what the relist has shown so far.
    relisting: BTreeMap<Kind, BTreeMap<PathBuf, Document>>,
    /// Kinds listed completely at least once.
    listed: BTreeSet<Kind>,
    /// What changed since [`Self::take_delta`] was last called.
    delta: Delta,
}

/// The documents in force that changed: so one edit costs one object's
/// parsing, not the cluster's.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub changed: BTreeMap<PathBuf, Document>,
    pub removed: BTreeSet<PathBuf>,
    /// A relist replaced a kind's documents: read them all again.
    pub everything: bool,
}

impl Objects {
    /// Applies one change; says whether the documents in force changed.
    pub fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Relist(kind) => {
                self.relisting.insert(kind, BTreeMap::new());
                false
            }
            Change::Apply(kind, doc) => {
                if let Some(list) = self.relisting.get_mut(&kind) {
                    list.insert(doc.file.clone(), doc);
                    return false;
                }
                let docs = self.by_kind.entry(kind).or_default();
                let changed = docs.insert(doc.file.clone(), doc.clone()).as_ref() != Some(&doc);
                if changed {
                    self.delta.removed.remove(&doc.file);
                    self.delta.changed.insert(doc.file.clone(), doc);
                }
                changed
            }
            Change::Delete(kind, doc) => {
                if let Some(list) = self.relisting.get_mut(&kind) {
                    list.remove(&doc.file);
                }
                let removed = self.by_kind.get_mut(&kind).is_some_and(|docs| docs.remove(&doc.file).is_some());
                if removed {
                    self.delta.changed.remove(&doc.file);
                    self.delta.removed.insert(doc.file);
                }
                removed
            }
            Change::Listed(kind) => {
                self.listed.insert(kind);
                let Some(list) = self.relisting.remove(&kind) else { return false };
                let old = self.by_kind.insert(kind, list);
                let changed = old.as_ref() != self.by_kind.get(&kind);
                self.delta.everything |= changed;
                changed
            }
        }
    }

    /// Whether every one of `kinds` has been listed completely: before that,
    /// the model would be built from part of the cluster.
    pub fn listed(&self, kinds: &[Kind]) -> bool {
        kinds.iter().all(|k| self.listed.contains(k))
    }

    /// Every document, in a stable order.
    pub fn documents(&self) -> Vec<Document> {
        self.by_kind.values().flat_map(|docs| docs.values().cloned()).collect()
    }

    /// The documents of the kinds `wanted` says, in a stable order.
    pub fn documents_of(&self, wanted: impl Fn(Kind) -> bool) -> Vec<Document> {
        self.by_kind.iter().filter(|(k, _)| wanted(**k)).flat_map(|(_, docs)| docs.values().cloned()).collect()
    }

    /// What changed since the last call (after a relist: everything).
    pub fn take_delta(&mut self) -> Delta {
        std::mem::take(&mut self.delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(path: &str, text: &str) -> Document {
        Document { file: path.into(), line: 1, text: text.into() }
    }

    #[test]
    fn watch_events_become_the_documents_in_force() {
        use Change::*;
        let pod = Kind::Pod;
        let policy = Kind::AuthorizationPolicy;
        // (change, whether it changes what is in force, the files in force after it)
        let steps: Vec<(Change, bool, &[&str])> = vec![
            (Relist(pod), false, &[]),
            (Apply(pod, doc("p/a", "1")), false, &[]),
            (Apply(pod, doc("p/b", "1")), false, &[]),
            (Listed(pod), true, &["p/a", "p/b"]),
            (Apply(pod, doc("p/a", "1")), false, &["p/a", "p/b"]),
            (Apply(pod, doc("p/a", "2")), true, &["p/a", "p/b"]),
            (Apply(policy, doc("x/p", "1")), true, &["p/a", "p/b", "x/p"]),
            (Delete(pod, doc("p/b", "1")), true, &["p/a", "x/p"]),
            (Delete(pod, doc("p/b", "1")), false, &["p/a", "x/p"]),
            // A relist after a lost watch: p/a is gone, p/c came meanwhile.
            // Nothing changes until the relist is complete.
            (Relist(pod), false, &["p/a", "x/p"]),
            (Apply(pod, doc("p/c", "1")), false, &["p/a", "x/p"]),
            (Listed(pod), true, &["p/c", "x/p"]),
            // A relist that finds what was there changes nothing.
            (Relist(pod), false, &["p/c", "x/p"]),
            (Apply(pod, doc("p/c", "1")), false, &["p/c", "x/p"]),
            (Listed(pod), false, &["p/c", "x/p"]),
        ];
        let mut objects = Objects::default();
        for (i, (change, changed, files)) in steps.into_iter().enumerate() {
            let what = format!("step {i}: {change:?}");
            let (relisted, path) = match &change {
                Listed(_) => (true, None),
                Apply(_, d) | Delete(_, d) => (false, Some(d.file.clone())),
                Relist(_) => (false, None),
            };
            let deleted = matches!(change, Delete(..));
            assert_eq!(objects.apply(change), changed, "{what}");
            let got: Vec<String> = objects.documents().iter().map(|d| d.file.display().to_string()).collect();
            assert_eq!(got, *files, "{what}");
            // The delta names exactly what changed (a relist: everything).
            let delta = objects.take_delta();
            match (changed, relisted, path) {
                (false, _, _) => assert_eq!(delta, Delta::default(), "{what}"),
                (true, true, _) => assert!(delta.everything, "{what}"),
                (true, false, Some(path)) if deleted => assert_eq!(delta.removed, BTreeSet::from([path]), "{what}"),
                (true, false, Some(path)) => {
                    assert_eq!(delta.changed.keys().collect::<Vec<_>>(), [&path], "{what}")
                }
                (true, false, None) => unreachable!("{what}"),
            }
        }
        assert!(objects.listed(&[pod]));
        assert!(!objects.listed(&[pod, policy]), "policies were never listed");
    }

    #[test]
    fn a_listed_object_reads_as_the_same_object_written_by_hand() {
        let resource = ApiResource {
            group: "security.istio.io".into(),
            version: "v1".into(),
            api_version: "security.istio.io/v1".into(),
            kind: "AuthorizationPolicy".into(),
            plural: "authorizationpolicies".into(),
        };
        // As a list returns an item: no type fields, bookkeeping, a status.
        let object: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "deny", "namespace": "shop", "uid": "1", "resourceVersion": "7",
                "managedFields": [{"manager": "kubectl"}], "finalizers": ["x"],
            },
            "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]},
            "status": {"validationMessages": []},
        }))
        .unwrap();
        let doc = document(Kind::AuthorizationPolicy, &resource, object);
        assert_eq!(doc.file, PathBuf::from("/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/deny"));
        assert!(!doc.text.contains("managedFields"), "{}", doc.text);
        let by_hand = doc_of(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: shop}\n\
             spec: {action: DENY, rules: [{to: [{operation: {ports: ['80']}}]}]}\n",
        );
        let (key, resource) = mesh_config::parse_document(&doc).expect("valid");
        let (hand_key, hand_resource) = mesh_config::parse_document(&by_hand).expect("valid");
        assert_eq!((key, resource), (hand_key, hand_resource));
    }

    fn doc_of(text: &str) -> Document {
        doc("by-hand.yaml", text)
    }
}
