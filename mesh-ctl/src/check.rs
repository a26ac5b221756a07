//! `mesh-ctl check PATH...`: the controller's own reading of configuration
//! files (the same parser, validator and duplicate detection), offline.
use std::{fmt::Write as _, path::PathBuf};

use mesh_config::{ConfigStore, Problem, Snapshot, read_dir, split_documents};
use serde_json::json;

use crate::{
    api::{CtlError, Result},
    output::Report,
};

pub fn check(paths: &[PathBuf]) -> Result<Report> {
    let mut docs = Vec::new();
    let mut read_problems = Vec::new();
    for path in paths {
        if path.is_dir() {
            let (d, p) = read_dir(path);
            docs.extend(d);
            read_problems.extend(p);
        } else {
            let text = std::fs::read_to_string(path).map_err(|e| {
                CtlError::new(format!("cannot read {}: {e}", path.display()))
                    .hint("give YAML files or directories of them")
            })?;
            docs.extend(split_documents(path, &text));
        }
    }
    let files: std::collections::BTreeSet<&PathBuf> = docs.iter().map(|d| &d.file).collect();
    let files = files.len();
    let mut store = ConfigStore::default();
    store.apply(Snapshot::from_documents(&docs, read_problems));
    let problems: &[Problem] = store.problems();
    let mut text = String::new();
    for p in problems {
        let _ = writeln!(text, "{p}");
    }
    let warnings = store.warnings();
    for w in &warnings {
        let _ = writeln!(text, "warning: {w}");
    }
    let objects = store.objects().len();
    if problems.is_empty() {
        let _ = writeln!(text, "ok: {objects} objects in {files} files, no problems, {} warnings", warnings.len());
    } else {
        let _ = writeln!(text, "{} problems; {objects} valid objects in {files} files", problems.len());
    }
    let mut report =
        Report::new(json!({ "files": files, "objects": objects, "problems": problems, "warnings": warnings }), text);
    report.failed = !problems.is_empty();
    Ok(report)
}
