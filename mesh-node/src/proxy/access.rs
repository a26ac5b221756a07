//! One access-log line per proxied connection, written when it ends.
use std::{net::SocketAddr, time::Instant};

use serde::Serialize;
use tracing::info;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// The facts about one connection, gathered as it is handled.
pub struct ConnectionRecord<'a> {
    pub direction: Direction,
    pub pod: &'a str,
    /// The proxy's listening address the connection arrived on.
    pub listener: SocketAddr,
    pub src: SocketAddr,
    /// Where the client meant to go (outbound: recovered from the kernel;
    /// inbound: the local address the kernel kept).
    pub original_dst: Option<SocketAddr>,
    pub started: Instant,
}

impl ConnectionRecord<'_> {
    /// Writes the line. `sent` goes from client to destination, `received` back.
    pub fn finish(&self, outcome: Result<(u64, u64), String>) {
        let dst = self.original_dst.map(|d| d.to_string()).unwrap_or_default();
        let duration_ms = self.started.elapsed().as_secs_f64() * 1e3;
        match outcome {
            Ok((sent, received)) => info!(
                target: "access",
                direction = self.direction.as_str(),
                pod = self.pod,
                listener = %self.listener,
                listener_port = self.listener.port(),
                src = %self.src,
                original_dst = dst,
                bytes_sent = sent,
                bytes_received = received,
                duration_ms,
                outcome = "ok",
                "connection"
            ),
            Err(error) => info!(
                target: "access",
                direction = self.direction.as_str(),
                pod = self.pod,
                listener = %self.listener,
                listener_port = self.listener.port(),
                src = %self.src,
                original_dst = dst,
                duration_ms,
                outcome = "error",
                error,
                "connection"
            ),
        }
    }
}
