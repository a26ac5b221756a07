//! The typed documents of the admin and debug APIs: what the node's
//! `/config_dump` and the controller's `/debug/nodes` serve, and what
//! `mesh-ctl` reads back. One definition on both ends, so a field renamed on
//! one side cannot silently vanish on the other.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A pod as the node's admin API takes it (`POST /pods`, `PUT /netns`):
/// what a caller (the CLI, a CNI hook) asks to enroll or reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    /// `namespace/name` of the pod.
    pub name: String,
    /// Path of the pod's network namespace: `/run/netns/NAME` or `/proc/PID/ns/net`.
    pub netns: std::path::PathBuf,
}

/// A pod name the node accepts: `namespace/name`, each part a DNS-style
/// name (letters, digits, `-`, `.`; 1 to 253 characters).
pub fn valid_pod_name(name: &str) -> bool {
    let valid_part = |p: &str| {
        !p.is_empty() && p.len() <= 253 && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    name.split_once('/').is_some_and(|(ns, pod)| valid_part(ns) && valid_part(pod))
}

/// Whether a caller of an admin API is on this host: on loopback, or
/// calling from the very address it called (Linux drops packets from
/// outside that claim a local source, so only a local process can connect
/// that way). The node's and the controller's admin APIs take changes only
/// from such callers.
pub fn is_local_caller(remote: std::net::IpAddr, local: Option<std::net::IpAddr>) -> bool {
    let remote = remote.to_canonical();
    remote.is_loopback() || local.is_some_and(|l| l.to_canonical() == remote)
}

/// A node as the controller sees it (for `/debug/nodes`, metrics and `mesh-ctl status`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    pub connected: bool,
    /// The node's admin API, as it announced it (empty: loopback only).
    pub admin_addr: String,
    /// `waypoint` for a waypoint instance; empty for a node agent.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub role: String,
    /// Where the controller scrapes its metrics for the service graph (empty: it does not).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub metrics_addr: String,
    pub version_sent: String,
    pub version_acked: String,
    pub last_push_unix: u64,
    pub pushes: u64,
    pub nacks: u64,
    pub last_nack: Option<String>,
    /// Resources sent in the first update of the latest stream (0: resumed in sync).
    pub resync_resources: usize,
    /// When its stream ended (0 while connected): it serves the configuration
    /// it acknowledged last, and renews no certificate, until it is back.
    #[serde(default)]
    pub disconnected_unix: u64,
}

/// The controller's `/debug/nodes`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeList {
    /// The configuration version the controller publishes now.
    pub version: String,
    pub nodes: BTreeMap<String, NodeStatus>,
}

/// What the config dump shows of a certificate (never the key).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertView {
    pub identity: String,
    pub serial: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    pub renew_at_unix: i64,
    /// Certificates from the leaf's issuer up to the root.
    pub chain_len: usize,
    /// Subjects from the leaf's issuer up to the root.
    pub chain: Vec<String>,
    /// Each signature checks against its issuer's key, up to the self-signed
    /// root the controller gave; else why not.
    pub chain_verified: Result<(), String>,
}

/// A node's `GET /config_dump`: what it enrolled, what it put in the kernel,
/// what the controller gave it and what the proxy enforces.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConfigDump {
    /// The agent's instance name.
    pub instance: String,
    pub pods: Vec<PodView>,
    pub dataplane: DataplaneStatus,
    /// The controller channel; the fields below it are set only with a controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<ControlStatus>,
    /// The configuration version the node holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// By name within their kind (a workload's uid, `namespace/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads: Option<BTreeMap<String, crate::api::Workload>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<BTreeMap<String, crate::api::Service>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<BTreeMap<String, crate::api::Authorization>>,
    /// HTTP routes by service (what the waypoints route by).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<BTreeMap<String, crate::api::HttpRoutes>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<Vec<CertView>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_certificate: Option<CertView>,
    pub hbone_pool: PoolStats,
    pub proxy: ProxyStatus,
}

/// An enrolled pod.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodView {
    pub name: String,
    pub netns: std::path::PathBuf,
    pub netns_cookie: u64,
    pub addresses: Vec<std::net::IpAddr>,
    pub enrolled_at_unix: u64,
}

/// What is attached, for the config dump and for tests that check for leftovers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DataplaneStatus {
    pub pin_dir: std::path::PathBuf,
    pub cgroup: std::path::PathBuf,
    /// Pin name -> link id.
    pub links: BTreeMap<String, u32>,
    /// Program name -> program id.
    pub programs: BTreeMap<String, u32>,
}

/// The node's side of the controller channel.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ControlStatus {
    pub address: String,
    pub node: String,
    pub connected: bool,
    pub connects: u64,
    pub updates: u64,
    pub nacks: u64,
    pub last_update_unix: Option<u64>,
    pub last_error: Option<String>,
    /// Pods the controller schedules here that could not be enrolled yet, and why.
    pub pending_pods: BTreeMap<String, String>,
    /// Not connected to the controller since then (unset while connected):
    /// the configuration served is as of that moment.
    #[serde(default)]
    pub disconnected_since_unix: Option<u64>,
    /// The configuration version persisted by the last run, served from the
    /// start until the controller answered.
    #[serde(default)]
    pub restored_version: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PoolStats {
    /// Pooled HBONE connections now.
    pub connections: usize,
    /// HBONE connections dialed so far.
    pub dialed: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// The configuration version the proxy enforces now (it follows each applied update).
    pub version: String,
}

#[cfg(test)]
mod local_caller_tests {
    use super::is_local_caller;

    #[test]
    fn local_callers() {
        let cases = [
            ("127.0.0.1", Some("127.0.0.1"), true),
            ("::1", Some("::1"), true),
            ("::ffff:127.0.0.1", Some("::ffff:127.0.0.1"), true),
            ("127.0.0.1", None, true),
            ("10.0.0.5", Some("10.0.0.5"), true),
            ("::ffff:10.0.0.5", Some("10.0.0.5"), true),
            ("10.0.0.6", Some("10.0.0.5"), false),
            ("fd00::6", Some("fd00::5"), false),
            ("10.0.0.6", None, false),
        ];
        for (remote, local, want) in cases {
            let local = local.map(|l| l.parse().unwrap());
            assert_eq!(is_local_caller(remote.parse().unwrap(), local), want, "{remote} -> {local:?}");
        }
    }
}
