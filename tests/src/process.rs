//! Processes inside network namespaces. `nsenter --net` changes only the
//! network namespace: unlike `ip netns exec` it keeps the host's /sys, so the
//! agent sees the real bpffs and cgroup2 mounts.
use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

/// A command run to completion inside `netns` (a path under /run/netns).
pub fn run_in(netns: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display())).arg("--").args(args);
    cmd.output().unwrap_or_else(|e| panic!("running {args:?} in {}: {e}", netns.display()))
}

/// Like [`run_in`], and fails the test unless the command succeeds. Returns stdout.
pub fn run_in_ok(netns: &Path, args: &[&str]) -> String {
    let out = run_in(netns, args);
    assert!(
        out.status.success(),
        "{args:?} in {} failed ({}): {}{}",
        netns.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A background process, killed (with its process group) when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `args` inside `netns`, stdout and stderr to `log`.
    pub fn spawn_in(name: &str, netns: &Path, args: &[&str], log: &Path) -> Proc {
        let out = File::create(log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = out.try_clone().expect("dup log fd");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns.display()))
            .arg("--")
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {name} ({args:?}): {e}"));
        Proc { name: name.into(), child: Some(child), log: log.into() }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Sends `signal` to the process group.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill has no memory preconditions; a stale pid only fails.
            unsafe { libc::kill(-(child.id() as i32), signal) };
        }
    }

    /// Waits up to `timeout` for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + crate::patience(timeout);
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process group at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Lets the process outlive this guard (the quickstart leaves its mesh running).
    pub fn leave_running(mut self) {
        self.child = None;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `timeout` for `text` in the process's output (a server
    /// saying it listens); fails the test with the output otherwise.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) {
        let timeout = crate::patience(timeout);
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(text) {
            assert!(Instant::now() < deadline, "{}: no {text:?} after {timeout:?}:\n{}", self.name, self.log_text());
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
