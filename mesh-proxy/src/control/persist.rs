//! What the process keeps across restarts, so that one restarted while the
//! controller is away serves at once instead of waiting for it: the last
//! configuration it applied whole (`config.pb`: the store as one full
//! update, with its version) and the certificates of the identities it
//! serves (`workload-certs.json`, readable by root only, like the node
//! certificate beside it). One task writes both after each change, each
//! file atomically. On start they are loaded through the same checks as the
//! stream: a file that does not pass is ignored with a warning, and the
//! process waits for the controller as it would without it. On reconnect the
//! `Hello` carries the restored versions, so the controller sends only what
//! changed meanwhile.
use std::{path::Path, sync::Arc};

use mesh_common::{api, identity::SpiffeId};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Control, lock, now_unix};
use crate::identity::{KeyedCert, LocalIdentity};

const CONFIG_FILE: &str = "config.pb";
const CERTS_FILE: &str = "workload-certs.json";

#[derive(Serialize, Deserialize)]
struct PersistedCert {
    identity: String,
    cert: KeyedCert,
}

impl Control {
    /// Loads what an earlier run of this process persisted.
    pub(super) fn restore(&self) {
        let dir = &self.config.state_dir;
        let path = dir.join(CONFIG_FILE);
        match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(file = %path.display(), error = %e, "cannot read the persisted configuration"),
            Ok(bytes) => match api::Update::decode(bytes.as_slice()).map_err(|e| e.to_string()).and_then(|update| {
                let applied = self.proxy.state.apply(&update)?;
                Ok((update.version, applied.upserted))
            }) {
                Ok((version, resources)) => {
                    info!(version = %version, resources, file = %path.display(),
                        "serving the configuration persisted by the last run until the controller answers");
                    lock(&self.status).restored_version = Some(version);
                }
                Err(e) => warn!(file = %path.display(), "ignoring the persisted configuration: {e}"),
            },
        }
        let path = dir.join(CERTS_FILE);
        let Ok(bytes) = std::fs::read(&path) else { return };
        let certs: Vec<PersistedCert> = match serde_json::from_slice(&bytes) {
            Ok(certs) => certs,
            Err(e) => return warn!(file = %path.display(), "ignoring the persisted certificates: {e}"),
        };
        let now = now_unix();
        for PersistedCert { identity, cert } in certs {
            let restored = identity.parse::<SpiffeId>().map_err(|e| e.to_string()).and_then(|id| {
                if cert.not_after_unix <= now {
                    return Err(format!("expired at {}", cert.not_after_unix));
                }
                let local =
                    LocalIdentity::from_cert(&id, &cert, &self.proxy.state.revocations).map_err(|e| e.to_string())?;
                self.proxy.identities.set(id, local);
                Ok(())
            });
            match restored {
                Ok(()) => info!(identity = %identity, serial = %cert.serial, "workload certificate restored"),
                Err(e) => warn!(identity = %identity, "not restoring the persisted certificate: {e}"),
            }
        }
    }

    /// Removes everything this process persisted, the node certificate
    /// included (`mesh-node --cleanup`: nothing of the instance stays).
    pub fn forget_persisted(&self) {
        for name in [CONFIG_FILE, CERTS_FILE, super::NODE_CERT_FILE] {
            let _ = std::fs::remove_file(self.config.state_dir.join(name));
        }
    }

    /// Asks the persisting task to write what is held now.
    pub(super) fn persist_soon(&self) {
        self.persist.notify_one();
    }

    /// Writes the configuration and certificates each time it is asked; asks
    /// made while it writes are served by one more write.
    pub(super) async fn persist_loop(self: Arc<Self>) {
        loop {
            self.persist.notified().await;
            let config = self.proxy.state.snapshot().encode_to_vec();
            let certs: Vec<PersistedCert> = self
                .proxy
                .identities
                .certs()
                .into_iter()
                .map(|(id, cert)| PersistedCert { identity: id.to_string(), cert })
                .collect();
            let dir = self.config.state_dir.clone();
            let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                write(&dir, CONFIG_FILE, &config, 0o644)?;
                write(&dir, CERTS_FILE, &serde_json::to_vec_pretty(&certs).map_err(std::io::Error::other)?, 0o600)
            })
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(dir = %self.config.state_dir.display(), error = %e, "could not persist the configuration")
                }
                Err(e) => warn!(error = %e, "the persisting task failed"),
            }
        }
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    mesh_common::files::write_atomically(&dir.join(name), bytes, mode)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.join(name).display())))
}
