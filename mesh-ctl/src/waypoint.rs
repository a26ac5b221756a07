//! `mesh-ctl waypoint apply|list|status|delete`: declares a waypoint (a
//! Gateway of class istio-waypoint, as `istioctl waypoint apply` writes it)
//! in the controller's configuration directory, binds a namespace to it, and
//! shows which instances run it and which services use it. The instances
//! themselves are `mesh-waypoint` processes the operator runs (a Deployment
//! on Kubernetes); `apply` says how when none runs.
use std::{
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    api::{Client, CtlError, NodeSelector, Result},
    enroll::{replace_document, set_label_in_file, wait_applied, write_atomic},
    output::{Report, Table},
};

use mesh_config::{GATEWAY_NAME_LABEL, USE_WAYPOINT};

pub struct Apply<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// `service`, `workload`, `all` or `none`.
    pub for_traffic: &'a str,
    /// Label the namespace `istio.io/use-waypoint: NAME`.
    pub enroll_namespace: bool,
    pub timeout: Duration,
}

/// The controller's configuration directory, which mesh-ctl edits; on
/// Kubernetes, an error whose hint is `kubectl`, the way to make the edit there.
pub(crate) fn config_dir(config: &Value, client: &Client, kubectl: &str) -> Result<PathBuf> {
    if config["source"] == "kubernetes" {
        return Err(CtlError::new(format!(
            "the controller at {} reads its configuration from Kubernetes, not from a directory mesh-ctl can edit",
            client.controller
        ))
        .hint(format!("make the change on the API server: {kubectl}")));
    }
    config["config_dir"].as_str().map(PathBuf::from).ok_or_else(|| {
        CtlError::new(format!("the controller at {} does not say where its configuration is", client.controller))
            .hint("mesh-ctl and mesh-controller should be the same version")
    })
}

fn object<'a>(config: &'a Value, key: &str) -> Option<&'a Value> {
    config["objects"].as_array().into_iter().flatten().find(|o| o["key"] == key)
}

fn origin(o: &Value) -> (PathBuf, usize) {
    (
        PathBuf::from(o["origin"]["file"].as_str().unwrap_or_default()),
        o["origin"]["line"].as_u64().unwrap_or(0) as usize,
    )
}

pub fn apply(client: &Client, a: &Apply<'_>) -> Result<Report> {
    let started = Instant::now();
    let config = client.controller("/debug/config")?;
    let generation = config["generation"].as_u64().unwrap_or(0);
    let dir = config_dir(&config, client, "kubectl apply -f a Gateway with gatewayClassName: istio-waypoint")?;
    let (ns, name) = (a.namespace, a.name);
    let mut steps = Vec::new();
    let mut written = Vec::new();
    if object(&config, &format!("Gateway {ns}/{name}")).is_none() {
        let file = dir.join(format!("waypoint-{ns}-{name}.yaml"));
        let text = format!(
            "# Written by `mesh-ctl waypoint apply -n {ns} {name}`.\napiVersion: gateway.networking.k8s.io/v1\n\
             kind: Gateway\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    istio.io/waypoint-for: {}\n\
             spec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - name: mesh\n    port: 15008\n    protocol: HBONE\n",
            a.for_traffic
        );
        write_atomic(&file, &text)?;
        steps.push(format!("Gateway {ns}/{name} written to {}", file.display()));
        written.push(file);
    } else {
        steps.push(format!("Gateway {ns}/{name} already defined"));
    }
    if a.enroll_namespace {
        match object(&config, &format!("Namespace {ns}")) {
            Some(o) => {
                let (file, line) = origin(o);
                if set_label_in_file(&file, line, USE_WAYPOINT, Some(name))? {
                    steps.push(format!("namespace {ns} labelled {USE_WAYPOINT}: {name} in {}", file.display()));
                    written.push(file);
                }
            }
            None => {
                let file = dir.join(format!("namespace-{ns}.yaml"));
                let text = format!(
                    "# Written by `mesh-ctl waypoint apply -n {ns} {name} --enroll-namespace`.\napiVersion: v1\n\
                     kind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    {USE_WAYPOINT}: {name}\n"
                );
                write_atomic(&file, &text)?;
                steps.push(format!("namespace {ns} written with {USE_WAYPOINT}: {name} to {}", file.display()));
                written.push(file);
            }
        }
    }
    let deadline = started + a.timeout;
    for file in &written {
        wait_applied(client, generation, file, deadline)?;
    }
    // In force when every node holds the binding for the namespace's bound services.
    let bound = wait_bound(client, ns, name, deadline)?;
    let status = status_of(client, ns, name)?;
    let instances = status["instances"].as_array().map_or(0, Vec::len);
    let mut text: String = steps.iter().map(|s| format!("{s}\n")).collect();
    text += &format!("{bound} service(s) bound on every node after {:.1}s\n", started.elapsed().as_secs_f64());
    if instances == 0 {
        text += &format!(
            "no instance runs yet: connections to the bound services are refused until one does. Run one with\n  \
             a Pod {ns}/<name> labelled {GATEWAY_NAME_LABEL}: {name} and spec.nodeName <node>, and\n  \
             mesh-ctl node add <node> --token-file <file>   # on the controller's host\n  \
             mesh-waypoint --controller <host:15012> --node-name <node> --join-token <file> --controller-ca <file>\n"
        );
    } else {
        text += &format!("{instances} instance(s): {}\n", status["instances"]);
    }
    Ok(Report::new(json!({ "steps": steps, "bound_services": bound, "status": status }), text))
}

/// Waits until every node's services of `ns` that name a waypoint name this
/// one; returns how many do.
fn wait_bound(client: &Client, ns: &str, name: &str, deadline: Instant) -> Result<usize> {
    loop {
        let dumps = client.dumps(&NodeSelector::default())?;
        let counts: Vec<usize> = dumps
            .iter()
            .map(|(_, d)| {
                d.services
                    .iter()
                    .flatten()
                    .filter(|(_, s)| s.namespace == ns && s.waypoint.as_ref().is_some_and(|w| w.name == name))
                    .count()
            })
            .collect();
        if counts.windows(2).all(|w| w[0] == w[1]) && counts.first().is_some_and(|n| *n > 0) {
            return Ok(counts[0]);
        }
        if Instant::now() > deadline {
            return Ok(counts.first().copied().unwrap_or(0));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A waypoint's instances (with whether their process is connected and in
/// sync) and the services bound to it, from the controller's model.
fn status_of(client: &Client, ns: &str, name: &str) -> Result<Value> {
    let model = client.controller("/debug/model")?;
    let (version, nodes) = client.node_list()?;
    let instances: Vec<Value> = model["workloads"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(_, w)| w)
        .filter(|w| w["native_tunnel"] == true && w["namespace"] == ns && w["labels"][GATEWAY_NAME_LABEL] == name)
        .map(|w| {
            let node = w["node"].as_str().unwrap_or_default();
            let process = nodes.iter().find(|n| n.name == node && n.status.role == "waypoint");
            json!({
                "pod": format!("{ns}/{}", w["name"].as_str().unwrap_or_default()),
                "ips": w["ips"],
                "node": node,
                "connected": process.is_some_and(|n| n.status.connected),
                "in_sync": process.is_some_and(|n| n.status.version_acked == version),
            })
        })
        .collect();
    let services: Vec<String> = model["services"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, s)| s["waypoint"]["gateway"] == format!("{ns}/{name}"))
        .map(|(k, _)| k.clone())
        .collect();
    let declared = model["waypoints"].get(format!("{ns}/{name}")).cloned();
    Ok(
        json!({ "waypoint": format!("{ns}/{name}"), "declared": declared, "instances": instances, "services": services }),
    )
}

pub fn list(client: &Client, namespace: Option<&str>) -> Result<Report> {
    let model = client.controller("/debug/model")?;
    let mut table = Table::new(&["NAMESPACE", "NAME", "FOR", "INSTANCES", "READY", "SERVICES"]);
    let mut rows = Vec::new();
    for (key, w) in model["waypoints"].as_object().into_iter().flatten() {
        let (ns, name) = key.split_once('/').unwrap_or_default();
        if namespace.is_some_and(|n| n != ns) {
            continue;
        }
        let s = status_of(client, ns, name)?;
        let instances = s["instances"].as_array().cloned().unwrap_or_default();
        let ready = instances.iter().filter(|i| i["connected"] == true && i["in_sync"] == true).count();
        let services =
            s["services"].as_array().map(|v| v.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","));
        table.row(vec![
            ns.into(),
            name.into(),
            w["for_traffic"].as_str().unwrap_or("service").into(),
            instances.len().to_string(),
            format!("{ready}/{}", instances.len()),
            services.filter(|s| !s.is_empty()).unwrap_or_else(|| "none".into()),
        ]);
        rows.push(s);
    }
    Ok(Report::new(&rows, table.render("no waypoints (mesh-ctl waypoint apply -n NAMESPACE NAME declares one)")))
}

pub fn status(client: &Client, namespace: &str, name: &str) -> Result<Report> {
    let s = status_of(client, namespace, name)?;
    if s["declared"].is_null() {
        return Err(CtlError::new(format!("no waypoint {namespace}/{name}"))
            .hint("`mesh-ctl waypoint list` shows the waypoints; `waypoint apply` declares one"));
    }
    let mut text = format!("waypoint {namespace}/{name}\n");
    let instances = s["instances"].as_array().cloned().unwrap_or_default();
    if instances.is_empty() {
        text += "  no instance runs: connections to its services are refused until one does\n";
    }
    for i in &instances {
        text += &format!(
            "  instance {} on {} ({}): {}\n",
            i["pod"].as_str().unwrap_or_default(),
            i["node"].as_str().unwrap_or_default(),
            i["ips"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
                .unwrap_or_default(),
            match (i["connected"] == true, i["in_sync"] == true) {
                (true, true) => "connected, in sync",
                (true, false) => "connected, catching up",
                _ => "NOT CONNECTED",
            }
        );
    }
    let services: Vec<&str> = s["services"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    text += &format!("  services: {}\n", if services.is_empty() { "none bound".into() } else { services.join(", ") });
    Ok(Report::new(s, text))
}

pub fn delete(client: &Client, namespace: &str, name: &str, timeout: Duration) -> Result<Report> {
    let started = Instant::now();
    let config = client.controller("/debug/config")?;
    let generation = config["generation"].as_u64().unwrap_or(0);
    let gateway = object(&config, &format!("Gateway {namespace}/{name}"))
        .ok_or_else(|| CtlError::new(format!("no Gateway {namespace}/{name} in the configuration")))?;
    let (file, line) = origin(gateway);
    let text =
        std::fs::read_to_string(&file).map_err(|e| CtlError::new(format!("cannot read {}: {e}", file.display())))?;
    let rest = replace_document(&text, line, None);
    let mut steps = Vec::new();
    if rest.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#') || l.trim() == "---") {
        std::fs::remove_file(&file).map_err(|e| CtlError::new(format!("cannot remove {}: {e}", file.display())))?;
        steps.push(format!("removed {}", file.display()));
    } else {
        write_atomic(&file, &rest)?;
        steps.push(format!("Gateway {namespace}/{name} removed from {}", file.display()));
    }
    let mut written = vec![file];
    if let Some(o) = object(&config, &format!("Namespace {namespace}"))
        && o["object"]["metadata"]["labels"][USE_WAYPOINT] == name
    {
        let (file, line) = origin(o);
        if set_label_in_file(&file, line, USE_WAYPOINT, None)? {
            steps.push(format!("label {USE_WAYPOINT} removed from namespace {namespace} in {}", file.display()));
            written.push(file);
        }
    }
    for f in &written {
        wait_applied(client, generation, f, started + timeout)?;
    }
    let text: String = steps.iter().map(|s| format!("{s}\n")).collect();
    Ok(Report::new(json!({ "steps": steps }), text))
}
