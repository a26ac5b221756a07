//! The node's use of the controller client (`mesh_proxy::control`): keep the
//! enrolled pods equal to the captured pods the controller schedules here,
//! and hold a certificate for each of their identities.
use std::{collections::BTreeSet, sync::Arc, time::Duration};

pub use mesh_proxy::control::{Control, ControlConfig};
use tracing::warn;

use crate::pods::Pods;

/// Starts the configuration stream and the loop that reconciles pods and
/// certificates on every applied update, on pod reports, and every second
/// (renewals, retries).
pub fn spawn(control: &Arc<Control>, pods: Pods) {
    control.spawn();
    tokio::spawn(reconcile_loop(control.clone(), pods));
}

async fn reconcile_loop(control: Arc<Control>, pods: Pods) {
    let state = &control.proxy().state;
    loop {
        tokio::select! {
            () = control.changed() => {}
            () = pods.reports() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if state.is_empty() {
            continue; // nothing from the controller yet: keep the restored pods
        }
        let local = state.local_pods(control.node());
        sync_pods(&control, &pods, local.iter().map(|p| p.name.clone()).collect()).await;
        if let Err(e) = control.sync_certificates(local.into_iter().map(|p| p.identity).collect()).await {
            control.set_error(&e, false); // the stream may be fine: retried next second
        }
    }
}

/// Enrolls the captured pods scheduled here and unenrolls every other pod.
async fn sync_pods(control: &Control, pods: &Pods, desired: BTreeSet<String>) {
    let pending = pods.reconcile(desired).await;
    let mut status = control.status();
    for (pod, why) in &pending {
        if status.pending_pods.get(pod) != Some(why) {
            warn!(pod = %pod, "cannot enroll yet: {why}");
        }
    }
    status.pending_pods = pending;
}
