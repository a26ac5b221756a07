//! The agent's side of the CNI plugin (`mesh-cni`), on a Unix socket in the
//! agent's state directory (`cni.sock`, root only). On a pod's ADD the
//! plugin hands over the pod's network namespace and waits here until the
//! pod is enrolled, or known not to be captured, before it lets the kubelet
//! start the pod's containers: an app never runs a moment with its traffic
//! outside the mesh (Istio's users report that start-up race). DEL releases
//! the namespace.
//!
//! [`verdict`] decides what the plugin is told (pure, table-tested).
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    control::Control,
    pods::{PodSpec, Pods},
};

/// How long an ADD waits for the pod's enrolment. The kubelet retries a
/// failed ADD, so a pod the controller is slow to tell of starts later, not
/// outside the mesh.
const ADD_TIMEOUT: Duration = Duration::from_secs(20);

/// The socket's name in the agent's state directory.
pub const SOCKET: &str = "cni.sock";

/// What the plugin sends: the pod (`namespace/name`) and its network namespace.
#[derive(Debug, Deserialize, Serialize)]
pub struct CniPod {
    pub name: String,
    pub netns: PathBuf,
}

/// The answer to an ADD, as far as it is known now.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// In the mesh: the pod may start.
    Enrolled,
    /// Not in the mesh by the configuration: the pod may start as it is.
    NotCaptured(String),
    /// Not yet known: keep waiting (and refuse the ADD at the deadline).
    Wait(String),
}

/// What the agent knows of pod `name` being set up on `node`.
pub struct Known<'a> {
    pub enrolled: bool,
    /// Whether any configuration came from the controller yet.
    pub configured: bool,
    /// The pod's node and whether it is captured, as the controller says.
    pub placement: Option<(&'a str, bool)>,
    /// Why the agent could not enroll it yet, if it tried.
    pub pending: Option<&'a str>,
}

pub fn verdict(node: &str, k: &Known<'_>) -> Verdict {
    if k.enrolled {
        return Verdict::Enrolled;
    }
    if !k.configured {
        return Verdict::Wait("the agent has no configuration from the controller yet".into());
    }
    match k.placement {
        None => Verdict::Wait("the controller has not told this node of the pod yet".into()),
        Some((_, false)) => {
            Verdict::NotCaptured("not captured: its namespace is not ambient, or the pod opted out".into())
        }
        Some((on, true)) if on != node => {
            Verdict::Wait(format!("the controller places the pod on node {on:?}, not on this node"))
        }
        Some(_) => Verdict::Wait(k.pending.unwrap_or("being enrolled").to_owned()),
    }
}

#[derive(Clone)]
struct CniState {
    pods: Pods,
    control: Arc<Control>,
}

/// Serves the plugin on `<state_dir>/cni.sock` until the process ends.
pub fn serve(state_dir: &Path, pods: Pods, control: Arc<Control>) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = state_dir.join(SOCKET);
    // A socket left by an earlier agent (or the one handing over to this
    // one, which keeps serving on its open listener until it exits).
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let router =
        Router::new().route("/cni/add", post(add)).route("/cni/del", post(del)).with_state(CniState { pods, control });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            warn!("CNI socket: {e}");
        }
    });
    Ok(path)
}

async fn add(State(s): State<CniState>, Json(pod): Json<CniPod>) -> Response {
    let started = Instant::now();
    if let Err(e) = s.pods.report(PodSpec { name: pod.name.clone(), netns: pod.netns.clone() }).await {
        return (StatusCode::BAD_REQUEST, format!("pod {}: {e}", pod.name)).into_response();
    }
    let state = &s.control.proxy().state;
    loop {
        let enrolled = s.pods.list().iter().any(|p| p.name == pod.name && p.netns == pod.netns);
        let placement = state.pod_placement(&pod.name);
        let pending = s.control.status().pending_pods.get(&pod.name).cloned();
        let known = Known {
            enrolled,
            configured: !state.is_empty(),
            placement: placement.as_ref().map(|(node, captured)| (node.as_str(), *captured)),
            pending: pending.as_deref(),
        };
        match verdict(s.control.node(), &known) {
            Verdict::Enrolled => {
                info!(pod = %pod.name, ms = started.elapsed().as_millis() as u64, "CNI ADD: enrolled");
                return Json(serde_json::json!({"enrolled": true})).into_response();
            }
            Verdict::NotCaptured(why) => {
                return Json(serde_json::json!({"enrolled": false, "reason": why})).into_response();
            }
            Verdict::Wait(why) if started.elapsed() >= ADD_TIMEOUT => {
                warn!(pod = %pod.name, "CNI ADD refused: not enrolled after {ADD_TIMEOUT:?}: {why}");
                let message = format!("pod {} is not enrolled after {ADD_TIMEOUT:?}: {why}", pod.name);
                return (StatusCode::SERVICE_UNAVAILABLE, message).into_response();
            }
            Verdict::Wait(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn del(State(s): State<CniState>, Json(pod): Json<CniPod>) -> Response {
    // Unreported pods are fine: DEL is called again and again, and for pods
    // that never were ADDed.
    let _ = s.pods.forget(pod.name).await;
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_add_returns_once_the_pod_is_enrolled_or_known_not_to_be_captured() {
        let known = |enrolled, configured, placement, pending| Known { enrolled, configured, placement, pending };
        let cases = [
            (known(true, true, Some(("n1", true)), None), "enrolled"),
            (known(false, false, None, None), "wait: no configuration"),
            (known(false, true, None, None), "wait: has not told"),
            (known(false, true, Some(("n1", false)), None), "not captured"),
            (known(false, true, Some(("n2", true)), None), "wait: on node \"n2\""),
            (known(false, true, Some(("n1", true)), Some("no addresses")), "wait: no addresses"),
            (known(false, true, Some(("n1", true)), None), "wait: being enrolled"),
        ];
        for (k, want) in cases {
            let got = match verdict("n1", &k) {
                Verdict::Enrolled => "enrolled".to_owned(),
                Verdict::NotCaptured(_) => "not captured".to_owned(),
                Verdict::Wait(why) => format!("wait: {why}"),
            };
            let (kind, text) = want.split_once(": ").unwrap_or((want, ""));
            assert!(got.starts_with(kind) && got.contains(text), "{got:?} is not {want:?}");
        }
    }
}
