//! The configuration in force: every valid object, and for every object that
//! broke, its last good version. Applying a new snapshot of the directory
//! reports what changed, so nodes can be sent only that.
use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;

use super::{
    Document, Origin, Problem, Resource,
    objects::Kind,
    parse::{Reading, read_document},
};

/// Identity of an object: kind, namespace (empty when cluster-scoped), name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.name(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.name(), self.namespace, self.name)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stored {
    pub resource: Arc<Resource>,
    pub origin: Origin,
}

/// One reading of the configuration source, parsed and validated.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub valid: Vec<(ObjectKey, Arc<Resource>, Origin)>,
    /// Objects that failed, with their key when it could be read.
    pub rejected: Vec<(Option<ObjectKey>, Origin)>,
    pub problems: Vec<Problem>,
    /// Warnings: objects of kinds mesh does not read, which have no effect.
    pub not_read: Vec<Problem>,
}

/// Parse results by document (file, line, text): a reload re-parses only the
/// documents that changed, which keeps edits cheap in large directories.
#[derive(Debug, Default)]
pub struct ParseCache(HashMap<Document, Reading>);

impl Snapshot {
    /// Parses and validates documents (as read by [`super::read_dir`]).
    pub fn from_documents(docs: &[Document], read_problems: Vec<Problem>) -> Snapshot {
        Self::from_documents_cached(docs, read_problems, &mut ParseCache::default())
    }

    /// Like [`Self::from_documents`], reusing `cache` and leaving in it only these documents.
    pub fn from_documents_cached(docs: &[Document], read_problems: Vec<Problem>, cache: &mut ParseCache) -> Snapshot {
        let mut snap = Snapshot { problems: read_problems, ..Default::default() };
        let mut next = HashMap::with_capacity(docs.len());
        for doc in docs {
            let origin = Origin { file: doc.file.clone(), line: doc.line };
            // The cached key is moved over: a document's text is not copied at each reload.
            let (doc, read) = cache.0.remove_entry(doc).unwrap_or_else(|| (doc.clone(), read_document(doc)));
            next.insert(doc, read.clone());
            match read {
                Reading::Object(key, resource) => snap.valid.push((key, resource, origin)),
                Reading::Ignored(warning) => snap.not_read.push(warning),
                Reading::Rejected(key, problems) => {
                    snap.rejected.push((key, origin));
                    snap.problems.extend(problems);
                }
            }
        }
        cache.0 = next;
        snap
    }
}

/// What an [`ConfigStore::apply`] changed.
#[derive(Debug, Default, PartialEq, Serialize)]
pub struct ApplyReport {
    pub added: Vec<ObjectKey>,
    pub updated: Vec<ObjectKey>,
    pub removed: Vec<ObjectKey>,
    /// Objects whose new version was rejected, so the last good one stays.
    pub kept: Vec<ObjectKey>,
}

impl ApplyReport {
    pub fn changed(&self) -> bool {
        !(self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty())
    }
}

/// The objects in force, by key: a persistent map, shared between copies.
pub type Objects = imbl::OrdMap<ObjectKey, Stored>;

/// Cloning is O(1): the maps are persistent and objects are shared (`Arc`);
/// an edit of a copy costs O(log n).
#[derive(Clone, Debug, Default)]
pub struct ConfigStore {
    objects: Objects,
    /// The keys of the objects each file (or API path) holds.
    files: imbl::OrdMap<PathBuf, Vec<ObjectKey>>,
    problems: Vec<Problem>,
    not_read: Vec<Problem>,
    generation: u64,
}

impl ConfigStore {
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// Keeps `key` in the index of `file`'s objects.
    fn index(&mut self, file: &Path, key: &ObjectKey) {
        let keys = self.files.entry(file.to_path_buf()).or_default();
        if !keys.contains(key) {
            keys.push(key.clone());
        }
    }

    /// Takes `key` out of the index of `file`'s objects.
    fn unindex(&mut self, file: &Path, key: &ObjectKey) {
        if let Some(keys) = self.files.get_mut(file) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.files.remove(file);
            }
        }
    }

    /// Problems of the latest snapshot (rejected objects, unreadable files, duplicates).
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// The latest snapshot's objects of kinds mesh does not read (warnings).
    pub fn not_read(&self) -> &[Problem] {
        &self.not_read
    }

    /// Bumped whenever the objects in force change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Makes `snap` the configuration in force, except that an object whose new
    /// version is invalid keeps its last good version, and an object that
    /// vanished from a file with an unreadable document is kept too (it may be
    /// that document).
    pub fn apply(&mut self, snap: Snapshot) -> ApplyReport {
        let mut next: Objects = Objects::new();
        let mut problems = snap.problems;
        for (key, resource, origin) in snap.valid {
            if let Some(first) = next.get(&key) {
                problems.push(Problem {
                    file: origin.file.clone(),
                    line: origin.line,
                    object: Some(key.to_string()),
                    field: Some("metadata.name".into()),
                    message: format!(
                        "duplicate: already defined at {}:{}; this definition is ignored",
                        first.origin.file.display(),
                        first.origin.line
                    ),
                });
                continue;
            }
            next.insert(key, Stored { resource, origin });
        }
        let mut report = ApplyReport::default();
        let unkeyed_files: BTreeSet<PathBuf> =
            snap.rejected.iter().filter(|(k, _)| k.is_none()).map(|(_, o)| o.file.clone()).collect();
        let rejected_keys: BTreeSet<&ObjectKey> = snap.rejected.iter().filter_map(|(k, _)| k.as_ref()).collect();
        for (key, old) in &self.objects {
            if next.contains_key(key) {
                continue;
            }
            if rejected_keys.contains(key) || unkeyed_files.contains(&old.origin.file) {
                next.insert(key.clone(), old.clone());
                report.kept.push(key.clone());
            }
        }
        for (key, new) in &next {
            match self.objects.get(key) {
                None => report.added.push(key.clone()),
                // The parse cache hands an unchanged document's object back as is.
                Some(old) if !Arc::ptr_eq(&old.resource, &new.resource) && old.resource != new.resource => {
                    report.updated.push(key.clone())
                }
                Some(_) => {}
            }
        }
        report.removed = self.objects.keys().filter(|k| !next.contains_key(*k)).cloned().collect();
        if report.changed() {
            self.generation += 1;
        }
        // Keys are unique here: no need for index()'s check.
        let mut files: imbl::OrdMap<PathBuf, Vec<ObjectKey>> = imbl::OrdMap::new();
        for (key, stored) in &next {
            files.entry(stored.origin.file.clone()).or_default().push(key.clone());
        }
        self.files = files;
        self.objects = next;
        self.problems = problems;
        self.not_read = snap.not_read;
        report
    }

    /// Applies a change to some documents of a source whose every document
    /// holds one object at a path of its own (the API server's objects, by
    /// API path): `changed` are read anew, the objects at `removed` paths
    /// go. The outcome of [`Self::apply`] with the whole snapshot, for the
    /// work of the documents named: an invalid new version keeps the last
    /// good one; the problems and warnings of other documents stay.
    pub fn apply_changed(&mut self, changed: &[Document], removed: &[PathBuf]) -> ApplyReport {
        let mut report = ApplyReport::default();
        let touched: BTreeSet<&Path> =
            changed.iter().map(|d| d.file.as_path()).chain(removed.iter().map(PathBuf::as_path)).collect();
        self.problems.retain(|p| !touched.contains(p.file.as_path()));
        self.not_read.retain(|p| !touched.contains(p.file.as_path()));
        let at = |store: &Self, file: &Path| -> Vec<ObjectKey> { store.files.get(file).cloned().unwrap_or_default() };
        for path in removed {
            for key in at(self, path) {
                self.objects.remove(&key);
                self.unindex(path, &key);
                report.removed.push(key);
            }
        }
        for doc in changed {
            let before = at(self, &doc.file);
            match read_document(doc) {
                Reading::Object(key, resource) => {
                    if let Some(other) = self.objects.get(&key).filter(|s| s.origin.file != doc.file) {
                        let message = format!(
                            "duplicate: already defined at {}:{}; this definition is ignored",
                            other.origin.file.display(),
                            other.origin.line
                        );
                        let (object, field) = (Some(key.to_string()), Some("metadata.name".into()));
                        self.problems.push(Problem { file: doc.file.clone(), line: doc.line, object, field, message });
                        continue;
                    }
                    for old in before.iter().filter(|k| **k != key) {
                        self.objects.remove(old);
                        self.unindex(&doc.file, old);
                        report.removed.push(old.clone());
                    }
                    match self.objects.get(&key) {
                        Some(old) if old.resource == resource => continue,
                        Some(_) => report.updated.push(key.clone()),
                        None => report.added.push(key.clone()),
                    }
                    let origin = Origin { file: doc.file.clone(), line: doc.line };
                    self.index(&doc.file, &key);
                    self.objects.insert(key, Stored { resource, origin });
                }
                Reading::Ignored(warning) => {
                    for old in before {
                        self.objects.remove(&old);
                        self.unindex(&doc.file, &old);
                        report.removed.push(old);
                    }
                    self.not_read.push(warning);
                }
                Reading::Rejected(_, problems) => {
                    self.problems.extend(problems);
                    report.kept.extend(before);
                }
            }
        }
        if report.changed() {
            self.generation += 1;
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn pod(name: &str, extra: &str) -> Document {
        Document {
            file: format!("/api/v1/namespaces/shop/pods/{name}").into(),
            line: 1,
            text: format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop{extra}}}\nspec: {{}}\n"
            ),
        }
    }

    fn policy(name: &str, principal: &str) -> Document {
        Document {
            file: format!("/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/{name}").into(),
            line: 1,
            text: format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{rules: [{{from: [{{source: {{principals: ['{principal}']}}}}]}}]}}\n"
            ),
        }
    }

    fn deployment() -> Document {
        Document {
            file: "/apis/apps/v1/namespaces/shop/deployments/web".into(),
            line: 1,
            text: "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n".into(),
        }
    }

    /// What a store holds, comparably.
    fn state(s: &ConfigStore) -> (Vec<(ObjectKey, Stored)>, BTreeSet<String>, BTreeSet<String>) {
        let problems = s.problems().iter().map(ToString::to_string).collect();
        let not_read = s.not_read().iter().map(ToString::to_string).collect();
        (s.objects().iter().map(|(k, v)| (k.clone(), v.clone())).collect(), problems, not_read)
    }

    fn sorted(mut r: ApplyReport) -> ApplyReport {
        for v in [&mut r.added, &mut r.updated, &mut r.removed, &mut r.kept] {
            v.sort();
        }
        r
    }

    /// Each step's changed documents and removed paths applied one by one
    /// give what the whole snapshot after the step gives.
    #[test]
    fn applying_the_changed_documents_equals_applying_the_whole_snapshot() {
        let good = "cluster.local/ns/shop/sa/a";
        // (documents changed, paths removed)
        let steps: Vec<(Vec<Document>, Vec<&str>)> = vec![
            (vec![pod("a", ""), pod("b", ""), policy("p", good)], vec![]),
            // A label: an update.
            (vec![pod("a", ", labels: {app: a}")], vec![]),
            // Only bookkeeping (resourceVersion): no change at all.
            (vec![pod("b", ", resourceVersion: '7'")], vec![]),
            // An invalid new version: the last good one stays, with a problem.
            (vec![policy("p", "not a principal")], vec![]),
            // Valid again: the problem goes.
            (vec![policy("p", "cluster.local/ns/shop/sa/b")], vec![]),
            // A kind mesh does not read: a warning only.
            (vec![deployment(), pod("c", "")], vec![]),
            // Deleted.
            (vec![], vec!["/api/v1/namespaces/shop/pods/a", "/apis/apps/v1/namespaces/shop/deployments/web"]),
            // An invalid first version: nothing in force, a problem.
            (vec![policy("q", "not a principal")], vec![]),
            (vec![], vec!["/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/q"]),
        ];
        let mut whole = ConfigStore::default();
        let mut by_change = ConfigStore::default();
        let mut docs: BTreeMap<PathBuf, Document> = BTreeMap::new();
        for (i, (changed, removed)) in steps.into_iter().enumerate() {
            for d in &changed {
                docs.insert(d.file.clone(), d.clone());
            }
            let removed: Vec<PathBuf> = removed.into_iter().map(PathBuf::from).collect();
            for r in &removed {
                docs.remove(r);
            }
            let all: Vec<Document> = docs.values().cloned().collect();
            let want = sorted(whole.apply(Snapshot::from_documents(&all, Vec::new())));
            let got = sorted(by_change.apply_changed(&changed, &removed));
            assert_eq!(got, want, "step {i}: report");
            assert_eq!(state(&by_change), state(&whole), "step {i}: what is in force");
            assert_eq!(by_change.generation(), whole.generation(), "step {i}: generation");
            for store in [&whole, &by_change] {
                let mut index: BTreeMap<&Path, Vec<&ObjectKey>> = BTreeMap::new();
                for (key, stored) in store.objects() {
                    index.entry(&stored.origin.file).or_default().push(key);
                }
                let indexed: BTreeMap<&Path, Vec<&ObjectKey>> =
                    store.files.iter().map(|(f, keys)| (f.as_path(), keys.iter().collect())).collect();
                assert_eq!(indexed, index, "step {i}: the index of files is the objects'");
            }
        }
        assert!(!whole.objects().is_empty());
    }
}
