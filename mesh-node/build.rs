//! Builds `mesh-ebpf` for the BPF target and leaves the object in OUT_DIR, so a
//! plain `cargo build` produces a complete agent. Needs bpf-linker and a Rust
//! toolchain that ships `core` for bpfel-unknown-none (`cargo xtask test`
//! installs both; see ARCHITECTURE.md "Building the eBPF programs").
use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Where `cargo xtask` installs bpf-linker (outside the clone, kept between runs).
const TOOLS_DIRS: &[&str] = &["/var/tmp/mesh-tools/bin", "/usr/local/bin"];

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=MESH_EBPF_TOOLCHAIN");
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "mesh-ebpf")
        .ok_or_else(|| anyhow!("mesh-ebpf package not found in the workspace"))?;
    let root_dir = ebpf.manifest_path.parent().context("mesh-ebpf manifest has no parent")?;

    // bpf-linker must be on PATH for the nested cargo; add the places xtask installs it.
    let mut path: Vec<PathBuf> = TOOLS_DIRS.iter().map(PathBuf::from).collect();
    path.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    let path = env::join_paths(path)?;
    // SAFETY: build scripts are single-threaded; the variables are read by the
    // nested cargo that aya-build spawns below.
    unsafe {
        env::set_var("PATH", path);
        // aya-ebpf needs one unstable feature on the BPF target. Scoped to that
        // crate: "1" would make aya-build add -Z build-std, which needs rust-src.
        env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf");
    }
    // With rustup on PATH aya-build runs `rustup run <toolchain> cargo`: use the
    // toolchain linked to Debian's rustc-web, which ships core for BPF.
    let toolchain = env::var("MESH_EBPF_TOOLCHAIN").unwrap_or_else(|_| "debian-web".into());
    aya_build::build_ebpf(
        [Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
        Toolchain::Custom(&toolchain),
    )
}
