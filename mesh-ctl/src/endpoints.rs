//! `mesh-ctl endpoints --service NS/NAME`: each endpoint of a service as its
//! waypoint sees it: outlier detection's state (ejected, for how long, how
//! often, consecutive failures), requests in flight, and the cluster's
//! circuit-breaker occupancy (requests, retries, connections, pending), read
//! from the waypoint instances' `/debug/endpoints`.
use serde_json::{Value, json};

use crate::{
    api::{Client, CtlError, NodeSelector, Result},
    output::{Report, Table},
};

pub fn endpoints(client: &Client, sel: &NodeSelector, service: &str) -> Result<Report> {
    let dumps = client.dumps(sel)?;
    let (_, dump) = dumps.first().ok_or_else(|| CtlError::new("no node answered"))?;
    let svc = dump.services.as_ref().and_then(|s| s.get(service)).ok_or_else(|| {
        CtlError::new(format!("--service {service}: no such service")).hint("`mesh-ctl services` lists them")
    })?;
    let wp = svc.waypoint.as_ref().ok_or_else(|| {
        CtlError::new(format!("{service} is not bound to a waypoint")).hint(
            "circuit breaking, outlier detection and balancing are the waypoint's: bind it with istio.io/use-waypoint",
        )
    })?;
    let workloads = dump.workloads.clone().unwrap_or_default();
    let (_, nodes) = client.node_list()?;
    let mut table = Table::new(&[
        "WAYPOINT",
        "SUBSET",
        "PORT",
        "ENDPOINT",
        "STATE",
        "EJECTIONS",
        "5XX",
        "ACTIVE",
        "CLUSTER REQ/RETRY/CONN/PEND",
    ]);
    let mut rows = Vec::new();
    for uid in &wp.workloads {
        let Some(node) = workloads.get(uid).map(|w| w.node.clone()) else { continue };
        let Some(entry) = nodes.iter().find(|n| n.name == node && n.status.role == "waypoint") else { continue };
        if entry.status.admin_addr.is_empty() {
            return Err(CtlError::new(format!("waypoint {uid} (joined as {node}) did not announce an address"))
                .hint("start mesh-waypoint with --announce-addr POD_IP:15020"));
        }
        let state = client.node(&node, &entry.status.admin_addr, "/debug/endpoints")?;
        for c in state["clusters"].as_array().into_iter().flatten().filter(|c| c["service"] == service) {
            let occupancy =
                format!("{}/{}/{}/{}", c["requests_in_flight"], c["retries_in_flight"], c["connections"], c["pending"]);
            for e in c["endpoints"].as_array().into_iter().flatten() {
                let state = match e["ejected_for_ms"].as_u64() {
                    Some(ms) => format!("EJECTED ({:.1} s left)", ms as f64 / 1000.0),
                    None => "healthy".into(),
                };
                table.row(vec![
                    uid.clone(),
                    c["subset"].as_str().filter(|s| !s.is_empty()).unwrap_or("-").to_owned(),
                    c["port"].to_string(),
                    e["endpoint"].as_str().unwrap_or("").to_owned(),
                    state,
                    e["ejections"].to_string(),
                    e["consecutive_5xx"].to_string(),
                    e["active_requests"].to_string(),
                    occupancy.clone(),
                ]);
            }
            rows.push(json!({ "waypoint": uid, "cluster": c }));
        }
    }
    let text =
        table.render(&format!("{service}: its waypoint has sent it no request yet (endpoints appear once it has)"));
    Ok(Report::new(Value::Array(rows), text))
}
