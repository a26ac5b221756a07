//! A real Prometheus (Debian's package) scraping the quickstart's mesh: the
//! controller, both node proxies and the waypoint, every 5 s, so Istio's
//! dashboards' queries can be tried on it at once. Its data lives under the
//! quickstart's directory and goes with `--down`.
use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::Proc;

use super::DIR;

/// Not Prometheus' own 9090: Debian's package may run a system Prometheus there.
pub const ADDR: &str = "127.0.0.1:19090";
const BIN: &str = "/usr/bin/prometheus";

pub fn pid_file() -> PathBuf {
    Path::new(DIR).join("prometheus.pid")
}

/// What Prometheus scrapes: a job name and its targets (`host:port`, path `/metrics`).
pub type Targets<'a> = &'a [(&'a str, Vec<String>)];

/// The scrape configuration, as a user would write it for these addresses.
fn config(targets: Targets<'_>) -> String {
    let mut out = String::from("global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\nscrape_configs:\n");
    for (job, addrs) in targets {
        let list: Vec<String> = addrs.iter().map(|a| format!("'{a}'")).collect();
        out.push_str(&format!("- job_name: {job}\n  static_configs:\n  - targets: [{}]\n", list.join(", ")));
    }
    out
}

/// Starts Prometheus and waits until it has scraped every target once.
pub fn start(targets: Targets<'_>) -> anyhow::Result<Proc> {
    let dir = Path::new(DIR);
    let conf = dir.join("prometheus.yml");
    std::fs::write(&conf, config(targets))?;
    let data = dir.join("prometheus-data");
    let args = [
        BIN.to_owned(),
        format!("--config.file={}", conf.display()),
        format!("--storage.tsdb.path={}", data.display()),
        format!("--web.listen-address={ADDR}"),
        "--storage.tsdb.retention.time=1d".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proc = Proc::spawn_in("prometheus", Path::new("/proc/self/ns/net"), &args, &dir.join("prometheus.log"));
    std::fs::write(pid_file(), proc.pid().to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match targets_up() {
            Ok((up, all)) if up == all && all > 0 => return Ok(proc),
            Ok(_) | Err(_) if Instant::now() < deadline && proc.is_running() => {
                thread::sleep(Duration::from_millis(500))
            }
            Ok((up, all)) => bail!("Prometheus scrapes {up} of {all} targets after 60 s:\n{}", proc.log_text()),
            Err(e) => bail!("Prometheus is not answering ({e}):\n{}", proc.log_text()),
        }
    }
}

/// (targets up, targets) by Prometheus' `/api/v1/targets`.
fn targets_up() -> anyhow::Result<(usize, usize)> {
    let out = std::process::Command::new("curl")
        .args(["-sf", "-m", "2", &format!("http://{ADDR}/api/v1/targets")])
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!("GET /api/v1/targets failed");
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let active = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
    Ok((active.iter().filter(|t| t["health"] == "up").count(), active.len()))
}
