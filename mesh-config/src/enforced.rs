//! What is accepted but not (yet) acted on. Valid Istio and Gateway API YAML
//! is never rejected; where mesh does not enforce an object, it says so with
//! the object's file and line, and what happens instead. The controller logs
//! these and serves them in `/healthz/ready`; `mesh-ctl check` prints them as
//! warnings (exit 0).
use crate::{
    Problem, Resource,
    store::{ConfigStore, ObjectKey},
    validate::WAYPOINT_CLASS,
};

const NO_WAYPOINT_YET: &str = "accepted, not enforced yet: mesh does not run waypoints in this version, so this HTTP routing is not applied \
     and traffic to its hosts keeps the L4 path (the node proxies, with their policies)";

/// Why `resource` is not enforced, when it is not.
pub fn not_enforced(resource: &Resource) -> Option<String> {
    match resource {
        Resource::Gateway(g) if g.spec.gateway_class_name == WAYPOINT_CLASS => Some(NO_WAYPOINT_YET.into()),
        Resource::Gateway(g) => Some(format!(
            "accepted and ignored: gatewayClassName {:?} is another controller's (mesh runs only {WAYPOINT_CLASS:?})",
            g.spec.gateway_class_name
        )),
        Resource::HttpRoute(_) | Resource::VirtualService(_) => Some(NO_WAYPOINT_YET.into()),
        Resource::DestinationRule(_) => {
            Some("accepted, not enforced yet: subsets and traffic policies take effect with waypoints".into())
        }
        Resource::Opaque(o) => {
            Some(format!("accepted, not enforced: mesh does not implement {} yet, so it has no effect", o.kind.name()))
        }
        _ => None,
    }
}

impl ConfigStore {
    /// Every object in force that is accepted but not enforced, as a warning
    /// at its file and line.
    pub fn warnings(&self) -> Vec<Problem> {
        self.objects().keys().filter_map(|key| self.warning(key)).collect()
    }

    /// The warning for one object in force, if it is not enforced.
    pub fn warning(&self, key: &ObjectKey) -> Option<Problem> {
        let stored = self.objects().get(key)?;
        not_enforced(&stored.resource).map(|message| Problem {
            file: stored.origin.file.clone(),
            line: stored.origin.line,
            object: Some(key.to_string()),
            field: None,
            message,
        })
    }
}
