//! Agents share the kernel with each other and with other programs on the
//! same hooks (points 5 and 6); the test subnets never leave this host.
use mesh_tests::{Topology, cgroup_prog::DenyPort9, http_ok, run_in};

#[test]
fn two_agents_on_one_kernel_see_only_their_own_pods() {
    let t = Topology::new("two-agents");
    let (a1, b1, a2, b2) = (t.pod("a1"), t.pod("b1"), t.pod("a2"), t.pod("b2"));
    let (node1, node2) = (t.node("node1"), t.node("node2"));
    let Some(agent1) = t.agent_or_skip("two-agents", &node1, "n1", &[]) else {
        return;
    };
    let Some(agent2) = t.agent_or_skip("two-agents", &node2, "n2", &[]) else {
        return;
    };
    let _s1 = t.http_server(&b1, 8080);
    let _s2 = t.http_server(&b2, 8080);
    agent1.enroll(&a1);
    agent1.enroll(&b1);
    agent2.enroll(&a2);
    agent2.enroll(&b2);

    assert!(http_ok(&a1.curl(&format!("http://{}:8080/", b1.ip4))));
    agent1.wait_access("a1 -> b1 inbound", |v| v["pod"] == b1.name.as_str());
    assert!(http_ok(&a2.curl(&format!("http://{}:8080/", b2.ip4))));
    agent2.wait_access("a2 -> b2 inbound", |v| v["pod"] == b2.name.as_str());
    assert!(http_ok(&a1.curl(&format!("http://{}:8080/", b2.ip4))));
    let out = agent1.wait_access("a1 -> b2 outbound", |v| {
        v["pod"] == a1.name.as_str() && v["original_dst"] == format!("{}:8080", b2.ip4).as_str()
    });
    assert_eq!(out["direction"], "outbound");
    agent2.wait_access("a1 -> b2 inbound", |v| {
        v["pod"] == b2.name.as_str() && v["src"].as_str().unwrap().starts_with(&format!("{}:", a1.ip4))
    });

    let mine =
        |pods: &[&str], log: Vec<serde_json::Value>| log.iter().all(|v| pods.contains(&v["pod"].as_str().unwrap()));
    assert!(
        mine(&[&a1.name, &b1.name], agent1.access_log()),
        "agent 1 saw another agent's pods: {:?}",
        agent1.access_log()
    );
    assert!(
        mine(&[&a2.name, &b2.name], agent2.access_log()),
        "agent 2 saw another agent's pods: {:?}",
        agent2.access_log()
    );
}

#[test]
fn another_program_on_the_same_cgroup_hook_keeps_working() {
    let t = Topology::new("coexist");
    let (a, b) = (t.pod("a"), t.pod("b"));
    let node = t.node("node");
    let Some(agent) = t.agent_or_skip("coexist", &node, "n1", &[]) else {
        return;
    };
    let _server = t.http_server(&b, 8080);
    agent.enroll(&a);

    // Without the other program, port 9 is redirected like any port (the proxy
    // then finds nothing listening there).
    let _ = a.curl(&format!("http://{}:9/", b.ip4));
    let port9 = format!("{}:9", b.ip4);
    agent.wait_access("port 9 via proxy", |v| v["original_dst"] == port9.as_str());
    let seen_before = agent.access_log().len();

    let cg = t.cgroup("client");
    let _other = DenyPort9::attach(&cg).expect("attaching the other program to cgroup/connect4");
    let in_cgroup = |cmd: &str| {
        let script = format!("echo $$ > {}/cgroup.procs && exec {cmd}", cg.display());
        run_in(&a.netns, &["sh", "-c", &script])
    };
    let connect9 = format!(
        "python3 -c \"import socket,errno\ntry: socket.create_connection(('{}', 9), 3); print('connected')\n\
         except OSError as e: print(errno.errorcode[e.errno])\"",
        b.ip4
    );
    let refused = in_cgroup(&connect9);
    assert_eq!(
        String::from_utf8_lossy(&refused.stdout).trim(),
        "EPERM",
        "the other program did not refuse port 9: {refused:?}"
    );
    let fine = in_cgroup(&format!("curl -sS -m 3 -o /dev/null -w '%{{http_code}}' http://{}:8080/", b.ip4));
    assert!(http_ok(&fine), "{fine:?}");
    let dst = format!("{}:8080", b.ip4);
    agent.wait_access("redirect beside the other program", |v| v["original_dst"] == dst.as_str());
    assert_eq!(agent.access_log().len(), seen_before + 1, "only the allowed connection reached the proxy");
}

/// Issue 16 point 11: while a topology exists, this host routes its subnets
/// nowhere (a blackhole under the topology's own metric), so test traffic
/// cannot follow the default route out even when a test link is down; its
/// routes go with it.
#[test]
fn test_subnets_are_blackholed_on_this_host_while_a_topology_exists() {
    let route_to = |addr: &str| {
        let out = std::process::Command::new("ip").args(["route", "get", addr]).output().unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    let t = Topology::new("blackhole");
    let metric = mesh_tests::blackhole::metric(&t.id).to_string();
    // 10.201.0.0/24 may be a running quickstart's link: the other subnets
    // are routed nowhere but here.
    for addr in ["10.200.0.77", "10.96.0.77", "fd00:200::77"] {
        let route = route_to(addr);
        assert!(route.starts_with("blackhole") || route.contains("Invalid argument"), "{addr}: {route}");
    }
    let ours = || {
        let out = std::process::Command::new("ip").args(["route", "show", "type", "blackhole"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.trim_end().ends_with(&format!(" metric {metric}")))
            .count()
    };
    assert_eq!(ours(), 3, "the IPv4 routes of topology {}", t.id);
    drop(t);
    assert_eq!(ours(), 0, "the routes go with the topology");
}
