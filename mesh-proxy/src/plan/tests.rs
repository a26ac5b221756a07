//! The plans as tables: one shop namespace with a client `a`, a captured
//! backend `b1`, an unenrolled `b2`, a backend service over both, an empty
//! service, and a DENY for namespace `evil`.
use mesh_common::api::{self, resource::Kind};

use super::*;
use crate::{error::Flag, state::State};

const A: &str = "spiffe://cluster.local/ns/shop/sa/a";
const B1: &str = "spiffe://cluster.local/ns/shop/sa/b1";

fn workload(name: &str, ip: &str, captured: bool) -> api::Resource {
    let w = crate::state::fixtures::workload(name, ip, captured, &[("app", name)]);
    api::Resource {
        key: api::ResourceKey::Workload(w.uid.clone()).to_string(),
        version: 1,
        kind: Some(Kind::Workload(w)),
    }
}

fn service(name: &str, vip: &str, endpoints: &[&str]) -> api::Resource {
    routed(name, vip, endpoints, None)
}

/// A service bound to waypoint `shop/<gateway>` with these instances.
fn routed(name: &str, vip: &str, endpoints: &[&str], waypoint: Option<(&str, &[&str])>) -> api::Resource {
    let s = api::Service {
        namespace: "shop".into(),
        name: name.into(),
        hosts: vec![format!("{name}.shop.svc.cluster.local")],
        vips: vec![vip.into()],
        ports: vec![api::ServicePort { port: 80, target_port: 8080, ..Default::default() }],
        endpoints: endpoints.iter().map(|ip| api::Endpoint { workload: String::new(), ip: ip.to_string() }).collect(),
        waypoint: waypoint.map(|(gateway, instances)| api::WaypointRef {
            namespace: "shop".into(),
            name: gateway.into(),
            workloads: instances.iter().map(|s| s.to_string()).collect(),
        }),
        ..Default::default()
    };
    let key = api::ResourceKey::Service(format!("shop/{name}")).to_string();
    api::Resource { key, version: 1, kind: Some(Kind::Service(s)) }
}

/// A waypoint's instance: not captured, terminates HBONE itself.
fn waypoint_instance() -> api::Resource {
    let mut r = workload("wp", "10.0.9.1", false);
    if let Some(Kind::Workload(w)) = &mut r.kind {
        w.native_tunnel = true;
    }
    r
}

fn deny_evil() -> api::Resource {
    let p = api::Authorization {
        namespace: "shop".into(),
        name: "deny-evil".into(),
        action: api::Action::Deny.into(),
        scope: api::Scope::Namespace.into(),
        rules: vec![api::Rule {
            from: vec![api::SourceMatch {
                namespaces: vec![api::StringMatch { kind: Some(api::string_match::Kind::Exact("evil".into())) }],
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    api::Resource { key: "policy/shop/deny-evil".into(), version: 1, kind: Some(Kind::Authorization(p)) }
}

fn view() -> Arc<MeshView> {
    let state = State::default();
    let resources = vec![
        workload("a", "10.0.0.1", true),
        workload("b1", "10.0.0.2", true),
        workload("b2", "10.0.0.3", false),
        service("back", "10.96.0.10", &["10.0.0.2", "10.0.0.3"]),
        service("empty", "10.96.0.11", &[]),
        waypoint_instance(),
        routed("routed", "10.96.0.12", &["10.0.0.2"], Some(("waypoint", &["Pod/shop/wp"]))),
        // Bound to a waypoint with no instance; and to a "waypoint" that is an ordinary pod.
        routed("orphan", "10.96.0.13", &["10.0.0.2"], Some(("gone", &[]))),
        routed("impostor", "10.96.0.14", &["10.0.0.2"], Some(("fake", &["Pod/shop/b1"]))),
        deny_evil(),
    ];
    state.apply(&api::Update { nonce: 1, version: "v1".into(), full: true, resources, ..Default::default() }).unwrap();
    state.view()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A hop as one line: `route dial -> target [source => peer via src_ip]`, or its error's flag and text.
fn show(hop: &Result<Hop, ProxyError>) -> String {
    match hop {
        Ok(h) => {
            let mut s = format!("{} {} -> {}", h.route.as_str(), h.dial, h.target);
            if let Some(m) = &h.mtls {
                let name = |id: &SpiffeId| id.service_account().to_owned();
                s += &format!(" [{} => {} via {}]", name(&m.source), name(&m.peer), m.pool.src_ip);
            }
            s
        }
        Err(e) => format!("{}: {e}", e.flag().as_str()),
    }
}

#[test]
fn outbound_plans() {
    let view = view();
    let a = LocalPod { name: "shop/a", addresses: &["10.0.0.1".parse().unwrap()] };
    let stranger = LocalPod { name: "shop/nobody", addresses: &["10.0.0.9".parse().unwrap()] };
    let certs = |id: &SpiffeId| id.to_string() == A;
    let no_certs = |_: &SpiffeId| false;
    // (from, destination, holds a certificate, the hops: how to reach it or why not)
    type Case<'a> = (LocalPod<'a>, &'a str, bool, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        // A mesh workload: HBONE to its 15008, CONNECT to the original destination.
        (a, "10.0.0.2:8080", true, vec!["hbone 10.0.0.2:15008 -> 10.0.0.2:8080 [a => b1 via 10.0.0.1]"]),
        // An IPv4-mapped destination is the same workload.
        (a, "[::ffff:10.0.0.2]:8080", true, vec!["hbone 10.0.0.2:15008 -> 10.0.0.2:8080 [a => b1 via 10.0.0.1]"]),
        // A service VIP: its endpoints on the target port, each by its own route.
        (
            a,
            "10.96.0.10:80",
            true,
            vec!["hbone 10.0.0.2:15008 -> 10.0.0.2:8080 [a => b1 via 10.0.0.1]", "tcp 10.0.0.3:8080 -> 10.0.0.3:8080"],
        ),
        // A pod outside the mesh: plain TCP, no certificate needed.
        (a, "10.0.0.3:8080", false, vec!["tcp 10.0.0.3:8080 -> 10.0.0.3:8080"]),
        // An address the mesh does not know: passthrough.
        (a, "192.0.2.1:443", false, vec!["passthrough 192.0.2.1:443 -> 192.0.2.1:443"]),
        // No certificate for the source yet: refused, never plaintext.
        (
            a,
            "10.0.0.2:8080",
            false,
            vec!["NR: no certificate for spiffe://cluster.local/ns/shop/sa/a yet: not sending in plaintext"],
        ),
        // A pod the configuration does not have cannot speak HBONE.
        (stranger, "10.0.0.2:8080", true, vec!["NR: pod shop/nobody has no workload in the mesh configuration"]),
        // A service without endpoints, or without the port.
        (a, "10.96.0.11:80", true, vec!["UH: service shop/empty has no endpoints"]),
        (a, "10.96.0.10:81", true, vec!["UH: service shop/back has no port 81"]),
        // A service bound to a waypoint: HBONE to the waypoint, CONNECT the
        // service address, accepting only the waypoint's identity.
        (a, "10.96.0.12:80", true, vec!["hbone 10.0.9.1:15008 -> 10.96.0.12:80 [a => wp via 10.0.0.1]"]),
        (a, "10.96.0.12:81", true, vec!["UH: service shop/routed has no port 81"]),
        // No waypoint running (or only something that is not one): refused, never around it.
        (
            a,
            "10.96.0.13:80",
            true,
            vec!["UH: service shop/orphan is bound to waypoint shop/gone, which has no instance"],
        ),
        (
            a,
            "10.96.0.14:80",
            true,
            vec!["UH: service shop/impostor is bound to waypoint shop/fake, which has no instance"],
        ),
        // The waypoint's pod itself is reached over HBONE without a node proxy.
        (a, "10.0.9.1:15008", true, vec!["hbone 10.0.9.1:15008 -> 10.0.9.1:15008 [a => wp via 10.0.0.1]"]),
    ];
    for (pod, dst, has_cert, want) in cases {
        let got =
            if has_cert { outbound(&view, pod, addr(dst), certs) } else { outbound(&view, pod, addr(dst), no_certs) };
        let mut got: Vec<String> = got.hops.iter().map(show).collect();
        let mut want: Vec<String> = want.into_iter().map(String::from).collect();
        // The round robin rotates a VIP's endpoints: compare them as a set.
        got.sort();
        want.sort();
        assert_eq!(got, want, "{} -> {dst}", pod.name);
    }
}

#[test]
fn outbound_plan_describes_the_connection_once() {
    let view = view();
    let a = LocalPod { name: "shop/a", addresses: &["10.0.0.1".parse().unwrap()] };
    let plan = outbound(&view, a, addr("10.0.0.2:8080"), |_| true);
    let hop = plan.hops[0].as_ref().unwrap();
    let mut info =
        ConnInfo::new(crate::telemetry::Direction::Outbound, "shop/a", addr("127.0.0.1:15001"), addr("10.0.0.1:40000"));
    plan.describe(&mut info, Some(hop));
    assert_eq!((info.route, info.security), ("hbone", "mutual_tls"));
    assert_eq!(info.src_principal.as_deref(), Some(A));
    assert_eq!(info.dst_principal.as_deref(), Some(B1));
    assert_eq!(info.upstream, Some(addr("10.0.0.2:8080")));
}

#[test]
fn inbound_plans() {
    let view = view();
    let b1 = LocalPod { name: "shop/b1", addresses: &["10.0.0.2".parse().unwrap()] };
    let hbone = |id: &str| Arrival::Hbone(id.parse().unwrap());
    // (from, arrival, target, verdict: "ok" or the flag and message, source workload label)
    let cases: Vec<(&str, Arrival, &str, &str, Option<&str>)> = vec![
        // A verified mesh peer: allowed, labelled as its workload.
        ("10.0.0.1:40000", hbone(A), "10.0.0.2:8080", "ok", Some("a")),
        // A tunnel for an address that is not this pod's.
        (
            "10.0.0.1:40000",
            hbone(A),
            "10.0.0.3:8080",
            "NR: tunnel target 10.0.0.3:8080 is not an address of pod shop/b1",
            Some("a"),
        ),
        // Plaintext from the unenrolled pod: PERMISSIVE admits it, labelled by its IP.
        ("10.0.0.3:40000", Arrival::Plaintext, "10.0.0.2:8080", "ok", Some("b2")),
        // Plaintext to a STRICT port is refused.
        ("10.0.0.3:40000", Arrival::Plaintext, "10.0.0.2:9000", "RBAC: denied", Some("b2")),
        // A peer of namespace evil is denied by the DENY policy.
        ("10.9.0.1:40000", hbone("spiffe://cluster.local/ns/evil/sa/x"), "10.0.0.2:8080", "RBAC: denied", None),
    ];
    for (src, arrival, target, want, source) in cases {
        let plan = inbound(&view, b1, addr(src), arrival.clone(), addr(target));
        let got = match &plan.verdict {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("{}: {e}", e.flag().as_str()),
        };
        assert!(got.starts_with(want), "{src} {arrival:?} -> {target}: {got}");
        let mut info = ConnInfo::new(crate::telemetry::Direction::Inbound, "shop/b1", addr("[::]:15008"), addr(src));
        plan.describe(&mut info);
        assert_eq!(info.src_workload.as_deref(), source, "{src}");
        if matches!(plan.verdict, Err(ProxyError::Denied { .. })) {
            assert_eq!(info.decision, Some("deny"));
        }
    }
    // The DENY names its policy.
    let plan =
        inbound(&view, b1, addr("10.9.0.1:1"), hbone("spiffe://cluster.local/ns/evil/sa/x"), addr("10.0.0.2:80"));
    assert!(
        matches!(&plan.verdict, Err(ProxyError::Denied { policy: Some(p), .. }) if p == "shop/deny-evil"),
        "{:?}",
        plan.verdict
    );
    assert_eq!(plan.verdict.unwrap_err().flag(), Flag::Denied);
}
