//! What the controller made of each Istio object, written on the object's
//! own `status` (the leader only): an `Accepted` condition, `False` with the
//! problems when an object got past admission invalid (the webhook was
//! down, or the object predates it), `True` otherwise. `kubectl get -o yaml`
//! then shows why an object has no effect, as Istio's status does.
//!
//! Only Istio's and mesh's own kinds: Kubernetes' are not mesh's to mark,
//! and Gateway API's status has a shape of its own (per parent).
use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
};

use kube::Client;
use mesh_config::{Document, Problem};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tracing::{debug, warn};

/// An object's `Accepted` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub accepted: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The documents whose status mesh writes: what the writer needs to be
/// given of a reload (not the Pods and Services, the bulk of a cluster).
pub fn marked_documents(docs: &[Document]) -> Vec<Document> {
    docs.iter().filter(|d| marked(&d.file)).cloned().collect()
}

/// Whether mesh writes the status of the object at this API path.
fn marked(path: &Path) -> bool {
    let path = path.to_string_lossy();
    let Some(rest) = path.strip_prefix("/apis/") else { return false };
    let group = rest.split('/').next().unwrap_or_default();
    group.ends_with(".istio.io") || group == "policy.linkerd.io"
}

/// The condition each marked object should carry, from the problems of the
/// latest reload; `in_force`: the paths whose (last good) version is applied.
pub fn desired(docs: &[Document], problems: &[Problem], in_force: &BTreeSet<PathBuf>) -> Vec<(PathBuf, Accepted)> {
    docs.iter()
        .filter(|d| marked(&d.file))
        .map(|doc| {
            let mine: Vec<String> = problems
                .iter()
                .filter(|p| p.file == doc.file)
                .map(|p| match &p.field {
                    Some(field) => format!("{field}: {}", p.message),
                    None => p.message.clone(),
                })
                .collect();
            let condition = if mine.is_empty() {
                Accepted { accepted: true, reason: "Accepted", message: "in force".into() }
            } else {
                let meanwhile = if in_force.contains(&doc.file) {
                    "the last valid version stays in force"
                } else {
                    "no version of it is in force"
                };
                Accepted { accepted: false, reason: "Invalid", message: format!("{}; {meanwhile}", mine.join("; ")) }
            };
            (doc.file.clone(), condition)
        })
        .collect()
}

/// The `Accepted` condition an object already carries (from its document).
pub fn current(doc: &Document) -> Option<Accepted> {
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&doc.text).ok()?;
    let conditions = value.get("status")?.get("conditions")?.as_sequence()?;
    let c = conditions.iter().find(|c| c.get("type").and_then(|t| t.as_str()) == Some("Accepted"))?;
    let text = |k: &str| c.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let reason = if text("reason") == "Accepted" { "Accepted" } else { "Invalid" };
    Some(Accepted { accepted: text("status") == "True", reason, message: text("message") })
}

/// Writes conditions that differ from what objects carry.
pub struct StatusWriter {
    client: Client,
    /// What was last written, by path: a write's own watch event (a new
    /// resourceVersion) can come before the next reload.
    written: Mutex<HashMap<PathBuf, Accepted>>,
}

impl StatusWriter {
    pub fn new(client: Client) -> StatusWriter {
        StatusWriter { client, written: Mutex::default() }
    }

    /// Brings every marked object's condition up to date. A failed write is
    /// said and tried again at the next reload.
    pub async fn update(&self, docs: &[Document], problems: &[Problem], in_force: &BTreeSet<PathBuf>) {
        let mut written = self.written.lock().await;
        let by_path: HashMap<&PathBuf, &Document> = docs.iter().map(|d| (&d.file, d)).collect();
        written.retain(|path, _| by_path.contains_key(path));
        for (path, condition) in desired(docs, problems, in_force) {
            let doc = by_path[&path];
            // What was written is known without parsing the object again.
            if written.get(&path) == Some(&condition) || current(doc).as_ref() == Some(&condition) {
                continue;
            }
            match self.write(&path, doc, &condition).await {
                Ok(()) => {
                    debug!(object = %path.display(), accepted = condition.accepted, "status written");
                    written.insert(path, condition);
                }
                Err(e) => warn!(object = %path.display(), "cannot write status: {e}"),
            }
        }
    }

    async fn write(&self, path: &Path, doc: &Document, c: &Accepted) -> anyhow::Result<()> {
        let generation = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&doc.text)
            .ok()
            .and_then(|v| v.get("metadata")?.get("generation")?.as_i64());
        let condition = json!({
            "type": "Accepted",
            "status": if c.accepted { "True" } else { "False" },
            "reason": c.reason,
            "message": c.message,
            "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            "observedGeneration": generation,
        });
        let patch = json!({"status": {"conditions": [condition]}});
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

    fn doc(file: &str, status: &str) -> Document {
        Document { file: file.into(), line: 1, text: format!("metadata: {{name: x}}\n{status}") }
    }

    fn problem(file: &str, field: &str, message: &str) -> Problem {
        Problem { file: file.into(), line: 3, object: None, field: Some(field.into()), message: message.into() }
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
            doc("/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/r", ""),
        ];
        let problems = [problem(policy, "spec.action", "bad"), problem(fresh, "spec.rules[0]", "worse")];
        let in_force = BTreeSet::from([PathBuf::from(policy)]);
        let got: Vec<(String, bool, String)> = desired(&docs, &problems, &in_force)
            .into_iter()
            .map(|(p, c)| (p.display().to_string(), c.accepted, c.message))
            .collect();
        assert_eq!(
            got,
            [
                (policy.to_owned(), false, "spec.action: bad; the last valid version stays in force".to_owned()),
                (fresh.to_owned(), false, "spec.rules[0]: worse; no version of it is in force".to_owned()),
                (
                    "/apis/networking.istio.io/v1/namespaces/shop/virtualservices/ok".to_owned(),
                    true,
                    "in force".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn the_condition_an_object_carries_is_read_back() {
        let written = doc(
            "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/p",
            "status:\n  conditions:\n  - {type: Accepted, status: 'False', reason: Invalid, message: 'spec.action: bad'}\n",
        );
        assert_eq!(
            current(&written),
            Some(Accepted { accepted: false, reason: "Invalid", message: "spec.action: bad".into() })
        );
        assert_eq!(current(&doc("/apis/x/v1/y", "")), None);
    }
}
