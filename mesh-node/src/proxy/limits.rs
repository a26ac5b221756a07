//! Bounds on the connections the node proxy carries, so that a flood can
//! neither exhaust the agent's file descriptors (an agent that crashes takes
//! every pod's traffic with it) nor starve the other pods: a node-wide limit
//! (by default what the open-file limit allows) and a per-pod one (by default
//! a quarter of it). A connection over either is reset at once, counted in
//! `mesh_node_connections_refused_total{reason}` and logged at most once a
//! second. Outbound connections count against the client pod; inbound ones,
//! HBONE connections and the tunnels on them against the destination pod.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tracing::warn;

/// File descriptors kept for everything but proxied connections (listeners,
/// maps, the control channel, pooled HBONE connections).
const RESERVED_FDS: u64 = 1024;
/// A proxied connection holds at most two: the client's and the upstream.
const FDS_PER_CONNECTION: u64 = 2;

/// The node-wide default for an open-file limit of `nofile`.
pub fn default_node_max(nofile: u64) -> usize {
    (nofile.saturating_sub(RESERVED_FDS) / FDS_PER_CONNECTION).max(64) as usize
}

/// The per-pod default: one pod may hold a quarter of the node's connections.
pub fn default_pod_max(node_max: usize) -> usize {
    (node_max / 4).max(16)
}

/// A counter with a ceiling.
#[derive(Debug)]
pub struct Slots {
    used: AtomicUsize,
    max: usize,
}

impl Slots {
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots { used: AtomicUsize::new(0), max })
    }

    /// One slot, or `None` when all are taken. Never goes above `max`.
    fn take(self: &Arc<Self>) -> Option<Slot> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| Slot(self.clone()))
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// A taken slot, given back when dropped.
#[derive(Debug)]
struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's place under both limits, held until it ends.
#[derive(Debug)]
pub struct Permit {
    _pod: Slot,
    _node: Slot,
}

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Refusal {
    reason: &'static str,
}

/// Takes a slot of the pod's, then one of the node's.
fn admit(node: &Arc<Slots>, pod: &Arc<Slots>) -> Result<Permit, &'static str> {
    let pod = pod.take().ok_or("pod_limit")?;
    let node = node.take().ok_or("node_limit")?;
    Ok(Permit { _pod: pod, _node: node })
}

pub struct Limits {
    node: Arc<Slots>,
    pod_max: usize,
    refused: Family<Refusal, Counter>,
    /// When the last refusal was logged, and how many since.
    last_log: Mutex<(Option<Instant>, u64)>,
}

impl Limits {
    pub fn new(node_max: usize, pod_max: usize, registry: &mut Registry) -> Limits {
        let refused = Family::<Refusal, Counter>::default();
        registry.register(
            "mesh_node_connections_refused",
            "Connections reset on arrival because the node's (node_limit) or the pod's (pod_limit) connection limit was reached",
            refused.clone(),
        );
        Limits { node: Slots::new(node_max), pod_max, refused, last_log: Mutex::new((None, 0)) }
    }

    /// The counter a newly enrolled pod's connections are held in.
    pub fn pod_slots(&self) -> Arc<Slots> {
        Slots::new(self.pod_max)
    }

    /// A permit for one more connection of `pod` (its `slots`), or `None`
    /// after counting and (at most once a second) logging the refusal.
    pub fn admit(&self, pod: &str, slots: &Arc<Slots>) -> Option<Permit> {
        match admit(&self.node, slots) {
            Ok(permit) => Some(permit),
            Err(reason) => {
                self.refused.get_or_create(&Refusal { reason }).inc();
                let mut last = self.last_log.lock().unwrap();
                last.1 += 1;
                if last.0.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    warn!(
                        pod,
                        reason,
                        refused = last.1,
                        node_open = self.node.used(),
                        node_max = self.node.max,
                        pod_open = slots.used(),
                        pod_max = slots.max,
                        "connection reset: connection limit reached (--max-connections, --max-connections-per-pod)"
                    );
                    *last = (Some(Instant::now()), 0);
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        assert_eq!(default_node_max(1 << 20), 523_776);
        assert_eq!(default_node_max(1024), 64, "never below 64");
        assert_eq!(default_pod_max(523_776), 130_944);
        assert_eq!(default_pod_max(10), 16);
    }

    #[test]
    fn limits_hold_and_free_slots() {
        let node = Slots::new(3);
        let (a, b) = (Slots::new(2), Slots::new(2));
        let a1 = admit(&node, &a).unwrap();
        let _a2 = admit(&node, &a).unwrap();
        assert_eq!(admit(&node, &a).unwrap_err(), "pod_limit");
        let _b1 = admit(&node, &b).unwrap();
        assert_eq!(admit(&node, &b).unwrap_err(), "node_limit");
        assert_eq!((node.used(), a.used(), b.used()), (3, 2, 1), "a refusal takes nothing");
        drop(a1);
        assert_eq!((node.used(), a.used()), (2, 1));
        let _b2 = admit(&node, &b).unwrap();
        assert_eq!(admit(&node, &a).unwrap_err(), "node_limit");
    }

    #[test]
    fn concurrent_takers_never_exceed_the_limit() {
        let node = Slots::new(100);
        let pod = Slots::new(1000);
        let taken: Vec<Vec<Permit>> = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..8).map(|_| s.spawn(|| (0..50).filter_map(|_| admit(&node, &pod).ok()).collect())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(taken.iter().map(Vec::len).sum::<usize>(), 100);
        assert_eq!((node.used(), pod.used()), (100, 100));
        drop(taken);
        assert_eq!((node.used(), pod.used()), (0, 0));
    }
}
