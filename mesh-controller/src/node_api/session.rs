//! One node's configuration stream: an update now, then one per published
//! change, with ACK/NACK and bounded large updates.
use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

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
        // Publications sent and not yet acknowledged: (nonce of their last
        // part, what the node holds once it applied them, version). An ACK
        // may come after a newer update went out; it still counts.
        let mut unacked: VecDeque<(u64, Held, String)> = VecDeque::new();
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
                unacked.push_back((nonce, sent.clone(), published.wire.version.clone()));
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
                    Some(api::NodeMessage { kind: Some(Msg::Ack(ack)) }) => {
                        if let Some((held, version)) = acknowledged(&mut unacked, ack.nonce) {
                            acked = held;
                            self.status(node, |s| s.version_acked = version);
                        }
                        if unacked.is_empty() {
                            drop(in_flight.take());
                        }
                    }
                    Some(api::NodeMessage { kind: Some(Msg::Nack(nack)) }) => {
                        warn!(node = %node, nonce = nack.nonce, "node rejected an update: {}", nack.reason);
                        // Resend everything it has not acknowledged with the next change.
                        sent = acked.clone();
                        unacked.clear();
                        drop(in_flight.take());
                        self.metrics.nacks.inc();
                        self.status(node, |s| {
                            s.nacks += 1;
                            s.last_nack = Some(nack.reason);
                        });
                    }
                    Some(_) => {} // a stray Hello
                },
            }
        }
    }
}

/// Takes out of `unacked` every publication whose last part is at or before
/// `nonce`, and returns the newest of them: what the node holds now. An ACK
/// of a part before a publication's last one acknowledges only those before.
fn acknowledged(unacked: &mut VecDeque<(u64, Held, String)>, nonce: u64) -> Option<(Held, String)> {
    let mut newest = None;
    while unacked.front().is_some_and(|(last, ..)| *last <= nonce) {
        newest = unacked.pop_front();
    }
    newest.map(|(_, held, version)| (held, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_and_partial_acks() {
        let held = |v: &str| Held::Known(Arc::new([(v.to_string(), 1)].into()));
        let queue =
            || VecDeque::from([(1, held("a"), "v1".into()), (3, held("b"), "v2".into()), (4, held("c"), "v3".into())]);
        // (ACKed nonce, the version it acknowledges, publications still unacknowledged)
        for (nonce, want, left) in
            [(1, Some("v1"), 2), (2, Some("v1"), 2), (3, Some("v2"), 1), (4, Some("v3"), 0), (0, None, 3)]
        {
            let mut q = queue();
            let got = acknowledged(&mut q, nonce).map(|(_, v)| v);
            assert_eq!((got.as_deref(), q.len()), (want, left), "ACK {nonce}");
        }
    }
}
