//! The enrolment mechanism: a pod's listeners bound in its namespace, the
//! kernel pointed at them, the set persisted so a restarted agent takes its
//! pods back; and the same undone in reverse order. Owned by one task (see
//! the parent module); nothing here is shared.
use std::{
    collections::{BTreeMap, HashSet},
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    ebpf::{Dataplane, DataplaneError},
    netns::{Netns, NetnsError},
    proxy::{PodContext, PodListeners, Ports, ProxyContext},
};

pub use mesh_common::admin::{PodSpec, PodView};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("invalid pod name {0:?}: expected namespace/name")]
    InvalidName(String),
    #[error("pod {0} is already enrolled")]
    AlreadyEnrolled(String),
    #[error("pod {0} is not enrolled")]
    NotEnrolled(String),
    #[error("network namespace {netns} is already enrolled as pod {pod}")]
    NetnsTaken { netns: PathBuf, pod: String },
    #[error("network namespace {0} has no address besides loopback: add the pod's address first")]
    NoAddresses(PathBuf),
    #[error("pod {pod}: binding the proxy's listeners: {source} (is loopback up in the pod, and the port free?)")]
    Listen { pod: String, source: NetnsError },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("pod {pod}: {source}")]
    Dataplane { pod: String, source: Box<DataplaneError> },
    #[error("pod {pod}: starting the proxy: {source}")]
    Proxy { pod: String, source: io::Error },
    #[error("the agent is shutting down")]
    Stopped,
    #[error("network namespace {0:?}: expected an absolute path such as /run/netns/NAME or /proc/PID/ns/net")]
    RelativeNetns(PathBuf),
    #[error("no network namespace is reported for pod {0} on this node")]
    NotReported(String),
}

struct EnrolledPod {
    view: PodView,
    spec: PodSpec,
    tasks: Vec<JoinHandle<()>>,
    /// Other handles to its listening sockets, for a handoff to a new agent;
    /// dropped with the accept loops, so the sockets close then.
    listeners: Option<PodListeners>,
}

pub struct Enrolment {
    dataplane: Dataplane,
    ctx: Arc<ProxyContext>,
    ports: Ports,
    state_file: PathBuf,
    pods: BTreeMap<String, EnrolledPod>,
    /// Where each pod's network namespace is, as reported on this node (by a
    /// CNI plugin, or the local tooling standing in for one): node-local
    /// knowledge the controller never has. Persisted beside the pods.
    reported: BTreeMap<String, PathBuf>,
    reported_file: PathBuf,
    /// Listeners a previous agent handed over, by pod, used instead of binding.
    inherited: BTreeMap<String, PodListeners>,
    /// Set once the pods were handed to a new agent: this one changes nothing.
    handed_over: bool,
}

impl Enrolment {
    pub fn new(dataplane: Dataplane, ctx: Arc<ProxyContext>, ports: Ports, state_dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(state_dir)?;
        let reported_file = state_dir.join("netns.json");
        let reported =
            fs::read(&reported_file).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default();
        Ok(Self {
            dataplane,
            ctx,
            ports,
            state_file: state_dir.join("pods.json"),
            pods: BTreeMap::new(),
            reported,
            reported_file,
            inherited: BTreeMap::new(),
            handed_over: false,
        })
    }

    /// Listeners handed over by the agent this one replaces: the pods it
    /// restores accept on the very sockets the kernel already steers to.
    pub fn inherit(&mut self, pods: Vec<crate::handoff::HandedPod>) {
        for pod in pods {
            match PodListeners::from_fds(pod.outbound, pod.fds) {
                Some(l) => drop(self.inherited.insert(pod.spec.name, l)),
                None => warn!(pod = %pod.spec.name, "handed-over listeners unusable; binding afresh"),
            }
        }
    }

    /// Hands every pod's listeners over to a new agent; from then on this one
    /// changes nothing (see [`Self::handed_over`]).
    pub fn hand_off(&mut self) -> Vec<crate::handoff::HandedPod> {
        self.handed_over = true;
        let mut handed = Vec::new();
        for pod in self.pods.values() {
            match pod.listeners.as_ref().map(PodListeners::try_clone) {
                Some(Ok(l)) => {
                    let (outbound, fds) = l.into_fds();
                    handed.push(crate::handoff::HandedPod { spec: pod.spec.clone(), outbound, fds });
                }
                Some(Err(e)) => warn!(pod = %pod.spec.name, error = %e, "cannot hand its listeners over"),
                None => {}
            }
        }
        handed
    }

    pub fn handed_over(&self) -> bool {
        self.handed_over
    }

    /// Owns the pods again after a handoff that failed.
    pub fn resume(&mut self) {
        self.handed_over = false;
    }

    /// Re-enrolls the pods a previous agent of this instance had, and drops
    /// kernel state for those that are gone. Must run inside the tokio runtime.
    pub fn restore(&mut self) {
        let specs: Vec<PodSpec> = match fs::read(&self.state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(file = %self.state_file.display(), error = %e, "ignoring unreadable pod state");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        for spec in specs {
            let name = spec.name.clone();
            match self.enroll(spec) {
                Ok(_) => info!(pod = %name, "pod restored"),
                Err(e) => {
                    warn!(pod = %name, error = %e, "could not restore pod; it is no longer enrolled")
                }
            }
        }
        let keep: HashSet<u64> = self.pods.values().map(|p| p.view.netns_cookie).collect();
        self.dataplane.retain(&keep);
        self.persist();
    }

    /// Enrolls a pod: binds the proxy's listeners in its namespace, then points
    /// the kernel at them. Must run inside the tokio runtime.
    pub fn enroll(&mut self, spec: PodSpec) -> Result<PodView, EnrollError> {
        validate_name(&spec.name)?;
        if self.pods.contains_key(&spec.name) {
            return Err(EnrollError::AlreadyEnrolled(spec.name));
        }
        let netns = Arc::new(Netns::open(&spec.netns)?);
        if let Some(other) = self.pods.values().find(|p| p.view.netns_cookie == netns.cookie()) {
            return Err(EnrollError::NetnsTaken { netns: spec.netns, pod: other.view.name.clone() });
        }
        let addresses = netns.addresses()?;
        if addresses.is_empty() {
            return Err(EnrollError::NoAddresses(spec.netns));
        }
        let listeners = match self.inherited.remove(&spec.name) {
            Some(handed) => handed,
            None => PodListeners::bind(&netns, self.ports)
                .map_err(|source| EnrollError::Listen { pod: spec.name.clone(), source })?,
        };
        let kept =
            listeners.try_clone().map_err(|e| warn!(pod = %spec.name, error = %e, "no handoff for this pod")).ok();
        self.dataplane
            .enroll(&spec.netns, netns.cookie(), &addresses, listeners.inbound())
            .map_err(|source| EnrollError::Dataplane { pod: spec.name.clone(), source: Box::new(source) })?;
        let pod = Arc::new(PodContext {
            name: spec.name.clone(),
            netns: netns.clone(),
            addresses: addresses.clone(),
            open: self.ctx.limits.pod_slots(),
        });
        let tasks = match listeners.spawn(pod, self.ctx.clone()) {
            Ok(tasks) => tasks,
            Err(source) => {
                let _ = self.dataplane.unenroll(netns.cookie(), &addresses);
                return Err(EnrollError::Proxy { pod: spec.name, source });
            }
        };
        let view = PodView {
            name: spec.name.clone(),
            netns: spec.netns.clone(),
            netns_cookie: netns.cookie(),
            addresses,
            enrolled_at_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        info!(pod = %view.name, netns = %view.netns.display(), addresses = ?view.addresses, "pod enrolled");
        self.pods.insert(spec.name.clone(), EnrolledPod { view: view.clone(), spec, tasks, listeners: kept });
        self.persist();
        Ok(view)
    }

    /// Stops redirecting a pod and closes its listeners. Connections already
    /// proxied run to their end; new ones go direct.
    pub fn unenroll(&mut self, name: &str) -> Result<(), EnrollError> {
        let pod = self.pods.remove(name).ok_or_else(|| EnrollError::NotEnrolled(name.into()))?;
        self.ctx.forget_pod(&pod.view.addresses);
        let result = self.dataplane.unenroll(pod.view.netns_cookie, &pod.view.addresses);
        for task in &pod.tasks {
            task.abort();
        }
        self.persist();
        info!(pod = name, "pod unenrolled");
        result.map_err(|source| EnrollError::Dataplane { pod: name.into(), source: Box::new(source) })
    }

    /// Closes every pod's listeners and keeps the kernel state: new
    /// connections are refused (outbound) or dropped (inbound), as with the
    /// agent down, while those already accepted run on. The start of a drain.
    pub fn stop_accepting(&mut self) {
        for pod in self.pods.values_mut() {
            self.ctx.forget_pod(&pod.view.addresses);
            for task in &pod.tasks {
                task.abort();
            }
            pod.listeners = None;
        }
    }

    pub fn list(&self) -> Vec<PodView> {
        self.pods.values().map(|p| p.view.clone()).collect()
    }

    /// Records where a pod's network namespace is on this node.
    pub fn report(&mut self, spec: PodSpec) -> Result<(), EnrollError> {
        validate_name(&spec.name)?;
        if !spec.netns.is_absolute() {
            return Err(EnrollError::RelativeNetns(spec.netns));
        }
        // Another path to the namespace already reported (`/var/run/netns/x`
        // from the runtime, `/run/netns/x` found by discovery) changes
        // nothing: a new path would re-enroll the pod.
        if self.reported.get(&spec.name).is_some_and(|old| same_namespace(old, &spec.netns)) {
            return Ok(());
        }
        if self.reported.insert(spec.name, spec.netns.clone()).as_ref() != Some(&spec.netns) {
            write_json(&self.reported_file, &self.reported, "reported network namespaces");
        }
        Ok(())
    }

    /// Forgets a pod's network namespace (the pod is gone from this node).
    pub fn forget(&mut self, name: &str) -> Result<(), EnrollError> {
        self.reported.remove(name).ok_or_else(|| EnrollError::NotReported(name.into()))?;
        write_json(&self.reported_file, &self.reported, "reported network namespaces");
        Ok(())
    }

    /// Every reported pod's network namespace.
    pub fn reported(&self) -> &BTreeMap<String, PathBuf> {
        &self.reported
    }

    pub fn dataplane_status(&self) -> crate::ebpf::DataplaneStatus {
        self.dataplane.status()
    }

    /// Removes every pod and all kernel state, and forgets the persisted pods.
    pub fn cleanup(&mut self) -> Result<(), EnrollError> {
        for name in self.pods.keys().cloned().collect::<Vec<_>>() {
            self.unenroll(&name)?;
        }
        let _ = fs::remove_file(&self.state_file);
        let _ = fs::remove_file(&self.reported_file);
        if let Some(dir) = self.state_file.parent() {
            let _ = fs::remove_dir(dir);
        }
        self.dataplane.cleanup().map_err(|source| EnrollError::Dataplane { pod: "*".into(), source: Box::new(source) })
    }

    fn persist(&self) {
        if self.handed_over {
            return; // the new agent keeps the state now
        }
        let specs: Vec<&PodSpec> = self.pods.values().map(|p| &p.spec).collect();
        write_json(&self.state_file, &specs, "enrolled pods");
    }
}

/// Writes `value` to `path` atomically (a temporary file, then a rename).
fn write_json(path: &Path, value: &impl Serialize, what: &str) {
    let write = serde_json::to_vec_pretty(value)
        .map_err(io::Error::other)
        .and_then(|bytes| mesh_common::files::write_atomically(path, &bytes, 0o644));
    if let Err(e) = write {
        warn!(file = %path.display(), error = %e, "could not persist {what}");
    }
}

fn validate_name(name: &str) -> Result<(), EnrollError> {
    if mesh_common::admin::valid_pod_name(name) { Ok(()) } else { Err(EnrollError::InvalidName(name.into())) }
}

/// Whether two paths name one network namespace (one nsfs inode).
fn same_namespace(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names() {
        for (name, ok) in [
            ("default/web-1", true),
            ("ns.a/b", true),
            ("web", false),
            ("/web", false),
            ("ns/", false),
            ("ns/a/b", false),
            ("ns/we b", false),
        ] {
            assert_eq!(validate_name(name).is_ok(), ok, "{name}");
        }
    }

    #[test]
    fn pod_spec_rejects_unknown_fields() {
        let err = serde_json::from_str::<PodSpec>(r#"{"name":"a/b","netns":"/x","ip":"1"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `ip`"), "{err}");
    }
}
