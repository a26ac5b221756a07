//! What the controller made of each object, written on the object's own
//! `status` (the leader only), as Istio writes it. Istio's kinds (and
//! mesh's own) get an `Accepted` condition: `False` with the problems when
//! an object got past admission invalid (the webhook was down, or the
//! object predates it), `True` otherwise; `kubectl get -o yaml` then shows
//! why an object has no effect. Gateway API's shapes: a waypoint Gateway
//! gets `Accepted` and `Programmed` (whether instances of it run, which
//! `kubectl get gateway` shows), and an HTTPRoute or GRPCRoute an entry in
//! `status.parents` for each parent mesh serves (a Service, or a waypoint
//! Gateway), under Istio's controller name, other controllers' entries
//! left as they are.
//!
//! Kubernetes' own kinds are not mesh's to mark.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
};

use kube::Client;
use mesh_config::{Document, Problem, WAYPOINT_CLASS};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tracing::{debug, warn};

/// The controller name of route parent entries: the `istio-waypoint`
/// GatewayClass's, whose Gateways and mesh routes mesh serves.
pub const CONTROLLER_NAME: &str = "istio.io/gateway-controller";

const GATEWAY_API: &str = "gateway.networking.k8s.io";

/// One condition mesh sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub kind: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// What mesh writes on an object's status.
#[derive(Clone, Debug, PartialEq)]
pub enum Desired {
    /// `status.conditions`.
    Conditions(Vec<Condition>),
    /// A Route's `status.parents` entries for the parents mesh serves:
    /// each parentRef as the route writes it, with its conditions.
    Parents(Vec<(Value, Vec<Condition>)>),
}

/// The documents whose status mesh writes: what the writer needs to be
/// given of a reload (not the Pods and Services, the bulk of a cluster).
pub fn marked_documents(docs: &[Document]) -> Vec<Document> {
    docs.iter().filter(|d| marked(&d.file)).cloned().collect()
}

/// The API group of the object at `path` (`/apis/<group>/...`).
fn group(path: &Path) -> &str {
    let path = path.to_str().unwrap_or_default();
    path.strip_prefix("/apis/").and_then(|rest| rest.split('/').next()).unwrap_or_default()
}

/// Whether mesh writes the status of the object at this API path.
fn marked(path: &Path) -> bool {
    let group = group(path);
    group.ends_with(".istio.io") || group == "policy.linkerd.io" || group == GATEWAY_API
}

/// The resource (plural) and name at the end of an API path.
fn resource_and_name(path: &Path) -> (&str, &str) {
    let mut parts = path.to_str().unwrap_or_default().rsplit('/');
    let name = parts.next().unwrap_or_default();
    (parts.next().unwrap_or_default(), name)
}

/// The namespace in an API path (`.../namespaces/<ns>/...`).
fn namespace_of(path: &Path) -> &str {
    let path = path.to_str().unwrap_or_default();
    path.split_once("/namespaces/").and_then(|(_, rest)| rest.split('/').next()).unwrap_or_default()
}

/// What each marked object's status should say, from the problems of the
/// latest reload; `in_force`: the paths whose (last good) version is
/// applied; `instances`: the running instances of each waypoint Gateway
/// (`namespace/name`).
pub fn desired(
    docs: &[Document],
    problems: &[Problem],
    in_force: &BTreeSet<PathBuf>,
    instances: &BTreeMap<String, usize>,
) -> Vec<(PathBuf, Desired)> {
    // Only Gateway API's objects are read (parentRefs, gatewayClassName):
    // Istio's kinds, most of what is marked, need only their problems.
    let parsed: Vec<(&Document, Value)> = docs
        .iter()
        .filter(|d| marked(&d.file))
        .map(|d| match group(&d.file) == GATEWAY_API {
            true => (d, serde_yaml_ng::from_str(&d.text).unwrap_or(Value::Null)),
            false => (d, Value::Null),
        })
        .collect();
    // The waypoint Gateways, by `namespace/name`.
    let waypoints: BTreeSet<String> = parsed
        .iter()
        .filter(|(d, v)| {
            group(&d.file) == GATEWAY_API
                && resource_and_name(&d.file).0 == "gateways"
                && v["spec"]["gatewayClassName"] == WAYPOINT_CLASS
        })
        .map(|(d, _)| format!("{}/{}", namespace_of(&d.file), resource_and_name(&d.file).1))
        .collect();
    let mut out = Vec::new();
    for (doc, value) in &parsed {
        let accepted = accepted(doc, problems, in_force);
        if group(&doc.file) != GATEWAY_API {
            out.push((doc.file.clone(), Desired::Conditions(vec![accepted])));
            continue;
        }
        let namespace = namespace_of(&doc.file);
        match resource_and_name(&doc.file) {
            ("gateways", name) if waypoints.contains(&format!("{namespace}/{name}")) => {
                let running = instances.get(&format!("{namespace}/{name}")).copied().unwrap_or(0);
                let programmed = match (accepted.status, running) {
                    (false, _) => Condition {
                        kind: "Programmed",
                        status: false,
                        reason: "Invalid",
                        message: "not accepted".into(),
                    },
                    (true, 0) => Condition {
                        kind: "Programmed",
                        status: false,
                        reason: "NoResources",
                        message: "no instance runs: its clients are refused until one does".into(),
                    },
                    (true, n) => Condition {
                        kind: "Programmed",
                        status: true,
                        reason: "Programmed",
                        message: format!("{n} instance(s) running"),
                    },
                };
                out.push((doc.file.clone(), Desired::Conditions(vec![accepted, programmed])));
            }
            ("httproutes" | "grpcroutes", _) => {
                let parents = value["spec"]["parentRefs"].as_array().cloned().unwrap_or_default();
                let ours: Vec<(Value, Vec<Condition>)> = parents
                    .into_iter()
                    .filter(|p| serves(p, namespace, &waypoints))
                    .map(|p| (p, vec![accepted.clone()]))
                    .collect();
                if !ours.is_empty() {
                    out.push((doc.file.clone(), Desired::Parents(ours)));
                }
            }
            _ => {} // another controller's Gateway, a ReferenceGrant, a GatewayClass
        }
    }
    out
}

/// The `Accepted` condition of the object of `doc`.
fn accepted(doc: &Document, problems: &[Problem], in_force: &BTreeSet<PathBuf>) -> Condition {
    let mine: Vec<String> = problems
        .iter()
        .filter(|p| p.file == doc.file)
        .map(|p| match &p.field {
            Some(field) => format!("{field}: {}", p.message),
            None => p.message.clone(),
        })
        .collect();
    if mine.is_empty() {
        return Condition { kind: "Accepted", status: true, reason: "Accepted", message: "in force".into() };
    }
    let meanwhile = match in_force.contains(&doc.file) {
        true => "the last valid version stays in force",
        false => "no version of it is in force",
    };
    let message = format!("{}; {meanwhile}", mine.join("; "));
    Condition { kind: "Accepted", status: false, reason: "Invalid", message }
}

/// Whether mesh serves the route parent `p` of a route in `namespace`: a
/// Service (a mesh route, GAMMA) or a waypoint Gateway.
fn serves(p: &Value, namespace: &str, waypoints: &BTreeSet<String>) -> bool {
    let text = |k: &str| p[k].as_str();
    let kind = text("kind").unwrap_or("Gateway");
    let group = text("group").unwrap_or(GATEWAY_API);
    let ns = text("namespace").unwrap_or(namespace);
    match (group, kind) {
        ("" | "core", "Service") => true,
        (GATEWAY_API, "Gateway") => waypoints.contains(&format!("{ns}/{}", text("name").unwrap_or_default())),
        _ => false,
    }
}

/// The conditions of `kinds` in a status's `conditions` list, comparably.
fn conditions_in(list: &Value, like: &[Condition]) -> Vec<Condition> {
    like.iter()
        .filter_map(|want| {
            let c = list.as_array()?.iter().find(|c| c["type"] == want.kind)?;
            Some(Condition {
                kind: want.kind,
                status: c["status"] == "True",
                // A reason mesh did not write reads as none of mesh's.
                reason: if c["reason"] == want.reason { want.reason } else { "" },
                message: c["message"].as_str().unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

/// Whether the object of `doc` already says what `want` says.
pub fn up_to_date(doc: &Document, want: &Desired) -> bool {
    let Ok(value) = serde_yaml_ng::from_str::<Value>(&doc.text) else { return false };
    let status = &value["status"];
    match want {
        Desired::Conditions(want) => conditions_in(&status["conditions"], want) == *want,
        Desired::Parents(want) => {
            let ours: Vec<&Value> = status["parents"]
                .as_array()
                .map(|ps| ps.iter().filter(|p| p["controllerName"] == CONTROLLER_NAME).collect())
                .unwrap_or_default();
            ours.len() == want.len()
                && want.iter().zip(ours).all(|((parent, conditions), have)| {
                    have["parentRef"] == *parent && conditions_in(&have["conditions"], conditions) == *conditions
                })
        }
    }
}

/// The object's `metadata.resourceVersion`, as its document says it (a
/// field of `metadata`, indented once, in `kubernetes::document`'s
/// rendering), without parsing the whole object.
fn resource_version(doc: &Document) -> Option<String> {
    let line = doc.text.lines().find(|l| l.starts_with("  resourceVersion:"))?;
    Some(line.split_once(':')?.1.trim().trim_matches(|c| c == '\'' || c == '"').to_owned())
}

/// Writes statuses that differ from what objects carry.
pub struct StatusWriter {
    client: Client,
    /// What was last written, by path, and the resourceVersion it was
    /// written over: a write's own watch event can come after the next
    /// reload, whose document still has that version; a newer version that
    /// does not say it (another writer replaced it) is written again.
    written: Mutex<HashMap<PathBuf, (Desired, Option<String>)>>,
}

impl StatusWriter {
    pub fn new(client: Client) -> StatusWriter {
        StatusWriter { client, written: Mutex::default() }
    }

    /// Brings every marked object's status up to date. A failed write is
    /// said and tried again at the next reload.
    pub async fn update(
        &self,
        docs: &[Document],
        problems: &[Problem],
        in_force: &BTreeSet<PathBuf>,
        instances: &BTreeMap<String, usize>,
    ) {
        let mut written = self.written.lock().await;
        let by_path: HashMap<&PathBuf, &Document> = docs.iter().map(|d| (&d.file, d)).collect();
        written.retain(|path, _| by_path.contains_key(path));
        for (path, want) in desired(docs, problems, in_force, instances) {
            let doc = by_path[&path];
            let version = resource_version(doc);
            let pending = written.get(&path).is_some_and(|(w, v)| *w == want && *v == version);
            if pending || up_to_date(doc, &want) {
                continue;
            }
            match self.write(&path, doc, &want).await {
                Ok(()) => {
                    debug!(object = %path.display(), "status written");
                    written.insert(path, (want, version));
                }
                Err(e) => warn!(object = %path.display(), "cannot write status: {e}"),
            }
        }
    }

    async fn write(&self, path: &Path, doc: &Document, want: &Desired) -> anyhow::Result<()> {
        let value: Value = serde_yaml_ng::from_str(&doc.text).unwrap_or(Value::Null);
        let generation = value["metadata"]["generation"].as_i64();
        let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let conditions = |cs: &[Condition]| -> Vec<Value> {
            cs.iter()
                .map(|c| {
                    json!({
                        "type": c.kind,
                        "status": if c.status { "True" } else { "False" },
                        "reason": c.reason,
                        "message": c.message,
                        "lastTransitionTime": now,
                        "observedGeneration": generation,
                    })
                })
                .collect()
        };
        let status = match want {
            Desired::Conditions(cs) => json!({"conditions": conditions(cs)}),
            Desired::Parents(parents) => {
                // A merge patch replaces the list: other controllers' entries go back in as they were.
                let mut all: Vec<Value> = value["status"]["parents"]
                    .as_array()
                    .map(|ps| ps.iter().filter(|p| p["controllerName"] != CONTROLLER_NAME).cloned().collect())
                    .unwrap_or_default();
                all.extend(parents.iter().map(|(parent, cs)| {
                    json!({"parentRef": parent, "controllerName": CONTROLLER_NAME, "conditions": conditions(cs)})
                }));
                json!({ "parents": all })
            }
        };
        let patch = json!({ "status": status });
        let request = http::Request::patch(format!("{}/status", path.display()))
            .header(http::header::CONTENT_TYPE, "application/merge-patch+json")
            .body(serde_json::to_vec(&patch)?)?;
        self.client.request::<Value>(request).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(file: &str, body: &str) -> Document {
        Document { file: file.into(), line: 1, text: format!("metadata: {{name: x}}\n{body}") }
    }

    fn problem(file: &str, field: &str, message: &str) -> Problem {
        Problem { file: file.into(), line: 3, object: None, field: Some(field.into()), message: message.into() }
    }

    fn accepted(status: bool, message: &str) -> Condition {
        let reason = if status { "Accepted" } else { "Invalid" };
        Condition { kind: "Accepted", status, reason, message: message.into() }
    }

    #[test]
    fn istio_objects_are_marked_accepted_or_invalid_with_their_problems() {
        let policy = "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/p";
        let fresh = "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/new";
        let docs = [
            doc(policy, ""),
            doc(fresh, ""),
            doc("/apis/networking.istio.io/v1/namespaces/shop/virtualservices/ok", ""),
            doc("/api/v1/namespaces/shop/pods/a", ""),
        ];
        let problems = [problem(policy, "spec.action", "bad"), problem(fresh, "spec.rules[0]", "worse")];
        let in_force = BTreeSet::from([PathBuf::from(policy)]);
        let got = desired(&docs, &problems, &in_force, &BTreeMap::new());
        let want = [
            (policy, accepted(false, "spec.action: bad; the last valid version stays in force")),
            (fresh, accepted(false, "spec.rules[0]: worse; no version of it is in force")),
            ("/apis/networking.istio.io/v1/namespaces/shop/virtualservices/ok", accepted(true, "in force")),
        ];
        let want: Vec<(PathBuf, Desired)> =
            want.into_iter().map(|(p, c)| (PathBuf::from(p), Desired::Conditions(vec![c]))).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn waypoint_gateways_and_the_routes_mesh_serves_get_gateway_apis_status() {
        let gw = |name: &str, class: &str| {
            doc(
                &format!("/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/{name}"),
                &format!("spec: {{gatewayClassName: {class}}}\n"),
            )
        };
        let route = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/r";
        let docs = [
            gw("waypoint", WAYPOINT_CLASS),
            gw("idle", WAYPOINT_CLASS),
            gw("ingress", "nginx"),
            doc(
                route,
                "spec:\n  parentRefs:\n  - {group: '', kind: Service, name: web}\n  - {name: waypoint}\n  \
                 - {name: ingress}\n  - {name: waypoint, namespace: elsewhere}\n",
            ),
        ];
        let instances = BTreeMap::from([("shop/waypoint".to_owned(), 2)]);
        let got: BTreeMap<PathBuf, Desired> = desired(&docs, &[], &BTreeSet::new(), &instances).into_iter().collect();
        let programmed =
            |status, reason, message: &str| Condition { kind: "Programmed", status, reason, message: message.into() };
        assert_eq!(
            got[&PathBuf::from("/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/waypoint")],
            Desired::Conditions(vec![
                accepted(true, "in force"),
                programmed(true, "Programmed", "2 instance(s) running")
            ])
        );
        let idle = &got[&PathBuf::from("/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/idle")];
        assert!(matches!(idle, Desired::Conditions(c) if !c[1].status && c[1].reason == "NoResources"), "{idle:?}");
        assert!(
            !got.contains_key(&PathBuf::from("/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/ingress"))
        );
        // The route's parents mesh serves: the Service and the waypoint, not
        // nginx's Gateway nor a Gateway mesh does not know.
        let Desired::Parents(parents) = &got[&PathBuf::from(route)] else { panic!() };
        let names: Vec<&str> = parents.iter().map(|(p, _)| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["web", "waypoint"]);
    }

    #[test]
    fn what_an_object_carries_is_read_back() {
        let policy = "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/p";
        let written = doc(
            policy,
            "status:\n  conditions:\n  - {type: Accepted, status: 'False', reason: Invalid, message: 'spec.action: bad'}\n",
        );
        assert!(up_to_date(&written, &Desired::Conditions(vec![accepted(false, "spec.action: bad")])));
        assert!(!up_to_date(&written, &Desired::Conditions(vec![accepted(true, "in force")])));
        assert!(!up_to_date(&doc(policy, ""), &Desired::Conditions(vec![accepted(true, "in force")])));
        // A route's entry of mesh's, beside another controller's.
        let route = doc(
            "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/r",
            "status:\n  parents:\n  - parentRef: {name: ingress}\n    controllerName: example.net/gw\n    \
             conditions: [{type: Accepted, status: 'True', reason: Accepted, message: ok}]\n  \
             - parentRef: {group: '', kind: Service, name: web}\n    controllerName: istio.io/gateway-controller\n    \
             conditions: [{type: Accepted, status: 'True', reason: Accepted, message: in force}]\n",
        );
        let web = serde_json::json!({"group": "", "kind": "Service", "name": "web"});
        assert!(up_to_date(&route, &Desired::Parents(vec![(web.clone(), vec![accepted(true, "in force")])])));
        assert!(!up_to_date(&route, &Desired::Parents(vec![(web, vec![accepted(false, "bad")])])));
    }

    #[test]
    fn the_resource_version_is_metadatas() {
        let text =
            "apiVersion: v1\nmetadata:\n  labels:\n    resourceVersion: no\n  name: x\n  resourceVersion: '42'\n";
        let d = Document { file: "x".into(), line: 1, text: text.into() };
        assert_eq!(resource_version(&d).as_deref(), Some("42"));
    }
}
