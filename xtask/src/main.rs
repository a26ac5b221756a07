//! `cargo xtask`: the project's two set-up commands and their helpers.
//!
//! - `cargo xtask test`: installs what is missing, builds, runs every test
//!   (the kernel tests need root). `--kernel 6.1|6.12|all` runs the
//!   eBPF-centred kernel tests under those kernels in qemu instead.
//! - `cargo xtask quickstart [--down]`: runs the mesh on this host.
//! - `cargo xtask bench`: the benchmarks (not part of the tests; figures, no pass/fail).
//! - `cargo xtask fuzz [--seconds N]`: the libFuzzer targets of every parser of outside input.
//! - `cargo xtask image`: OCI archives of the node agent, the controller and the waypoint.
mod fuzz;
mod image;
mod kernels;
mod prereqs;
mod quickstart;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing prerequisites, build, and run every test (as root).
    Test {
        /// Run the eBPF-centred kernel tests under Debian's kernel of this
        /// series in qemu (6.1, 6.12, or all) instead of the whole suite here.
        #[arg(long)]
        kernel: Option<String>,
        /// Passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Bring up a local mesh on this host, drive traffic through it, and show what happened.
    Quickstart {
        /// Remove everything a previous quickstart created.
        #[arg(long)]
        down: bool,
        /// Use the binaries already built beside xtask (the tests run it this way).
        #[arg(long, hide = true)]
        no_build: bool,
        /// Build and run debug binaries (faster to build, several times slower to run).
        #[arg(long)]
        debug: bool,
    },
    /// Only install the prerequisites (Debian packages, bpf-linker, toolchain link, the tests' API server).
    Setup,
    /// Fuzz every parser of outside input (cargo fuzz, libFuzzer), each target for N seconds.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets; all when none is named.
        targets: Vec<String>,
    },
    /// Write deploy/crds/ from mesh's kind table (a test fails when they drift).
    Crds,
    /// Build the OCI images deploy/ names (node agent with the CNI plugin,
    /// controller, waypoint) from release binaries, as OCI archives to push
    /// with `skopeo copy oci-archive:<file> docker://<registry>/<name>:<version>`.
    Image {
        /// Where the archives go (default: <target dir>/images).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// From debug binaries (faster to build, larger and slower).
        #[arg(long)]
        debug: bool,
        /// Use the binaries already built beside xtask (the tests run it this way).
        #[arg(long, hide = true)]
        no_build: bool,
    },
    /// Run the benchmarks (release builds) and write JSON reports under /var/tmp/mesh-bench.
    Bench {
        /// Only these benchmarks (`scale`, `dataplane`, `l7`, `profile`); all
        /// but `profile` when none is named.
        only: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Test { kernel: Some(which), args } => test_kernels(&which, &args),
        Cmd::Test { kernel: None, args } => test(&args),
        Cmd::Quickstart { down: false, no_build, debug } => quickstart::up(no_build, debug),
        Cmd::Quickstart { down: true, .. } => quickstart::down(),
        Cmd::Setup => prereqs::ensure_for_tests(),
        Cmd::Bench { only } => bench(&only),
        Cmd::Fuzz { seconds, targets } => fuzz::run(seconds, &targets),
        Cmd::Crds => write_crds(),
        Cmd::Image { out, debug, no_build } => images(out, debug, no_build),
    }
}

fn images(out: Option<std::path::PathBuf>, debug: bool, no_build: bool) -> anyhow::Result<()> {
    let bin_dir = if no_build {
        std::env::current_exe()?.parent().context("xtask's directory")?.to_path_buf()
    } else {
        let profile = if debug { "debug" } else { "release" };
        step(&format!("building the images' binaries ({profile})"));
        let mut args = vec!["build", "-p", "mesh-node", "-p", "mesh-cni", "-p", "mesh-controller"];
        args.extend(["-p", "mesh-waypoint", "-p", "mesh-ctl"]);
        if !debug {
            args.push("--release");
        }
        cargo(&args)?;
        mesh_tests::profile_dir(profile)
    };
    let out = out.unwrap_or_else(|| bin_dir.parent().expect("a target directory").join("images"));
    image::build_all(&bin_dir, &out)?;
    Ok(())
}

fn write_crds() -> anyhow::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    std::fs::create_dir_all(&dir)?;
    for (name, yaml) in mesh_config::crds::files() {
        std::fs::write(dir.join(&name), yaml)?;
        println!("wrote deploy/crds/{name}");
    }
    Ok(())
}

fn bench(only: &[String]) -> anyhow::Result<()> {
    let named = |name: &str| only.iter().any(|o| o == name);
    let wanted = |name: &str| only.is_empty() || named(name);
    if let Some(unknown) = only.iter().find(|o| !["scale", "dataplane", "l7", "profile"].contains(&o.as_str())) {
        anyhow::bail!("no benchmark named {unknown:?} (there are scale, dataplane, l7 and profile)");
    }
    if wanted("scale") {
        // Its Kubernetes half runs a real kube-apiserver.
        prereqs::ensure_for_tests()?;
    } else {
        prereqs::ensure()?;
    }
    if wanted("scale") {
        step(
            "controller at scale: 10 000 pods, 2 000 services, 1 000 policies, 100 nodes; \
             from a directory, then from a kube-apiserver",
        );
        cargo(&["bench", "-p", "mesh-controller", "--bench", "scale"])?;
    }
    cargo(&[
        "build",
        "--release",
        "-p",
        "mesh-node",
        "-p",
        "mesh-waypoint",
        "-p",
        "mesh-controller",
        "-p",
        "mesh-ctl",
        "-p",
        "mesh-loadgen",
    ])?;
    if wanted("dataplane") {
        step(
            "data plane: direct vs mesh across nodes vs mesh on one node (iperf3, mesh-loadgen, wrk, redis-benchmark)",
        );
        cargo(&["bench", "-p", "mesh-tests", "--bench", "dataplane"])?;
    }
    if wanted("l7") {
        step(
            "the waypoint's HTTP engine as a plain reverse proxy against Envoy 1.40 and HAProxy (wrk, h2load, hey, RSS)",
        );
        let envoy = prereqs::ensure_envoy()?;
        // SAFETY: single-threaded here; the bench reads it.
        unsafe { std::env::set_var("MESH_ENVOY_BIN", &envoy) };
        cargo(&["bench", "-p", "mesh-tests", "--bench", "l7"])?;
    }
    if named("profile") {
        step("where the node proxies' CPU time goes: perf on both agents under iperf3 and wrk (PERFORMANCE.md)");
        prereqs::ensure_debian(&["linux-perf"])?;
        cargo(&["bench", "-p", "mesh-tests", "--bench", "profile"])?;
    }
    Ok(())
}

fn test(args: &[String]) -> anyhow::Result<()> {
    prereqs::require_root("cargo xtask test")?;
    prereqs::ensure_for_tests()?;
    step("building the workspace");
    cargo(&["build"])?;
    step("running every test (unit tests, then the kernel tests in network namespaces)");
    let skipped_file = mesh_tests::skipped_file();
    let _ = std::fs::remove_file(&skipped_file);
    let mut test_args = vec!["test"];
    test_args.extend(args.iter().map(String::as_str));
    let mut outcome = cargo_test(&test_args)?;
    outcome.skipped = std::fs::read_to_string(&skipped_file).unwrap_or_default().lines().map(str::to_owned).collect();
    outcome.report()
}

/// The kernel tests on other kernels, in qemu, one kernel after the other.
fn test_kernels(which: &str, filter: &[String]) -> anyhow::Result<()> {
    prereqs::require_root("cargo xtask test --kernel")?;
    let series = kernels::series(which)?;
    prereqs::ensure()?;
    prereqs::ensure_debian(kernels::PACKAGES)?;
    step("building the workspace and the kernel tests");
    cargo(&["build"])?;
    let tests = test_executables(kernels::TESTS)?;
    let mut outcome = TestOutcome { success: true, ..TestOutcome::default() };
    for s in series {
        let kernel = kernels::fetch(s)?;
        step(&format!("kernel {} ({}): {} in qemu", s.name, kernel.release, kernels::TESTS.join(", ")));
        kernels::run_tests(&kernel, &tests, filter, &mut outcome)?;
    }
    outcome.report()
}

/// The executables of the kernel test targets `names` (built now).
fn test_executables(names: &[&str]) -> anyhow::Result<Vec<(String, std::path::PathBuf)>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["test", "--no-run", "--message-format=json", "-p", "mesh-tests"]).env("PATH", prereqs::path_with_tools());
    for name in names {
        cmd.args(["--test", name]);
    }
    let out = cmd.stderr(std::process::Stdio::inherit()).output().context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the kernel tests failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str()) else { continue };
        if names.contains(&name) && msg["target"]["kind"][0] == "test" {
            found.push((name.to_owned(), exe.into()));
        }
    }
    found.sort_by_key(|(n, _)| names.iter().position(|m| m == n));
    if found.len() != names.len() {
        bail!("found {} of the {} kernel test executables", found.len(), names.len());
    }
    Ok(found)
}

#[derive(Default)]
struct TestOutcome {
    passed: u64,
    failed: u64,
    skipped: Vec<String>,
    success: bool,
}

impl TestOutcome {
    /// Adds up a libtest `test result:` line.
    fn add_line(&mut self, line: &str) {
        let Some(result) = line.strip_prefix("test result: ") else { return };
        for part in result.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else { continue };
            let n: u64 = n.parse().unwrap_or(0);
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }

    /// Prints every skip and the closing line; fails when a test failed.
    fn report(&self) -> anyhow::Result<()> {
        for line in &self.skipped {
            eprintln!("*** {line}");
        }
        println!("tests: {} passed, {} failed, {} skipped", self.passed, self.failed, self.skipped.len());
        if !self.success {
            bail!("some tests failed");
        }
        Ok(())
    }
}

/// `cargo test`, its output passed through, its `test result:` lines added up.
fn cargo_test(args: &[&str]) -> anyhow::Result<TestOutcome> {
    use std::io::{BufRead as _, BufReader};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(&cargo)
        .args(args)
        .env("PATH", prereqs::path_with_tools())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    let mut outcome = TestOutcome::default();
    for line in BufReader::new(child.stdout.take().context("cargo test stdout")?).lines() {
        let line = line?;
        println!("{line}");
        outcome.add_line(&line);
    }
    outcome.success = child.wait()?.success();
    Ok(outcome)
}

/// Runs cargo with this workspace's default members (mesh-ebpf is built by
/// mesh-node's build script, never for the host).
pub(crate) fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .env("PATH", prereqs::path_with_tools())
        .status()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub(crate) fn step(what: &str) {
    eprintln!("\n==> {what}");
}
