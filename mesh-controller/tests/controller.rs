//! The controller process against a real directory: live reload, rejected
//! objects on its health endpoint, last good version kept.
use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

struct Controller {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Controller {
    fn start(name: &str, files: &[(&str, &str)]) -> Controller {
        let dir = std::env::temp_dir().join(format!("mesh-ctl-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for (f, text) in files {
            fs::write(dir.join(f), text).unwrap();
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-controller"))
            .args(["--config-dir", dir.to_str().unwrap(), "--metrics-addr", "127.0.0.1:0"])
            .args(["--state-dir", dir.join(".state").to_str().unwrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("controller exited before it was ready").unwrap();
            if let Some(rest) = line.split("metrics_addr=").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        std::thread::spawn(move || for _ in lines {}); // keep draining its log
        Controller { child, addr, dir }
    }

    fn get(&self, path: &str) -> Value {
        let mut s = TcpStream::connect(self.addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
    }

    fn write(&self, file: &str, text: &str) {
        // Write then rename, as editors and config-management tools do.
        let tmp = self.dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, self.dir.join(file)).unwrap();
    }

    /// Waits for the configuration generation to pass `after`; returns how long it took.
    fn wait_generation(&self, after: u64, since: Instant) -> Duration {
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

const NAMESPACE: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n";
const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop}\nspec: {nodeName: node1, serviceAccountName: web}\nstatus: {podIP: 10.0.0.1}\n";

#[test]
fn file_edits_apply_live_and_bad_ones_are_reported_without_losing_good_config() {
    let c = Controller::start("live", &[("ns.yaml", NAMESPACE)]);
    let g0 = c.get("/healthz/ready")["generation"].as_u64().unwrap();

    let t = Instant::now();
    c.write("pod.yaml", POD);
    let delay = c.wait_generation(g0, t);
    eprintln!("file edit -> configuration in force: {delay:?}");
    assert!(delay < Duration::from_secs(1), "took {delay:?}");
    let model = c.get("/debug/model");
    let web = &model["workloads"]["Pod/shop/web-1"];
    assert_eq!(web["identity"], "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(web["captured"], true);

    // A broken new version: reported by file, line, object and field; the old one stays.
    let g1 = c.get("/healthz/ready")["generation"].as_u64().unwrap();
    c.write("pod.yaml", &POD.replace("10.0.0.1", "10.0.0.300"));
    let deadline = Instant::now() + Duration::from_secs(5);
    let rejected = loop {
        let r = c.get("/healthz/ready");
        if !r["rejected"].as_array().unwrap().is_empty() {
            break r;
        }
        assert!(Instant::now() < deadline, "the bad file was not reported");
        std::thread::sleep(Duration::from_millis(10));
    };
    let line = rejected["rejected"][0].as_str().unwrap();
    assert!(line.ends_with("pod.yaml:5: Pod shop/web-1: status.podIP: \"10.0.0.300\" is not an IP address"), "{line}");
    assert_eq!(rejected["generation"].as_u64().unwrap(), g1, "nothing in force changed");
    assert_eq!(c.get("/debug/model")["workloads"]["Pod/shop/web-1"]["ips"][0], "10.0.0.1");

    // Deleting the file removes the pod.
    fs::remove_file(c.dir.join("pod.yaml")).unwrap();
    c.wait_generation(g1, Instant::now());
    assert!(c.get("/debug/model")["workloads"].as_object().unwrap().is_empty());
}
