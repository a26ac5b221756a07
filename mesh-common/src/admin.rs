//! The typed documents of the admin and debug APIs: what the node's
//! `/config_dump` and the controller's `/debug/nodes` serve, and what
//! `mesh-ctl` reads back. One definition on both ends, so a field renamed on
//! one side cannot silently vanish on the other.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node as the controller sees it (for `/debug/nodes`, metrics and `mesh-ctl status`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    pub connected: bool,
    /// The node's admin API, as it announced it (empty: loopback only).
    pub admin_addr: String,
    pub version_sent: String,
    pub version_acked: String,
    pub last_push_unix: u64,
    pub pushes: u64,
    pub nacks: u64,
    pub last_nack: Option<String>,
    /// Resources sent in the first update of the latest stream (0: resumed in sync).
    pub resync_resources: usize,
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
