//! Outbound redirect and inbound steering for enrolled pods, and nothing for
//! anyone else (issue points 1, 2, 3 and 8).
use std::{thread, time::Duration};

use mesh_tests::{Topology, http_clients, http_ok, run_in};

fn ok(out: std::process::Output) {
    assert!(
        http_ok(&out),
        "request failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Lets a line that should *not* appear get the chance to.
fn settle() {
    thread::sleep(Duration::from_millis(300));
}

#[test]
fn enrolled_pods_go_through_the_node_proxy_both_ways() {
    let t = Topology::new("proxy-both-ways");
    let (a, b) = (t.pod("a"), t.pod("b"));
    let node = t.node("node");
    let Some(agent) = t.agent_or_skip("proxy-both-ways", &node, "n1", &[]) else {
        return;
    };
    let server = t.http_server(&b, 8080);
    agent.enroll(&a);
    agent.enroll(&b);

    ok(a.curl(&format!("http://{}:8080/", b.ip4)));

    let dst = format!("{}:8080", b.ip4);
    let out = agent.wait_access("a's outbound", |v| v["direction"] == "outbound" && v["pod"] == a.name.as_str());
    assert_eq!(out["listener_port"], 15001, "{out}");
    assert_eq!(out["original_dst"], dst.as_str(), "{out}");
    assert_eq!(out["outcome"], "ok", "{out}");
    let inb = agent.wait_access("b's inbound", |v| v["direction"] == "inbound" && v["pod"] == b.name.as_str());
    assert_eq!(inb["listener_port"], 15006, "{inb}");
    assert_eq!(inb["original_dst"], dst.as_str(), "{inb}");
    assert!(inb["src"].as_str().unwrap().starts_with(&format!("{}:", a.ip4)), "{inb}");
    // The app was reached by the proxy, from inside its own pod.
    assert_eq!(http_clients(&server), vec![b.ip(false)]);
}

#[test]
fn pods_not_enrolled_and_the_host_connect_directly() {
    let t = Topology::new("not-enrolled");
    let (a, c, d) = (t.pod("a"), t.pod("c"), t.pod("d"));
    let node = t.node("node");
    let Some(agent) = t.agent_or_skip("not-enrolled", &node, "n1", &[]) else {
        return;
    };
    let server = t.http_server(&d, 8080);
    agent.enroll(&a);

    ok(c.curl(&format!("http://{}:8080/", d.ip4)));
    ok(c.curl(&format!("http://[{}]:8080/", d.ip6)));
    assert_eq!(http_clients(&server), vec![c.ip(false), c.ip(true)], "c reached d directly");

    // The host (its own namespace, never enrolled) talks to itself as before.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (_, peer) = listener.accept().unwrap();
    assert_eq!(peer, client.local_addr().unwrap(), "host connection was not redirected");

    settle();
    assert!(agent.access_log().is_empty(), "proxy saw traffic it should not: {:?}", agent.access_log());
}

#[test]
fn enrolment_changes_take_effect_without_restarting_pods() {
    let t = Topology::new("runtime-enrol");
    let (a, b, c) = (t.pod("a"), t.pod("b"), t.pod("c"));
    let node = t.node("node");
    let Some(agent) = t.agent_or_skip("runtime-enrol", &node, "n1", &[]) else {
        return;
    };
    let server = t.http_server(&b, 8080);
    let url = format!("http://{}:8080/", b.ip4);

    agent.enroll(&a);
    ok(a.curl(&url));
    agent.wait_access("a's outbound", |v| v["pod"] == a.name.as_str() && v["direction"] == "outbound");

    agent.unenroll(&a);
    let before = agent.access_log().len();
    ok(a.curl(&url));
    settle();
    assert_eq!(agent.access_log().len(), before, "a was redirected after unenrolment");
    assert_eq!(http_clients(&server).last(), Some(&a.ip(false)), "a reached b directly");

    agent.enroll(&b);
    ok(c.curl(&url));
    let inb = agent.wait_access("b's inbound", |v| v["pod"] == b.name.as_str() && v["direction"] == "inbound");
    assert_eq!(inb["listener_port"], 15006, "{inb}");
    assert!(inb["src"].as_str().unwrap().starts_with(&format!("{}:", c.ip4)), "{inb}");
    assert_eq!(http_clients(&server).last(), Some(&b.ip(false)), "b's app was reached through the proxy");
}

#[test]
fn ipv6_and_ipv4_mapped_connects_are_redirected() {
    let t = Topology::new("ipv6");
    let (a, b) = (t.pod("a"), t.pod("b"));
    let node = t.node("node");
    let Some(agent) = t.agent_or_skip("ipv6", &node, "n1", &[]) else {
        return;
    };
    let _server = t.http_server(&b, 8080);
    agent.enroll(&a);
    agent.enroll(&b);

    ok(a.curl(&format!("http://[{}]:8080/", b.ip6)));
    let dst6 = format!("[{}]:8080", b.ip6);
    let out = agent.wait_access("v6 outbound", |v| v["direction"] == "outbound" && v["original_dst"] == dst6.as_str());
    assert_eq!(out["listener"], "[::1]:15001", "{out}");
    let inb = agent.wait_access("v6 inbound", |v| v["direction"] == "inbound" && v["original_dst"] == dst6.as_str());
    assert_eq!(inb["listener_port"], 15006, "{inb}");
    assert!(inb["src"].as_str().unwrap().starts_with(&format!("[{}]:", a.ip6)), "{inb}");

    // A dual-stack socket dialing an IPv4-mapped address must not escape the mesh.
    let script = format!(
        "import socket; s=socket.socket(socket.AF_INET6); s.settimeout(3); s.connect(('::ffff:{}',8080,0,0)); \
         s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.recv(12).decode())",
        b.ip4
    );
    let reply = run_in(&a.netns, &["python3", "-c", &script]);
    assert!(String::from_utf8_lossy(&reply.stdout).starts_with("HTTP/1.0 200"), "{reply:?}");
    let dst4 = format!("{}:8080", b.ip4);
    agent.wait_access("v4-mapped outbound", |v| v["direction"] == "outbound" && v["original_dst"] == dst4.as_str());
}
