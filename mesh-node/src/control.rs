//! The node's use of the controller client (`mesh_proxy::control`): keep the
//! enrolled pods equal to the captured pods the controller schedules here,
//! and hold a certificate for each of their identities.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

pub use mesh_proxy::control::{Control, ControlConfig};
use tracing::{info, warn};

use crate::pods::{
    PodSpec, Pods,
    discover::{self, Found},
};

/// Starts the configuration stream and the loop that reconciles pods and
/// certificates on every applied update, on pod reports, and every second
/// (renewals, retries). With `discover`, the network namespaces of pods
/// nothing reported are looked for there ([`discover`]).
pub fn spawn(control: &Arc<Control>, pods: Pods, discover: Option<PathBuf>) {
    control.spawn();
    tokio::spawn(reconcile_loop(control.clone(), pods, discover));
}

async fn reconcile_loop(control: Arc<Control>, pods: Pods, discover: Option<PathBuf>) {
    let state = &control.proxy().state;
    let mut ambiguous = BTreeSet::new();
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
        if let Some(dir) = &discover {
            let wanted = local.iter().map(|p| p.name.clone()).collect();
            find_unreported(&control, &pods, dir, wanted, &mut ambiguous).await;
        }
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

/// Reports the pods of `wanted` that nothing reported yet, where [`discover`]
/// finds them in `dir`. Says once per pod why one it cannot place is left.
async fn find_unreported(
    control: &Control,
    pods: &Pods,
    dir: &Path,
    mut wanted: BTreeSet<String>,
    ambiguous: &mut BTreeSet<String>,
) {
    let reported = pods.reported().await;
    wanted.retain(|name| !reported.contains_key(name));
    if wanted.is_empty() {
        return;
    }
    let addresses = control.proxy().state.pod_addresses(&wanted);
    let dir = dir.to_owned();
    let Ok(namespaces) = tokio::task::spawn_blocking(move || discover::scan(&dir)).await else { return };
    for (pod, found) in discover::locate(&addresses, &namespaces) {
        match found {
            Found::At(netns) => {
                info!(pod = %pod, netns = %netns.display(), "found the network namespace of a pod that had no CNI ADD");
                if let Err(e) = pods.report(PodSpec { name: pod.clone(), netns }).await {
                    warn!(pod = %pod, "reporting its network namespace: {e}");
                }
            }
            Found::Ambiguous(paths) => {
                if ambiguous.insert(pod.clone()) {
                    let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                    warn!(pod = %pod, "its address is held by several network namespaces ({}): waiting for its CNI ADD", paths.join(", "));
                }
            }
            Found::Nowhere => {}
        }
    }
}
