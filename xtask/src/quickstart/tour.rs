//! What the quickstart shows once the demo runs: traffic through the mesh, the
//! identities issued, HBONE on the wire, a policy that blocks one caller, a
//! waypoint routing a canary and a marked tester, and the metrics the proxies
//! keep. Each claim is checked, not just printed.
use std::{collections::BTreeMap, path::Path, process::Command, thread, time::Duration};

use anyhow::{Context as _, bail, ensure};
use mesh_tests::{
    Proc,
    mesh::{Mesh, node_metrics, sum_metric, yaml},
    run_in,
    waypoint::waypoint_metrics,
};

use super::{
    Ctl, DIR,
    app::{App, FRONTEND_VIP, NAMESPACE, REDIS_VIP, ROUTES_YAML},
};
use crate::step;

/// The tour; returns the processes it started (the waypoint, the canary), to
/// leave running, and the waypoint's pod.
pub fn run(mesh: &Mesh, app: &App, ctl: &Ctl) -> anyhow::Result<(Vec<Proc>, mesh_tests::Pod)> {
    step("traffic: 20 requests from demo/tester to the frontend service; frontend -> backend service -> redis");
    let tester = &app.member("tester").pod;
    let replies = requests(tester, 20);
    let mut by_backend: BTreeMap<String, usize> = BTreeMap::new();
    for r in &replies {
        *by_backend.entry(r.split(" on ").next().unwrap_or(r).to_owned()).or_default() += 1;
    }
    println!("    last reply: {}", replies.last().map(String::as_str).unwrap_or("-"));
    println!("    answered by: {by_backend:?} (the backend service spreads over its replicas on both nodes)");
    ensure!(
        replies.iter().all(|r| r.contains(": visit ")) && by_backend.len() == 2,
        "expected 20 answers from both backends, got {replies:?}"
    );

    step("identities: every workload has a SPIFFE ID; its node proxy holds the certificate");
    indent(&ctl.run(&["workloads"])?);
    indent(&ctl.run(&["certs"])?);

    step("on the wire: tshark on the bridge while 5 more requests run");
    wire_proof(mesh, tester)?;

    step("policy: only the backend may talk to redis");
    let policy = yaml::authorization(
        NAMESPACE,
        "redis-only-from-backend",
        &format!(
            "{{selector: {{matchLabels: {{app: redis}}}}, action: ALLOW, rules: [{{from: [{{source: {{principals: \
             [cluster.local/ns/{NAMESPACE}/sa/backend]}}}}]}}]}}"
        ),
    );
    let took = mesh.apply("30-policy.yaml", &policy);
    println!("    applied AuthorizationPolicy demo/redis-only-from-backend; in force on both nodes after {took:?}");
    let denied = run_in(&tester.netns, &["timeout", "5", "redis-cli", "-h", REDIS_VIP, "ping"]);
    let denied_text = format!("{}{}", String::from_utf8_lossy(&denied.stdout), String::from_utf8_lossy(&denied.stderr));
    println!("    demo/tester$ redis-cli -h {REDIS_VIP} ping   ->  {}", denied_text.trim());
    ensure!(!denied_text.contains("PONG"), "tester still reaches redis: {denied_text}");
    let allowed = requests(tester, 1);
    println!("    demo/tester$ curl {FRONTEND_VIP}        ->  {}", allowed[0]);
    ensure!(allowed[0].contains(": visit "), "the backend lost redis: {allowed:?}");
    println!("    why (mesh-ctl authz explain --from demo/tester --to demo/redis:6379):");
    indent(&ctl.run(&["authz", "explain", "--from", "demo/tester", "--to", "demo/redis:6379"])?);

    let procs = canary(mesh, app, ctl)?;

    step(
        "metrics: connections closed and bytes, as the destinations' proxies counted them (istio_tcp_*, :15020/metrics)",
    );
    metrics(mesh)?;
    Ok(procs)
}

/// L7: a waypoint for the backend service, a canary v2 at 10 %, the tester's
/// marked requests always to v2; the split as the waypoint counted it.
fn canary(mesh: &Mesh, app: &App, ctl: &Ctl) -> anyhow::Result<(Vec<Proc>, mesh_tests::Pod)> {
    step(
        "L7: a waypoint for the backend service (Gateway demo/waypoint, class istio-waypoint), and a canary backend-v2",
    );
    let (wp, procs) = app.add_waypoint(mesh)?;
    println!("    the backend service is labelled istio.io/use-waypoint: waypoint; the node proxies now send its");
    println!("    connections to the waypoint over HBONE, and the waypoint chooses a backend for every request");
    step(
        "routing: 90 % to v1 and 10 % to v2, and requests marked x-tester: yes always to v2 (VirtualService, DestinationRule)",
    );
    mesh.apply("50-routes.yaml", ROUTES_YAML);
    mesh.wait_waypoint_current(&wp);
    let tester = &app.member("tester").pod;
    let labels = [("reporter", "waypoint"), ("destination_service_name", "backend"), ("response_code", "200")];
    let by_workload = |text: &str| -> BTreeMap<String, f64> {
        ["backend-1", "backend-2", "backend-v2"]
            .iter()
            .map(|w| {
                let mut l = labels.to_vec();
                l.push(("destination_workload", w));
                (w.to_string(), sum_metric(text, "istio_requests_total", &l))
            })
            .collect()
    };
    let before = by_workload(&waypoint_metrics(&wp));
    let out = run_in(&tester.netns, &["curl", "-s", "-m", "60", &format!("http://{FRONTEND_VIP}/?[1-200]")]);
    let replies = String::from_utf8_lossy(&out.stdout);
    ensure!(replies.lines().count() == 200, "200 replies expected, got:\n{replies}");
    thread::sleep(Duration::from_millis(200)); // a request is counted when its response has ended
    let after = by_workload(&waypoint_metrics(&wp));
    let counted: BTreeMap<&String, f64> = after.iter().map(|(k, v)| (k, v - before[k])).collect();
    let total: f64 = counted.values().sum();
    let v2 = counted.get(&"backend-v2".to_string()).copied().unwrap_or(0.0);
    println!(
        "    200 requests from demo/tester, as the waypoint counted them (istio_requests_total by destination_workload):"
    );
    for (w, n) in &counted {
        println!("      {w:<12} {n:>5}  ({:.0} %)", n * 100.0 / total.max(1.0));
    }
    ensure!(total == 200.0, "the waypoint counted {total} of 200 requests");
    ensure!((8.0..=40.0).contains(&v2), "the canary got {v2} of 200 requests, not about 10 %");
    let marked = run_in(
        &tester.netns,
        &["curl", "-s", "-m", "30", "-H", "x-tester: yes", &format!("http://{FRONTEND_VIP}/?[1-10]")],
    );
    let marked = String::from_utf8_lossy(&marked.stdout);
    println!("    10 requests with x-tester: yes  ->  {}", marked.lines().next().unwrap_or("-"));
    ensure!(
        marked.lines().count() == 10 && marked.lines().all(|l| l.starts_with("backend-v2 ")),
        "marked requests: {marked}"
    );
    println!("    why (mesh-ctl route explain --to demo/backend:80 --header x-tester=yes):");
    indent(&ctl.run(&["route", "explain", "--to", "demo/backend:80", "--header", "x-tester=yes"])?);
    Ok((procs, wp))
}

/// `n` requests to the frontend from `pod`; each reply's text.
fn requests(pod: &mesh_tests::Pod, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let out = run_in(&pod.netns, &["curl", "-s", "-m", "5", &format!("http://{FRONTEND_VIP}/")]);
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        })
        .collect()
}

/// Captures the bridge during traffic and shows that pods only exchange TLS
/// on HBONE's port: no plaintext port, and none of the app's text.
fn wire_proof(mesh: &Mesh, tester: &mesh_tests::Pod) -> anyhow::Result<()> {
    let pcap = Path::new(DIR).join("capture.pcap");
    let mut tshark = Proc::spawn_in(
        "tshark",
        mesh.t.network(),
        &["tshark", "-i", "br0", "-w", pcap.to_str().unwrap(), "-f", "tcp"],
        &Path::new(DIR).join("tshark.log"),
    );
    tshark.wait_for_log("Capturing on", Duration::from_secs(20));
    thread::sleep(Duration::from_secs(1)); // "Capturing on" comes just before the capture starts
    let replies = requests(tester, 5);
    thread::sleep(Duration::from_millis(500));
    tshark.signal(libc::SIGINT);
    tshark.wait_exit(Duration::from_secs(10));

    let pod_net = "ip.src==10.200.0.0/24 && ip.dst==10.200.0.0/24";
    let total = count(&pcap, pod_net)?;
    let hbone = count(&pcap, &format!("{pod_net} && tcp.port==15008"))?;
    let tls_data = count(&pcap, &format!("{pod_net} && tls.app_data"))?;
    let plain = count(&pcap, "frame contains \"visit\"")?;
    println!("    {} replies, e.g. {:?}", replies.len(), replies.last().map(String::as_str).unwrap_or("-"));
    println!(
        "    TCP segments between pods: {total}; on port 15008 (HBONE): {hbone}; on any other port: {}",
        total - hbone
    );
    println!("    TLS application-data records among them: {tls_data}");
    println!("    segments carrying the reply text \"visit\" in the clear: {plain}");
    ensure!(total > 0 && total == hbone && tls_data > 0 && plain == 0, "the capture does not show HBONE-only traffic");
    println!(
        "    -> traffic between pods on different nodes is mutual TLS on HBONE's port; between two pods \
         of one node it never reaches the wire (the node proxy relays it in memory: route \"local\" in \
         mesh-ctl connections)"
    );
    Ok(())
}

/// Packets of `pcap` matching a display filter (15008 decoded as TLS).
fn count(pcap: &Path, filter: &str) -> anyhow::Result<usize> {
    let out = Command::new("tshark")
        .args(["-r", pcap.to_str().unwrap(), "-d", "tcp.port==15008,tls", "-Y", filter])
        .output()
        .context("running tshark")?;
    if !out.status.success() {
        bail!("tshark -Y {filter:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

/// Connections and bytes by (source, destination), as destinations reported them.
fn metrics(mesh: &Mesh) -> anyhow::Result<()> {
    let mut rows: BTreeMap<(String, String, String), (f64, f64)> = BTreeMap::new();
    for node in &mesh.nodes {
        let text = node_metrics(&node.netns);
        for line in text.lines() {
            let (name, labels, value) = match parse_sample(line) {
                Some(s) => s,
                None => continue,
            };
            if labels.get("reporter").map(String::as_str) != Some("destination") {
                continue;
            }
            let key = (
                labels.get("source_workload").cloned().unwrap_or_default(),
                labels.get("destination_workload").cloned().unwrap_or_default(),
                labels.get("response_flags").cloned().unwrap_or_default(),
            );
            let entry = rows.entry(key).or_default();
            match name {
                "istio_tcp_connections_closed_total" => entry.0 += value,
                "istio_tcp_received_bytes_total" | "istio_tcp_sent_bytes_total" => entry.1 += value,
                _ => {}
            }
        }
    }
    println!("    {:<12} {:<12} {:<6} {:>11} {:>10}", "SOURCE", "DESTINATION", "FLAGS", "CLOSED", "BYTES");
    for ((src, dst, flags), (conns, bytes)) in rows.iter().filter(|(_, (n, _))| *n > 0.0) {
        println!("    {src:<12} {dst:<12} {flags:<6} {conns:>11} {bytes:>10}");
    }
    ensure!(
        rows.iter().any(|((s, d, f), (n, _))| s == "tester" && d == "redis" && f == "RBAC" && *n >= 1.0),
        "no denied tester -> redis connection in the metrics"
    );
    println!("    (FLAGS RBAC: refused by policy; the tester -> redis row is the connection just blocked)");
    Ok(())
}

/// `name{k="v",...} value`.
fn parse_sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    let (head, value) = line.rsplit_once(' ')?;
    let (name, labels) = head.split_once('{')?;
    let labels = labels.strip_suffix('}')?;
    let map = labels
        .split("\",")
        .filter_map(|kv| {
            let (k, v) = kv.split_once("=\"")?;
            Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
        })
        .collect();
    Some((name, map, value.parse().ok()?))
}

fn indent(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

pub fn next_steps(ctl: &Ctl) {
    step("the mesh keeps running; try:");
    let (bin, token) = (ctl.bin.display(), ctl.admin_token.display());
    println!("    alias mesh-ctl='MESH_ADMIN_TOKEN_FILE={token} {bin}'   # the token lets it read the nodes");
    println!("    mesh-ctl status                                   # controller, nodes, versions, rejected objects");
    println!("    mesh-ctl workloads | services | policies | certs   # what the nodes see");
    println!("    mesh-ctl connections                              # live connections with identities and bytes");
    println!("    mesh-ctl authz explain --from demo/frontend --to demo/redis:6379");
    println!("    mesh-ctl routes                                   # the waypoint's routes for the backend service");
    println!("    mesh-ctl route explain --to demo/backend:80 --path /");
    println!("    {:<49} # validate configuration offline", format!("mesh-ctl check {DIR}/config"));
    println!("    mesh-ctl unenroll demo; mesh-ctl enroll demo      # take the namespace out of the mesh and back");
    println!("    {:<49} # more traffic", format!("ip netns exec mq-tester curl -s http://{FRONTEND_VIP}/"));
    println!("    {:<49} # the live service graph (a browser page)", format!("http://{}/graph", super::METRICS_ADDR));
    println!("    {:<49} # the same graph, as text or drawn", "mesh-ctl graph; mesh-ctl graph -o svg > g.svg");
    println!("    {:<49} # a node agent's log (JSON; access lines too)", format!("tail -f {DIR}/agent-node1-*.log"));
    println!("    {:<49} # Prometheus, scraping the mesh every 5 s", format!("http://{}/", super::prometheus::ADDR));
    println!(
        "    {:<49} # e.g. requests per second by backend workload",
        "  sum by (destination_workload) (rate(istio_requests_total[1m]))"
    );
    println!("    cargo xtask quickstart --down                     # remove everything");
}
