//! `mesh-ctl authz explain --from A --to B:PORT`: the decision the
//! destination's node proxy makes for a connection from A, reached with the
//! proxy's own code (`mesh_common::authz::admission`) on the workloads and
//! policies that node holds now.
use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use mesh_common::admin::ConfigDump;
use mesh_common::{
    api,
    authz::{CompiledPolicy, Connection, Decision, admission},
    identity::SpiffeId,
};
use serde_json::json;

use crate::{
    api::{Client, CtlError, NodeSelector, Result, Target},
    explain_l7,
    output::Report,
};

pub fn explain(
    client: &Client,
    sel: &NodeSelector,
    from: &str,
    to: &str,
    request: &explain_l7::Request,
    l7_given: bool,
) -> Result<Report> {
    let (to_name, port) = split_port(to)?;
    let targets = client.targets(sel)?;
    let mut dumps: BTreeMap<String, ConfigDump> = BTreeMap::new();
    let first = &targets[0];
    dumps.insert(first.name.clone(), client.dump(first)?);
    let workloads = workloads_of(&dumps[&first.name]);

    let src = resolve(&workloads, from, "--from")?;
    // A service bound to a waypoint: its waypoint decides each request (every node holds its policies).
    let services = dumps[&first.name].services.clone().unwrap_or_default();
    if let Some(service) = waypoint_service(&services, &to_name) {
        let ip = src.ip.unwrap_or_else(|| src.workload.map_or(IpAddr::from([0, 0, 0, 0]), |w| pick_ip(&w.ips, None)));
        let identity = match src.workload.filter(|w| w.speaks_hbone()) {
            Some(w) => Some(w.identity.parse().map_err(|e| CtlError::new(format!("{}: identity: {e}", w.uid)))?),
            None => None,
        };
        let source = explain_l7::Source { workload: src.workload, identity, ip };
        let dump = &dumps[&first.name];
        return explain_l7::explain(dump, service, port, &source, request, &policies_of(dump, &first.name)?);
    }
    if l7_given {
        return Err(CtlError::new(format!("--to {to_name}: not a service bound to a waypoint"))
            .hint("--method, --path, --authority and --header are decided at a waypoint: name NAMESPACE/SERVICE:PORT of a service that uses one"));
    }
    let dst = resolve(&workloads, &to_name, "--to")?;
    let Some(dst_w) = dst.workload else {
        return Err(CtlError::new(format!("--to {to_name}: no workload has that address"))
            .hint("policy is enforced by the destination's node proxy; name a workload in the mesh"));
    };
    // The destination's node holds the policies that decide (when it is one of ours).
    let node_name = if sel.node_addr.is_some() { first.name.clone() } else { dst_w.node.clone() };
    let node: &Target = targets.iter().find(|t| t.name == node_name).ok_or_else(|| {
        CtlError::new(format!("{} is on node {:?}, which has not connected to the controller", dst_w.uid, dst_w.node))
    })?;
    if !dumps.contains_key(&node.name) {
        dumps.insert(node.name.clone(), client.dump(node)?);
    }
    let dump = &dumps[&node.name];
    let enrolled = dump.pods.iter().any(|p| p.name == format!("{}/{}", dst_w.namespace, dst_w.name));
    let policies = policies_of(dump, &node.name)?;

    let dst_ip = dst.ip.unwrap_or_else(|| pick_ip(&dst_w.ips, None));
    let src_ip = src.ip.unwrap_or_else(|| src.workload.map_or(dst_ip, |w| pick_ip(&w.ips, Some(dst_ip))));
    // A captured source's proxy speaks HBONE with the source's certificate;
    // anything else arrives in plaintext, with no verified identity.
    let hbone = src.workload.is_some_and(api::Workload::speaks_hbone);
    let source: Option<SpiffeId> = match src.workload.filter(|_| hbone) {
        Some(w) => Some(w.identity.parse().map_err(|e| CtlError::new(format!("{}: identity: {e}", w.uid)))?),
        None => None,
    };
    let conn = Connection { source: source.clone(), source_ip: src_ip, destination_ip: dst_ip, destination_port: port };
    let explanation = if enrolled {
        admission::explain(dst_w, &policies, &conn)
    } else {
        admission::Explanation {
            mtls_mode: "-".into(),
            policies: Vec::new(),
            decision: Decision {
                allowed: true,
                policy: None,
                reason: format!("{} is not enrolled on node {}: nothing enforces policy for it", dst_w.uid, node.name),
            },
        }
    };

    let mut text = String::new();
    let src_desc = match (src.workload, &source) {
        (Some(w), Some(id)) => format!("{} ({src_ip}), in the mesh: HBONE (mTLS) as {id}", w.uid),
        (Some(w), None) => format!("{} ({src_ip}), outside the mesh: plaintext, no identity", w.uid),
        (None, _) => format!("{src_ip}, not a known workload: plaintext, no identity"),
    };
    let _ = writeln!(text, "from      {src_desc}");
    let _ = writeln!(
        text,
        "to        {} ({dst_ip}:{port}) on node {}, {}, PeerAuthentication {}",
        dst_w.uid,
        node.name,
        if enrolled { "enrolled" } else { "not enrolled" },
        explanation.mtls_mode
    );
    if explanation.policies.is_empty() {
        let _ = writeln!(text, "policies  none apply");
    } else {
        let _ = writeln!(text, "policies  (DENY first, then ALLOW; AUDIT never decides)");
        for v in &explanation.policies {
            let verdict = v.matched_rule.map_or("no rule matches".to_owned(), |r| format!("matches (rule {r})"));
            let _ = writeln!(text, "  {:<6} {:<40} {verdict}", format!("{:?}", v.action).to_uppercase(), v.policy);
        }
    }
    let d = &explanation.decision;
    let _ = writeln!(
        text,
        "decision  {}{}: {}",
        if d.allowed { "ALLOW" } else { "DENY" },
        d.policy.as_ref().map(|p| format!(" by {p}")).unwrap_or_default(),
        d.reason
    );
    let data = json!({
        "from": { "workload": src.workload.map(|w| &w.uid), "ip": src_ip, "identity": source.map(|s| s.to_string()), "hbone": hbone },
        "to": { "workload": dst_w.uid, "ip": dst_ip, "port": port, "node": node.name, "enrolled": enrolled },
        "mtls_mode": explanation.mtls_mode,
        "policies": explanation.policies,
        "decision": explanation.decision,
    });
    let mut report = Report::new(data, text);
    report.failed = !d.allowed;
    Ok(report)
}

/// `ns/name:80`, `name:80`, `10.0.0.1:80`, `[fd00::1]:80`.
fn split_port(to: &str) -> Result<(String, u16)> {
    let bad = || {
        CtlError::new(format!("--to {to:?}: expected WORKLOAD:PORT or IP:PORT"))
            .hint("the decision depends on the port, e.g. --to shop/db:6379 or --to '[fd00::5]:6379'")
    };
    let (host, port) = to.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.contains(':') && !host.starts_with('[') {
        return Err(bad()); // a bare IPv6 address without a port
    }
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_owned(), port))
}

#[derive(Debug)]
struct Resolved<'a> {
    workload: Option<&'a api::Workload>,
    /// Set when the user gave an address.
    ip: Option<IpAddr>,
}

/// A workload by `namespace/name`, by a name unique in the mesh, or by IP
/// (an IP need not be a workload's: it is then a source outside the mesh).
fn resolve<'a>(workloads: &'a [api::Workload], what: &str, flag: &str) -> Result<Resolved<'a>> {
    if let Ok(ip) = what.parse::<IpAddr>() {
        let workload = workloads.iter().find(|w| w.ips.iter().any(|a| a.parse() == Ok(ip)));
        return Ok(Resolved { workload, ip: Some(ip) });
    }
    let found: Vec<&api::Workload> = match what.split_once('/') {
        Some((ns, name)) => workloads.iter().filter(|w| w.namespace == ns && w.name == name).collect(),
        None => workloads.iter().filter(|w| w.name == what).collect(),
    };
    match found.as_slice() {
        [w] => Ok(Resolved { workload: Some(w), ip: None }),
        [] => Err(CtlError::new(format!("{flag} {what}: no such workload")).hint("`mesh-ctl workloads` lists them")),
        many => {
            let names: Vec<String> = many.iter().map(|w| format!("{}/{}", w.namespace, w.name)).collect();
            Err(CtlError::new(format!("{flag} {what}: ambiguous ({})", names.join(", ")))
                .hint("write it as namespace/name"))
        }
    }
}

/// The service `what` names (`namespace/name`, or a name unique among
/// services), when it is bound to a waypoint.
fn waypoint_service<'a>(services: &'a BTreeMap<String, api::Service>, what: &str) -> Option<&'a api::Service> {
    let found = services.get(what).or_else(|| {
        let mut named = services.values().filter(|s| s.name == what);
        named.next().filter(|_| named.next().is_none())
    })?;
    found.waypoint.is_some().then_some(found)
}

/// An address of `ips` in the family of `like` (IPv4 first otherwise).
fn pick_ip(ips: &[String], like: Option<IpAddr>) -> IpAddr {
    let parsed: Vec<IpAddr> = ips.iter().filter_map(|a| a.parse().ok()).collect();
    let want_v4 = like.is_none_or(|l| l.is_ipv4());
    parsed.iter().find(|a| a.is_ipv4() == want_v4).or(parsed.first()).copied().unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

fn workloads_of(dump: &ConfigDump) -> Vec<api::Workload> {
    dump.workloads.iter().flatten().map(|(_, w)| w.clone()).collect()
}

fn policies_of(dump: &ConfigDump, node: &str) -> Result<Vec<(api::Authorization, CompiledPolicy)>> {
    dump.policies
        .iter()
        .flatten()
        .map(|(k, wire)| {
            let compiled =
                CompiledPolicy::from_wire(wire).map_err(|e| CtlError::new(format!("node {node}: policy {k}: {e}")))?;
            Ok((wire.clone(), compiled))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_and_ports() {
        for (to, want) in [
            ("shop/db:6379", Some(("shop/db", 6379))),
            ("db:80", Some(("db", 80))),
            ("10.0.0.1:8080", Some(("10.0.0.1", 8080))),
            ("[fd00::1]:80", Some(("fd00::1", 80))),
            ("shop/db", None),
            ("fd00::1", None),
            ("db:http", None),
        ] {
            let got = split_port(to).ok();
            assert_eq!(got.as_ref().map(|(h, p)| (h.as_str(), *p)), want, "{to}");
        }
    }

    #[test]
    fn workloads_by_name_namespace_or_ip() {
        let w = |ns: &str, name: &str, ip: &str| api::Workload {
            uid: format!("Pod/{ns}/{name}"),
            namespace: ns.into(),
            name: name.into(),
            ips: vec![ip.into(), "fd00::9".into()],
            ..Default::default()
        };
        let all = vec![w("a", "web", "10.0.0.1"), w("b", "web", "10.0.0.2"), w("a", "db", "10.0.0.3")];
        assert_eq!(resolve(&all, "db", "--to").unwrap().workload.unwrap().uid, "Pod/a/db");
        assert_eq!(resolve(&all, "b/web", "--to").unwrap().workload.unwrap().uid, "Pod/b/web");
        assert!(resolve(&all, "web", "--to").unwrap_err().message.contains("ambiguous (a/web, b/web)"));
        assert!(resolve(&all, "nope", "--from").is_err());
        let by_ip = resolve(&all, "10.0.0.2", "--from").unwrap();
        assert_eq!(by_ip.workload.unwrap().uid, "Pod/b/web");
        assert!(resolve(&all, "192.0.2.1", "--from").unwrap().workload.is_none());
        assert_eq!(pick_ip(&all[0].ips, Some("fd00::1".parse().unwrap())), "fd00::9".parse::<IpAddr>().unwrap());
        assert_eq!(pick_ip(&all[0].ips, None), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
