//! The keys of the resources on the node stream: `workload/<uid>`,
//! `service/<namespace>/<name>`, `policy/<namespace>/<name>`,
//! `routes/<namespace>/<service>`. Built and read
//! only here, by the controller and the node alike.
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKey {
    /// A workload by uid (`Pod/<ns>/<name>`, `WorkloadEntry/<ns>/<name>`).
    Workload(String),
    /// A service (or ServiceEntry) by `namespace/name`.
    Service(String),
    /// An AuthorizationPolicy by `namespace/name`.
    Policy(String),
    /// The HTTP routes of a service, by its `namespace/name`.
    Routes(String),
    /// The revoked certificates of a node removed from the mesh, by its name.
    Revoked(String),
}

impl ResourceKey {
    /// The key's name within its kind (what the node's store is keyed by).
    pub fn name(&self) -> &str {
        match self {
            ResourceKey::Workload(n)
            | ResourceKey::Service(n)
            | ResourceKey::Policy(n)
            | ResourceKey::Routes(n)
            | ResourceKey::Revoked(n) => n,
        }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResourceKey::Workload(n) => write!(f, "workload/{n}"),
            ResourceKey::Service(n) => write!(f, "service/{n}"),
            ResourceKey::Policy(n) => write!(f, "policy/{n}"),
            ResourceKey::Routes(n) => write!(f, "routes/{n}"),
            ResourceKey::Revoked(n) => write!(f, "revoked/{n}"),
        }
    }
}

impl std::str::FromStr for ResourceKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some(("workload", n)) if !n.is_empty() => Ok(ResourceKey::Workload(n.into())),
            Some(("service", n)) if !n.is_empty() => Ok(ResourceKey::Service(n.into())),
            Some(("policy", n)) if !n.is_empty() => Ok(ResourceKey::Policy(n.into())),
            Some(("routes", n)) if !n.is_empty() => Ok(ResourceKey::Routes(n.into())),
            Some(("revoked", n)) if !n.is_empty() => Ok(ResourceKey::Revoked(n.into())),
            Some((prefix, _)) => {
                Err(format!("key prefix {prefix:?} is not workload, service, policy, routes or revoked"))
            }
            None => Err("key without a kind prefix".into()),
        }
    }
}

impl super::Workload {
    /// Whether the node proxies reach this workload over HBONE: exactly when
    /// it is captured (in an ambient namespace and not opted out) or
    /// terminates HBONE itself (a waypoint). Anything else is reached in plain TCP.
    pub fn speaks_hbone(&self) -> bool {
        self.captured || self.native_tunnel
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for key in [
            ResourceKey::Workload("Pod/shop/a".into()),
            ResourceKey::Service("shop/back".into()),
            ResourceKey::Policy("istio-system/deny".into()),
            ResourceKey::Routes("shop/back".into()),
            ResourceKey::Revoked("node1".into()),
        ] {
            assert_eq!(key.to_string().parse::<ResourceKey>(), Ok(key));
        }
        for (bad, want) in [("pod/x", "key prefix \"pod\""), ("workload", "without a kind"), ("service/", "prefix")] {
            assert!(bad.parse::<ResourceKey>().unwrap_err().contains(want), "{bad}");
        }
    }
}
