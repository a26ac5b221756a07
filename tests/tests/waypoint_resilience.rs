//! Resilience at the waypoint, on the real kernel: VirtualService fault
//! injection (aborts and delays for a share of the requests, HTTP and gRPC),
//! measured with real clients through a waypoint.
use std::time::Instant;

use mesh_tests::{
    mesh::sum_metric,
    run_in,
    waypoint::{BACKEND_VIP, GRPC_VIP, SYSTEM_PYTHON, access_log, l7_setup, waypoint_metrics},
};

fn fault_route(host: &str, fault: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {host}, namespace: default}}\n\
         spec:\n  hosts: [{host}]\n  http:\n  - name: faulty\n    fault: {fault}\n    route: [{{destination: {{host: {host}}}}}]\n"
    )
}

/// An abort for 30 % of 2000 requests lands within five standard deviations
/// of 600 (a binomial's: sqrt(2000 * 0.3 * 0.7) = 20.5), each with the
/// configured status and flag `FI`; a fixed delay is observed within a
/// tolerance; gRPC aborts carry the configured status.
#[test]
fn faults_abort_a_share_and_delay_as_configured() {
    let Some(s) = l7_setup("wp-faults") else { return };
    s.mesh.apply("faults.yaml", &fault_route("backend", "{abort: {httpStatus: 418, percentage: {value: 30}}}"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let out = run_in(
        &s.client.netns,
        &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\\n", &format!("http://{BACKEND_VIP}/?[1-2000]")],
    );
    let codes = String::from_utf8_lossy(&out.stdout);
    let (mut aborted, mut ok) = (0u32, 0u32);
    for c in codes.lines() {
        match c {
            "418" => aborted += 1,
            "200" => ok += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(aborted + ok, 2000, "{codes}");
    let sd = (2000.0f64 * 0.3 * 0.7).sqrt();
    println!("abort at 30 %: {aborted} of 2000 (expected 600 ± {:.0} at 5 sd)", 5.0 * sd);
    assert!((f64::from(aborted) - 600.0).abs() <= 5.0 * sd, "{aborted} aborted of 2000");
    let text = waypoint_metrics(&s.wp_pod);
    let counted = sum_metric(&text, "istio_requests_total", &[("response_code", "418"), ("response_flags", "FI")]);
    assert_eq!(counted, f64::from(aborted), "every abort counted with flag FI");

    // A fixed delay of 300 ms for every request: observed, within a tolerance.
    s.mesh.apply("faults.yaml", &fault_route("backend", "{delay: {fixedDelay: 300ms, percentage: {value: 100}}}"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let mut took = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let out = run_in(&s.client.netns, &["curl", "-sf", "-m", "10", &format!("http://{BACKEND_VIP}/delayed")]);
        assert!(out.status.success(), "{out:?}");
        took.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    println!("fixed delay 300 ms: requests took {took:.0?} ms");
    assert!(took.iter().all(|ms| (300.0..300.0 + 700.0).contains(ms)), "{took:?}");
    let line = access_log(&s.wp).into_iter().rev().find(|l| l["path"] == "/delayed").expect("an access-log line");
    assert_eq!((line["status"].as_u64(), line["response_flags"].as_str()), (Some(200), Some("DI")), "{line}");
    assert!(line["duration_ms"].as_u64().is_some_and(|d| d >= 300), "{line}");

    // gRPC: an abort with a gRPC status, for every call.
    s.mesh.apply("faults.yaml", &fault_route("grpc", "{abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let script = "import grpc, sys\nch = grpc.insecure_channel(sys.argv[1])\ntry:\n    \
                  ch.unary_unary('/mesh.test.Echo/Unary')(b'x', timeout=10)\n    print('OK')\n\
                  except grpc.RpcError as e:\n    print(e.code().name, e.details())\n";
    let out = run_in(&s.client.netns, &[SYSTEM_PYTHON, "-c", script, &format!("{GRPC_VIP}:9090")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "UNAVAILABLE fault filter abort", "{out:?}");

    // mesh-ctl says which fault a request's route injects.
    let out = s.mesh.ctl(&["route", "explain", "--to", "default/grpc:9090", "--path", "/mesh.test.Echo/Unary"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Fault: abort with gRPC status 14 for 100% of requests"), "{text}");
}
