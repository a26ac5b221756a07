//! A `mesh-controller` in a test's node namespace: its config directory, its
//! state (CA root, join token), and what an agent needs to join it.
use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    process::{Proc, run_in},
    topology::{STATE_ROOT, Topology, now_millis, sibling_bin},
};

/// Where the controller listens for nodes (they reach it at its node's bridge address).
pub const GRPC_ADDR: &str = "0.0.0.0:15012";
/// Its HTTP port; `mesh-ctl` run in its namespace finds it at the default address.
pub const METRICS_ADDR: &str = "127.0.0.1:15014";

/// Where a controller runs and listens.
pub struct Placement<'a> {
    /// Its network namespace (`/proc/self/ns/net`: the caller's).
    pub netns: &'a Path,
    pub grpc_addr: &'a str,
    pub metrics_addr: &'a str,
    /// `ip:port` agents dial.
    pub dial: String,
}

pub struct Controller {
    pub proc: Proc,
    /// `ip:port` agents dial.
    pub address: String,
    pub netns: PathBuf,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Its HTTP port (reached from inside `netns`).
    pub metrics_addr: String,
}

impl Topology {
    /// Starts `mesh-controller` in `netns` with an empty config directory (or
    /// the one of an earlier controller of this topology) and waits until it
    /// answers.
    pub fn start_controller(&self, netns: &Path, extra: &[&str]) -> Controller {
        let dial = format!("{}:15012", self.node_ip(netns));
        self.start_controller_at(Placement { netns, grpc_addr: GRPC_ADDR, metrics_addr: METRICS_ADDR, dial }, extra)
    }

    /// Like [`Self::start_controller`], placed and bound as `at` says.
    pub fn start_controller_at(&self, at: Placement, extra: &[&str]) -> Controller {
        let netns = at.netns;
        let config_dir = self.dir.join("config");
        let state_dir = PathBuf::from(format!("{STATE_ROOT}/{}/controller", self.id));
        fs::create_dir_all(&config_dir).expect("config dir");
        let bin = sibling_bin("mesh-controller");
        let log = self.dir.join(format!("controller-{}.log", now_millis()));
        let mut args = vec![bin.to_str().unwrap()];
        // `--kubernetes` (with its --kubeconfig) in `extra` replaces the directory.
        if !extra.contains(&"--kubernetes") {
            args.extend(["--config-dir", config_dir.to_str().unwrap()]);
        }
        args.extend([
            "--state-dir",
            state_dir.to_str().unwrap(),
            "--grpc-addr",
            at.grpc_addr,
            "--metrics-addr",
            at.metrics_addr,
            "--poll-ms",
            "20",
        ]);
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn_in("controller", netns, &args, &log);
        let deadline = Instant::now() + crate::patience(Duration::from_secs(20));
        let url = format!("http://{}/healthz/ready", at.metrics_addr);
        while !run_in(netns, &["curl", "-sf", "-m", "1", &url]).status.success() {
            assert!(proc.is_running(), "controller exited:\n{}", proc.log_text());
            assert!(Instant::now() < deadline, "controller not ready after 20 s:\n{}", proc.log_text());
            thread::sleep(Duration::from_millis(20));
        }
        Controller {
            proc,
            address: at.dial,
            netns: netns.into(),
            config_dir,
            state_dir,
            metrics_addr: at.metrics_addr.to_owned(),
        }
    }
}

impl Controller {
    /// Replaces a config file the way editors do (write, then rename).
    pub fn write(&self, file: &str, text: &str) {
        let tmp = self.config_dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, text).expect("writing config");
        fs::rename(&tmp, self.config_dir.join(file)).expect("renaming config");
    }

    pub fn remove(&self, file: &str) {
        fs::remove_file(self.config_dir.join(file)).expect("removing config");
    }

    /// The body of `GET path` on the controller's HTTP port.
    pub fn get(&self, path: &str) -> String {
        let out = run_in(&self.netns, &["curl", "-sf", "-m", "5", &format!("http://{}{path}", self.metrics_addr)]);
        assert!(out.status.success(), "GET {path} on the controller failed:\n{}", self.proc.log_text());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, path: &str) -> Value {
        serde_json::from_str(&self.get(path)).expect("controller JSON")
    }

    /// The value of an unlabelled metric.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }

    /// Makes `token` what `node`'s agent joins with (instead of a token from
    /// `mesh-ctl node add`): a Kubernetes service-account token, say.
    pub fn set_node_token(&self, node: &str, token: &str) {
        fs::write(self.state_dir.with_file_name(format!("join-token-{node}")), token).expect("writing the token");
    }

    /// A file holding `node`'s join token, registered once with `mesh-ctl
    /// node add` on the controller's host (its namespace), as an operator
    /// would; later agents of the node reuse its persisted node certificate.
    pub fn node_token(&self, node: &str) -> PathBuf {
        let file = self.state_dir.with_file_name(format!("join-token-{node}"));
        if !file.exists() {
            let ctl = sibling_bin("mesh-ctl");
            let url = format!("http://{}", self.metrics_addr);
            let args = [ctl.to_str().unwrap(), "--controller", &url, "node", "add", node, "--token-file"];
            let out = run_in(&self.netns, &[&args[..], &[file.to_str().unwrap()]].concat());
            assert!(
                out.status.success(),
                "mesh-ctl node add {node}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        file
    }

    /// Flags that make an agent join this controller as node `node`.
    pub fn agent_args(&self, node: &str) -> Vec<String> {
        vec![
            "--controller".into(),
            self.address.clone(),
            "--node-name".into(),
            node.into(),
            "--join-token".into(),
            self.node_token(node).display().to_string(),
            "--controller-ca".into(),
            self.root_cert().display().to_string(),
        ]
    }

    /// A file with the root agents verify this controller with: its state
    /// directory's, or on Kubernetes (where the CA is kept in a Secret) the
    /// trust bundle it serves, as the DaemonSet mounts it from mesh-ca-root.
    pub fn root_cert(&self) -> PathBuf {
        let own = self.state_dir.join("ca-cert.pem");
        if own.exists() {
            return own;
        }
        let served = self.state_dir.with_file_name("controller-trust-bundle.pem");
        fs::write(&served, self.get("/debug/ca")).expect("writing the trust bundle");
        served
    }
}
