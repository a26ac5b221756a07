//! The namespace test harness: a bridge standing for the network, pods as
//! network namespaces on it, agents as `mesh-node` processes in their own
//! "node" namespaces, and real clients and servers run inside pods.
//!
//! Every name is unique to one [`Topology`] (prefix, process id, counter), the
//! bridge lives in a namespace of its own so nothing touches the host's
//! network, and dropping the topology (also on panic) kills its processes and
//! removes its namespaces, pins, state and cgroups. Leftovers of a run that was
//! killed outright are swept by the next one.
pub mod bench;
pub mod blackhole;
pub mod capture;
pub mod cgroup_prog;
mod controller;
pub mod kube;
pub mod mesh;
mod process;
mod topology;
pub mod waypoint;

pub use controller::{Controller, GRPC_ADDR, METRICS_ADDR, Placement};
pub use process::{Proc, run_in, run_in_ok};
pub use topology::{
    Agent, AgentStart, BIN_DIR_VAR, Pod, Topology, http_clients, profile_dir, remove_named, sibling_bin,
};

/// These tests change the kernel's state (namespaces, eBPF programs): they need root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("mesh's kernel tests need root (CI runs them as root): run `sudo -E cargo xtask test`");
    }
}

/// Whether a [`Pod::curl`] got HTTP 200.
pub fn http_ok(out: &std::process::Output) -> bool {
    out.status.success() && out.stdout == b"200"
}

/// A deadline for waiting on something: `d` here, longer where the machine
/// is slower (the kernel matrix runs the tests under emulation, 15–35×
/// slower, and sets `MESH_TEST_PATIENCE`). Tests wait for conditions with
/// such deadlines and report the time measured; they never assert a tight
/// bound, which a slow machine would break.
pub fn patience(d: std::time::Duration) -> std::time::Duration {
    static FACTOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let factor = *FACTOR.get_or_init(|| {
        std::env::var("MESH_TEST_PATIENCE").ok().and_then(|v| v.parse().ok()).filter(|f| *f >= 1).unwrap_or(1)
    });
    d * factor
}

/// Where `cargo xtask test` installs Envoy's Python API (PyPI's xds-protos,
/// with grpcio and protobuf) for the tests' external authorizer.
pub const EXT_AUTHZ_PYTHONPATH: &str = "/var/tmp/mesh-tools/python-ext-authz";

/// Where skipped tests are recorded: libtest hides the output of tests that
/// pass, so `cargo xtask test` reads this file and reports every skip.
pub fn skipped_file() -> std::path::PathBuf {
    std::env::temp_dir().join("mesh-tests").join("skipped.txt")
}

/// Says loudly that a test did not run, and why; the caller then returns.
pub fn skip(test: &str, reason: &str) {
    use std::io::Write as _;
    eprintln!("\n*** SKIPPED {test}: {reason} ***\n");
    let file = skipped_file();
    let _ = std::fs::create_dir_all(file.parent().unwrap());
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&file) {
        let _ = writeln!(f, "SKIPPED {test}: {reason}");
    }
}

/// A test's own directory outside any topology (`<tmp>/mesh-tests/<name>-<pid>`,
/// made empty), removed when the test passes and kept for the post-mortem
/// when it fails, as a topology's logs are.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join("mesh-tests").join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
