//! What nodes see now: workloads, services, policies, certificates, live
//! connections, and the raw config dump. Configuration the controller sends
//! to every node is listed once, with the nodes that hold it, so a node that
//! lags behind shows.
use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use mesh_common::admin::ConfigDump;
use mesh_common::api;
use serde::Serialize;
use serde_json::json;

use crate::{
    api::{Client, CtlError, NodeSelector, Result, Target},
    output::{Report, Table, cell, human_bytes, human_duration, rfc3339},
};

/// One map of every dump (`field` picks it); for each key, the value and the
/// nodes that hold it.
fn merged<T: Clone>(
    dumps: &[(Target, ConfigDump)],
    field: impl Fn(&ConfigDump) -> Option<&BTreeMap<String, T>>,
) -> BTreeMap<String, (T, Vec<String>)> {
    let mut out: BTreeMap<String, (T, Vec<String>)> = BTreeMap::new();
    for (node, dump) in dumps {
        for (key, v) in field(dump).into_iter().flatten() {
            match out.get_mut(key) {
                Some((_, seen)) => seen.push(node.name.clone()),
                None => drop(out.insert(key.clone(), (v.clone(), vec![node.name.clone()]))),
            }
        }
    }
    out
}

fn seen_by(seen: &[String], all: usize) -> String {
    if seen.len() == all && all > 1 { "all".into() } else { seen.join(",") }
}

#[derive(Serialize)]
struct WorkloadRow<'a> {
    name: &'a str,
    namespace: &'a str,
    ips: &'a [String],
    node: &'a str,
    identity: &'a str,
    /// HBONE: captured by its node proxy; TCP: outside the mesh.
    protocol: &'static str,
    seen_by: &'a [String],
}

pub fn workloads(client: &Client, sel: &NodeSelector) -> Result<Report> {
    let dumps = client.dumps(sel)?;
    let all = merged(&dumps, |d| d.workloads.as_ref());
    let mut table = Table::new(&["NAMESPACE", "NAME", "IP", "NODE", "IDENTITY", "PROTOCOL", "SEEN BY"]);
    let mut rows = Vec::new();
    for (w, seen) in all.values() {
        let row = WorkloadRow {
            name: &w.name,
            namespace: &w.namespace,
            ips: &w.ips,
            node: &w.node,
            identity: &w.identity,
            protocol: if w.speaks_hbone() { "HBONE" } else { "TCP" },
            seen_by: seen,
        };
        table.row(vec![
            w.namespace.clone(),
            w.name.clone(),
            w.ips.join(","),
            if w.node.is_empty() { "-".into() } else { w.node.clone() },
            w.identity.clone(),
            row.protocol.into(),
            seen_by(seen, dumps.len()),
        ]);
        rows.push(row);
    }
    Ok(Report::new(&rows, table.render("no workloads")))
}

pub fn services(client: &Client, sel: &NodeSelector) -> Result<Report> {
    let dumps = client.dumps(sel)?;
    let all = merged(&dumps, |d| d.services.as_ref());
    let mut table = Table::new(&["NAMESPACE", "NAME", "VIPS", "PORTS", "ENDPOINTS", "SEEN BY"]);
    let mut rows = Vec::new();
    for (s, seen) in all.values() {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| match (p.target_port, p.target_port_name.as_str()) {
                (0, "") => p.port.to_string(),
                (0, name) => format!("{}->{name}", p.port),
                (t, _) => format!("{}->{t}", p.port),
            })
            .collect();
        let endpoints: Vec<&str> = s.endpoints.iter().map(|e| e.ip.as_str()).collect();
        table.row(vec![
            s.namespace.clone(),
            s.name.clone(),
            s.vips.join(","),
            ports.join(","),
            if endpoints.is_empty() { "none".into() } else { endpoints.join(",") },
            seen_by(seen, dumps.len()),
        ]);
        rows.push(json!({ "service": s, "seen_by": seen }));
    }
    Ok(Report::new(&rows, table.render("no services")))
}

pub fn policies(client: &Client, sel: &NodeSelector) -> Result<Report> {
    let dumps = client.dumps(sel)?;
    let all = merged(&dumps, |d| d.policies.as_ref());
    let mut table = Table::new(&["NAMESPACE", "NAME", "ACTION", "APPLIES TO", "RULES", "SEEN BY"]);
    let mut rows = Vec::new();
    for (p, seen) in all.values() {
        let action = api::Action::try_from(p.action).map(|a| a.as_str_name()).unwrap_or("?");
        let selector: Vec<String> = p.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let applies = match api::Scope::try_from(p.scope) {
            Ok(api::Scope::Global) if selector.is_empty() => "every workload (mesh-wide)".to_owned(),
            Ok(api::Scope::Global) => format!("{} (mesh-wide)", selector.join(",")),
            Ok(api::Scope::Namespace) => format!("namespace {}", p.namespace),
            _ => format!("{} in {}", selector.join(","), p.namespace),
        };
        table.row(vec![
            p.namespace.clone(),
            p.name.clone(),
            action.into(),
            applies,
            p.rules.len().to_string(),
            seen_by(seen, dumps.len()),
        ]);
        rows.push(json!({ "policy": p, "seen_by": seen }));
    }
    Ok(Report::new(&rows, table.render("no policies")))
}

pub fn certs(client: &Client, sel: &NodeSelector) -> Result<Report> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let mut table = Table::new(&["NODE", "IDENTITY", "SERIAL", "NOT AFTER", "EXPIRES IN", "CHAIN"]);
    let mut rows = Vec::new();
    for (node, dump) in client.dumps(sel)? {
        for c in dump.certificates.iter().flatten() {
            let not_after = c.not_after_unix;
            let chain = match &c.chain_verified {
                Ok(()) => {
                    let root = c.chain.last().cloned().unwrap_or_default();
                    format!("verified to root {root} ({} above the leaf)", c.chain_len)
                }
                Err(e) => format!("NOT VERIFIED: {e}"),
            };
            table.row(vec![
                node.name.clone(),
                c.identity.clone(),
                c.serial.clone(),
                rfc3339(not_after),
                human_duration(not_after - now),
                chain,
            ]);
            let mut row = serde_json::to_value(c).unwrap_or_default();
            row["node"] = json!(node.name);
            rows.push(row);
        }
    }
    Ok(Report::new(&rows, table.render("no workload certificates (no pod is enrolled)")))
}

pub fn connections(client: &Client, sel: &NodeSelector) -> Result<Report> {
    let mut table = Table::new(&[
        "NODE",
        "DIRECTION",
        "SOURCE",
        "DESTINATION",
        "SOURCE IDENTITY",
        "DESTINATION IDENTITY",
        "ROUTE",
        "FROM CLIENT",
        "TO CLIENT",
        "AGE",
    ]);
    let mut rows = Vec::new();
    for t in client.targets(sel)? {
        let list = client.node(&t.name, &t.addr, "/connections")?;
        for c in list.as_array().into_iter().flatten() {
            let dst = if c["dst"].is_null() { &c["upstream"] } else { &c["dst"] };
            // An outbound connection's peer is the pod's own redirect (loopback): name the pod.
            let src = if c["direction"] == "outbound" { &c["pod"] } else { &c["src"] };
            table.row(vec![
                t.name.clone(),
                cell(&c["direction"]),
                cell(src),
                cell(dst),
                cell(&c["src_principal"]),
                cell(&c["dst_principal"]),
                cell(&c["route"]),
                human_bytes(c["bytes_received"].as_u64().unwrap_or(0)),
                human_bytes(c["bytes_sent"].as_u64().unwrap_or(0)),
                human_duration(c["duration_ms"].as_i64().unwrap_or(0) / 1000),
            ]);
            let mut row = c.clone();
            row["node"] = json!(t.name);
            rows.push(row);
        }
    }
    Ok(Report::new(&rows, table.render("no live connections")))
}

/// One node's whole dump; the table form is the JSON itself.
pub fn config_dump(client: &Client, sel: &NodeSelector) -> Result<Report> {
    let mut dumps = client.dumps(sel)?;
    if dumps.len() != 1 {
        return Err(
            CtlError::new("config-dump reads one node").hint("name it with --node NAME or --node-addr HOST:PORT")
        );
    }
    let (_, dump) = dumps.remove(0);
    let data = serde_json::to_value(&dump).unwrap_or_default();
    let text = serde_json::to_string_pretty(&data).unwrap_or_default() + "\n";
    Ok(Report { data, text, failed: false })
}
