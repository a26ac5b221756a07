//! The configuration in force: every valid object, and for every object that
//! broke, its last good version. Applying a new snapshot of the directory
//! reports what changed, so nodes can be sent only that.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    path::PathBuf,
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
    pub valid: Vec<(ObjectKey, Resource, Origin)>,
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
            let read = cache.0.remove(doc).unwrap_or_else(|| read_document(doc));
            next.insert(doc.clone(), read.clone());
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

/// Cloning is cheap: objects are shared (`Arc`).
#[derive(Clone, Debug, Default)]
pub struct ConfigStore {
    objects: BTreeMap<ObjectKey, Stored>,
    problems: Vec<Problem>,
    not_read: Vec<Problem>,
    generation: u64,
}

impl ConfigStore {
    pub fn objects(&self) -> &BTreeMap<ObjectKey, Stored> {
        &self.objects
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
        let mut next: BTreeMap<ObjectKey, Stored> = BTreeMap::new();
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
            next.insert(key, Stored { resource: Arc::new(resource), origin });
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
                Some(old) if old.resource != new.resource => report.updated.push(key.clone()),
                Some(_) => {}
            }
        }
        report.removed = self.objects.keys().filter(|k| !next.contains_key(k)).cloned().collect();
        if report.changed() {
            self.generation += 1;
        }
        self.objects = next;
        self.problems = problems;
        self.not_read = snap.not_read;
        report
    }
}
