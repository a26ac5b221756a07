//! Resilience at the waypoint, on the real kernel: VirtualService fault
//! injection (aborts and delays for a share of the requests, HTTP and gRPC)
//! and DestinationRule circuit breaking (connectionPool), measured with real
//! clients through a waypoint.
use std::time::Instant;

use std::collections::BTreeMap;

use mesh_tests::{
    Pod,
    mesh::sum_metric,
    run_in,
    waypoint::{BACKEND_VIP, GRPC_VIP, L7Setup, SYSTEM_PYTHON, access_log, l7_setup, waypoint_metrics},
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

/// `n` requests for `path` from `pod` at once, each on its own connection
/// (all connected first, then sent together): how many got each status.
fn concurrent(pod: &Pod, n: usize, path: &str) -> BTreeMap<String, usize> {
    let script = "import collections, http.client, json, sys, threading\n\
                  n, host, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]\n\
                  conns = [http.client.HTTPConnection(host, 80, timeout=60) for _ in range(n)]\n\
                  for c in conns: c.connect()\n\
                  codes, lock, start = collections.Counter(), threading.Lock(), threading.Barrier(n)\n\
                  def go(c):\n    start.wait()\n    c.request('GET', path)\n    r = c.getresponse()\n    r.read()\n    \
                  with lock: codes[str(r.status)] += 1\n\
                  ts = [threading.Thread(target=go, args=(c,)) for c in conns]\n\
                  for t in ts: t.start()\n\
                  for t in ts: t.join()\n\
                  print(json.dumps(codes))\n";
    let out = run_in(&pod.netns, &[SYSTEM_PYTHON, "-c", script, &n.to_string(), BACKEND_VIP, path]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// The most `/slow` requests the backends had at once, together (from when
/// each began and ended; they share the host's clock), and they start over.
fn backend_peak(s: &L7Setup) -> usize {
    let mut events: Vec<(f64, i32)> = Vec::new();
    for b in &s.backends {
        let out = run_in(&b.netns, &["curl", "-s", "-m", "5", "http://127.0.0.1:8080/spans?reset=1"]);
        let spans: Vec<(f64, f64)> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        for (began, ended) in spans {
            events.extend([(began, 1), (ended, -1)]);
        }
    }
    // Ends before beginnings at the same instant: back-to-back is not at once.
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, d) in events {
        now += d;
        peak = peak.max(now);
    }
    peak as usize
}

fn pool(spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: backend, namespace: default}}\n\
         spec:\n  host: backend\n  trafficPolicy:\n    connectionPool: {spec}\n"
    )
}

/// `http2MaxRequests: 10` with 50 concurrent slow requests: exactly the 40
/// beyond the limit are refused at once with 503 and flag UO, and the
/// backends never have more than 10 at once. Then `tcp.maxConnections: 2`
/// with `http1MaxPendingRequests: 3` and 10 at once: 2 are sent, 3 wait for
/// a connection and are sent in turn, 5 overflow; never more than 2 at the
/// backends.
#[test]
fn circuit_breakers_refuse_the_overflow_at_once() {
    let Some(s) = l7_setup("wp-breaker") else { return };
    s.mesh.apply("pool.yaml", &pool("{http: {http2MaxRequests: 10}}"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let started = std::time::Instant::now();
    let got = concurrent(&s.client, 50, "/slow?ms=3000");
    println!("http2MaxRequests 10, 50 at once: {got:?} in {:?}", started.elapsed());
    assert_eq!(got, BTreeMap::from([("200".to_string(), 10), ("503".to_string(), 40)]), "{}", s.wp.log_text());
    let peak = backend_peak(&s);
    assert!(peak <= 10, "the backends had {peak} requests at once");
    let text = waypoint_metrics(&s.wp_pod);
    let flagged = sum_metric(&text, "istio_requests_total", &[("response_code", "503"), ("response_flags", "UO")]);
    assert_eq!(flagged, 40.0, "every overflow counted with flag UO");
    assert_eq!(sum_metric(&text, "mesh_waypoint_circuit_breaker_overflows_total", &[]), 40.0);

    s.mesh.apply("pool.yaml", &pool("{tcp: {maxConnections: 2}, http: {http1MaxPendingRequests: 3}}"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    // The first round's idle connections are more than the new limit: they are let go.
    let started = std::time::Instant::now();
    let got = concurrent(&s.client, 10, "/slow?ms=1000");
    let took = started.elapsed();
    println!("maxConnections 2, http1MaxPendingRequests 3, 10 at once: {got:?} in {took:?}");
    assert_eq!(got, BTreeMap::from([("200".to_string(), 5), ("503".to_string(), 5)]), "{}", s.wp.log_text());
    assert!(took >= std::time::Duration::from_secs(3), "5 requests over 2 connections take 3 rounds: {took:?}");
    let peak = backend_peak(&s);
    assert!(peak <= 2, "the backends had {peak} requests at once over 2 connections");
}

/// Every backend's count of requests for `path` (the app counts them, also
/// while it fails on purpose).
fn hits(s: &L7Setup, path: &str) -> Vec<u64> {
    s.backends
        .iter()
        .map(|b| {
            let out = run_in(&b.netns, &["curl", "-s", "-m", "5", &format!("http://127.0.0.1:8080/hits{path}")]);
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(u64::MAX)
        })
        .collect()
}

fn set_failing(b: &Pod, on: bool) {
    let url = format!("http://127.0.0.1:8080/admin?fail={}", u8::from(on));
    assert!(run_in(&b.netns, &["curl", "-sf", "-m", "5", &url]).status.success());
}

/// The waypoint's view of its clusters and endpoints.
fn endpoints(s: &L7Setup) -> serde_json::Value {
    let out = run_in(&s.wp_pod.netns, &["curl", "-s", "-m", "5", "http://127.0.0.1:15020/debug/endpoints"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

fn ejected(s: &L7Setup) -> Vec<String> {
    let all = endpoints(s);
    let mut out: Vec<String> = all["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["service"] == "default/backend")
        .flat_map(|c| c["endpoints"].as_array().unwrap().iter())
        .filter(|e| e["ejected"] == true)
        .map(|e| e["endpoint"].as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

fn requests(s: &L7Setup, path: &str, n: usize) -> BTreeMap<String, usize> {
    let out = run_in(
        &s.client.netns,
        &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\\n", &format!("http://{BACKEND_VIP}{path}?[1-{n}]")],
    );
    let mut tally = BTreeMap::new();
    for c in String::from_utf8_lossy(&out.stdout).lines() {
        *tally.entry(c.to_owned()).or_insert(0) += 1;
    }
    tally
}

/// One of three pods starts failing: after `consecutive5xxErrors` its
/// endpoints (its IPv4 and IPv6 addresses) are ejected and get no traffic
/// (its clients see answers: the retries go to the others); it comes back
/// after `baseEjectionTime` (5 s); when all fail, `maxEjectionPercent` keeps the
/// rest in rotation.
#[test]
fn outlier_detection_ejects_a_failing_endpoint_and_lets_it_back() {
    let Some(s) = l7_setup("wp-outliers") else { return };
    let dr = |max_percent: u32| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: backend, namespace: default}}\n\
             spec:\n  host: backend\n  trafficPolicy:\n    outlierDetection: {{consecutive5xxErrors: 3, interval: 1s, \
             baseEjectionTime: 5s, maxEjectionPercent: {max_percent}}}\n"
        )
    };
    s.mesh.apply("outliers.yaml", &dr(50));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let b3 = &s.backends[2];
    set_failing(b3, true);
    // The pods are dual-stack: each address is an endpoint, as in Envoy's
    // clusters. Requests are balanced at random (LEAST_REQUEST at equal
    // load), so send them until both of b3's have had their 3 failures.
    let b3_addrs = vec![format!("{}:8080", b3.ip4), format!("[{}]:8080", b3.ip6)];
    for _ in 0..15 {
        let got = requests(&s, "/warm", 20);
        assert_eq!(got.get("200"), Some(&20), "retries answer around the failing endpoint: {got:?}");
        if ejected(&s) == b3_addrs {
            break;
        }
    }
    assert_eq!(ejected(&s), b3_addrs, "{}", endpoints(&s));
    assert!(s.wp.log_text().contains("endpoint ejected by outlier detection"), "{}", s.wp.log_text());
    let got = requests(&s, "/during", 60);
    assert_eq!(got.get("200"), Some(&60), "{got:?}");
    let during = hits(&s, "/during");
    assert_eq!(during[2], 0, "the ejected endpoint gets no requests: {during:?}");
    assert_eq!(during[0] + during[1], 60, "{during:?}");
    let text = waypoint_metrics(&s.wp_pod);
    assert_eq!(sum_metric(&text, "mesh_waypoint_outlier_ejections_total", &[("service", "default/backend")]), 2.0);
    // mesh-ctl shows each endpoint as the waypoint sees it.
    let out = s.mesh.ctl(&["endpoints", "--service", "default/backend"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    let row = |addr: &str| table.lines().find(|l| l.contains(addr)).unwrap_or_else(|| panic!("{addr} in\n{table}"));
    assert!(row(&b3_addrs[0]).contains("EJECTED"), "{table}");
    assert!(row(&format!("{}:8080", s.backends[0].ip4)).contains("healthy"), "{table}");

    // Healthy again, and back in rotation once its ejection ends.
    set_failing(b3, false);
    std::thread::sleep(std::time::Duration::from_millis(5300));
    assert!(ejected(&s).is_empty(), "{}", endpoints(&s));
    requests(&s, "/after", 60);
    let after = hits(&s, "/after");
    assert!(after[2] > 0, "back after baseEjectionTime: {after:?}");

    // All fail: at most 34 % of the six endpoints (two) are ejected.
    s.mesh.apply("outliers.yaml", &dr(34));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    for b in &s.backends {
        set_failing(b, true);
    }
    for _ in 0..10 {
        let got = requests(&s, "/allfail", 20);
        assert_eq!(got.get("503"), Some(&20), "{got:?}");
        let out = ejected(&s).len();
        assert!(out <= 2, "maxEjectionPercent holds: {}", endpoints(&s));
        if out == 2 {
            break;
        }
    }
    assert_eq!(ejected(&s).len(), 2, "two of six may be out, no more: {}", endpoints(&s));
    let allfail = hits(&s, "/allfail");
    assert_eq!(allfail.iter().filter(|n| **n > 0).count(), 3, "the others still get requests: {allfail:?}");
}

fn destination_rule(traffic_policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: backend, namespace: default}}\n\
         spec:\n  host: backend\n  subsets: [{{name: v1, labels: {{version: v1}}}}]\n  trafficPolicy: {traffic_policy}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: backend, namespace: default}}\n\
         spec:\n  hosts: [backend]\n  http: [{{route: [{{destination: {{host: backend, subset: v1}}}}]}}]\n"
    )
}

/// `hey` with `c` clients for `n` requests of `path`; each backend's share.
fn shares_under_load(s: &L7Setup, path: &str, n: usize, c: usize) -> Vec<f64> {
    let url = format!("http://{BACKEND_VIP}{path}");
    let out = run_in(&s.client.netns, &["hey", "-n", &n.to_string(), "-c", &c.to_string(), &url]);
    assert!(out.status.success(), "{out:?}");
    let got = hits(s, path);
    let total: u64 = got.iter().sum();
    got.iter().map(|h| *h as f64 / total.max(1) as f64).collect()
}

/// A key's pod for each of `keys` (one request each, header `x-user`).
fn pods_by_key(s: &L7Setup, keys: usize) -> Vec<String> {
    let script = "import http.client, json, sys\n\
                  c = http.client.HTTPConnection(sys.argv[1], 80, timeout=10)\n\
                  out = []\n\
                  for k in range(int(sys.argv[2])):\n    \
                  c.request('GET', '/key', headers={'x-user': 'user-%d' % k})\n    \
                  r = c.getresponse()\n    out.append(r.read().decode().strip())\n\
                  print(json.dumps(out))\n";
    let out = run_in(&s.client.netns, &[SYSTEM_PYTHON, "-c", script, BACKEND_VIP, &keys.to_string()]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// LEAST_REQUEST (Istio's default) sends most requests to the fast one of a
/// fast/slow pair, where ROUND_ROBIN splits them evenly; a consistent hash
/// keeps a header's value on one pod across 500 requests, and a pod added
/// takes about 1/N of the keys, which move only to it.
#[test]
fn load_balancers_weigh_load_and_keep_keys() {
    let Some(s) = l7_setup("wp-balance") else { return };
    // Subset v1 is b1 (fast) and b2 (slow: 50 ms an answer).
    let run_in_ok = |pod: &Pod, url: &str| assert!(run_in(&pod.netns, &["curl", "-sf", url]).status.success());
    run_in_ok(&s.backends[1], "http://127.0.0.1:8080/admin?delay=50");
    s.mesh.apply("lb.yaml", &destination_rule("{}"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let least = shares_under_load(&s, "/least", 400, 8);
    s.mesh.apply("lb.yaml", &destination_rule("{loadBalancer: {simple: ROUND_ROBIN}}"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let round = shares_under_load(&s, "/round", 400, 8);
    println!("fast b1's share: LEAST_REQUEST {:.2}, ROUND_ROBIN {:.2}", least[0], round[0]);
    assert!(least[0] > 0.65, "LEAST_REQUEST: {least:?}");
    assert!((0.4..=0.6).contains(&round[0]), "ROUND_ROBIN: {round:?}");
    run_in_ok(&s.backends[1], "http://127.0.0.1:8080/admin?delay=0");

    // Consistent hash on x-user over the service's three pods.
    let hashed = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: backend, namespace: default}\n\
                  spec:\n  host: backend\n  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}\n";
    s.mesh.apply("lb.yaml", hashed);
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let out =
        run_in(&s.client.netns, &["curl", "-s", "-H", "x-user: alice", &format!("http://{BACKEND_VIP}/alice?[1-500]")]);
    let pods: std::collections::BTreeSet<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert_eq!(pods.len(), 1, "alice's 500 requests on one pod: {pods:?}");
    let before = pods_by_key(&s, 200);

    let b4 = s.mesh.t.pod("b4");
    s.mesh.apply("b4.yaml", &mesh_tests::waypoint::yaml::versioned_pod(&b4, "node1", "backend", "v3"));
    s.mesh.wait_ready(&[(&b4, "node1", "backend")]);
    let _app = s.mesh.t.app(&b4, 8080, "b4");
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let after = pods_by_key(&s, 200);
    let moved: Vec<(&String, &String)> = before.iter().zip(&after).filter(|(b, a)| b != a).collect();
    let share = moved.len() as f64 / before.len() as f64;
    println!("a fourth pod: {} of {} keys moved ({share:.2})", moved.len(), before.len());
    assert!((0.1..=0.45).contains(&share), "about 1/4 of the keys move: {share:.2}");
    assert!(moved.iter().all(|(_, a)| a.as_str() == "b4"), "keys move only to the new pod: {moved:?}");
}

/// Connections the waypoint has opened to `service`'s endpoints.
fn connections_opened(s: &L7Setup, service: &str) -> u64 {
    endpoints(s)["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["service"] == service)
        .map(|c| c["connections_opened"].as_u64().unwrap())
        .sum()
}

/// `maxRequestsPerConnection` holds on HTTP/2 upstreams too: a gRPC
/// client's calls, spread over the service's endpoints, reuse one shared
/// connection an endpoint without it, and a new one every two calls with
/// `maxRequestsPerConnection: 2`; every call is answered either way.
#[test]
fn http2_upstream_connections_carry_max_requests_per_connection() {
    let Some(s) = l7_setup("wp-h2-maxreq") else { return };
    let calls = |n: &str| {
        let target = format!("{GRPC_VIP}:9090");
        let out = run_in(&s.client.netns, &[SYSTEM_PYTHON, "-c", mesh_tests::waypoint::GRPC_CLIENT, &target, n]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        let answered: u64 = v["unary"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
        assert_eq!(answered, n.parse::<u64>().unwrap(), "{v}");
    };
    calls("30");
    let shared = connections_opened(&s, "default/grpc");
    // Six endpoints (three pods, two addresses each): at most one connection each, a race aside.
    assert!((1..=8).contains(&shared), "without a limit: {shared} connections for 34 calls");
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: grpc, namespace: default}\n\
              spec:\n  host: grpc\n  trafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: 2}}}\n";
    s.mesh.apply("grpc-dr.yaml", dr);
    s.mesh.wait_waypoint_current(&s.wp_pod);
    calls("30");
    let limited = connections_opened(&s, "default/grpc") - shared;
    println!("HTTP/2 connections for 34 calls: {shared} shared, {limited} with maxRequestsPerConnection: 2");
    assert!(limited >= 15, "two calls a connection: {limited} connections for 34 calls\n{}", endpoints(&s));
}

/// `n` requests of `path`, one after another on one connection: each
/// backend's share of them (`pods` beyond the setup's three counted too).
fn sequential_shares(s: &L7Setup, path: &str, n: usize, extra: &[&Pod]) -> Vec<f64> {
    let url = format!("http://{BACKEND_VIP}{path}?[1-{n}]");
    let out = run_in(&s.client.netns, &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\\n", &url]);
    let ok = String::from_utf8_lossy(&out.stdout).lines().filter(|c| *c == "200").count();
    assert_eq!(ok, n, "{out:?}");
    let mut got = hits(s, path);
    for pod in extra {
        let out = run_in(&pod.netns, &["curl", "-s", "-m", "5", &format!("http://127.0.0.1:8080/hits{path}")]);
        got.push(String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(u64::MAX));
    }
    let total: u64 = got.iter().sum();
    got.iter().map(|h| *h as f64 / total.max(1) as f64).collect()
}

/// Beyond Istio's balancers: peak-EWMA (`mesh.io/load-balancer: peak-ewma`)
/// weighs each endpoint's latency, so even one client sending one request
/// at a time (where LEAST_REQUEST sees no load anywhere and splits evenly)
/// goes mostly to the fast one of a fast/slow pair. And slow start
/// (`warmupDurationSecs`): a pod added to the service gets a small share at
/// first, its full share once its window has passed.
#[test]
fn peak_ewma_weighs_latency_and_new_pods_warm_up() {
    let Some(s) = l7_setup("wp-ewma") else { return };
    // Subset v1 is b1 (fast) and b2 (slow: 50 ms an answer).
    assert!(run_in(&s.backends[1].netns, &["curl", "-sf", "http://127.0.0.1:8080/admin?delay=50"]).status.success());
    s.mesh.apply("lb.yaml", &destination_rule("{}"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let least = sequential_shares(&s, "/least", 300, &[]);
    let annotated = destination_rule("{}").replacen(
        "metadata: {name: backend, namespace: default}",
        "metadata: {name: backend, namespace: default, annotations: {mesh.io/load-balancer: peak-ewma}}",
        1,
    );
    s.mesh.apply("lb.yaml", &annotated);
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let ewma = sequential_shares(&s, "/ewma", 300, &[]);
    println!("fast b1's share, one request at a time: LEAST_REQUEST {:.2}, peak-EWMA {:.2}", least[0], ewma[0]);
    assert!((0.3..=0.7).contains(&least[0]), "LEAST_REQUEST cannot tell them apart: {least:?}");
    // P2C over four endpoints (two addresses a pod) picks the two slow ones together 1 in 6: ~0.83.
    assert!(ewma[0] > 0.7, "peak-EWMA: {ewma:?}");
    assert!(run_in(&s.backends[1].netns, &["curl", "-sf", "http://127.0.0.1:8080/admin?delay=0"]).status.success());

    // Slow start over the whole service: the three pods are there before its first request.
    let warmup = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: backend, namespace: default}\n\
                  spec:\n  host: backend\n  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 10s}}\n";
    s.mesh.apply("lb.yaml", warmup);
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let before = sequential_shares(&s, "/before", 60, &[]);
    assert!(before.iter().all(|x| *x > 0.2), "three warm pods share evenly: {before:?}");
    let b4 = s.mesh.t.pod("b4");
    s.mesh.apply("b4.yaml", &mesh_tests::waypoint::yaml::versioned_pod(&b4, "node1", "backend", "v3"));
    s.mesh.wait_ready(&[(&b4, "node1", "backend")]);
    let _app = s.mesh.t.app(&b4, 8080, "b4");
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let added = Instant::now();
    let warming = sequential_shares(&s, "/warming", 300, &[&b4]);
    let took = added.elapsed();
    std::thread::sleep(std::time::Duration::from_secs(10).saturating_sub(added.elapsed()));
    let warm = sequential_shares(&s, "/warm", 300, &[&b4]);
    println!("new pod b4's share: {:.3} in its first {took:?}, {:.3} after its 10 s window", warming[3], warm[3]);
    assert!(warming[3] > 0.0 && warming[3] < 0.12, "warming up (a quarter of 10-30 %): {warming:?}");
    assert!(warm[3] > 0.17, "its full quarter once warm: {warm:?}");
}

/// localityLbSetting, with the waypoint and b1, b2 in zone a and b3 in zone
/// b (their `istio-locality` labels): `distribute` splits requests across
/// zones by weight; failover (with outlier detection, as Istio requires)
/// keeps every request in the waypoint's zone while it is healthy, and moves
/// them to the other zone once its endpoints are ejected.
#[test]
fn locality_distributes_and_fails_over() {
    let zone = |z: &str| format!("istio-locality: region1.{z}");
    let (a, b) = (zone("zone-a"), zone("zone-b"));
    let Some(s) = mesh_tests::waypoint::l7_setup_labelled("wp-locality", &[], &a, [&a, &a, &b]) else { return };
    let dr = |lb: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: backend, namespace: default}}\n\
             spec:\n  host: backend\n  trafficPolicy:\n    loadBalancer: {{localityLbSetting: {lb}}}\n    \
             outlierDetection: {{consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100}}\n"
        )
    };
    s.mesh.apply(
        "lb.yaml",
        &dr("{distribute: [{from: region1/zone-a/*, to: {region1/zone-a/*: 20, region1/zone-b/*: 80}}]}"),
    );
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let split = sequential_shares(&s, "/split", 300, &[]);
    println!("distribute 20/80: zone a {:.2}, zone b {:.2}", split[0] + split[1], split[2]);
    assert!((0.68..=0.92).contains(&split[2]), "zone b's 80 %: {split:?}");

    s.mesh.apply("lb.yaml", &dr("{enabled: true}"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let local = sequential_shares(&s, "/local", 60, &[]);
    assert_eq!(local[2], 0.0, "the waypoint's zone takes every request while healthy: {local:?}");
    // Zone a fails: once its four endpoints (two pods, two addresses each) are ejected, zone b takes over.
    set_failing(&s.backends[0], true);
    set_failing(&s.backends[1], true);
    let zone_a: Vec<String> =
        s.backends[..2].iter().flat_map(|p| [format!("{}:8080", p.ip4), format!("[{}]:8080", p.ip6)]).collect();
    for _ in 0..30 {
        requests(&s, "/failing", 10);
        if zone_a.iter().all(|e| ejected(&s).contains(e)) {
            break;
        }
    }
    assert!(zone_a.iter().all(|e| ejected(&s).contains(e)), "{}", endpoints(&s));
    let got = requests(&s, "/failover", 40);
    assert_eq!(got.get("200"), Some(&40), "zone b answers every request: {got:?}");
    let failover = hits(&s, "/failover");
    assert_eq!(failover, [0, 0, 40], "all in zone b: {failover:?}");
}

fn rate_limit(spec: &str) -> String {
    format!(
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: HTTPLocalRateLimitPolicy\nmetadata: {{name: backend-rl, namespace: default}}\n\
         spec:\n  targetRef: {{group: core, kind: Service, name: backend}}\n{spec}"
    )
}

/// `hey`'s count of each status.
fn hey_statuses(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let code = l.strip_prefix('[')?.split(']').next()?.to_owned();
            let n = l.split(']').nth(1)?.split_whitespace().next()?.parse().ok()?;
            Some((code, n))
        })
        .collect()
}

/// Linkerd's HTTPLocalRateLimitPolicy on a Service: at 100 requests a second
/// against a total of 20, the answered ones stay within one bucket (one
/// second's worth) of 20 a second, the rest get 429 with retry-after; a
/// per-identity limit keeps one caller's flood from another caller.
#[test]
fn local_rate_limits_hold_their_rate() {
    let Some(s) = l7_setup("wp-ratelimit") else { return };
    s.mesh.apply("rl.yaml", &rate_limit("  total: {requestsPerSecond: 20}\n"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let url = format!("http://{BACKEND_VIP}/limited");
    let out = run_in(&s.client.netns, &["hey", "-z", "4s", "-c", "1", "-q", "100", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    let got = hey_statuses(&text);
    let (ok, limited) = (got.get("200").copied().unwrap_or(0), got.get("429").copied().unwrap_or(0));
    println!("100 rps for 4 s against 20 rps: {ok} answered, {limited} limited");
    assert!(ok + limited > 200, "the client sent too little to test the limit: {got:?}\n{text}");
    assert!((60..=105).contains(&ok), "20 a second for 4 s, plus at most one second's burst: {ok}");
    // A quick burst past the bucket: the refused are told when to come back.
    let out = run_in(&s.client.netns, &["curl", "-s", "-D", "-", "-o", "/dev/null", &format!("{url}?[1-40]")]);
    let heads = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    let refused = heads.split("\r\n\r\n").find(|h| h.starts_with("http/1.1 429")).unwrap_or_else(|| panic!("{heads}"));
    assert!(refused.contains("retry-after: 1"), "{refused}");
    let metrics = waypoint_metrics(&s.wp_pod);
    assert!(sum_metric(&metrics, "mesh_waypoint_rate_limited_total", &[("limit", "total")]) >= limited as f64);
    assert!(sum_metric(&metrics, "istio_requests_total", &[("response_code", "429"), ("response_flags", "RL")]) >= 1.0);

    // Per identity: client floods, other is untouched.
    s.mesh.apply("rl.yaml", &rate_limit("  identity: {requestsPerSecond: 10}\n"));
    s.mesh.wait_waypoint_current(&s.wp_pod);
    let codes = |pod: &Pod, n: usize| {
        let out =
            run_in(&pod.netns, &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\\n", &format!("{url}?[1-{n}]")]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.lines().filter(|c| *c == "200").count(), text.lines().filter(|c| *c == "429").count())
    };
    let (flood_ok, flood_limited) = codes(&s.client, 60);
    let (other_ok, other_limited) = codes(&s.other, 8);
    println!(
        "identity limit 10 rps: client's flood {flood_ok} answered / {flood_limited} limited; other {other_ok} / {other_limited}"
    );
    assert!(flood_limited > 0 && flood_ok <= 25, "the flooding caller is limited: {flood_ok}/{flood_limited}");
    assert_eq!((other_ok, other_limited), (8, 0), "the other caller has its own bucket");
}
