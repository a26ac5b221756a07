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
