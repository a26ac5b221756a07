//! The agent's life: killed (pods fail closed), restarted (picks its programs
//! back up, nothing duplicated), and cleaned up (nothing left). Points 4 and 7.
use std::{
    collections::BTreeMap,
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{Agent, Topology, http_clients, http_ok, run_in};
use serde_json::Value;

fn ids(dump: &Value, key: &str) -> BTreeMap<String, u64> {
    dump["dataplane"][key]
        .as_object()
        .unwrap_or_else(|| panic!("no dataplane.{key} in {dump}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

fn kernel_has(kind: &str, id: u64) -> bool {
    Command::new("bpftool").args([kind, "show", "id", &id.to_string()]).output().unwrap().status.success()
}

/// The kernel frees links and programs after an RCU grace period: poll.
fn assert_gone(kind: &str, id: u64, what: &str) {
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(5));
    while kernel_has(kind, id) {
        assert!(Instant::now() < deadline, "{kind} {id} ({what}) is still in the kernel");
        thread::sleep(Duration::from_millis(50));
    }
}

fn pinned_links(agent: &Agent) -> usize {
    fs::read_dir(agent.pin_dir.join("links")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_killed_agent_fails_closed_and_a_restarted_one_takes_over_cleanly() {
    let t = Topology::new("fail-closed");
    let (a, b, c) = (t.pod("a"), t.pod("b"), t.pod("c"));
    let node = t.node("node");
    let Some(mut agent) = t.agent_or_skip("fail-closed", &node, "n1", &[]) else {
        return;
    };
    let server = t.http_server(&b, 8080);
    agent.enroll(&a);
    agent.enroll(&b);
    let url = format!("http://{}:8080/", b.ip4);
    assert!(http_ok(&a.curl(&url)));
    let before = ids(&agent.config_dump(), "links");
    let programs_before = ids(&agent.config_dump(), "programs");
    assert_eq!(before.len(), 5, "connect4, connect6, sockops and one sk_lookup per pod: {before:?}");

    agent.proc.kill();
    let served = http_clients(&server).len();
    let out = a.curl(&url);
    assert!(!out.status.success(), "a's outbound connection went around the dead proxy: {out:?}");
    let out = c.curl(&url);
    assert!(!out.status.success(), "plaintext reached b's app around the dead proxy: {out:?}");
    assert_eq!(http_clients(&server).len(), served, "the server was reached while the agent was down");
    assert_eq!(pinned_links(&agent), 5, "the links stay pinned while the agent is down");

    let agent = t.start_agent(&node, "n1", &[]).expect("restart");
    let dump = agent.config_dump();
    let names: Vec<&str> = dump["pods"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec![a.name.as_str(), b.name.as_str()], "pods restored");
    assert!(http_ok(&a.curl(&url)), "a works again after the restart");
    assert!(http_ok(&c.curl(&url)), "inbound to b works again after the restart");
    agent.wait_access("outbound after restart", |v| v["pod"] == a.name.as_str());

    let after = ids(&dump, "links");
    assert_eq!(after.keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>());
    assert_eq!(pinned_links(&agent), 5, "no duplicate pins");
    for (name, id) in &before {
        assert_ne!(after[name], *id, "{name} was re-attached");
        assert_gone("link", *id, name);
    }
    for (name, id) in &programs_before {
        assert_gone("prog", *id, name);
    }
    for id in after.values() {
        assert!(kernel_has("link", *id));
    }
}

#[test]
fn cleanup_leaves_nothing_behind() {
    let t = Topology::new("cleanup");
    let (a, b) = (t.pod("a"), t.pod("b"));
    let node = t.node("node");
    let Some(mut agent) = t.agent_or_skip("cleanup", &node, "n1", &["--cleanup"]) else {
        return;
    };
    let server = t.http_server(&b, 8080);
    agent.enroll(&a);
    agent.enroll(&b);
    let url = format!("http://{}:8080/", b.ip4);
    assert!(http_ok(&a.curl(&url)));
    let dump = agent.config_dump();
    let (links, programs) = (ids(&dump, "links"), ids(&dump, "programs"));

    assert_eq!(agent.terminate(), Some(0), "clean exit:\n{}", agent.proc.log_text());
    assert!(!agent.pin_dir.exists(), "{} remains", agent.pin_dir.display());
    for (name, id) in &links {
        assert_gone("link", *id, name);
    }
    for (name, id) in &programs {
        assert_gone("prog", *id, name);
    }
    let state = format!("/run/mesh-tests/{}/{}/pods.json", t.id, agent.instance);
    assert!(!std::path::Path::new(&state).exists(), "{state} remains");
    for pod in [&a, &b] {
        let listening = run_in(&pod.netns, &["ss", "-Hltn"]);
        let text = String::from_utf8_lossy(&listening.stdout);
        assert!(!text.contains(":15001") && !text.contains(":15006"), "listeners remain in {}: {text}", pod.name);
    }
    assert!(http_ok(&a.curl(&url)));
    assert_eq!(http_clients(&server).last(), Some(&a.ip(false)), "a now reaches b directly");
}
