//! Which nodes may join and which node certificates are good: a per-node
//! bootstrap token (`mesh-ctl node add NAME`: single use, short-lived, only
//! its hash kept), and the serials of the certificates issued to each node,
//! so a node is revoked (`mesh-ctl node remove NAME`) by forgetting them:
//! its certificate is refused at once, though it has not expired. The
//! workload certificates issued to a removed node are kept, until they
//! expire, as revoked: nodes are sent them and refuse them. Persisted
//! in `<state-dir>/nodes.json` (written atomically, mode 0600).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use super::auth::same_token;

/// Certificate serials kept per node: the one in use and those it may still
/// present until it switches to the newest.
const SERIALS_KEPT: usize = 3;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// SHA-256 (hex) of the bootstrap token; empty once used.
    #[serde(default)]
    pub token_sha256: String,
    #[serde(default)]
    pub token_expires_unix: u64,
    #[serde(default)]
    pub added_unix: u64,
    #[serde(default)]
    pub joined_unix: u64,
    /// Serials (hex) of the node certificates it may present, newest last.
    #[serde(default)]
    pub serials: Vec<String>,
    /// Set when the operator removed the node: nothing of it is accepted.
    #[serde(default)]
    pub revoked_unix: u64,
    /// The workload certificates issued to it that have not expired.
    #[serde(default)]
    pub workload_certs: Vec<IssuedCert>,
}

/// A workload certificate, by serial (hex), and when it expires.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IssuedCert {
    pub serial: String,
    pub not_after_unix: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RegistryFile {
    nodes: BTreeMap<String, NodeRecord>,
    /// The unexpired workload certificates of removed nodes, by node.
    #[serde(default)]
    revoked: BTreeMap<String, Vec<IssuedCert>>,
}

/// Drops the certificates expired at `now`.
fn unexpired(certs: &mut Vec<IssuedCert>, now: u64) {
    certs.retain(|c| c.not_after_unix > now);
}

/// Why a join or a node certificate was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("node {0:?} is not registered (create its token with `mesh-ctl node add {0}`)")]
    Unknown(String),
    #[error("node {0:?} was removed from the mesh (`mesh-ctl node add {0}` registers it again)")]
    Revoked(String),
    #[error("node {0:?}: invalid join token")]
    BadToken(String),
    #[error(
        "node {0:?}: its join token was already used (tokens are single-use: `mesh-ctl node add {0}` for a new one)"
    )]
    TokenUsed(String),
    #[error("node {0:?}: its join token expired (`mesh-ctl node add {0}` for a new one)")]
    TokenExpired(String),
    #[error("node {0:?}: this node certificate is no longer valid (replaced or revoked)")]
    UnknownCertificate(String),
}

impl Refusal {
    /// The label of `mesh_controller_node_refusals_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unknown(_) => "unknown_node",
            Refusal::Revoked(_) => "revoked",
            Refusal::BadToken(_) => "bad_token",
            Refusal::TokenUsed(_) => "token_used",
            Refusal::TokenExpired(_) => "token_expired",
            Refusal::UnknownCertificate(_) => "unknown_certificate",
        }
    }
}

/// The registry, in memory and on disk.
#[derive(Debug)]
pub struct Registry {
    path: Option<PathBuf>,
    file: Mutex<RegistryFile>,
}

/// What `mesh-ctl node add` gets back.
#[derive(Debug, Serialize, Deserialize)]
pub struct NewToken {
    pub node: String,
    pub token: String,
    pub expires_unix: u64,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl Registry {
    /// The registry in `path` (empty when the file does not exist yet).
    pub fn open(path: &Path) -> anyhow::Result<Registry> {
        let file = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e} (fix or remove the file)", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RegistryFile::default(),
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        };
        Ok(Registry { path: Some(path.to_owned()), file: Mutex::new(file) })
    }

    /// A registry kept in memory only (tests).
    pub fn in_memory() -> Registry {
        Registry { path: None, file: Mutex::default() }
    }

    fn save(&self, file: &RegistryFile) -> std::io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let bytes = serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?;
        mesh_common::files::write_atomically(path, &bytes, 0o600)
    }

    /// Saves after a join or an issuance; a failure is logged, not returned:
    /// the node is served either way, but a restart would forget the change
    /// (a used token usable again, a serial unknown).
    fn save_or_warn(&self, file: &RegistryFile) {
        if let Err(e) = self.save(file) {
            tracing::warn!(error = %e, path = ?self.path, "could not persist the node registry");
        }
    }

    /// Whether `node` was removed from the mesh.
    pub fn is_revoked(&self, node: &str) -> bool {
        self.file.lock().unwrap().nodes.get(node).is_some_and(|r| r.revoked_unix != 0)
    }

    /// Registers `node` (again) with a fresh token valid for `ttl_secs`. A node
    /// registered again starts over: its earlier certificates are refused.
    pub fn add(&self, node: &str, token: String, ttl_secs: u64, now: u64) -> std::io::Result<NewToken> {
        let mut file = self.file.lock().unwrap();
        // Certificates it holds stay known (revocable) when it registers again.
        let workload_certs = file.nodes.remove(node).map(|r| r.workload_certs).unwrap_or_default();
        let record = NodeRecord {
            token_sha256: sha256_hex(token.as_bytes()),
            token_expires_unix: now + ttl_secs,
            added_unix: now,
            workload_certs,
            ..NodeRecord::default()
        };
        file.nodes.insert(node.to_owned(), record);
        self.save(&file)?;
        Ok(NewToken { node: node.to_owned(), token, expires_unix: now + ttl_secs })
    }

    /// Revokes `node`: its token and certificates are refused from now on,
    /// and its workload certificates join the revoked ones. `false` when it
    /// was never registered.
    pub fn remove(&self, node: &str, now: u64) -> std::io::Result<bool> {
        let mut file = self.file.lock().unwrap();
        let Some(record) = file.nodes.get_mut(node) else { return Ok(false) };
        let mut certs = std::mem::take(&mut record.workload_certs);
        *record = NodeRecord { revoked_unix: now, added_unix: record.added_unix, ..NodeRecord::default() };
        let revoked = file.revoked.entry(node.to_owned()).or_default();
        revoked.append(&mut certs);
        revoked.sort();
        revoked.dedup();
        for certs in file.revoked.values_mut() {
            unexpired(certs, now);
        }
        file.revoked.retain(|_, certs| !certs.is_empty());
        self.save(&file)?;
        Ok(true)
    }

    /// Records a workload certificate issued to `node`, forgetting those of
    /// its that expired.
    pub fn issued_workload(&self, node: &str, cert: IssuedCert, now: u64) {
        let mut file = self.file.lock().unwrap();
        let Some(record) = file.nodes.get_mut(node) else { return };
        unexpired(&mut record.workload_certs, now);
        record.workload_certs.push(cert);
        self.save_or_warn(&file);
    }

    /// The revoked certificates not expired at `now`, by removed node.
    pub fn revoked_certificates(&self, now: u64) -> BTreeMap<String, Vec<IssuedCert>> {
        let file = self.file.lock().unwrap();
        let mut revoked = file.revoked.clone();
        for certs in revoked.values_mut() {
            unexpired(certs, now);
        }
        revoked.retain(|_, certs| !certs.is_empty());
        revoked
    }

    /// Checks `node`'s join token and uses it up.
    pub fn redeem(&self, node: &str, token: &str, now: u64) -> Result<(), Refusal> {
        let mut file = self.file.lock().unwrap();
        let record = file.nodes.get_mut(node).ok_or_else(|| Refusal::Unknown(node.into()))?;
        let fail = |r: fn(String) -> Refusal| Err(r(node.into()));
        if record.revoked_unix != 0 {
            return fail(Refusal::Revoked);
        }
        if record.token_sha256.is_empty() {
            return fail(Refusal::TokenUsed);
        }
        if !same_token(&sha256_hex(token.as_bytes()), &record.token_sha256) {
            return fail(Refusal::BadToken);
        }
        if now >= record.token_expires_unix {
            return fail(Refusal::TokenExpired);
        }
        record.token_sha256.clear();
        record.joined_unix = now;
        self.save_or_warn(&file);
        Ok(())
    }

    /// Registers a node that joined without a token of its own (the older
    /// shared join token, or its agent's Kubernetes service-account token),
    /// so that it can be revoked like the others.
    pub fn joined_without_own_token(&self, node: &str, now: u64) -> Result<(), Refusal> {
        let mut file = self.file.lock().unwrap();
        match file.nodes.get(node) {
            Some(r) if r.revoked_unix != 0 => return Err(Refusal::Revoked(node.into())),
            _ => {}
        }
        let record = file.nodes.entry(node.to_owned()).or_default();
        if record.added_unix == 0 {
            record.added_unix = now;
        }
        record.joined_unix = now;
        self.save_or_warn(&file);
        Ok(())
    }

    /// Records a certificate issued to `node`.
    pub fn issued(&self, node: &str, serial: &str) {
        let mut file = self.file.lock().unwrap();
        let Some(record) = file.nodes.get_mut(node) else { return };
        record.serials.push(serial.to_owned());
        let excess = record.serials.len().saturating_sub(SERIALS_KEPT);
        record.serials.drain(..excess);
        self.save_or_warn(&file);
    }

    /// Whether `node` may use its certificate with `serial`.
    pub fn check(&self, node: &str, serial: &str) -> Result<(), Refusal> {
        let file = self.file.lock().unwrap();
        let record = file.nodes.get(node).ok_or_else(|| Refusal::Unknown(node.into()))?;
        if record.revoked_unix != 0 {
            return Err(Refusal::Revoked(node.into()));
        }
        if !record.serials.iter().any(|s| s == serial) {
            return Err(Refusal::UnknownCertificate(node.into()));
        }
        Ok(())
    }

    /// Every registered node (for `mesh-ctl node list`).
    pub fn list(&self) -> BTreeMap<String, NodeRecord> {
        let mut nodes = self.file.lock().unwrap().nodes.clone();
        for r in nodes.values_mut() {
            // The hash is nobody's business but the controller's.
            r.workload_certs.clear();
            r.token_sha256 = if r.token_sha256.is_empty() { String::new() } else { "pending".into() };
        }
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_use_short_lived_and_per_node() {
        let r = Registry::in_memory();
        r.add("node1", "t1".into(), 60, 1000).unwrap();
        r.add("node2", "t2".into(), 60, 1000).unwrap();
        let cases = [
            ("node3", "t1", 1001, Err(Refusal::Unknown("node3".into()))),
            ("node1", "t2", 1001, Err(Refusal::BadToken("node1".into()))),
            ("node1", "", 1001, Err(Refusal::BadToken("node1".into()))),
            ("node1", "t1", 1060, Err(Refusal::TokenExpired("node1".into()))),
            ("node1", "t1", 1059, Ok(())),
            ("node1", "t1", 1059, Err(Refusal::TokenUsed("node1".into()))),
            ("node2", "t2", 1002, Ok(())),
        ];
        for (node, token, now, want) in cases {
            assert_eq!(r.redeem(node, token, now), want, "{node} {token:?} at {now}");
        }
    }

    #[test]
    fn certificates_are_known_by_serial_until_revoked() {
        let r = Registry::in_memory();
        r.add("node1", "t".into(), 60, 0).unwrap();
        r.redeem("node1", "t", 1).unwrap();
        assert_eq!(r.check("node1", "aa"), Err(Refusal::UnknownCertificate("node1".into())));
        for s in ["aa", "bb", "cc", "dd"] {
            r.issued("node1", s);
        }
        assert_eq!(r.check("node1", "aa"), Err(Refusal::UnknownCertificate("node1".into())), "only the last 3 kept");
        assert_eq!(r.check("node1", "bb"), Ok(()));
        assert_eq!(r.check("node1", "dd"), Ok(()));
        assert!(r.remove("node1", 5).unwrap());
        assert_eq!(r.check("node1", "dd"), Err(Refusal::Revoked("node1".into())));
        assert_eq!(r.redeem("node1", "t", 6), Err(Refusal::Revoked("node1".into())));
        assert!(!r.remove("node9", 5).unwrap());
        // Registered again: a new token works; the old certificates stay refused.
        r.add("node1", "t2".into(), 60, 10).unwrap();
        assert_eq!(r.redeem("node1", "t2", 11), Ok(()));
        assert_eq!(r.check("node1", "dd"), Err(Refusal::UnknownCertificate("node1".into())));
        assert_eq!(r.list()["node1"].token_sha256, "", "used");
    }

    #[test]
    fn a_removed_nodes_workload_certificates_are_revoked_until_they_expire() {
        let r = Registry::in_memory();
        let cert = |serial: &str, not_after_unix| IssuedCert { serial: serial.into(), not_after_unix };
        for node in ["node1", "node2"] {
            r.add(node, "t".into(), 60, 0).unwrap();
        }
        r.issued_workload("node1", cert("a1", 100), 10);
        r.issued_workload("node1", cert("a2", 200), 20);
        r.issued_workload("node2", cert("b1", 300), 20);
        r.issued_workload("node9", cert("x", 300), 20); // unregistered: not kept
        assert!(r.revoked_certificates(30).is_empty(), "nothing removed yet");
        r.issued_workload("node1", cert("a3", 400), 150); // a1 expired: forgotten
        r.add("node1", "t2".into(), 60, 160).unwrap(); // registered again: still known
        r.remove("node1", 170).unwrap();
        let want = BTreeMap::from([("node1".to_string(), vec![cert("a2", 200), cert("a3", 400)])]);
        assert_eq!(r.revoked_certificates(170), want);
        assert_eq!(r.revoked_certificates(250)["node1"], vec![cert("a3", 400)], "a2 expired");
        assert!(r.revoked_certificates(400).is_empty(), "all expired");
        assert!(r.list()["node2"].workload_certs.is_empty(), "serials are not listed");
    }

    #[test]
    fn persisted_and_read_back() {
        let dir = std::env::temp_dir().join(format!("mesh-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nodes.json");
        let r = Registry::open(&path).unwrap();
        r.add("node1", "t".into(), 60, 0).unwrap();
        r.redeem("node1", "t", 1).unwrap();
        r.issued("node1", "aa");
        let again = Registry::open(&path).unwrap();
        assert_eq!(again.check("node1", "aa"), Ok(()));
        assert_eq!(again.redeem("node1", "t", 2), Err(Refusal::TokenUsed("node1".into())));
        again.issued_workload("node1", IssuedCert { serial: "w1".into(), not_after_unix: 100 }, 3);
        again.remove("node1", 4).unwrap();
        assert_eq!(Registry::open(&path).unwrap().revoked_certificates(5)["node1"][0].serial, "w1");
        std::fs::write(&path, "{").unwrap();
        assert!(Registry::open(&path).unwrap_err().to_string().contains("nodes.json"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
