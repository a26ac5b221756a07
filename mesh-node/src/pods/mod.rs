//! The pods this agent enrolls. One task owns the [`Enrolment`] mechanism
//! (kernel state, listeners, the persisted set); everything else (the admin
//! API, the metrics, the controller client, shutdown) talks to it through a
//! [`Pods`] handle, and reads the enrolled list from a published snapshot
//! without waiting on it. [`reconcile`] decides, purely, what to change to
//! reach the set the controller wants; [`discover`] finds the network
//! namespaces of pods that predate the CNI plugin.
pub mod discover;
mod enrolment;
pub mod reconcile;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
};

pub use enrolment::{EnrollError, Enrolment, PodSpec, PodView};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::warn;

use crate::ebpf::DataplaneStatus;

type Reply<T> = oneshot::Sender<T>;

enum Command {
    Enroll(PodSpec, Reply<Result<PodView, EnrollError>>),
    Unenroll(String, Reply<Result<(), EnrollError>>),
    Report(PodSpec, Reply<Result<(), EnrollError>>),
    Forget(String, Reply<Result<(), EnrollError>>),
    Reported(Reply<BTreeMap<String, PathBuf>>),
    /// Make the enrolled set these pods (by name, their network namespaces
    /// as reported); answers the pods that could not be enrolled, and why.
    Reconcile(BTreeSet<String>, Reply<BTreeMap<String, String>>),
    Status(Reply<DataplaneStatus>),
    StopAccepting(Reply<()>),
    Cleanup(Reply<Result<(), EnrollError>>),
    HandOff(Reply<Vec<crate::handoff::HandedPod>>),
    /// The handoff failed: this agent owns its pods again.
    Resume(Reply<()>),
}

/// The handle to the task that owns the enrolled pods.
#[derive(Clone)]
pub struct Pods {
    commands: mpsc::Sender<Command>,
    enrolled: watch::Receiver<Arc<Vec<PodView>>>,
    /// Woken when a network namespace is reported, so a reconciler acts at once.
    reports: Arc<Notify>,
}

/// The owning task is gone (it only ends when every handle is dropped).
fn gone<T>(_: T) -> EnrollError {
    EnrollError::Stopped
}

impl Pods {
    /// Starts the owning task with `enrolment`, and returns once it has
    /// re-enrolled the pods a previous agent of this instance had. The task
    /// is a thread of its own, since enrolment waits on syscalls and on the
    /// pods' namespaces; it binds listeners in this tokio runtime.
    pub async fn start(mut enrolment: Enrolment) -> Pods {
        let runtime = tokio::runtime::Handle::current();
        let (commands, mut rx) = mpsc::channel::<Command>(64);
        let (publish, enrolled) = watch::channel(Arc::new(Vec::new()));
        let (restored, restored_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("pods".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                enrolment.restore();
                publish.send_replace(Arc::new(enrolment.list()));
                let _ = restored.send(());
                while let Some(command) = rx.blocking_recv() {
                    handle(&mut enrolment, command);
                    publish.send_replace(Arc::new(enrolment.list()));
                }
            })
            .expect("spawning the pods thread");
        let _ = restored_rx.await;
        Pods { commands, enrolled, reports: Arc::default() }
    }

    /// The pods enrolled now (a snapshot, published after every change).
    pub fn list(&self) -> Arc<Vec<PodView>> {
        self.enrolled.borrow().clone()
    }

    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, EnrollError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(command(tx)).await.map_err(gone)?;
        rx.await.map_err(gone)
    }

    pub async fn enroll(&self, spec: PodSpec) -> Result<PodView, EnrollError> {
        self.ask(|r| Command::Enroll(spec, r)).await?
    }

    pub async fn unenroll(&self, name: String) -> Result<(), EnrollError> {
        self.ask(|r| Command::Unenroll(name, r)).await?
    }

    /// Records where a pod's network namespace is on this node (what a CNI
    /// plugin reports); the controller decides whether it is enrolled.
    pub async fn report(&self, spec: PodSpec) -> Result<(), EnrollError> {
        self.ask(|r| Command::Report(spec, r)).await??;
        self.reports.notify_one();
        Ok(())
    }

    pub async fn forget(&self, name: String) -> Result<(), EnrollError> {
        self.ask(|r| Command::Forget(name, r)).await?
    }

    /// Every reported pod's network namespace.
    pub async fn reported(&self) -> BTreeMap<String, PathBuf> {
        self.ask(Command::Reported).await.unwrap_or_default()
    }

    /// Resolves when a network namespace has been reported since the last call.
    pub async fn reports(&self) {
        self.reports.notified().await;
    }

    /// Enrolls exactly the pods named in `desired`, each in the network
    /// namespace reported for it; returns the pods that could not be enrolled
    /// yet, with the reason.
    pub async fn reconcile(&self, desired: BTreeSet<String>) -> BTreeMap<String, String> {
        self.ask(|r| Command::Reconcile(desired, r)).await.unwrap_or_default()
    }

    pub async fn dataplane_status(&self) -> DataplaneStatus {
        self.ask(Command::Status).await.unwrap_or_default()
    }

    /// Closes every pod's listeners, keeping the kernel state (the start of a drain).
    pub async fn stop_accepting(&self) {
        let _ = self.ask(Command::StopAccepting).await;
    }

    /// Every pod's listeners, for a new agent; this one changes nothing after.
    pub async fn hand_off(&self) -> Vec<crate::handoff::HandedPod> {
        self.ask(Command::HandOff).await.unwrap_or_default()
    }

    /// Takes the pods back after a failed handoff.
    pub async fn resume(&self) {
        let _ = self.ask(Command::Resume).await;
    }

    /// Removes every pod and all kernel state, and forgets the persisted pods.
    pub async fn cleanup(&self) -> Result<(), EnrollError> {
        self.ask(Command::Cleanup).await?
    }
}

fn handle(enrolment: &mut Enrolment, command: Command) {
    // Handed over: the new agent owns the pods; every change is refused.
    if enrolment.handed_over() {
        match command {
            Command::Enroll(_, r) => drop(r.send(Err(EnrollError::Stopped))),
            Command::Unenroll(_, r) | Command::Report(_, r) | Command::Forget(_, r) | Command::Cleanup(r) => {
                drop(r.send(Err(EnrollError::Stopped)))
            }
            Command::Reconcile(_, r) => drop(r.send(BTreeMap::new())),
            Command::HandOff(r) => drop(r.send(Vec::new())),
            Command::Resume(r) => {
                enrolment.resume();
                let _ = r.send(());
            }
            other => handle_now(enrolment, other),
        }
        return;
    }
    handle_now(enrolment, command);
}

fn handle_now(enrolment: &mut Enrolment, command: Command) {
    // A caller that went away does not want the answer.
    match command {
        Command::Enroll(spec, reply) => drop(reply.send(enrolment.enroll(spec))),
        Command::Unenroll(name, reply) => drop(reply.send(enrolment.unenroll(&name))),
        Command::Report(spec, reply) => drop(reply.send(enrolment.report(spec))),
        Command::Forget(name, reply) => drop(reply.send(enrolment.forget(&name))),
        Command::Reported(reply) => drop(reply.send(enrolment.reported().clone())),
        Command::Reconcile(desired, reply) => drop(reply.send(apply(enrolment, &desired))),
        Command::Status(reply) => drop(reply.send(enrolment.dataplane_status())),
        Command::StopAccepting(reply) => {
            enrolment.stop_accepting();
            let _ = reply.send(());
        }
        Command::Cleanup(reply) => drop(reply.send(enrolment.cleanup())),
        Command::HandOff(reply) => drop(reply.send(enrolment.hand_off())),
        Command::Resume(reply) => {
            let _ = reply.send(());
        }
    }
}

/// Carries out [`reconcile::plan`]; returns the pods that could not be enrolled.
fn apply(enrolment: &mut Enrolment, wanted: &BTreeSet<String>) -> BTreeMap<String, String> {
    let (desired, mut pending) = reconcile::locate(wanted, enrolment.reported());
    let plan = reconcile::plan(&enrolment.list(), &desired);
    for name in plan.unenroll {
        if let Err(e) = enrolment.unenroll(&name) {
            warn!(pod = %name, error = %e, "unenrolling");
        }
    }
    for spec in plan.enroll {
        let name = spec.name.clone();
        if let Err(e) = enrolment.enroll(spec) {
            pending.insert(name, e.to_string());
        }
    }
    pending
}
