//! `cargo xtask`: the project's two set-up commands and their helpers.
//!
//! - `cargo xtask test`: installs what is missing, builds, runs every test
//!   (the kernel tests need root).
//! - `cargo xtask quickstart [--down]`: runs the mesh on this host.
//! - `cargo xtask bench`: the benchmarks (not part of the tests; figures, no pass/fail).
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
    },
    /// Only install the prerequisites (Debian packages, bpf-linker, toolchain link).
    Setup,
    /// Run the benchmarks (release builds) and write JSON reports under /var/tmp/mesh-bench.
    Bench,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Test { args } => test(&args),
        Cmd::Quickstart { down: false, no_build } => quickstart::up(no_build),
        Cmd::Quickstart { down: true, .. } => quickstart::down(),
        Cmd::Setup => prereqs::ensure(),
        Cmd::Bench => bench(),
    }
}

fn bench() -> anyhow::Result<()> {
    prereqs::ensure()?;
    step("controller at scale: 10 000 pods, 2 000 services, 1 000 policies, 100 nodes");
    cargo(&["bench", "-p", "mesh-controller", "--bench", "scale"])?;
    step("data plane: direct vs mesh across nodes vs mesh on one node (iperf3, hey, wrk against nginx)");
    cargo(&["build", "--release", "-p", "mesh-node", "-p", "mesh-controller"])?;
    cargo(&["bench", "-p", "mesh-tests", "--bench", "dataplane"])
}

fn test(args: &[String]) -> anyhow::Result<()> {
    prereqs::require_root("cargo xtask test")?;
    prereqs::ensure()?;
    step("building the workspace");
    cargo(&["build"])?;
    step("running every test (unit tests, then the kernel tests in network namespaces)");
    let skipped_file = mesh_tests::skipped_file();
    let _ = std::fs::remove_file(&skipped_file);
    let mut test_args = vec!["test"];
    test_args.extend(args.iter().map(String::as_str));
    let outcome = cargo_test(&test_args)?;
    let skipped: Vec<String> =
        std::fs::read_to_string(&skipped_file).unwrap_or_default().lines().map(str::to_owned).collect();
    for line in &skipped {
        eprintln!("*** {line}");
    }
    println!("tests: {} passed, {} failed, {} skipped", outcome.passed, outcome.failed, skipped.len());
    if !outcome.success {
        bail!("some tests failed");
    }
    Ok(())
}

#[derive(Default)]
struct TestOutcome {
    passed: u64,
    failed: u64,
    success: bool,
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
        if let Some(result) = line.strip_prefix("test result: ") {
            for part in result.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else { continue };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "passed" => outcome.passed += n,
                    "failed" => outcome.failed += n,
                    _ => {}
                }
            }
        }
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
