//! The OCI images `cargo xtask image` writes, read back with the tools a
//! user pushes and runs them with: skopeo reads each archive's
//! configuration, umoci unpacks it, and every binary in it runs from the
//! unpacked root alone (chroot), which proves the image holds all it loads.
//! The manifests in `deploy/` name exactly these images.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use mesh_tests::{Scratch, sibling_bin};
use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// name, binaries (the first is the entrypoint)
const IMAGES: &[(&str, &[&str])] = &[
    ("mesh-node", &["mesh-node", "mesh-cni", "mesh-ctl"]),
    ("mesh-controller", &["mesh-controller", "mesh-ctl"]),
    ("mesh-waypoint", &["mesh-waypoint"]),
];

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn each_image_runs_its_binaries_from_its_own_files_and_deploy_names_it() {
    mesh_tests::require_root();
    let dir = Scratch::new("images");
    // The binaries this test run was built with (beside the xtask binary).
    run(Command::new(sibling_bin("xtask")).args(["image", "--no-build", "--out"]).arg(&dir.0));

    for (name, binaries) in IMAGES {
        let archive = dir.0.join(format!("{name}-{VERSION}.oci.tar"));
        let transport = format!("oci-archive:{}", archive.display());
        let config: Value =
            serde_json::from_str(&run(Command::new("skopeo").args(["inspect", "--config", &transport])))
                .expect("skopeo's config is JSON");
        let entrypoint = format!("/usr/local/bin/{}", binaries[0]);
        assert_eq!(config["config"]["Entrypoint"], serde_json::json!([entrypoint]), "{name}: {config}");
        assert_eq!(config["config"]["Labels"]["org.opencontainers.image.version"], VERSION, "{name}");
        assert_eq!(config["os"], "linux", "{name}");
        let info: Value =
            serde_json::from_str(&run(Command::new("skopeo").args(["inspect", &transport]))).expect("JSON");
        assert_eq!(info["Layers"].as_array().map(Vec::len), Some(1), "{name}: one layer: {info}");

        let rootfs = unpack(&archive, &dir.0.join(name));
        assert!(!rootfs.join("bin/sh").exists() && !rootfs.join("usr/bin/sh").exists(), "{name}: a shell in the image");
        for bin in *binaries {
            let version =
                run(Command::new("chroot").arg(&rootfs).arg(format!("/usr/local/bin/{bin}")).arg("--version"));
            assert_eq!(version.trim(), format!("{bin} {VERSION}"), "{name}: {bin} --version");
            if *bin == "mesh-cni" {
                // The container runtime's way of asking a CNI plugin.
                let cni = run(Command::new("chroot")
                    .arg(&rootfs)
                    .arg("/usr/local/bin/mesh-cni")
                    .env("CNI_COMMAND", "VERSION"));
                assert!(cni.contains("\"cniVersion\""), "{name}: mesh-cni VERSION: {cni}");
            }
        }
        let size = std::fs::metadata(&archive).unwrap().len();
        println!("{name}: {} MiB archive", size / (1 << 20));
    }

    let named = deploy_images();
    let built: Vec<String> = IMAGES.iter().map(|(name, _)| format!("{name}:{VERSION}")).collect();
    for image in &named {
        assert!(built.contains(image), "deploy/ names {image}, which cargo xtask image does not build ({built:?})");
    }
    for image in &built {
        assert!(named.contains(image), "deploy/ never names {image}");
    }
}

/// The archive's layout extracted and its image unpacked with umoci; the root filesystem.
fn unpack(archive: &Path, dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    run(Command::new("tar").arg("-C").arg(&layout).arg("-xf").arg(archive));
    let bundle = dir.join("bundle");
    run(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:{VERSION}", layout.display())).arg(&bundle));
    bundle.join("rootfs")
}

/// Every `image:` in the manifests under deploy/.
fn deploy_images() -> Vec<String> {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut images = Vec::new();
    for dir in std::fs::read_dir(&deploy).unwrap().map(|d| d.unwrap().path()).filter(|d| d.is_dir()) {
        for file in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
            for line in text.lines() {
                if let Some(image) = line.trim().strip_prefix("image:") {
                    images.push(image.trim().trim_matches('"').to_owned());
                }
            }
        }
    }
    images.sort();
    images.dedup();
    images
}
