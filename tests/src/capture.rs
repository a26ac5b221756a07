//! tshark on a mesh's bridge: what really crosses the wire between pods.
use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::{Pod, Proc, mesh::Mesh, run_in};

/// A capture of TCP on the bridge, stopped and read by [`Capture::packets`].
pub struct Capture {
    proc: Proc,
    file: PathBuf,
    /// The namespace of the bridge.
    net: PathBuf,
}

impl Capture {
    /// Starts tshark on the bridge and returns once it demonstrably captures:
    /// `probe` (a pod outside the mesh) knocks on `target` until tshark
    /// prints a packet of it (its start message comes before it really captures).
    pub fn start(mesh: &Mesh, probe: &Pod, target: &Pod) -> Capture {
        Self::start_in(mesh.t.network(), &mesh.t.dir, probe, target)
    }

    /// Like [`Self::start`], on the bridge in namespace `net`, files in `dir`.
    pub fn start_in(net: &Path, dir: &Path, probe: &Pod, target: &Pod) -> Capture {
        let file = dir.join(format!("bridge-{}.pcap", std::process::id()));
        let _ = std::fs::remove_file(&file);
        let log = dir.join("tshark.log");
        let proc = Proc::spawn_in(
            "tshark",
            net,
            &["tshark", "-i", "br0", "-f", "tcp", "-l", "-P", "-w", file.to_str().unwrap()],
            &log,
        );
        let deadline = Instant::now() + crate::patience(Duration::from_secs(20));
        let knock = format!("http://{}:1/", target.ip4);
        while !proc.log_text().contains(&format!("{} ", probe.ip4)) {
            assert!(Instant::now() < deadline, "tshark did not capture:\n{}", proc.log_text());
            run_in(&probe.netns, &["curl", "-s", "-m", "1", &knock]);
            thread::sleep(Duration::from_millis(100));
        }
        Capture { proc, file, net: net.into() }
    }

    /// Stops the capture; returns (src port, dst port, payload length) of every
    /// TCP segment between `a` and `b`, how many of them tshark dissects as
    /// TLS application data, and the raw capture.
    pub fn packets(mut self, a: &Pod, b: &Pod) -> (Vec<(u16, u16, usize)>, usize, Vec<u8>) {
        self.stop();
        self.between(a, b)
    }

    /// Stops the capture and asserts that everything between `a` and `b` was
    /// TLS on 15008 (some of it), and that none of `clear` (what the apps
    /// sent) appears anywhere in the raw capture.
    pub fn assert_only_tls(self, a: &Pod, b: &Pod, clear: &[&str]) {
        let (packets, tls_records, raw) = self.packets(a, b);
        let off_15008: Vec<_> = packets.iter().filter(|(s, d, _)| *s != 15008 && *d != 15008).collect();
        assert!(
            off_15008.is_empty(),
            "segments between a and b not on 15008: {:?}",
            &off_15008[..off_15008.len().min(5)]
        );
        assert!(tls_records > 0, "no TLS between a and b in the capture");
        let raw = String::from_utf8_lossy(&raw);
        for text in clear {
            assert!(!raw.contains(text), "{text:?} in clear on the bridge");
        }
        eprintln!("capture: {} segments between a and b, all on 15008, {tls_records} TLS records", packets.len());
    }

    /// Stops the capture (once; later calls do nothing).
    pub fn stop(&mut self) {
        if self.proc.is_running() {
            thread::sleep(Duration::from_millis(300));
            self.proc.signal(libc::SIGINT);
            self.proc.wait_exit(Duration::from_secs(10));
        }
    }

    /// What [`Self::packets`] returns, for any pair, once [`Self::stop`]ped.
    pub fn between(&self, a: &Pod, b: &Pod) -> (Vec<(u16, u16, usize)>, usize, Vec<u8>) {
        let filter = format!("ip.addr=={} && ip.addr=={}", a.ip4, b.ip4);
        let out = run_in(
            &self.net,
            &[
                "tshark",
                "-r",
                self.file.to_str().unwrap(),
                "-Y",
                &filter,
                "-T",
                "fields",
                "-e",
                "tcp.srcport",
                "-e",
                "tcp.dstport",
                "-e",
                "tcp.len",
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let packets = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                Some((f.first()?.parse().ok()?, f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?))
            })
            .collect();
        let tls = format!("{filter} && tls.app_data");
        let out =
            run_in(&self.net, &["tshark", "-r", self.file.to_str().unwrap(), "-d", "tcp.port==15008,tls", "-Y", &tls]);
        let tls_records = String::from_utf8_lossy(&out.stdout).lines().count();
        (packets, tls_records, std::fs::read(&self.file).unwrap_or_default())
    }
}
