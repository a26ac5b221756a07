//! The L4 overlay on the real kernel: two nodes joined to a controller, pods
//! on each, real clients and servers. Traffic between nodes is HBONE (only
//! TLS on 15008 on the bridge), PeerAuthentication and AuthorizationPolicy are
//! enforced by the destination's proxy, a service VIP spreads connections over
//! its endpoints, and both proxies count what they carried.
use std::{
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Pod, Proc,
    mesh::{Mesh, exchange, identity, sum_metric, yaml},
    run_in,
};

/// A capture of TCP on the bridge, stopped and read by [`Capture::packets`].
struct Capture {
    proc: Proc,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(mesh: &Mesh) -> Capture {
        let file = mesh.t.dir.join(format!("bridge-{}.pcap", std::process::id()));
        let _ = std::fs::remove_file(&file);
        let log = mesh.t.dir.join("tshark.log");
        let proc = Proc::spawn_in(
            "tshark",
            mesh.t.network(),
            &["tshark", "-i", "br0", "-f", "tcp", "-w", file.to_str().unwrap()],
            &log,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !proc.log_text().contains("Capturing on") {
            assert!(Instant::now() < deadline, "tshark did not start:\n{}", proc.log_text());
            thread::sleep(Duration::from_millis(50));
        }
        Capture { proc, file }
    }

    /// Stops the capture; returns (src port, dst port, payload length) of every
    /// TCP segment between `a` and `b`, and the raw capture.
    fn packets(mut self, mesh: &Mesh, a: &Pod, b: &Pod) -> (Vec<(u16, u16, usize)>, Vec<u8>) {
        thread::sleep(Duration::from_millis(300));
        self.proc.signal(libc::SIGINT);
        self.proc.wait_exit(Duration::from_secs(10));
        let filter = format!("ip.addr=={} && ip.addr=={}", a.ip4, b.ip4);
        let out = run_in(
            mesh.t.network(),
            &[
                "tshark",
                "-r",
                self.file.to_str().unwrap(),
                "-Y",
                &filter,
                "-T",
                "fields",
                "-e",
                "tcp.srcport",
                "-e",
                "tcp.dstport",
                "-e",
                "tcp.len",
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let packets = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                Some((f.first()?.parse().ok()?, f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?))
            })
            .collect();
        (packets, std::fs::read(&self.file).unwrap_or_default())
    }
}

const MARKER: &str = "mesh-overlay-secret-payload-7f3a";

/// Points 1 and 6: curl from A (node 1) to nginx in B (node 2) over HBONE;
/// the bridge carries only TLS on 15008 between them; both nodes count the
/// known exchange with Istio's labels.
#[test]
fn cross_node_traffic_is_mutual_tls_and_counted() {
    let Some(mesh) = Mesh::start("overlay-cross", &["node1", "node2"]) else { return };
    let (a, b) = (mesh.t.pod("a"), mesh.t.pod("b"));
    let config = format!(
        "{}{}{}",
        yaml::namespace("default", true),
        yaml::pod(&a, "node1", "sa-a", "a"),
        yaml::pod(&b, "node2", "sa-b", "b")
    );
    mesh.apply("mesh.yaml", &config);
    mesh.wait_ready(&[(&a, "node1", "sa-a"), (&b, "node2", "sa-b")]);
    let _nginx = mesh.t.nginx(&b, 80, &format!("<p>{MARKER}</p>\n"), 10);
    let _sink = mesh.t.sink_server(&b, 9000, 70_000);

    let capture = Capture::start(&mesh);
    let out = run_in(&a.netns, &["curl", "-sS", "-m", "5", &format!("http://{}/", b.ip4)]);
    assert!(out.status.success(), "curl A -> B failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(MARKER), "nginx's page did not come back");
    let (packets, raw) = capture.packets(&mesh, &a, &b);
    assert!(!packets.is_empty(), "the capture saw nothing between A and B");
    let off_15008: Vec<_> = packets.iter().filter(|(s, d, _)| *s != 15008 && *d != 15008).collect();
    assert!(off_15008.is_empty(), "segments between A and B not on 15008: {off_15008:?}");
    assert!(packets.iter().any(|(_, _, len)| *len > 0), "no payload on 15008");
    let raw = String::from_utf8_lossy(&raw);
    assert!(!raw.contains(MARKER) && !raw.contains("GET / HTTP"), "HTTP payload in clear on the bridge");

    // Both proxies saw identities and the decision.
    let a_id = identity("default", "sa-a");
    let b_id = identity("default", "sa-b");
    let node1 = &mesh.node("node1").agent;
    let node2 = &mesh.node("node2").agent;
    let out_line = node1.wait_access("A's outbound", |v| v["pod"] == "default/a" && v["route"] == "hbone");
    assert_eq!((out_line["src_identity"].as_str(), out_line["dst_identity"].as_str()), (Some(&*a_id), Some(&*b_id)));
    let in_line = node2.wait_access("B's inbound", |v| v["pod"] == "default/b" && v["direction"] == "inbound");
    assert_eq!(in_line["src_identity"], a_id.as_str(), "{in_line}");
    assert_eq!((in_line["security"].as_str(), in_line["decision"].as_str()), (Some("mutual_tls"), Some("allow")));

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
    let deadline = Instant::now() + Duration::from_secs(5);
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
