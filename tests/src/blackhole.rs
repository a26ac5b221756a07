//! Blackhole routes in this host's namespace for the subnets the test
//! topologies and the quickstart use, for as long as they exist. Their own
//! links carry more specific routes (a /24 on a veth), so nothing changes
//! while those are up; if one goes down, packets for the test subnets are
//! dropped here instead of following the host's default route out of the
//! machine. Each topology owns its routes by their metric (derived from its
//! id), so parallel tests add and remove only their own; routes whose
//! topology is gone (a run killed outright) are swept.
use std::{collections::HashSet, fs, process::Command};

/// Service VIPs, pods (IPv4 and IPv6) and nodes, as the harness and the
/// quickstart number them.
pub const SUBNETS: &[&str] = &["10.96.0.0/16", "10.200.0.0/16", "10.201.0.0/16", "fd00:200::/32"];

/// The metric of topology `id`'s routes (FNV-1a of the id), above anything
/// a distribution sets.
pub fn metric(id: &str) -> u32 {
    let hash = id.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    1_000_000 + hash % 1_000_000_000
}

/// Adds topology `id`'s routes (replacing any it left).
pub fn add(id: &str) {
    let metric = metric(id).to_string();
    for subnet in SUBNETS {
        let out = Command::new("ip").args(["route", "replace", "blackhole", subnet, "metric", &metric]).output();
        let ok = out.as_ref().is_ok_and(|o| o.status.success());
        assert!(ok, "adding the blackhole route {subnet} metric {metric}: {out:?}");
    }
}

/// Removes topology `id`'s routes.
pub fn remove(id: &str) {
    let metric = metric(id).to_string();
    for subnet in SUBNETS {
        let _ = Command::new("ip").args(["route", "del", "blackhole", subnet, "metric", &metric]).output();
    }
}

/// Removes the blackhole routes on [`SUBNETS`] whose topology no longer
/// exists (its `<id>-net` namespace is gone).
pub fn sweep() {
    let live: HashSet<u32> = fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().strip_suffix("-net").map(metric))
        .collect();
    for family in ["-4", "-6"] {
        let Ok(out) = Command::new("ip").args(["-j", family, "route", "show", "type", "blackhole"]).output() else {
            continue;
        };
        let routes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for route in routes {
            let (Some(dst), Some(metric)) = (route["dst"].as_str(), route["metric"].as_u64()) else { continue };
            if SUBNETS.contains(&dst) && !live.contains(&(metric as u32)) {
                let metric = metric.to_string();
                let _ = Command::new("ip").args(["route", "del", "blackhole", dst, "metric", &metric]).output();
            }
        }
    }
}
