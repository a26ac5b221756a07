//! `cargo xtask image`: OCI images of the node agent (with the CNI plugin),
//! the controller and the waypoint, made from the built binaries.
//!
//! Each image is built from scratch and holds its binaries, the shared
//! libraries they load (found with `ldd`: glibc and libgcc_s, nothing else),
//! and the few files named below; no shell, no package manager. Written as
//! OCI archives (`<name>-<version>.oci.tar`) that `skopeo copy
//! oci-archive:... docker://<registry>/<name>:<version>` pushes, with
//! Debian's umoci (no daemon, no registry). `deploy/` names the images as
//! `<name>:<version>`; a test checks both.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{prereqs, step};

/// One image: its binaries (the first is the entrypoint) and the host files
/// it needs beyond them.
pub struct Image {
    pub name: &'static str,
    pub binaries: &'static [&'static str],
    pub files: &'static [&'static str],
}

pub const IMAGES: &[Image] = &[
    // mesh-cni: the DaemonSet's init container installs it on the host;
    // mesh-ctl: `kubectl exec` into an agent to ask it what it sees.
    Image { name: "mesh-node", binaries: &["mesh-node", "mesh-cni", "mesh-ctl"], files: &[] },
    Image { name: "mesh-controller", binaries: &["mesh-controller", "mesh-ctl"], files: &[] },
    // The system's trust roots: remote JWKS are fetched over TLS verified against them.
    Image { name: "mesh-waypoint", binaries: &["mesh-waypoint"], files: &["/etc/ssl/certs/ca-certificates.crt"] },
];

/// The images' tag: the workspace's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where a binary lives inside an image (first on the image's PATH).
const BIN_DIR: &str = "/usr/local/bin";

/// Builds every image from the binaries in `bin_dir` into `out` and returns
/// the archives written.
pub fn build_all(bin_dir: &Path, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    prereqs::ensure_debian(&["umoci"])?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    IMAGES.iter().map(|image| build(image, bin_dir, out)).collect()
}

fn build(image: &Image, bin_dir: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    step(&format!("image {}:{VERSION} ({})", image.name, image.binaries.join(", ")));
    let work = out.join(format!(".{}.work", image.name));
    let _ = std::fs::remove_dir_all(&work);
    let layout = work.join("layout");
    let bundle = work.join("bundle");
    let reference = format!("{}:{VERSION}", layout.display());
    umoci(&["init", "--layout", &layout.to_string_lossy()])?;
    umoci(&["new", "--image", &reference])?;
    umoci(&["unpack", "--image", &reference, &bundle.to_string_lossy()])?;
    fill_rootfs(image, bin_dir, &bundle.join("rootfs"))?;
    umoci(&["repack", "--image", &reference, &bundle.to_string_lossy()])?;
    let entrypoint = format!("--config.entrypoint={BIN_DIR}/{}", image.binaries[0]);
    let title = format!("--config.label=org.opencontainers.image.title={}", image.name);
    let version = format!("--config.label=org.opencontainers.image.version={VERSION}");
    let architecture = format!("--architecture={}", oci_architecture()?);
    let path = format!("--config.env=PATH={BIN_DIR}:/usr/bin:/bin");
    let author = "--author=mesh";
    umoci(&[
        "config",
        "--image",
        &reference,
        "--os=linux",
        &architecture,
        author,
        &entrypoint,
        &path,
        "--config.workingdir=/",
        &title,
        &version,
    ])?;
    umoci(&["gc", "--layout", &layout.to_string_lossy()])?;
    let archive = out.join(format!("{}-{VERSION}.oci.tar", image.name));
    prereqs::run(Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&archive).arg("."), "tar")?;
    std::fs::remove_dir_all(&work)?;
    println!("wrote {}", archive.display());
    Ok(archive)
}

/// The image's files: binaries, their libraries and its extra files, each
/// at its path on the host (so the dynamic loader finds the libraries where
/// the binaries were linked to look), and an empty /tmp.
fn fill_rootfs(image: &Image, bin_dir: &Path, rootfs: &Path) -> anyhow::Result<()> {
    let mut libraries = BTreeSet::new();
    for name in image.binaries {
        let bin = bin_dir.join(name);
        anyhow::ensure!(bin.exists(), "{} not built", bin.display());
        copy_into(rootfs, &bin, &Path::new(BIN_DIR).join(name))?;
        libraries.extend(shared_libraries(&bin)?);
    }
    for file in libraries.iter().map(PathBuf::as_path).chain(image.files.iter().map(Path::new)) {
        copy_into(rootfs, file, file)?;
    }
    let tmp = rootfs.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))?;
    Ok(())
}

/// Copies `from` (following links) to `to` inside `rootfs`, keeping its mode.
fn copy_into(rootfs: &Path, from: &Path, to: &Path) -> anyhow::Result<()> {
    let dest = rootfs.join(to.strip_prefix("/").unwrap_or(to));
    std::fs::create_dir_all(dest.parent().context("a path with a parent")?)?;
    std::fs::copy(from, &dest).with_context(|| format!("copying {} into the image", from.display()))?;
    Ok(())
}

/// The shared objects `bin` loads, the dynamic loader included, as `ldd` resolves them.
fn shared_libraries(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output().context("running ldd")?;
    if !out.status.success() {
        bail!("ldd {}: {}", bin.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(ldd_paths(&String::from_utf8_lossy(&out.stdout)))
}

/// The absolute paths in `ldd`'s output ("libc.so.6 => /lib/.../libc.so.6
/// (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)"; the kernel's vDSO has none).
fn ldd_paths(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|line| {
            let target = line.split_once("=>").map_or(line, |(_, t)| t);
            target.split_whitespace().next().filter(|p| p.starts_with('/')).map(PathBuf::from)
        })
        .collect()
}

fn oci_architecture() -> anyhow::Result<&'static str> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => bail!("no OCI name for architecture {other}"),
    })
}

fn umoci(args: &[&str]) -> anyhow::Result<()> {
    prereqs::run(Command::new("umoci").args(args), &format!("umoci {}", args[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader_but_not_the_vdso() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd5a9f6000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c1c000000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c1be1f000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1d0b0000)\n";
        assert_eq!(
            ldd_paths(ldd),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }
}
