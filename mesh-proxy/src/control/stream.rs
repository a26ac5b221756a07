//! The configuration stream: `Hello` with what the node holds, then every
//! update into the proxy's state (the only writer), answered with ACK or NACK.
use std::{sync::Arc, time::Duration};

use mesh_common::api::{self, node_control_client::NodeControlClient, node_message::Kind as Msg};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{BACKOFF_MAX, BACKOFF_MIN, Control, lock, now_unix};

impl Control {
    pub(super) async fn stream_loop(self: Arc<Self>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.stream_once(&mut backoff).await {
                Ok(()) => {}
                Err(e) => self.set_error(&e, true),
            }
            *lock(&self.channel) = None;
            {
                let mut s = lock(&self.status);
                s.connected = false;
                s.disconnected_since_unix.get_or_insert(now_unix() as u64);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream: Hello with what the node holds, then updates until it ends.
    async fn stream_once(&self, backoff: &mut Duration) -> anyhow::Result<()> {
        let identity = self.node_identity().await?;
        let channel = self.connect(Some(&identity)).await?;
        *lock(&self.channel) = Some(channel.clone());
        let (tx, rx) = mpsc::channel(8);
        let admin_addr = self.config.admin_addr.map(|a| a.to_string()).unwrap_or_default();
        let metrics_addr = self.config.metrics_addr.map(|a| a.to_string()).unwrap_or_default();
        let hello =
            api::Hello { known: self.proxy.state.known(), admin_addr, role: self.config.role.into(), metrics_addr };
        tx.send(api::NodeMessage { kind: Some(Msg::Hello(hello)) }).await?;
        let mut client = NodeControlClient::new(channel);
        let mut updates = client
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| self.node_refused(s))?
            .into_inner();
        {
            let mut s = lock(&self.status);
            s.connected = true;
            s.connects += 1;
            s.last_error = None;
            s.disconnected_since_unix = None;
        }
        info!(controller = %self.config.address, node = %self.config.node, "connected to the controller");
        *backoff = BACKOFF_MIN;
        loop {
            let update = tokio::select! {
                u = updates.message() => u.map_err(|s| self.node_refused(s))?,
                () = self.reconnect.notified() => return Ok(()),
            };
            let Some(update) = update else { anyhow::bail!("the controller closed the stream") };
            // A complete publication (`more` unset) is in force for new connections at once.
            let reply = match self.proxy.state.apply(&update) {
                Ok(applied) => {
                    info!(
                        version = %update.version, full = update.full, upserted = applied.upserted,
                        removed = applied.removed, "configuration update applied"
                    );
                    Msg::Ack(api::Ack { nonce: update.nonce, version: update.version.clone() })
                }
                Err(reason) => {
                    warn!(version = %update.version, "configuration update rejected: {reason}");
                    lock(&self.status).nacks += 1;
                    Msg::Nack(api::Nack { nonce: update.nonce, reason })
                }
            };
            {
                let mut s = lock(&self.status);
                s.updates += 1;
                s.last_update_unix = Some(now_unix() as u64);
            }
            if !update.more {
                self.changed.notify_one();
                if matches!(reply, Msg::Ack(_)) {
                    self.persist_soon();
                }
            }
            tx.send(api::NodeMessage { kind: Some(reply) }).await?;
        }
    }
}
