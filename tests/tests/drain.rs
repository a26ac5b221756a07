//! Graceful drain: SIGTERM during a long iperf3 stream and a burst of short
//! connections. Readiness turns false at once, new connections are refused
//! from then on, the stream runs until the drain deadline and no longer, and
//! the pods stay fail-closed until the next agent takes them back.
use std::{
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{Proc, Topology, http_ok, run_in};

const DRAIN: Duration = Duration::from_secs(3);

fn readiness(node: &std::path::Path) -> String {
    let out = run_in(
        node,
        &["curl", "-s", "-m", "1", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:15021/healthz/ready"],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes so far of the agent's live connections to port 5201.
fn stream_bytes(agent: &mesh_tests::Agent) -> u64 {
    let out = run_in(&agent.node, &["curl", "-s", "-m", "2", &format!("http://{}/connections", agent.admin_addr)]);
    let conns: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    conns
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["dst"].as_str().is_some_and(|d| d.ends_with(":5201")))
        .map(|c| c["bytes_received"].as_u64().unwrap_or(0) + c["bytes_sent"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn sigterm_drains_open_connections_and_refuses_new_ones() {
    let t = Topology::new("drain");
    let (a, b) = (t.pod("a"), t.pod("b"));
    let node = t.node("node");
    let drain = format!("{}ms", DRAIN.as_millis());
    let Some(mut agent) = t.agent_or_skip("drain", &node, "n1", &["--drain-timeout", &drain]) else {
        return;
    };
    let _http = t.http_server(&b, 8080);
    agent.enroll(&a);
    agent.enroll(&b);
    let url = format!("http://{}:8080/", b.ip4);
    let iperf_server = Proc::spawn_in(
        "iperf3 server",
        &b.netns,
        &["iperf3", "-s", "-p", "5201", "--forceflush"],
        &t.dir.join("iperf3-server.log"),
    );
    iperf_server.wait_for_log("listening", Duration::from_secs(10));
    let mut iperf = Proc::spawn_in(
        "iperf3 client",
        &a.netns,
        &["iperf3", "-c", &b.ip4.to_string(), "-p", "5201", "-t", "30", "-i", "1", "--forceflush"],
        &t.dir.join("iperf3-client.log"),
    );
    // The stream is flowing through the proxy.
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(10));
    while stream_bytes(&agent) < 1 << 20 {
        assert!(Instant::now() < deadline, "no iperf3 stream through the proxy:\n{}", iperf.log_text());
        thread::sleep(Duration::from_millis(100));
    }
    // A burst of short connections, all served.
    for i in 0..20 {
        assert!(http_ok(&a.curl(&url)), "short connection {i} before the drain failed");
    }
    assert_eq!(readiness(&node), "200");

    let sigterm = Instant::now();
    agent.proc.signal(libc::SIGTERM);
    // Readiness turns false at once, while the agent is still running.
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_millis(500));
    while readiness(&node) != "503" {
        assert!(Instant::now() < deadline, "readiness still {} 500 ms after SIGTERM", readiness(&node));
        thread::sleep(Duration::from_millis(10));
    }
    assert!(agent.proc.is_running(), "the agent exited at once instead of draining");
    eprintln!("readiness false {} ms after SIGTERM", sigterm.elapsed().as_millis());

    // No new connection is accepted during the drain...
    for i in 0..5 {
        let out = a.curl(&url);
        assert!(!http_ok(&out), "short connection {i} was accepted during the drain: {out:?}");
    }
    // ...while the stream keeps moving.
    let before = stream_bytes(&agent);
    thread::sleep(Duration::from_millis(500));
    let during = stream_bytes(&agent);
    assert!(during > before, "the stream stopped during the drain ({before} -> {during} bytes)");

    // The agent exits at the deadline, cutting the stream there.
    let code = agent.proc.wait_exit(DRAIN + Duration::from_secs(5));
    let exited = sigterm.elapsed();
    assert_eq!(code, Some(0), "exit code:\n{}", agent.proc.log_text());
    assert!(exited >= DRAIN - Duration::from_millis(200), "exited after {exited:?}, before the drain deadline");
    let late = DRAIN + mesh_tests::patience(Duration::from_secs(2));
    assert!(exited < late, "exited after {exited:?}, long past the drain deadline");
    let log = agent.proc.log_text();
    assert!(log.contains("drain deadline reached"), "no drain deadline line in:\n{log}");
    eprintln!("agent exited {} ms after SIGTERM (drain {DRAIN:?})", exited.as_millis());
    let iperf_end = iperf.wait_exit(Duration::from_secs(10));
    assert!(sigterm.elapsed() < Duration::from_secs(25), "iperf3 ran to its end: the stream was not cut");
    eprintln!("iperf3 client ended ({iperf_end:?}) {} ms after SIGTERM", sigterm.elapsed().as_millis());

    // Afterwards the pods fail closed: nothing goes around the missing proxy.
    let out = a.curl(&url);
    assert!(!http_ok(&out), "a reached b with the agent gone: {out:?}");

    // The next agent takes the pods back.
    let _agent = t.start_agent(&node, "n1", &["--drain-timeout", &drain]).expect("restart");
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(5));
    while !http_ok(&a.curl(&url)) {
        assert!(Instant::now() < deadline, "the next agent did not restore a -> b");
        thread::sleep(Duration::from_millis(100));
    }
}

/// With no connection open, SIGTERM with --cleanup exits at once and leaves
/// nothing of the agent in the kernel.
#[test]
fn sigterm_without_connections_exits_at_once_and_cleans_up() {
    let t = Topology::new("drain-idle");
    let a = t.pod("a");
    let node = t.node("node");
    let Some(mut agent) = t.agent_or_skip("drain-idle", &node, "n1", &["--cleanup", "--drain-timeout", "10s"]) else {
        return;
    };
    agent.enroll(&a);
    let started = Instant::now();
    assert_eq!(agent.terminate(), Some(0), "clean exit:\n{}", agent.proc.log_text());
    assert!(started.elapsed() < Duration::from_secs(5), "an idle agent waited {:?} to exit", started.elapsed());
    assert!(agent.proc.log_text().contains("drained: no connection left"));
    assert!(!agent.pin_dir.exists(), "pins left at {}", agent.pin_dir.display());
}

/// Hitless upgrade (issue 16 pt 4): a new agent started beside the running
/// one on each node takes the pods' listening sockets over (SCM_RIGHTS), so
/// a client opening a connection every 5 ms across both nodes sees none
/// refused, and a bulk stream open through the old agents runs to its end.
/// For contrast, the same client through a plain restart (SIGTERM, then a
/// new agent) of the client's node; both counts are printed. A capture on
/// the bridge through both shows no plaintext between the two pods: only
/// TLS on 15008 (issue 16 pt 8).
#[test]
fn a_new_agent_takes_over_without_refusing_a_connection() {
    use mesh_tests::mesh::{Mesh, connection_prober, prober_counts};
    let Some(mut mesh) = Mesh::start_with("upgrade", &["node1", "node2"], &["--drain-timeout", "30s"]) else { return };
    let (a, b, _servers) = mesh.a_and_b_serving();
    let b_ip = b.ip4.to_string();
    let probe = mesh.t.pod("probe");
    let capture = mesh_tests::capture::Capture::start(&mesh, &probe, &b);

    let mut stream =
        Proc::spawn_in("iperf3", &a.netns, &["iperf3", "-c", &b_ip, "-t", "8", "-J"], &mesh.t.dir.join("iperf.log"));
    let mut prober = connection_prober(&a, &b_ip, 8, &mesh.t.dir.join("prober-upgrade.log"));
    thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let mut old = vec![mesh.upgrade_agent("node1"), mesh.upgrade_agent("node2")];
    let took = started.elapsed();
    assert_eq!(prober.wait_exit(Duration::from_secs(30)), Some(0));
    let (served, refused) = prober_counts(&prober);
    assert_eq!(stream.wait_exit(Duration::from_secs(30)), Some(0), "{}", stream.log_text());
    let report: serde_json::Value = serde_json::from_str(&stream.log_text()).unwrap_or_default();
    assert!(report.get("error").is_none(), "the stream through the old agents was cut: {report}");
    for agent in &mut old {
        assert_eq!(agent.proc.wait_exit(Duration::from_secs(30)), Some(0), "the old agent exits once drained");
        assert!(agent.proc.log_text().contains("handed the pods' listeners to a new agent"));
    }
    eprintln!("upgrade of both nodes in {took:?}: {served} connections served, {refused} refused or reset");
    assert_eq!(refused, 0, "{}", prober.log_text());
    assert!(served > 200, "the prober ran: {served}");
    let url = format!("http://{b_ip}/");
    assert!(run_in(&a.netns, &["curl", "-sf", "-m", "5", &url]).status.success(), "served by the new agents");

    // A plain restart of node1's agent, for contrast.
    let mut prober = connection_prober(&a, &b_ip, 4, &mesh.t.dir.join("prober-restart.log"));
    thread::sleep(Duration::from_secs(1));
    let i = mesh.nodes.iter().position(|n| n.name == "node1").unwrap();
    mesh.nodes[i].agent.proc.signal(libc::SIGTERM);
    assert_eq!(mesh.nodes[i].agent.proc.wait_exit(Duration::from_secs(30)), Some(0));
    mesh.restart_agent("node1");
    assert_eq!(prober.wait_exit(Duration::from_secs(30)), Some(0));
    let (served, refused) = prober_counts(&prober);
    eprintln!("plain restart of node1: {served} connections served, {refused} refused or reset");

    capture.assert_only_tls(&a, &b, &["GET / HTTP/1.0"]);
}
