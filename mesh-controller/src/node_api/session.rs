//! One node's configuration stream: an update now, then one per published
//! change, with ACK/NACK and bounded large updates.
use std::{collections::BTreeMap, sync::Arc};

use mesh_common::api::{self, node_message::Kind as Msg};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use tracing::warn;

use super::{Held, Hub, LARGE_UPDATE, UPDATE_PART, unix_now};

impl Hub {
    /// One node's stream: an update now (what differs from what it holds),
    /// then one per published change, until either side goes away.
    pub(super) async fn session(
        &self,
        node: &str,
        known: BTreeMap<String, u64>,
        inbound: &mut Streaming<api::NodeMessage>,
        tx: &mpsc::Sender<Result<api::Update, Status>>,
    ) -> Result<(), String> {
        let mut changes = self.published.subscribe();
        let mut sent = Held::Known(Arc::new(known));
        let mut acked = sent.clone();
        let mut in_flight: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let (mut nonce, mut first) = (0u64, true);
        loop {
            let published = changes.borrow_and_update().clone();
            let delta = sent.delta_to(&published);
            if first || !delta.is_empty() {
                if delta.upserts.len() >= LARGE_UPDATE {
                    // Held until the node acknowledges: bounds the memory of many
                    // nodes (re)connecting at once.
                    let permit = self.large_updates.clone().acquire_owned().await;
                    in_flight = permit.ok();
                }
                let size = delta.upserts.len() + delta.removed.len();
                // Parts of bounded size: each is encoded on its own, so no buffer
                // grows to the size of a whole snapshot.
                let parts: Vec<&[Arc<api::Resource>]> = match delta.upserts.len() {
                    0 => vec![&[]],
                    _ => delta.upserts.chunks(UPDATE_PART).collect(),
                };
                let (last, full) = (parts.len() - 1, sent.is_empty());
                let mut removed = Some(delta.removed);
                for (i, part) in parts.into_iter().enumerate() {
                    nonce += 1;
                    let update = api::Update {
                        nonce,
                        version: published.wire.version.clone(),
                        full: full && i == 0,
                        resources: part.iter().map(|r| (**r).clone()).collect(),
                        removed: if i == last { removed.take().unwrap_or_default() } else { Vec::new() },
                        more: i != last,
                    };
                    tx.send(Ok(update)).await.map_err(|_| "node went away".to_string())?;
                }
                sent = Held::Set(published.wire.clone());
                let latency = published.at.elapsed().as_secs_f64();
                self.metrics.pushes.inc();
                if first {
                    self.metrics.resync_resources.inc_by(size as u64);
                } else {
                    self.metrics.push_latency.observe(latency);
                }
                self.status(node, |s| {
                    s.pushes += 1;
                    s.version_sent = published.wire.version.clone();
                    s.last_push_unix = unix_now();
                    if first {
                        s.resync_resources = size;
                    }
                });
                first = false;
            }
            tokio::select! {
                changed = changes.changed() => changed.map_err(|_| "controller shutting down".to_string())?,
                msg = inbound.message() => match msg.map_err(|e| e.to_string())? {
                    None => return Err("node closed the stream".into()),
                    Some(api::NodeMessage { kind: Some(Msg::Ack(ack)) }) if ack.nonce == nonce => {
                        acked = sent.clone();
                        drop(in_flight.take());
                        self.status(node, |s| s.version_acked = ack.version);
                    }
                    Some(api::NodeMessage { kind: Some(Msg::Nack(nack)) }) => {
                        warn!(node = %node, nonce = nack.nonce, "node rejected an update: {}", nack.reason);
                        // Resend everything it has not acknowledged with the next change.
                        sent = acked.clone();
                        drop(in_flight.take());
                        self.metrics.nacks.inc();
                        self.status(node, |s| {
                            s.nacks += 1;
                            s.last_nack = Some(nack.reason);
                        });
                    }
                    Some(_) => {} // an ACK of an older update, or a stray Hello
                },
            }
        }
    }
}
