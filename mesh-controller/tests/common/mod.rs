//! Helpers shared by the controller's integration tests.
#![allow(dead_code)] // each test file uses part of it
use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// A directory unique to this test process, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("mesh-controller-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn write(&self, file: &str, text: &str) {
        fs::write(self.0.join(file), text).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A `mesh-controller` process on loopback ports it picks.
pub struct Controller {
    child: Child,
    pub addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub dir: PathBuf,
}

impl Controller {
    pub fn start(name: &str, files: &[(&str, &str)], extra: &[&str]) -> Controller {
        let dir = std::env::temp_dir().join(format!("mesh-ctl-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for (f, text) in files {
            fs::write(dir.join(f), text).unwrap();
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-controller"))
            .args(["--config-dir", dir.to_str().unwrap(), "--metrics-addr", "127.0.0.1:0"])
            .args(["--state-dir", dir.join(".state").to_str().unwrap(), "--grpc-addr", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let field = |line: &str, name: &str| -> Option<SocketAddr> {
            line.split(name).nth(1)?.split_whitespace().next()?.parse().ok()
        };
        let (addr, grpc_addr) = loop {
            let line = lines.next().expect("controller exited before it was ready").unwrap();
            if let (Some(a), Some(g)) = (field(&line, "metrics_addr="), field(&line, "grpc_addr=")) {
                break (a, g);
            }
        };
        std::thread::spawn(move || for _ in lines {}); // keep draining its log
        Controller { child, addr, grpc_addr, dir }
    }

    pub fn get_text(&self, path: &str) -> String {
        let mut s = TcpStream::connect(self.addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Value {
        let body = self.get_text(path);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    pub fn write(&self, file: &str, text: &str) {
        // Write then rename, as editors and config-management tools do.
        let tmp = self.dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, self.dir.join(file)).unwrap();
    }

    /// Waits for the configuration generation to pass `after`; returns how long it took.
    pub fn wait_generation(&self, after: u64, since: Instant) -> Duration {
        loop {
            if self.get("/healthz/ready")["generation"].as_u64().unwrap() > after {
                return since.elapsed();
            }
            assert!(since.elapsed() < Duration::from_secs(10), "no reload after 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
