//! The pods this agent enrolls. One task owns the [`Enrolment`] mechanism
//! (kernel state, listeners, the persisted set); everything else (the admin
//! API, the metrics, the controller client, shutdown) talks to it through a
//! [`Pods`] handle, and reads the enrolled list from a published snapshot
//! without waiting on it. [`reconcile`] decides, purely, what to change to
//! reach the set the controller wants.
mod enrolment;
pub mod reconcile;

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

pub use enrolment::{EnrollError, Enrolment, PodSpec, PodView};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

use crate::ebpf::DataplaneStatus;

type Reply<T> = oneshot::Sender<T>;

enum Command {
    Enroll(PodSpec, Reply<Result<PodView, EnrollError>>),
    Unenroll(String, Reply<Result<(), EnrollError>>),
    /// Make the enrolled set `name -> netns`; answers the pods that could not be enrolled, and why.
    Reconcile(BTreeMap<String, PathBuf>, Reply<BTreeMap<String, String>>),
    Status(Reply<DataplaneStatus>),
    StopAccepting(Reply<()>),
    Cleanup(Reply<Result<(), EnrollError>>),
}

/// The handle to the task that owns the enrolled pods.
#[derive(Clone)]
pub struct Pods {
    commands: mpsc::Sender<Command>,
    enrolled: watch::Receiver<Arc<Vec<PodView>>>,
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
        Pods { commands, enrolled }
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

    /// Enrolls exactly `desired` (`name -> netns`); returns the pods that
    /// could not be enrolled yet, with the reason.
    pub async fn reconcile(&self, desired: BTreeMap<String, PathBuf>) -> BTreeMap<String, String> {
        self.ask(|r| Command::Reconcile(desired, r)).await.unwrap_or_default()
    }

    pub async fn dataplane_status(&self) -> DataplaneStatus {
        self.ask(Command::Status).await.unwrap_or_default()
    }

    /// Closes every pod's listeners, keeping the kernel state (the start of a drain).
    pub async fn stop_accepting(&self) {
        let _ = self.ask(Command::StopAccepting).await;
    }

    /// Removes every pod and all kernel state, and forgets the persisted pods.
    pub async fn cleanup(&self) -> Result<(), EnrollError> {
        self.ask(Command::Cleanup).await?
    }
}

fn handle(enrolment: &mut Enrolment, command: Command) {
    // A caller that went away does not want the answer.
    match command {
        Command::Enroll(spec, reply) => drop(reply.send(enrolment.enroll(spec))),
        Command::Unenroll(name, reply) => drop(reply.send(enrolment.unenroll(&name))),
        Command::Reconcile(desired, reply) => drop(reply.send(apply(enrolment, &desired))),
        Command::Status(reply) => drop(reply.send(enrolment.dataplane_status())),
        Command::StopAccepting(reply) => {
            enrolment.stop_accepting();
            let _ = reply.send(());
        }
        Command::Cleanup(reply) => drop(reply.send(enrolment.cleanup())),
    }
}

/// Carries out [`reconcile::plan`]; returns the pods that could not be enrolled.
fn apply(enrolment: &mut Enrolment, desired: &BTreeMap<String, PathBuf>) -> BTreeMap<String, String> {
    let plan = reconcile::plan(&enrolment.list(), desired);
    for name in plan.unenroll {
        if let Err(e) = enrolment.unenroll(&name) {
            warn!(pod = %name, error = %e, "unenrolling");
        }
    }
    let mut pending = BTreeMap::new();
    for spec in plan.enroll {
        let name = spec.name.clone();
        if let Err(e) = enrolment.enroll(spec) {
            pending.insert(name, e.to_string());
        }
    }
    pending
}
