//! mesh's configuration: source (files) → parse and validate → store (last good).
//! The controller and `mesh-ctl check` both read configuration through this crate.
pub mod crds;
mod enforced;
mod locate;
pub mod objects;
mod parse;
mod source;
mod store;
mod unmodelled;
mod validate;

use std::{fmt, path::PathBuf};

use serde::Serialize;

pub use enforced::{
    GATEWAY_NAME_LABEL, LOAD_BALANCER_ANNOTATION, PEAK_EWMA, USE_WAYPOINT, USE_WAYPOINT_NAMESPACE, not_enforced,
    resolve_host,
};
pub use objects::{Kind, Resource};
pub use parse::parse_document;
pub use source::{Document, read_dir, split_documents};
pub use store::{ApplyReport, ConfigStore, ObjectKey, Objects, ParseCache, Snapshot, Stored};
pub use validate::{WAYPOINT_CLASS, WAYPOINT_FOR_LABEL};

/// Where an object was defined.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based line where the object's document starts.
    pub line: usize,
}

/// One thing wrong with the configuration, precise enough to fix without searching.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    /// `Kind namespace/name`, when known.
    pub object: Option<String>,
    /// Path of the offending field, e.g. `spec.rules[0].from[0].source.principals[1]`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Configuration that is read once at start-up (flags), not from files.
#[derive(Clone, Debug)]
pub struct MeshSettings {
    /// SPIFFE trust domain of every workload identity.
    pub trust_domain: String,
    /// Policies here without a selector apply mesh-wide (Istio's root namespace).
    pub root_namespace: String,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self { trust_domain: "cluster.local".into(), root_namespace: "istio-system".into() }
    }
}
