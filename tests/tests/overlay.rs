//! The L4 overlay on the real kernel: two nodes joined to a controller, pods
//! on each, real clients and servers. Traffic between nodes is HBONE (only
//! TLS on 15008 on the bridge), PeerAuthentication and AuthorizationPolicy are
//! enforced by the destination's proxy, a service VIP spreads connections over
//! its endpoints, and both proxies count what they carried.
use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Pod, Proc,
    capture::Capture,
    mesh::{Mesh, exchange, identity, sum_metric, yaml},
    run_in,
};

/// Two nodes; pod A (service account sa-a) on node1 and B (sa-b) on node2,
/// in an ambient namespace, enrolled and holding their certificates.
fn a_and_b(test: &str) -> Option<(Mesh, Pod, Pod)> {
    let mesh = Mesh::start(test, &["node1", "node2"])?;
    let (a, b) = (mesh.t.pod("a"), mesh.t.pod("b"));
    let config = format!(
        "{}{}{}",
        yaml::namespace("default", true),
        yaml::pod(&a, "node1", "sa-a", "a"),
        yaml::pod(&b, "node2", "sa-b", "b")
    );
    mesh.apply("mesh.yaml", &config);
    mesh.wait_ready(&[(&a, "node1", "sa-a"), (&b, "node2", "sa-b")]);
    Some((mesh, a, b))
}

const MARKER: &str = "mesh-overlay-secret-payload-7f3a";

/// Points 1 and 6: curl from A (node 1) to nginx in B (node 2) over HBONE;
/// the bridge carries only TLS on 15008 between them; both nodes count the
/// known exchange with Istio's labels.
#[test]
fn cross_node_traffic_is_mutual_tls_and_counted() {
    let Some((mesh, a, b)) = a_and_b("overlay-cross") else { return };
    let _nginx = mesh.t.nginx(&b, 80, &format!("<p>{MARKER}</p>\n"), 10);
    let _sink = mesh.t.sink_server(&b, 9000, 70_000);

    let probe = mesh.t.pod("probe");
    let capture = Capture::start(&mesh, &probe, &b);
    let out = run_in(&a.netns, &["curl", "-sS", "-m", "5", &format!("http://{}/", b.ip4)]);
    assert!(out.status.success(), "curl A -> B failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(MARKER), "nginx's page did not come back");
    let (packets, tls_records, raw) = capture.packets(&a, &b);
    assert!(!packets.is_empty(), "the capture saw nothing between A and B");
    let off_15008: Vec<_> = packets.iter().filter(|(s, d, _)| *s != 15008 && *d != 15008).collect();
    assert!(off_15008.is_empty(), "segments between A and B not on 15008: {off_15008:?}");
    assert!(packets.iter().any(|(_, _, len)| *len > 0), "no payload on 15008");
    let raw = String::from_utf8_lossy(&raw);
    assert!(tls_records > 0, "tshark sees no TLS application data between A and B");
    // The probe's own plaintext is in the capture too, but nginx's page is not.
    assert!(!raw.contains(MARKER), "nginx's page in clear on the bridge");

    // Both proxies saw identities and the decision.
    let a_id = identity("default", "sa-a");
    let b_id = identity("default", "sa-b");
    let node1 = &mesh.node("node1").agent;
    let node2 = &mesh.node("node2").agent;
    let out_line = node1.wait_access("A's outbound", |v| v["pod"] == "default/a" && v["route"] == "hbone");
    assert_eq!((out_line["src_identity"].as_str(), out_line["dst_identity"].as_str()), (Some(&*a_id), Some(&*b_id)));
    let in_line = node2.wait_access("B's inbound", |v| v["pod"] == "default/b" && v["route"] == "hbone");
    assert_eq!(in_line["src_identity"], a_id.as_str(), "{in_line}");
    assert_eq!((in_line["security"].as_str(), in_line["decision"].as_str()), (Some("mutual_tls"), Some("allow")));
    // The tunnel's CONNECT names the connection: B's node logs A's line's id.
    let id = out_line["connection_id"].as_str().filter(|id| id.len() == 16).expect("a connection id").to_owned();
    node2.wait_access("B's inbound, by A's connection id", |v| {
        v["pod"] == "default/b" && v["connection_id"] == id.as_str()
    });

    // 6. A known exchange: 12 345 bytes up, 70 000 back, counted on both nodes.
    let got = exchange(&a, &format!("{}:9000", b.ip4), 12_345);
    assert_eq!(got, Some(70_000));
    let labels = |reporter: &'static str| {
        vec![
            ("reporter", reporter),
            ("source_workload", "a"),
            ("source_workload_namespace", "default"),
            ("source_principal", a_id.as_str()),
            ("destination_workload", "b"),
            ("destination_principal", b_id.as_str()),
            ("connection_security_policy", "mutual_tls"),
            ("request_protocol", "tcp"),
        ]
    };
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(5));
    loop {
        let m1 = mesh_tests::mesh::node_metrics(&mesh.node("node1").netns);
        let m2 = mesh_tests::mesh::node_metrics(&mesh.node("node2").netns);
        let figures = |m: &str, reporter| {
            [
                "istio_tcp_connections_opened_total",
                "istio_tcp_connections_closed_total",
                "istio_tcp_received_bytes_total",
                "istio_tcp_sent_bytes_total",
            ]
            .map(|name| sum_metric(m, name, &labels(reporter)))
        };
        // nginx's exchange happened before: the counters hold both connections.
        let (f1, f2) = (figures(&m1, "source"), figures(&m2, "destination"));
        let done = f1[1] >= 2.0 && f2[1] >= 2.0;
        if done || Instant::now() > deadline {
            eprintln!("node1 (source): {f1:?}\nnode2 (destination): {f2:?}");
            assert_eq!(f1[0], 2.0, "opened on node1:\n{m1}");
            assert_eq!(f1[1], 2.0, "closed on node1:\n{m1}");
            assert_eq!(f1, f2, "both reporters agree");
            // curl's request and nginx's answer came first; the exchange adds its exact counts.
            let curl_up = f1[2] - 12_345.0;
            let curl_down = f1[3] - 70_000.0;
            assert!((70.0..200.0).contains(&curl_up), "request bytes {} not the exchange's + curl's", f1[2]);
            assert!((200.0..600.0).contains(&curl_down), "response bytes {} not the exchange's + nginx's", f1[3]);
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let m1 = mesh_tests::mesh::node_metrics(&mesh.node("node1").netns);
    assert!(m1.contains("destination_service=\"unknown\""), "{m1}");
    assert!(m1.contains("response_flags=\"-\""), "{m1}");
    assert!(m1.contains("mesh_node_pods_enrolled 1"), "{m1}");
}

/// curl from `pod`; true when the HTTP exchange completed with 200.
fn reaches(pod: &Pod, url: &str) -> bool {
    mesh_tests::http_ok(&pod.curl(url))
}

/// Point 2: PeerAuthentication. STRICT refuses plaintext from a pod outside
/// the mesh, closes such a connection already open, and keeps admitting
/// enrolled clients (which arrive as mTLS); PERMISSIVE admits both.
#[test]
fn peer_authentication_strict_and_permissive() {
    let Some(mesh) = Mesh::start("overlay-peerauthn", &["node1", "node2"]) else { return };
    let (a, b) = (mesh.t.pod("a"), mesh.t.pod("b"));
    let c = mesh.t.pod_in("legacy", "c");
    let base = format!(
        "{}{}{}{}{}",
        yaml::namespace("default", true),
        yaml::namespace("legacy", false),
        yaml::pod(&a, "node1", "sa-a", "a"),
        yaml::pod(&b, "node2", "sa-b", "b"),
        yaml::pod(&c, "node1", "sa-c", "c"),
    );
    mesh.apply("mesh.yaml", &base);
    mesh.wait_ready(&[(&a, "node1", "sa-a"), (&b, "node2", "sa-b")]);
    let _nginx = mesh.t.nginx(&b, 80, "b\n", 10);
    let url = format!("http://{}/", b.ip4);
    let node2 = &mesh.node("node2").agent;

    assert!(reaches(&c, &url), "PERMISSIVE (the default) refused plaintext");
    let line = node2.wait_access("c's plaintext", |v| {
        v["pod"] == "default/b" && v["src"].as_str().unwrap().starts_with(&c.ip4.to_string())
    });
    assert_eq!((line["security"].as_str(), line["listener_port"].as_u64()), (Some("none"), Some(15006)));

    // A plaintext connection open when STRICT comes is closed (pt 9).
    let _echo = mesh.t.echo_server(&b, &[9100]);
    let held = mesh.t.held_connection(&c, &b.ip4.to_string(), 9100);
    let took = mesh.apply("peer-authn.yaml", &yaml::peer_authentication("default", "STRICT"));
    assert!(!reaches(&c, &url), "STRICT admitted plaintext");
    held.wait_for_log("closed after", Duration::from_secs(5));
    let denied = node2.wait_access("c refused", |v| v["response_flags"] == "RBAC" && v["security"] == "none");
    assert!(denied["error"].as_str().unwrap().contains("STRICT"), "{denied}");
    assert!(reaches(&a, &url), "STRICT refused an enrolled client");
    let line = node2.wait_access("a's mTLS", |v| v["src_identity"] == identity("default", "sa-a").as_str());
    assert_eq!((line["security"].as_str(), line["listener_port"].as_u64()), (Some("mutual_tls"), Some(15008)));
    eprintln!("STRICT in force on every node {took:?} after the edit");

    mesh.apply("peer-authn.yaml", &yaml::peer_authentication("default", "PERMISSIVE"));
    assert!(reaches(&c, &url), "PERMISSIVE refused plaintext");
    assert!(reaches(&a, &url));
}

/// Point 3: AuthorizationPolicy, enforced by the destination's proxy: ALLOW
/// by principal, DENY by namespace winning over ALLOW, ipBlocks, ports; each
/// change in force for new connections (the time each took is printed), with no restart.
#[test]
fn authorization_policies() {
    let Some(mesh) = Mesh::start("overlay-authz", &["node1", "node2"]) else { return };
    let (a, b, c) = (mesh.t.pod("a"), mesh.t.pod("b"), mesh.t.pod("c"));
    let o = mesh.t.pod_in("other", "o");
    let base = format!(
        "{}{}{}{}{}{}",
        yaml::namespace("default", true),
        yaml::namespace("other", true),
        yaml::pod(&a, "node1", "sa-a", "a"),
        yaml::pod(&b, "node2", "sa-b", "b"),
        yaml::pod(&c, "node1", "sa-c", "c"),
        yaml::pod(&o, "node1", "sa-o", "o"),
    );
    mesh.apply("mesh.yaml", &base);
    mesh.wait_ready(&[(&a, "node1", "sa-a"), (&b, "node2", "sa-b"), (&c, "node1", "sa-c"), (&o, "node1", "sa-o")]);
    let _n80 = mesh.t.nginx(&b, 80, "b80\n", 10);
    let _n8080 = mesh.t.nginx(&b, 8080, "b8080\n", 10);
    let (url, url8080) = (format!("http://{}/", b.ip4), format!("http://{}:8080/", b.ip4));
    assert!(reaches(&a, &url) && reaches(&c, &url) && reaches(&o, &url), "no policy: everyone reaches b");

    let select_b = "selector: {matchLabels: {app: b}}";
    let mut delays = Vec::new();
    let mut policy = |file: &str, spec: &str| {
        let took = mesh.apply(file, &yaml::authorization("default", file.trim_end_matches(".yaml"), spec));
        delays.push(took);
    };

    policy(
        "allow-a.yaml",
        &format!("{{{select_b}, rules: [{{from: [{{source: {{principals: [cluster.local/ns/default/sa/sa-a]}}}}]}}]}}"),
    );
    assert!(reaches(&a, &url), "ALLOW by principal refused a");
    assert!(!reaches(&c, &url), "ALLOW by principal admitted c (another service account)");
    let node2 = &mesh.node("node2").agent;
    let denied = node2.wait_access("c denied", |v| {
        v["decision"] == "deny" && v["src_identity"] == identity("default", "sa-c").as_str()
    });
    assert_eq!(denied["response_flags"], "RBAC", "{denied}");
    let allowed = node2.wait_access("a allowed", |v| v["decision"] == "allow" && v["policy"] == "default/allow-a");
    assert_eq!(allowed["src_identity"], identity("default", "sa-a").as_str());

    // DENY by namespace wins over an ALLOW that names o.
    policy(
        "allow-a.yaml",
        &format!(
            "{{{select_b}, rules: [{{from: [{{source: {{principals: [cluster.local/ns/default/sa/sa-a, cluster.local/ns/other/sa/sa-o]}}}}]}}]}}"
        ),
    );
    assert!(reaches(&o, &url), "ALLOW naming o refused it");
    policy(
        "deny-other.yaml",
        &format!("{{{select_b}, action: DENY, rules: [{{from: [{{source: {{namespaces: [other]}}}}]}}]}}"),
    );
    assert!(!reaches(&o, &url), "DENY by namespace did not win over ALLOW");
    assert!(reaches(&a, &url), "DENY of another namespace refused a");
    let line = node2.wait_access("o denied by policy", |v| v["policy"] == "default/deny-other");
    assert_eq!(line["decision"], "deny");

    // ipBlocks: only a's address.
    mesh.controller.remove("deny-other.yaml");
    policy("allow-a.yaml", &format!("{{{select_b}, rules: [{{from: [{{source: {{ipBlocks: [{}/32]}}}}]}}]}}", a.ip4));
    assert!(reaches(&a, &url), "ipBlocks refused a");
    assert!(!reaches(&c, &url), "ipBlocks admitted c");

    // ports: only 8080.
    policy("allow-a.yaml", &format!("{{{select_b}, rules: [{{to: [{{operation: {{ports: ['8080']}}}}]}}]}}"));
    assert!(reaches(&c, &url8080), "port 8080 refused");
    assert!(!reaches(&c, &url), "port 80 admitted");

    mesh.controller.remove("allow-a.yaml");
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(2));
    while !reaches(&c, &url) {
        assert!(Instant::now() < deadline, "removing the policy did not reopen b");
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("policy edits in force on every node after: {delays:?}");
}

/// An echo server on `ports` (one thread a connection), and a client that
/// keeps one connection to `addr` and says when it ends.
/// Issue 16, point 9: a policy change applies to connections already open,
/// as ztunnel's connection manager does. A DENY on one port closes A's open
/// connection to it within about a second, with the policy in node2's log
/// and access log; A's connection to another port carries on.
#[test]
fn a_policy_change_closes_the_open_connections_it_denies() {
    let Some((mesh, a, b)) = a_and_b("overlay-live-policy") else { return };
    let _echo = mesh.t.echo_server(&b, &[9100, 9101]);
    let hold = |port: u16| mesh.t.held_connection(&a, &b.ip4.to_string(), port);
    let (denied, mut kept) = (hold(9100), hold(9101));
    let applied = Instant::now();
    mesh.apply(
        "deny-9100.yaml",
        &yaml::authorization(
            "default",
            "deny-9100",
            "{selector: {matchLabels: {app: b}}, action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sa-a]}}], to: [{operation: {ports: ['9100']}}]}]}",
        ),
    );
    let deadline = applied + mesh_tests::patience(Duration::from_secs(5));
    while !denied.log_text().contains("closed after") {
        assert!(Instant::now() < deadline, "the denied connection is still open:\n{}", denied.log_text());
        thread::sleep(Duration::from_millis(20));
    }
    println!("the open connection was closed {:?} after the policy was written", applied.elapsed());
    let node2 = &mesh.node("node2").agent;
    let line =
        node2.wait_access("closed by policy", |v| v["policy"] == "default/deny-9100" && v["listener_port"] == 15008);
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!((line["response_flags"].as_str(), line["outcome"].as_str()), (Some("RBAC"), Some("error")), "{line}");
    assert!(node2.proc.log_text().contains("open connection closed: the configuration now denies it"));
    thread::sleep(Duration::from_millis(300));
    assert!(!kept.log_text().contains("closed after"), "the allowed connection was closed too:\n{}", kept.log_text());
    assert!(kept.is_running(), "the allowed connection's client ended");
}

/// Point 5: a service VIP with three endpoints (on both nodes) spreads 300
/// connections over all three; a removed endpoint gets no more.
#[test]
fn service_vip_spreads_connections_over_endpoints() {
    let Some(mesh) = Mesh::start("overlay-vip", &["node1", "node2"]) else { return };
    let a = mesh.t.pod("a");
    let eps = [mesh.t.pod("e1"), mesh.t.pod("e2"), mesh.t.pod("e3")];
    let nodes = ["node1", "node2", "node2"];
    let mut config = format!("{}{}", yaml::namespace("default", true), yaml::pod(&a, "node1", "sa-a", "a"));
    for (e, n) in eps.iter().zip(nodes) {
        config += &yaml::pod(e, n, "sa-web", "web");
    }
    let service = yaml::service("default", "web", "10.96.0.10", "web", &[(80, 8080)]);
    mesh.apply("mesh.yaml", &(config.clone() + &service));
    let mut ready = vec![(&a, "node1", "sa-a")];
    ready.extend(eps.iter().zip(nodes).map(|(e, n)| (e, n, "sa-web")));
    mesh.wait_ready(&ready);
    let _servers: Vec<Proc> =
        eps.iter().map(|e| mesh.t.nginx(e, 8080, &format!("{}\n", e.name.split('/').nth(1).unwrap()), 10)).collect();

    let tally = |n: usize| -> BTreeMap<String, usize> {
        let script = format!("for i in $(seq {n}); do curl -s -m 3 http://10.96.0.10/ || echo failed; done");
        let out = run_in(&a.netns, &["sh", "-c", &script]);
        let mut counts = BTreeMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            *counts.entry(line.to_string()).or_insert(0) += 1;
        }
        counts
    };
    let counts = tally(300);
    eprintln!("300 connections to the VIP: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 300);
    assert!(!counts.contains_key("failed"), "{counts:?}");
    for e in ["e1", "e2", "e3"] {
        let n = counts.get(e).copied().unwrap_or(0);
        assert!((80..=120).contains(&n), "{e} got {n} of 300: {counts:?}");
    }
    // e1 shares a's node: the same-node path; e2 is across: HBONE.
    for (e, route) in [(&eps[0], "local"), (&eps[1], "hbone")] {
        let line = mesh.node("node1").agent.wait_access("VIP access", |v| {
            v["dst_service"] == "web.default.svc.cluster.local"
                && v["upstream"].as_str().is_some_and(|u| u.starts_with(&format!("{}:", e.ip4)))
        });
        assert_eq!(line["route"], route, "{line}");
    }

    // e2 leaves the service (its label changes): no more traffic to it.
    let config = config.replace(
        "name: e2, namespace: default, labels: {app: web}",
        "name: e2, namespace: default, labels: {app: old}",
    );
    mesh.apply("mesh.yaml", &(config + &service));
    let counts = tally(150);
    eprintln!("150 connections after removing e2: {counts:?}");
    assert_eq!(counts.get("e2"), None, "{counts:?}");
    assert_eq!(counts.get("e1").copied().unwrap_or(0) + counts.get("e3").copied().unwrap_or(0), 150, "{counts:?}");
}

/// Point 7: protocols beside HTTP across nodes: a 10 s iperf3 stream and
/// redis-benchmark against redis-server, with no errors.
#[test]
fn long_streams_and_redis_cross_node() {
    let Some((mesh, a, b)) = a_and_b("overlay-protocols") else { return };

    let iperf = Proc::spawn_in(
        "iperf3",
        &b.netns,
        &["iperf3", "-s", "-p", "5201", "--forceflush"],
        &mesh.t.dir.join("iperf3.log"),
    );
    let redis = Proc::spawn_in(
        "redis",
        &b.netns,
        &["redis-server", "--port", "6379", "--protected-mode", "no", "--save", "", "--appendonly", "no"],
        &mesh.t.dir.join("redis.log"),
    );
    iperf.wait_for_log("listening", Duration::from_secs(10));
    redis.wait_for_log("Ready to accept", Duration::from_secs(10));

    let out = run_in(&a.netns, &["iperf3", "-c", &b.ip4.to_string(), "-p", "5201", "-t", "10", "-J"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    assert!(out.status.success() && report.get("error").is_none(), "iperf3 failed: {report}");
    let received = report["end"]["sum_received"]["bytes"].as_f64().unwrap();
    let seconds = report["end"]["sum_received"]["seconds"].as_f64().unwrap();
    eprintln!("iperf3 through the mesh: {:.2} Gbit/s over {seconds:.1} s", received * 8.0 / seconds / 1e9);
    assert!(seconds >= 9.5 && received > 0.0, "{report}");

    let out = run_in(
        &a.netns,
        &[
            "redis-benchmark",
            "-h",
            &b.ip4.to_string(),
            "-p",
            "6379",
            "-q",
            "-n",
            "20000",
            "-c",
            "20",
            "-t",
            "set,get,lpush",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    eprintln!("{}", text.lines().filter(|l| l.contains("requests per second")).collect::<Vec<_>>().join("\n"));
    assert!(out.status.success(), "redis-benchmark failed: {text}");
    for op in ["SET", "GET", "LPUSH"] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{op}:")) && l.contains("requests per second")),
            "{op}: {text}"
        );
    }
    assert!(!text.to_lowercase().contains("error"), "{text}");
    let node2 = &mesh.node("node2").agent;
    let redis_line = node2.wait_access("redis over HBONE", |v| v["original_dst"] == format!("{}:6379", b.ip4).as_str());
    assert_eq!(redis_line["route"], "hbone");
}

/// A certificate for `uri` signed by the test controller's CA (it holds the
/// key in its state directory), valid from `from` to `to`; written as
/// `<name>.pem`/`<name>.key` in the test's directory.
fn mesh_signed(
    mesh: &Mesh,
    name: &str,
    uri: &str,
    from: time::OffsetDateTime,
    to: time::OffsetDateTime,
) -> (String, String) {
    let san = rcgen::SanType::URI(uri.try_into().unwrap());
    signed(mesh, &mesh_ca(mesh), name, san, from, to)
}

/// The test controller's CA, as a signer.
fn mesh_ca(mesh: &Mesh) -> rcgen::Issuer<'static, rcgen::KeyPair> {
    let ca_cert = std::fs::read_to_string(mesh.controller.state_dir.join("ca-cert.pem")).unwrap();
    let ca_key = std::fs::read_to_string(mesh.controller.state_dir.join("ca-key.pem")).unwrap();
    rcgen::Issuer::from_ca_cert_pem(&ca_cert, rcgen::KeyPair::from_pem(&ca_key).unwrap()).unwrap()
}

/// A CA of the attacker's own, as a signer.
fn other_ca() -> rcgen::Issuer<'static, rcgen::KeyPair> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).unwrap();
    rcgen::Issuer::from_ca_cert_pem(&cert.pem(), key).unwrap()
}

/// A client/server certificate with the one SAN `san`, signed by `issuer`.
fn signed(
    mesh: &Mesh,
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    name: &str,
    san: rcgen::SanType,
    from: time::OffsetDateTime,
    to: time::OffsetDateTime,
) -> (String, String) {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![san];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    (params.not_before, params.not_after) = (from, to);
    let cert = params.signed_by(&key, issuer).unwrap();
    let (cert_file, key_file) = (mesh.t.dir.join(format!("{name}.pem")), mesh.t.dir.join(format!("{name}.key")));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (cert_file.display().to_string(), key_file.display().to_string())
}

/// A TLS 1.3 handshake with ALPN h2 from `pod` to `addr`, presenting `cert`.
fn openssl_client(pod: &Pod, addr: &str, (cert, key): &(String, String)) {
    let seconds = mesh_tests::patience(Duration::from_secs(5)).as_secs();
    let script = format!(
        "echo | timeout {seconds} openssl s_client -connect {addr} -tls1_3 -alpn h2 -cert {cert} -key {key} -quiet 2>&1; true"
    );
    run_in(&pod.netns, &["sh", "-c", &script]);
}

/// Identity spoofing fails the handshake, with a clear log line on the proxy
/// that refused it and a metric by reason (issue 16 pt 8): client
/// certificates of another trust domain, expired, not yet valid, without a
/// SPIFFE ID (all signed by the mesh's own CA, so only the checks stop
/// them), signed by another CA; and a server presenting the wrong SPIFFE ID.
#[test]
fn spoofed_identities_fail_the_handshake() {
    let Some(mesh) = Mesh::start("overlay-spoof", &["node1", "node2"]) else { return };
    let (a, b) = (mesh.t.pod("a"), mesh.t.pod("b"));
    let x = mesh.t.pod_in("legacy", "x");
    let rogue = mesh.t.pod("rogue");
    // The rogue pod claims sa-b's place on a node with no agent: whoever
    // answers on its 15008 must prove it is sa-b.
    let config = format!(
        "{}{}{}{}{}{}",
        yaml::namespace("default", true),
        yaml::namespace("legacy", false),
        yaml::pod(&a, "node1", "sa-a", "a"),
        yaml::pod(&b, "node2", "sa-b", "b"),
        yaml::pod(&x, "node1", "sa-x", "x"),
        yaml::pod(&rogue, "node9", "sa-b", "rogue"),
    );
    mesh.apply("mesh.yaml", &config);
    mesh.wait_ready(&[(&a, "node1", "sa-a"), (&b, "node2", "sa-b")]);
    let _nginx = mesh.t.nginx(&b, 80, "b\n", 10);
    assert!(reaches(&a, &format!("http://{}/", b.ip4)), "the genuine path must work");

    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let hbone = format!("{}:15008", b.ip4);
    let node2 = &mesh.node("node2").agent;
    let refusals = |needle: &str| -> Vec<String> {
        node2
            .proc
            .log_text()
            .lines()
            .filter(|l| l.contains("HBONE connection refused") && l.contains(needle))
            .map(str::to_owned)
            .collect()
    };

    // Client certificates the proxy must refuse at the handshake, each with
    // its reason in the log line and in mesh_node_hbone_errors_total.
    let sa_a = identity("default", "sa-a");
    let uri = |id: &str| rcgen::SanType::URI(id.try_into().unwrap());
    let cases = [
        (
            "foreign",
            signed(
                &mesh,
                &mesh_ca(&mesh),
                "foreign",
                uri("spiffe://evil.org/ns/default/sa/sa-a"),
                now - hour,
                now + hour,
            ),
            "foreign_trust_domain",
        ),
        ("expired", signed(&mesh, &mesh_ca(&mesh), "expired", uri(&sa_a), now - hour * 3, now - hour * 2), "expired"),
        (
            "not yet valid",
            signed(&mesh, &mesh_ca(&mesh), "future", uri(&sa_a), now + hour, now + hour * 2),
            "not_yet_valid",
        ),
        ("another CA's", signed(&mesh, &other_ca(), "other-ca", uri(&sa_a), now - hour, now + hour), "unknown_issuer"),
        (
            "without a SPIFFE ID",
            signed(
                &mesh,
                &mesh_ca(&mesh),
                "dns-only",
                rcgen::SanType::DnsName("a.example".try_into().unwrap()),
                now - hour,
                now + hour,
            ),
            "bad_identity",
        ),
    ];
    for (what, cert, reason) in &cases {
        openssl_client(&x, &hbone, cert);
        let needle = format!("\"reason\":\"{reason}\"");
        let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(5));
        while refusals(&needle).is_empty() {
            assert!(Instant::now() < deadline, "no refusal of the {what} certificate:\n{}", node2.proc.log_text());
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{what}: {}", refusals(&needle)[0]);
        let counted = mesh.metric("node2", "mesh_node_hbone_errors_total", &[("reason", reason)]);
        assert!(counted >= 1.0, "{what}: not counted as {reason}");
    }
    assert!(refusals("is not in trust domain cluster.local").len() == 1, "the trust domain is named");

    // The wrong server: node1's proxy dials the rogue's 15008 for sa-b and
    // gets a certificate for sa-evil (from the mesh CA, so the chain is fine).
    let (cert, key) = mesh_signed(&mesh, "rogue", &identity("default", "sa-evil"), now - hour, now + hour);
    let _server = Proc::spawn_in(
        "rogue tls",
        &rogue.netns,
        &["openssl", "s_server", "-accept", "15008", "-tls1_3", "-alpn", "h2", "-cert", &cert, "-key", &key, "-quiet"],
        &mesh.t.dir.join("rogue.log"),
    );
    // Listening before the client dials (openssl starts slowly on a slow machine).
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(5));
    while run_in(&rogue.netns, &["ss", "-Hltn", "sport = :15008"]).stdout.is_empty() {
        assert!(Instant::now() < deadline, "the impostor's openssl s_server never listened");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(!reaches(&a, &format!("http://{}/", rogue.ip4)), "a reached an impostor");
    let node1 = &mesh.node("node1").agent;
    let line = node1.wait_access("refused impostor", |v| {
        v["dst_identity"] == identity("default", "sa-b").as_str() && v["outcome"] == "error"
    });
    let error = line["error"].as_str().unwrap();
    eprintln!("{error}");
    assert!(
        error.contains(&format!(
            "server presented {}, expected {}",
            identity("default", "sa-evil"),
            identity("default", "sa-b")
        )),
        "{line}"
    );
}
