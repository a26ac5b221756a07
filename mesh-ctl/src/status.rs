//! `mesh-ctl status`: is the controller up, which nodes and waypoints are
//! connected and in sync with the configuration, and which objects it
//! rejected and why.
use std::{
    fmt::Write as _,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::json;

use crate::{
    api::{Client, Result},
    output::{Report, Table, human_duration, rfc3339},
};

pub fn status(client: &Client) -> Result<Report> {
    let ready = client.controller("/healthz/ready")?;
    let (version, nodes) = client.node_list()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let rejected: Vec<String> =
        ready["rejected"].as_array().into_iter().flatten().filter_map(|r| r.as_str().map(str::to_owned)).collect();

    let mut text = String::new();
    let _ = writeln!(
        text,
        "controller {}: {}, configuration generation {}, version {}",
        client.controller,
        if ready["ready"] == true { "ready" } else { "NOT READY" },
        ready["generation"],
        if version.is_empty() { "-" } else { &version },
    );
    let mut table =
        Table::new(&["NODE", "ROLE", "CONNECTED", "ADMIN", "VERSION ACKED", "IN SYNC", "LAST PUSH", "NACKS"]);
    for n in &nodes {
        let last_push = if n.status.last_push_unix == 0 {
            "never".into()
        } else {
            format!("{} ago", human_duration(now as i64 - n.status.last_push_unix as i64))
        };
        let waypoint = n.status.role == "waypoint";
        table.row(vec![
            n.name.clone(),
            if waypoint { "waypoint" } else { "node" }.into(),
            connected(&n.status, now),
            match (waypoint, n.status.admin_addr.is_empty()) {
                (true, _) => "-".into(),
                (false, true) => "loopback only".into(),
                (false, false) => n.status.admin_addr.clone(),
            },
            n.status.version_acked.clone(),
            if n.status.version_acked == version { "yes" } else { "no" }.into(),
            last_push,
            match &n.status.last_nack {
                Some(reason) => format!("{} (last: {reason})", n.status.nacks),
                None => n.status.nacks.to_string(),
            },
        ]);
    }
    text.push('\n');
    text.push_str(&table.render("no node has connected"));
    if rejected.is_empty() {
        text.push_str("\nno rejected objects\n");
    } else {
        let _ = writeln!(text, "\n{} rejected (the last good version of each stays in force):", rejected.len());
        for r in &rejected {
            let _ = writeln!(text, "  {r}");
        }
    }
    let in_sync = |role: &str| {
        nodes
            .iter()
            .filter(|n| n.status.role == role && n.status.connected && n.status.version_acked == version)
            .count()
    };
    let data = json!({
        "controller": { "address": client.controller, "ready": ready["ready"], "generation": ready["generation"] },
        "version": version,
        "nodes": nodes,
        "nodes_in_sync": in_sync(""),
        "waypoints_in_sync": in_sync("waypoint"),
        "rejected": rejected,
    });
    Ok(Report::new(data, text))
}

/// `yes`, or how long the node has been away: it serves the configuration
/// it acknowledged last (VERSION ACKED) and renews no certificate meanwhile.
fn connected(status: &mesh_common::admin::NodeStatus, now: u64) -> String {
    match (status.connected, status.disconnected_unix) {
        (true, _) => "yes".into(),
        (false, 0) => "no".into(),
        (false, since) => {
            format!("no, stale since {} ({})", rfc3339(since as i64), human_duration(now as i64 - since as i64))
        }
    }
}
