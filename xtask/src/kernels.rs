//! The kernel matrix: the eBPF-centred tests under Debian's own 6.1 and 6.12
//! kernels, booted with qemu (software emulation: no KVM on these machines)
//! with this host's root shared read-only, so the guest runs the very test
//! binaries built here.
//!
//! A kernel package is fetched with apt into `/var/tmp/mesh-kernels` and
//! unpacked there (never installed as the host's kernel). Each run builds a
//! small initramfs: busybox, the modules needed to reach the host's root
//! (virtio, 9p) and the test topology (veth, bridge), and an `/init` that
//! mounts the host's root over 9p with tmpfs on the paths the tests write,
//! chroots into it and runs the tests. The guest's console is the output;
//! its last line says the exit code.
use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{TestOutcome, prereqs::run, step};

const CACHE: &str = "/var/tmp/mesh-kernels";
/// What the matrix needs beyond the host's test tools.
pub const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod", "xz-utils", "zstd"];
/// Modules the guest loads before it can mount the host's root, and those
/// the test topology needs (with their dependencies); built-in ones are absent.
const MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "veth", "bridge"];
/// The last line of a guest that ran its command.
const EXIT_MARK: &str = "MESH-GUEST-EXIT ";
/// The kernel tests whose subject is the eBPF side: they run on every kernel.
pub const TESTS: &[&str] = &["redirect", "lifecycle", "isolation", "control", "overlay", "local"];
/// Tests of those left out under emulation, and why: nothing in them
/// depends on the kernel, and they cost many minutes there.
const LEFT_OUT: &[(&str, &str)] = &[
    // 450 curl processes through the mesh to check the proxy's round robin.
    ("overlay", "service_vip_spreads_connections_over_endpoints"),
];
/// Emulation computes 15–35× slower than the host: the harness multiplies
/// its deadlines (never its assertions) by this.
const PATIENCE: u32 = 10;
/// Where the guest mounts an empty tmpfs over the host's directory (`INIT`).
const GUEST_TMPFS: &[&str] = &["/tmp", "/run"];

/// A kernel series of the matrix and how Debian names its image packages.
#[derive(Clone, Copy, Debug)]
pub struct Series {
    pub name: &'static str,
    /// `linux-image-<prefix><n><suffix>`, the newest `n` wins.
    prefix: &'static str,
    suffix: &'static str,
}

pub const SERIES: &[Series] = &[
    Series { name: "6.1", prefix: "linux-image-6.1.0-", suffix: "-amd64" },
    Series { name: "6.12", prefix: "linux-image-6.12.", suffix: "+deb12-amd64" },
];

pub fn series(which: &str) -> anyhow::Result<Vec<Series>> {
    if which == "all" {
        return Ok(SERIES.to_vec());
    }
    let known: Vec<&str> = SERIES.iter().map(|s| s.name).collect();
    SERIES
        .iter()
        .find(|s| s.name == which)
        .map(|s| vec![*s])
        .with_context(|| format!("--kernel {which}: known kernels are {} (or all)", known.join(", ")))
}

/// An unpacked kernel: its release (`uname -r`) and where its files are.
pub struct Kernel {
    pub series: &'static str,
    pub release: String,
    pub root: PathBuf,
}

impl Kernel {
    fn vmlinuz(&self) -> PathBuf {
        self.root.join("boot").join(format!("vmlinuz-{}", self.release))
    }

    fn modules(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// The newest image of `series` that apt offers, unpacked in the cache
/// (fetched once; without apt lists, the newest one already cached).
pub fn fetch(series: Series) -> anyhow::Result<Kernel> {
    let cache = Path::new(CACHE);
    let newest = newest_package(series).or_else(|| {
        let _ = Command::new("apt-get").arg("update").status();
        newest_package(series)
    });
    let release = match newest {
        Some(package) => package.trim_start_matches("linux-image-").to_owned(),
        None => cached(series).with_context(|| format!("no linux-image package of {} in apt's lists", series.name))?,
    };
    let kernel = Kernel { series: series.name, root: cache.join(&release), release };
    if kernel.root.join(".ready").exists() {
        return Ok(kernel);
    }
    step(&format!("fetching Debian's kernel {} (linux-image-{}) into {CACHE}", series.name, kernel.release));
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let package = format!("linux-image-{}", kernel.release);
    run(Command::new("apt-get").args(["download", &package]).current_dir(&debs), "apt-get download")?;
    let deb = fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_"))))
        .with_context(|| format!("apt-get download left no {package}_*.deb in {}", debs.display()))?;
    let _ = fs::remove_dir_all(&kernel.root);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&kernel.root), "dpkg-deb -x")?;
    run(Command::new("depmod").arg("-b").arg(&kernel.root).arg(&kernel.release), "depmod")?;
    fs::write(kernel.root.join(".ready"), "")?;
    let _ = fs::remove_file(&deb);
    Ok(kernel)
}

fn newest_package(series: Series) -> Option<String> {
    let out =
        Command::new("apt-cache").args(["search", "--names-only", &format!("^{}", series.prefix)]).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let n: u32 = name.strip_prefix(series.prefix)?.strip_suffix(series.suffix)?.parse().ok()?;
            Some((n, name.to_owned()))
        })
        .max()
        .map(|(_, name)| name)
}

fn cached(series: Series) -> Option<String> {
    let prefix = series.prefix.trim_start_matches("linux-image-");
    fs::read_dir(CACHE)
        .ok()?
        .flatten()
        .filter(|e| e.path().join(".ready").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|r| r.starts_with(prefix) && r.ends_with(series.suffix))
        .max()
}

/// The guest's `/init`. `$RUN` (written beside it) is run inside the host's
/// root; everything else only prepares that root.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m.ko || echo "insmod $m failed"; done
i=0
until mount -t 9p -o trans=virtio,version=9p2000.L,ro host /host 2>/dev/null; do
  i=$((i + 1))
  if [ $i -gt 100 ]; then dmesg | tail -20; echo "MESH-GUEST-EXIT 97"; poweroff -f; fi
  sleep 0.1
done
H=/host
mount -t proc proc $H/proc
mount -t sysfs sys $H/sys
mount -o bind /dev $H/dev
for d in tmp run; do mount -t tmpfs $d $H/$d; done
mount -t bpf bpf $H/sys/fs/bpf
mount -t cgroup2 cgroup2 $H/sys/fs/cgroup
cp /run.sh $H/tmp/run.sh
chroot $H /bin/sh /tmp/run.sh
echo "MESH-GUEST-EXIT $?"
poweroff -f
"#;

/// Builds the initramfs that runs `script` (shell, in the host's root) on `kernel`.
fn initramfs(kernel: &Kernel, script: &str, out: &Path) -> anyhow::Result<()> {
    let dir = out.with_extension("d");
    let _ = fs::remove_dir_all(&dir);
    for d in ["bin", "proc", "sys", "dev", "host", "modules"] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::copy("/bin/busybox", dir.join("bin/busybox")).context("busybox-static")?;
    let mut names = Vec::new();
    for path in module_closure(&kernel.modules(), MODULES)? {
        let name = module_name(&path);
        let src = kernel.modules().join(&path);
        let dst = dir.join("modules").join(format!("{name}.ko"));
        let unpack = |tool: &str| -> anyhow::Result<()> {
            let bytes = Command::new(tool).arg("-dc").arg(&src).output()?.stdout;
            Ok(fs::write(&dst, bytes)?)
        };
        match path.rsplit('.').next() {
            Some("xz") => unpack("xz")?,
            Some("zst") => unpack("zstd")?,
            _ => drop(fs::copy(&src, &dst)?),
        }
        names.push(name);
    }
    fs::write(dir.join("modules.order"), names.join("\n"))?;
    fs::write(dir.join("run.sh"), script)?;
    let init = dir.join("init");
    fs::write(&init, INIT)?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    let cpio =
        format!("cd {} && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > {}", dir.display(), out.display());
    run(Command::new("sh").args(["-c", &cpio]), "packing the initramfs")?;
    fs::remove_dir_all(&dir)?;
    Ok(())
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).to_owned()
}

/// The modules `wanted` and what they depend on, dependencies first, as
/// paths relative to the modules directory (from its `modules.dep`).
fn module_closure(modules: &Path, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    let dep = fs::read_to_string(modules.join("modules.dep")).context("modules.dep (depmod)")?;
    let deps: std::collections::BTreeMap<String, Vec<String>> = dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m.to_owned(), d.split_whitespace().map(str::to_owned).collect()))
        .collect();
    fn add(
        m: &str,
        deps: &std::collections::BTreeMap<String, Vec<String>>,
        out: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) {
        if !seen.insert(m.to_owned()) {
            return;
        }
        for d in deps.get(m).into_iter().flatten() {
            add(d, deps, out, seen);
        }
        out.push(m.to_owned());
    }
    let (mut out, mut seen) = (Vec::new(), BTreeSet::new());
    for name in wanted {
        // Absent: built into this kernel.
        if let Some(path) = deps.keys().find(|p| module_name(p) == *name) {
            add(path, &deps, &mut out, &mut seen);
        }
    }
    Ok(out)
}

/// What one boot printed: its lines, and the exit code it reported (none:
/// the guest died before it finished).
struct Boot {
    lines: Vec<String>,
    exit: Option<i32>,
}

fn boot(kernel: &Kernel, initrd: &Path) -> anyhow::Result<Boot> {
    let mut child = Command::new("timeout")
        .args(["3600", "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "3072"])
        .args(["-nographic", "-no-reboot", "-nic", "none", "-kernel"])
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet random.trust_cpu=on"])
        .args(["-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let mut lines = Vec::new();
    let mut exit = None;
    for line in BufReader::new(child.stdout.take().context("qemu's console")?).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).trim_end_matches('\r').to_owned();
        println!("[{}] {line}", kernel.series);
        if let Some(code) = line.strip_prefix(EXIT_MARK) {
            exit = code.trim().parse().ok();
        }
        lines.push(line);
    }
    let _ = child.wait();
    Ok(Boot { lines, exit })
}

/// Runs the kernel tests (`tests`: name and executable; `filter`: libtest
/// arguments for each, such as a name) on `kernel`, and adds their results
/// to `outcome`. A boot that dies before it finishes is tried once more.
pub fn run_tests(
    kernel: &Kernel,
    tests: &[(String, PathBuf)],
    filter: &[String],
    outcome: &mut TestOutcome,
) -> anyhow::Result<()> {
    // The guest sees the host's root with fresh tmpfs on these: binaries
    // built under them would be missing there.
    for (_, exe) in tests {
        if let Some(hidden) = GUEST_TMPFS.iter().find(|d| exe.starts_with(d)) {
            bail!(
                "{} is under {hidden}, which the guest replaces with an empty tmpfs: \
                 set CARGO_TARGET_DIR to a directory elsewhere (e.g. /var/tmp/mesh-target)",
                exe.display()
            );
        }
    }
    let filter: String = filter.iter().map(|a| format!(" '{}'", a.replace('\'', ""))).collect();
    let mut script = format!(
        "export HOME=/tmp TMPDIR=/tmp MESH_TEST_PATIENCE={PATIENCE} \
         PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nip link set lo up\necho \"kernel $(uname -r)\"\n"
    );
    for (name, exe) in tests {
        let skips: String =
            LEFT_OUT.iter().filter(|(t, _)| t == name).map(|(_, test)| format!(" --skip {test}")).collect();
        script.push_str(&format!(
            "echo 'MESH-TEST {name}'\n{} --test-threads=2 --color never{skips}{filter} 2>&1\n",
            exe.display()
        ));
    }
    script.push_str("[ -f /tmp/mesh-tests/skipped.txt ] && cat /tmp/mesh-tests/skipped.txt\nexit 0\n");
    let started = std::time::Instant::now();
    let initrd = Path::new(CACHE).join(format!("initrd-{}.gz", kernel.release));
    initramfs(kernel, &script, &initrd)?;
    let mut run = boot(kernel, &initrd)?;
    if run.exit.is_none() {
        eprintln!(
            "*** the {} guest died before it finished (a known, rare emulation crash at boot): booting it again",
            kernel.series
        );
        run = boot(kernel, &initrd)?;
    }
    let Some(_) = run.exit else { bail!("the {} guest died twice before it finished", kernel.series) };
    let mut mine = TestOutcome { success: true, ..TestOutcome::default() };
    let mut binaries = 0;
    for line in &run.lines {
        if line.starts_with("MESH-TEST ") {
            binaries += 1;
        }
        mine.add_line(line);
        if let Some(skip) = line.strip_prefix("SKIPPED ") {
            outcome.skipped.push(format!("kernel {}: SKIPPED {skip}", kernel.series));
        }
    }
    let results = run.lines.iter().filter(|l| l.starts_with("test result: ")).count();
    if binaries != tests.len() || results != tests.len() {
        mine.success = false;
        eprintln!("*** kernel {}: {results} of {} test binaries reported a result", kernel.series, tests.len());
    }
    let took = started.elapsed().as_secs();
    println!(
        "kernel {} ({}): {} passed, {} failed in {}m{:02}s",
        kernel.series,
        kernel.release,
        mine.passed,
        mine.failed,
        took / 60,
        took % 60
    );
    outcome.passed += mine.passed;
    outcome.failed += mine.failed;
    outcome.success &= mine.success && mine.failed == 0;
    Ok(())
}
