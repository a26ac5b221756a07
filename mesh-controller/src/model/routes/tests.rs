use mesh_common::{
    api,
    routing::{CompiledRoutes, RequestFacts},
};

use super::*;
use crate::model::from_yaml as model;

const MESH: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {nodeName: wp1, serviceAccountName: waypoint}
status: {podIP: 10.0.9.1}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: shop, labels: {app: reviews, version: v1}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: shop, labels: {app: reviews, version: v2}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {selector: {app: reviews}, clusterIP: 10.96.0.1, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {selector: {app: db}, clusterIP: 10.96.0.2, ports: [{name: tcp-pg, port: 5432}, {port: 80, appProtocol: kubernetes.io/h2c}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop, labels: {istio.io/use-waypoint: gone}}
spec: {selector: {app: ratings}, clusterIP: 10.96.0.3, ports: [{port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
    timeout: 2s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: 'gateway-error,503'}
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v3}, weight: 20}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-ratings, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: ratings, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}]
    backendRefs: [{name: ratings, port: 9080}]
  - backendRefs: [{name: nowhere, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-ratings, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: ratings}]
  rules:
  - matches: [{path: {type: Exact, value: /api/health}}, {path: {type: PathPrefix, value: /api/x}, headers: [{name: x-test, value: '1'}]}]
    timeouts: {request: 1s}
    retry: {attempts: 1, codes: [503]}
    backendRefs: [{name: ratings, port: 9080}]
";

#[test]
fn waypoints_bind_by_service_then_namespace_and_run_as_native_tunnels() {
    let m = model(MESH);
    let wp = &m.workloads["Pod/shop/waypoint-1"];
    assert!(wp.native_tunnel && !wp.captured, "a waypoint speaks HBONE itself; no node enrolls it");
    assert_eq!(m.workloads_on_node("wp1").map(|w| w.uid.as_str()).collect::<Vec<_>>(), ["Pod/shop/waypoint-1"]);
    let reviews = m.services["shop/reviews"].waypoint.as_ref().unwrap();
    assert_eq!(
        (reviews.gateway.as_str(), reviews.instances.as_slice()),
        ("shop/waypoint", &["Pod/shop/waypoint-1".to_string()][..])
    );
    assert_eq!(m.services["shop/db"].waypoint, None, "use-waypoint: none opts out of the namespace's");
    let gone = m.services["shop/ratings"].waypoint.as_ref().unwrap();
    assert!(gone.instances.is_empty(), "an undefined waypoint binds with no instances: fail closed");
    // Protocols, as Istio reads them.
    let db: Vec<&str> = m.services["shop/db"].ports.iter().map(|p| p.protocol.as_str()).collect();
    assert_eq!(db, ["tcp", "http2"]);
    assert_eq!(m.services["shop/reviews"].ports[0].protocol, "http");
    assert_eq!(m.services["shop/ratings"].ports[0].protocol, "");
}

#[test]
fn port_protocols() {
    for (name, app, want) in [
        (Some("http-web"), None, "http"),
        (Some("grpc"), None, "grpc"),
        (Some("http2"), None, "http2"),
        (Some("web"), None, ""),
        (Some("http-web"), Some("tcp"), "tcp"),
        (None, Some("kubernetes.io/h2c"), "http2"),
        (None, Some("HTTP"), "http"),
        (Some("tcp-db"), None, "tcp"),
    ] {
        assert_eq!(port_protocol(name, app), want, "{name:?} {app:?}");
    }
}

#[test]
fn virtual_service_routes_with_subsets_timeouts_and_retries() {
    let m = model(MESH);
    let routes = &m.routes["shop/reviews"];
    assert_eq!(routes.len(), 2);
    let jason = &routes[0];
    assert_eq!(jason.name, "VirtualService/shop/reviews/0");
    assert_eq!(jason.backends[0].subset_labels.get("version").map(String::as_str), Some("v2"));
    assert_eq!((jason.backends[0].weight, jason.timeout_ms), (100, 2000));
    let retry = jason.retry.as_ref().unwrap();
    assert_eq!((retry.attempts, retry.per_try_timeout_ms), (3, 500));
    assert_eq!(retry.retry_on, ["gateway-error", "retriable-status-codes"]);
    assert_eq!(retry.status_codes, [503]);
    let split = &routes[1];
    assert_eq!(split.backends.iter().map(|b| b.weight).collect::<Vec<_>>(), [80, 20]);
    assert_eq!(split.backends[0].missing, "");
    assert!(split.backends[1].missing.contains("subset \"v3\""), "{}", split.backends[1].missing);
}

#[test]
fn http_routes_follow_gateway_api_precedence() {
    let m = model(MESH);
    let routes = &m.routes["shop/ratings"];
    let order: Vec<(&str, String)> = routes
        .iter()
        .map(|r| {
            let path = r.matches[0].path.as_ref().and_then(|p| p.kind.clone());
            (r.name.as_str(), format!("{path:?}"))
        })
        .collect();
    // Exact first, then longest prefix (/api/x before /api, before the catch-all /).
    let names: Vec<&str> = order.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "HTTPRoute/shop/a-ratings/0",
            "HTTPRoute/shop/a-ratings/0",
            "HTTPRoute/shop/b-ratings/0",
            "HTTPRoute/shop/b-ratings/1"
        ],
        "{order:?}"
    );
    assert!(order[0].1.contains("Exact(\"/api/health\")"), "{order:?}");
    assert_eq!(routes[0].timeout_ms, 1000);
    assert_eq!(routes[0].retry.as_ref().unwrap().status_codes, [503]);
    assert_eq!(routes[2].rewrite.as_ref().unwrap().prefix, "/v2");
    assert_eq!(routes[2].ports, [9080]);
    assert!(routes[3].backends[0].missing.contains("shop/nowhere is not defined"));

    // What the waypoint will do with these, through the shared matcher.
    let compiled =
        CompiledRoutes::from_wire(&api::HttpRoutes { routes: routes.clone(), ..Default::default() }).unwrap();
    let pick = |path: &str, headers: &[(&str, &str)]| {
        let req = RequestFacts { method: "GET", path, authority: "ratings", port: 9080, headers };
        compiled.select(&req).map(|r| r.wire.name.clone())
    };
    assert_eq!(pick("/api/health", &[]).as_deref(), Some("HTTPRoute/shop/a-ratings/0"));
    assert_eq!(pick("/api/x/1", &[("x-test", "1")]).as_deref(), Some("HTTPRoute/shop/a-ratings/0"));
    assert_eq!(pick("/api/x/1", &[]).as_deref(), Some("HTTPRoute/shop/b-ratings/0"));
    assert_eq!(pick("/other", &[]).as_deref(), Some("HTTPRoute/shop/b-ratings/1"));
}

#[test]
fn istio_bookinfo_samples_compile() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-config/tests/fixtures/bookinfo");
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\nspec: {clusterIP: 10.96.1.1, ports: [{port: 9080}]}\n",
    );
    for f in ["destination-rule-all.yaml", "virtual-service-reviews-test-v2.yaml"] {
        yaml.push_str("---\n");
        yaml.push_str(&std::fs::read_to_string(dir.join(f)).unwrap());
    }
    let m = model(&yaml);
    let reviews = &m.routes["default/reviews"];
    assert_eq!(reviews.len(), 2, "jason's route, then everyone else's");
    assert_eq!(reviews[0].backends[0].subset, "v2");
    assert_eq!(reviews[0].backends[0].missing, "");
    assert_eq!(reviews[1].backends[0].subset, "v1");
}

#[test]
fn grpc_routes_match_service_and_method_as_paths() {
    let yaml = format!(
        "{MESH}---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: echo, namespace: shop}}
spec:
  parentRefs: [{{group: '', kind: Service, name: reviews, port: 9080}}]
  rules:
  - matches: [{{method: {{service: mesh.test.Echo, method: Bidi}}}}]
    backendRefs: [{{name: ratings, port: 9080}}]
  - matches: [{{method: {{service: mesh.test.Echo}}}}, {{method: {{type: RegularExpression, method: 'Get.*'}}, headers: [{{name: x-canary, value: 'yes'}}]}}]
    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{add: [{{name: x-via, value: grpcroute}}]}}}}]
    backendRefs: [{{name: reviews, port: 9080}}]
"
    );
    let m = model(&yaml);
    let compiled =
        CompiledRoutes::from_wire(&api::HttpRoutes { routes: m.routes["shop/reviews"].clone(), ..Default::default() })
            .unwrap();
    let pick = |path: &str, headers: &[(&str, &str)]| {
        let req = RequestFacts { method: "POST", path, authority: "reviews", port: 9080, headers };
        compiled.select(&req).map(|r| (r.wire.name.clone(), r.wire.backends[0].service.clone()))
    };
    let bidi = pick("/mesh.test.Echo/Bidi", &[]).unwrap();
    assert_eq!(bidi, ("GRPCRoute/shop/echo/0".to_string(), "ratings".to_string()), "the exact method first");
    assert_eq!(pick("/mesh.test.Echo/Unary", &[]).unwrap().1, "reviews", "the service's other methods");
    assert_eq!(
        pick("/other.Svc/GetThing", &[("x-canary", "yes")]).unwrap().1,
        "reviews",
        "a method regex with a header"
    );
    assert_eq!(
        pick("/other.Svc/GetThing", &[]).map(|r| r.0),
        Some("VirtualService/shop/reviews/1".into()),
        "then the VirtualService"
    );
    let header_ops = m.routes["shop/reviews"].iter().find(|r| r.name == "GRPCRoute/shop/echo/1").unwrap();
    assert_eq!(header_ops.request_headers.as_ref().unwrap().add.get("x-via").map(String::as_str), Some("grpcroute"));
}

#[test]
fn virtual_service_faults() {
    let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: faults, namespace: shop}\n\
              spec:\n  hosts: [reviews]\n  http:\n  \
              - match: [{uri: {prefix: /a}}]\n    fault: {delay: {fixedDelay: 1.5s, percent: 20}, abort: {grpcStatus: UNAVAILABLE, percentage: {value: 2.5}}}\n    route: [{destination: {host: reviews}}]\n  \
              - fault: {abort: {httpStatus: 418}}\n    route: [{destination: {host: reviews}}]\n";
    let m = model(&format!("{MESH}{vs}"));
    let faults: Vec<Option<api::Fault>> = m.routes["shop/reviews"].iter().take(2).map(|r| r.fault).collect();
    assert_eq!(
        faults,
        [
            Some(api::Fault {
                delay_ms: 1500,
                delay_percent: 20.0, // the deprecated integer percent, with no percentage
                abort_percent: 2.5,
                abort_http_status: 0,
                abort_grpc_status: Some(14),
            }),
            // No percentage: no request is aborted (Istio's translation).
            Some(api::Fault { abort_http_status: 418, ..Default::default() }),
        ]
    );
}

#[test]
fn destination_rule_traffic_policies_with_istio_defaults() {
    let dr = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: limits, namespace: shop}\n\
              spec:\n  host: ratings\n  trafficPolicy:\n    connectionPool: {tcp: {maxConnections: 4, connectTimeout: 2s}, http: {http2MaxRequests: 10}}\n    \
              outlierDetection: {consecutive5xxErrors: 2}\n    portLevelSettings:\n    - {port: {number: 9080}, connectionPool: {http: {maxRetries: 1}}}\n  \
              subsets:\n  - {name: v1, labels: {version: v1}, trafficPolicy: {outlierDetection: {consecutiveGatewayErrors: 1, baseEjectionTime: 1m}}}\n";
    let m = model(&format!("{MESH}{dr}"));
    let svc = &m.services["shop/ratings"];
    let top = svc.traffic_policy.as_ref().unwrap();
    let pool = top.connection_pool.unwrap();
    assert_eq!((pool.max_connections, pool.connect_timeout_ms, pool.max_requests), (4, 2000, 10));
    assert_eq!(top.port_connection_pools[&9080].max_retries, 1);
    let od = top.outlier_detection.unwrap();
    assert_eq!(
        (od.consecutive_5xx, od.consecutive_gateway, od.interval_ms, od.base_ejection_ms, od.max_ejection_percent),
        (2, 0, 10_000, 30_000, 10),
        "Istio's defaults where unset"
    );
    let v1 = svc.subset_traffic_policies["v1"].outlier_detection.unwrap();
    assert_eq!((v1.consecutive_gateway, v1.consecutive_5xx, v1.base_ejection_ms), (1, 5, 60_000));
}

#[test]
fn warmup_and_peak_ewma_load_balancers() {
    let dr = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
              metadata: {name: lb, namespace: shop, annotations: {mesh.io/load-balancer: peak-ewma}}\n\
              spec:\n  host: ratings\n  trafficPolicy:\n    loadBalancer: {warmupDurationSecs: 60s}\n    portLevelSettings:\n    \
              - {port: {number: 9080}, loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 30s, minimumPercent: 20, aggression: 2}}}\n  \
              subsets:\n  - {name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}, warmupDurationSecs: 9s}}}\n  \
              - {name: v2, labels: {version: v2}}\n";
    let m = model(&format!("{MESH}{dr}"));
    let svc = &m.services["shop/ratings"];
    let top = svc.traffic_policy.as_ref().unwrap();
    let lb = top.load_balancer.as_ref().unwrap();
    assert_eq!((lb.warmup_ms, lb.warmup_min_percent, lb.warmup_aggression, lb.peak_ewma), (60_000, 10.0, 1.0, true));
    let port = &top.port_load_balancers[&9080];
    assert_eq!((port.warmup_ms, port.warmup_min_percent, port.warmup_aggression), (30_000, 20.0, 2.0));
    assert!(!port.peak_ewma, "ROUND_ROBIN stays round robin");
    let v1 = svc.subset_traffic_policies["v1"].load_balancer.as_ref().unwrap();
    assert!(v1.hashed && !v1.peak_ewma && v1.warmup_ms == 0, "consistent hashing: neither applies: {v1:?}");

    // Without the annotation, or without any loadBalancer: Istio's LEAST_REQUEST.
    let plain =
        model(&format!("{MESH}{}", dr.replace("annotations: {mesh.io/load-balancer: peak-ewma}", "annotations: {}")));
    assert!(!plain.services["shop/ratings"].traffic_policy.as_ref().unwrap().load_balancer.as_ref().unwrap().peak_ewma);
    let bare = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
                metadata: {name: lb, namespace: shop, annotations: {mesh.io/load-balancer: peak-ewma}}\nspec:\n  host: ratings\n";
    let m = model(&format!("{MESH}{bare}"));
    let lb = m.services["shop/ratings"].traffic_policy.as_ref().unwrap().load_balancer.as_ref().unwrap();
    assert!(lb.peak_ewma, "the annotation alone turns it on: {lb:?}");
}

#[test]
fn locality_lb_settings_and_workload_localities() {
    let extra = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: zonal, namespace: shop, labels: {app: ratings, istio-locality: us-west.zone1.s1}}\n\
                 spec: {nodeName: n1}\nstatus: {podIP: 10.9.0.1}\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata: {name: topo, namespace: shop, labels: {app: ratings, topology.kubernetes.io/region: us-east, topology.kubernetes.io/zone: z2}}\n\
                 spec: {nodeName: n1}\nstatus: {podIP: 10.9.0.2}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm, namespace: shop}\n\
                 spec: {address: 10.9.0.3, locality: eu-west/z1, labels: {app: ratings}}\n---\n\
                 apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: lb, namespace: shop}\n\
                 spec:\n  host: ratings\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting: {failover: [{from: us-west, to: us-east}]}\n    \
                 outlierDetection: {consecutive5xxErrors: 3}\n  subsets:\n  \
                 - {name: off, labels: {app: ratings}, trafficPolicy: {loadBalancer: {localityLbSetting: {enabled: false}}}}\n";
    let m = model(&format!("{MESH}{extra}"));
    let locality = |uid: &str| m.workloads[uid].locality.clone();
    assert_eq!(locality("Pod/shop/zonal"), "us-west/zone1/s1", "istio-locality, dots for slashes");
    assert_eq!(locality("Pod/shop/topo"), "us-east/z2/", "topology labels");
    assert_eq!(locality("WorkloadEntry/shop/vm"), "eu-west/z1");
    let svc = &m.services["shop/ratings"];
    let lb = svc.traffic_policy.as_ref().unwrap().load_balancer.as_ref().unwrap();
    let l = lb.locality.as_ref().expect("localityLbSetting");
    assert_eq!((l.failover[0].from.as_str(), l.failover[0].to.as_str()), ("us-west", "us-east"));
    let off = svc.subset_traffic_policies["off"].load_balancer.as_ref().unwrap();
    assert_eq!(off.locality, None, "enabled: false");
}
