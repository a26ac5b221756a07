//! mesh on a real kube-apiserver (v1.20.2, with etcd): objects applied with
//! kubectl reach the nodes and are enforced, and make the same model as the
//! same objects in a directory; bad ones are refused at admission with their
//! field, or marked on their status by the elected leader while the last
//! good version stays in force; node agents join with their pods' tokens;
//! the CNI plugin lets a pod start only once it is enrolled; Istio's agents
//! obtain certificates through Istio's API; deploy/ passes a dry run.
use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Controller, Placement, Pod, Topology, http_ok,
    kube::Kube,
    mesh::{Mesh, yaml},
};
use serde_json::Value;

/// A test's topology with a real API server (mesh's CRDs installed) on its
/// controller node's loopback. Bound in this order, the server stops before
/// the topology goes.
fn cluster(test: &str) -> (Topology, PathBuf, Kube) {
    let t = Topology::new(test);
    let node = t.node("controller");
    let kube = t.start_kube(&node);
    kube.install_crds_and_namespace();
    (t, node, kube)
}

/// A controller on `node` reading `kube`, its node API on `grpc` and its
/// HTTP port on `metrics` (loopback), with `extra` arguments.
fn kube_controller(t: &Topology, node: &Path, kube: &Kube, grpc: &str, metrics: &str, extra: &[&str]) -> Controller {
    let kubeconfig = kube.kubeconfig.display().to_string();
    let mut args = vec!["--kubernetes", "--kubeconfig", &kubeconfig];
    args.extend_from_slice(extra);
    let at = Placement { netns: node, grpc_addr: grpc, metrics_addr: metrics, dial: String::new() };
    t.start_controller_at(at, &args)
}

/// Retries `pred` until it holds, for up to `limit` (with patience).
fn eventually(what: &str, limit: Duration, pred: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    let limit = mesh_tests::patience(limit);
    while !pred() {
        assert!(start.elapsed() < limit, "{what}: not so after {limit:?}");
        thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

fn reaches(from: &Pod, to: &Pod) -> bool {
    http_ok(&from.curl(&format!("http://{}/", to.ip4)))
}

#[test]
fn objects_applied_with_kubectl_are_enforced_on_the_nodes() {
    let Some(mesh) = Mesh::start_on_kubernetes("kube-source", &["node1", "node2"]) else { return };
    let kube = mesh.kube.as_ref().unwrap();
    // Namespace and Pods through `kubectl apply`; the pods' addresses as a kubelet writes them.
    let (a, b, _servers) = mesh.a_and_b_serving();
    assert!(reaches(&a, &b), "a → b through the mesh");
    let tunnels = mesh.metric("node2", "istio_tcp_connections_opened_total", &[("reporter", "destination")]);
    assert!(tunnels >= 1.0, "the connection crossed over HBONE to node2's proxy ({tunnels})");

    // A Service without a selector goes where its EndpointSlice says, on the
    // slice's port (this server serves discovery.k8s.io/v1beta1). The slices
    // Kubernetes makes for selector Services are not watched.
    kube.apply_ok(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: by-hand, namespace: default}}\n\
         spec: {{clusterIP: 10.96.0.77, ports: [{{name: http, port: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\n\
         metadata: {{name: by-hand-1, namespace: default, labels: {{kubernetes.io/service-name: by-hand}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 80}}]\n\
         endpoints: [{{addresses: ['{}'], targetRef: {{kind: Pod, name: b}}}}]\n---\n\
         apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\n\
         metadata: {{name: by-kubernetes, namespace: default, labels: {{kubernetes.io/service-name: by-hand, \
         endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}}}}\n\
         addressType: IPv4\nendpoints: [{{addresses: [10.9.9.9]}}]\n",
        b.ip4
    ));
    eventually("a reaches b through the Service's slice", Duration::from_secs(10), || {
        http_ok(&a.curl("http://10.96.0.77:8080/"))
    });
    let endpoints = mesh.controller.json("/debug/model")["services"]["default/by-hand"]["endpoints"].clone();
    assert_eq!(endpoints, serde_json::json!([{"workload": "Pod/default/b", "ip": b.ip4.to_string()}]));

    // The trust bundle the DaemonSet's agents mount to verify the controller.
    let bundle = mesh.controller.get("/debug/ca");
    eventually("the trust bundle is published", Duration::from_secs(10), || {
        let get = ["get", "configmap", "-n", "mesh-system", "mesh-ca-root", "-o", "jsonpath={.data.root-cert\\.pem}"];
        kube.kubectl(&get).stdout == bundle.as_bytes()
    });

    // The agents joined with their pods' service-account tokens. Such a
    // token names its node: node1's agent token does not join node9.
    let token = mesh.t.dir.join("node1-agent-token");
    std::fs::write(&token, kube.node_agent_token("node1")).unwrap();
    let root = mesh.controller.root_cert();
    let rogue_node = mesh.t.node("rogue");
    let args = [
        "--controller",
        &mesh.controller.address,
        "--node-name",
        "node9",
        "--join-token",
        token.to_str().unwrap(),
        "--controller-ca",
        root.to_str().unwrap(),
    ];
    let rogue = mesh.t.start_agent(&rogue_node, "rogue", &args).expect("the agent runs here");
    eventually("the rogue join is refused", Duration::from_secs(10), || {
        let log = rogue.proc.log_text();
        log.contains("controller refused") && log.contains("the token's pod runs on node node1, not on node9")
    });
    drop(rogue);

    // A policy from kubectl is enforced.
    let deny = "{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sa-a]}}]}]}";
    mesh.apply("deny.yaml", &yaml::authorization("default", "deny-a", deny));
    assert!(!reaches(&a, &b), "a is denied by the policy applied with kubectl");

    // An invalid version gets into the API server (the CRD keeps spec open:
    // the controller validates, as Istio's does) and is refused with the
    // object's API path; the last good version stays in force.
    let bad = "{action: DENY, rules: [{from: [{source: {principals: ['not a principal']}}]}]}";
    kube.apply_ok(&yaml::authorization("default", "deny-a", bad));
    let path = "/apis/security.istio.io/v1/namespaces/default/authorizationpolicies/deny-a:";
    let field = "AuthorizationPolicy default/deny-a: spec.rules[0].from[0].source.principals[0]: \"not a principal\"";
    eventually("the bad version is reported", Duration::from_secs(10), || {
        let ready = mesh.controller.json("/healthz/ready");
        ready["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .any(|r| r.starts_with(path) && r.contains(field))
    });
    assert!(!reaches(&a, &b), "the last good version of the policy still denies a");

    // Deleted on the API server: a gets in again.
    kube.kubectl_ok(&["delete", "authorizationpolicy", "-n", "default", "deny-a"]);
    let took = eventually("a is allowed after the policy is deleted", Duration::from_secs(10), || reaches(&a, &b));
    eprintln!("policy deletion in force after {took:?}");

    // A pod's status changing in ways mesh does not read (a kubelet's
    // conditions) pushes nothing to the nodes.
    let version = mesh.controller.json("/debug/nodes")["version"].clone();
    kube.kubectl_ok(&["annotate", "pod", "-n", "default", "a", "example.com/touched=yes"]);
    kube.kubectl_ok(&["label", "pod", "-n", "default", "b", "tier=web"]);
    eventually("the label change reaches the model", Duration::from_secs(10), || {
        mesh.controller.json("/debug/model")["workloads"]["Pod/default/b"]["labels"]["tier"] == "web"
    });
    let after_label = mesh.controller.json("/debug/nodes")["version"].clone();
    assert_ne!(after_label, version, "a label is a change the nodes are sent");

    // Pods are in their Node's locality (its topology labels), which a
    // relabelled Node changes, as a cloud's kubelet relabels it.
    let locality = |pod: &str| mesh.controller.json("/debug/model")["workloads"][pod]["locality"].clone();
    assert_eq!(locality("Pod/default/a"), "test-region/zone-node1/");
    assert_eq!(locality("Pod/default/b"), "test-region/zone-node2/");
    kube.kubectl_ok(&["label", "node", "node2", "--overwrite", "topology.kubernetes.io/zone=zone-moved"]);
    eventually("the Node's new zone is its pods'", Duration::from_secs(10), || {
        locality("Pod/default/b") == "test-region/zone-moved/"
    });
}

/// The model of the objects of namespaces `shop` and `istio-system` only (an
/// API server adds its own: `default`, `kube-system`, the `kubernetes` Service).
fn model_of_test_namespaces(model: &Value) -> Value {
    let mut model = model.clone();
    for (_, map) in model.as_object_mut().unwrap().iter_mut() {
        if let Some(map) = map.as_object_mut() {
            map.retain(|key, _| key.contains("shop/") || key.contains("istio-system/"));
        }
    }
    model
}

const OBJECTS: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node1, labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-1}}
---
apiVersion: v1
kind: Node
metadata: {name: node2, labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-2}}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, version: v1}}
spec:
  nodeName: node1
  serviceAccountName: web
  restartPolicy: Always
  containers: [{name: web, image: nginx, ports: [{containerPort: 8080}]}]
status: {podIP: 10.200.0.10, podIPs: [{ip: 10.200.0.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web, version: v2}}
spec:
  nodeName: node2
  serviceAccountName: web
  containers: [{name: web, image: nginx}]
status: {podIP: 10.200.0.11, podIPs: [{ip: 10.200.0.11}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.50
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: legacy-db, namespace: shop}
spec:
  clusterIP: 10.96.0.51
  ports: [{name: tcp-sql, port: 5432}]
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {name: legacy-db-1, namespace: shop, labels: {kubernetes.io/service-name: legacy-db}}
addressType: IPv4
ports: [{name: tcp-sql, port: 15432}]
endpoints: [{addresses: [192.168.50.5]}, {addresses: [192.168.50.6], conditions: {ready: false}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-shop, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {namespaces: [shop]}}], to: [{operation: {ports: ['8080']}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-canary, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web}]
  rules:
  - backendRefs: [{name: web, port: 80, weight: 90}]
";

#[test]
fn the_same_objects_make_the_same_model_from_a_directory_and_from_the_api_server() {
    let (t, node, kube) = cluster("kube-model");
    kube.apply_ok(OBJECTS);
    for (name, ip) in [("web-1", "10.200.0.10"), ("web-2", "10.200.0.11")] {
        kube.set_pod_ips("shop", name, &[ip.parse().unwrap()]);
    }
    let from_kube = kube_controller(&t, &node, &kube, "127.0.0.1:0", "127.0.0.1:15114", &[]);
    let from_dir = t.start_controller_at(
        Placement { netns: &node, grpc_addr: "127.0.0.1:0", metrics_addr: "127.0.0.1:15214", dial: String::new() },
        &[],
    );
    from_dir.write("objects.yaml", OBJECTS);

    let models = || {
        (
            model_of_test_namespaces(&from_dir.json("/debug/model")),
            model_of_test_namespaces(&from_kube.json("/debug/model")),
        )
    };
    eventually("both controllers hold the workloads", Duration::from_secs(10), || {
        let (dir, kube) = models();
        [dir, kube].iter().all(|m| m["workloads"].as_object().unwrap().len() == 2)
    });
    let (dir, kube_model) = models();
    assert_eq!(dir, kube_model, "the two sources' models differ");
    assert_eq!(dir["workloads"]["Pod/shop/web-2"]["locality"], "eu/eu-2/", "from its Node");
    let legacy_db = &dir["services"]["shop/legacy-db"];
    assert_eq!(legacy_db["endpoints"], serde_json::json!([{"workload": "", "ip": "192.168.50.5"}]), "from its slice");
    for (what, got) in [
        ("workloads", &dir["workloads"]),
        ("services", &dir["services"]),
        ("policies", &dir["policies"]),
        ("waypoints", &dir["waypoints"]),
        ("routes", &dir["routes"]),
    ] {
        assert!(!got.as_object().unwrap().is_empty(), "the model has no {what}: {dir:#}");
    }
    let ready = from_kube.json("/healthz/ready");
    assert_eq!(ready["rejected"], Value::Array(vec![]), "{ready:#}");
}

/// The manifests of `deploy/`, as a user applies them.
fn deploy(file: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn kubectl_apply_of_an_invalid_object_is_refused_at_admission_with_its_field() {
    let (t, node, kube) = cluster("kube-webhook");
    kube.apply_ok(&yaml::namespace("shop", false));
    let webhook_config = ["--webhook-config", "mesh-validation"];
    let controller = kube_controller(&t, &node, &kube, "127.0.0.1:0", "127.0.0.1:15014", &webhook_config);
    // deploy/'s webhook configuration, pointed at the controller's address
    // instead of its in-cluster Service (there are no Services' endpoints here).
    let manifest = deploy("controller/mesh-controller.yaml");
    let webhook = manifest.split("\n---\n").find(|d| d.contains("kind: ValidatingWebhookConfiguration")).unwrap();
    let service = "service: { name: mesh-controller, namespace: mesh-system, path: /validate, port: 443 }";
    assert!(webhook.contains(service), "the manifest's clientConfig changed: {webhook}");
    kube.apply_ok(&webhook.replace(service, "url: https://127.0.0.1:15017/validate"));
    eventually("the controller sets the webhook's CA bundle", Duration::from_secs(20), || {
        let bundle = kube.kubectl_ok(&[
            "get",
            "validatingwebhookconfiguration",
            "mesh-validation",
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ]);
        !bundle.trim().is_empty()
    });

    // A bad principal: refused by the API server, with the field and the reason.
    let bad = "{rules: [{from: [{source: {principals: ['not a principal']}}]}]}";
    let out = kube.apply(&yaml::authorization("shop", "bad", bad));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the bad policy was admitted");
    assert!(
        stderr.contains("denied the request")
            && stderr.contains("spec.rules[0].from[0].source.principals[0]: \"not a principal\" is not a principal"),
        "kubectl said: {stderr}"
    );
    let got = kube.kubectl(&["get", "authorizationpolicy", "-n", "shop", "bad"]);
    assert!(!got.status.success(), "a refused object is not stored");

    // A typo in a field name, on an update of a good object: refused, and
    // the good version is what the API server (and so the mesh) keeps.
    let good = "{action: DENY, rules: [{to: [{operation: {ports: ['9000']}}]}]}";
    kube.apply_ok(&yaml::authorization("shop", "deny-9000", good));
    let out = kube.apply(&yaml::authorization("shop", "deny-9000", "{acton: ALLOW}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("spec.acton: unknown field `acton`"), "kubectl said: {stderr}");
    let action =
        kube.kubectl_ok(&["get", "authorizationpolicy", "-n", "shop", "deny-9000", "-o", "jsonpath={.spec.action}"]);
    assert_eq!(action, "DENY");
    eventually("the good version is in force", Duration::from_secs(10), || {
        controller.json("/debug/model")["policies"]["shop/deny-9000"]["policy"]["action"] == "Deny"
    });

    // Valid but not enforced by mesh: admitted, with a warning saying so.
    let out = kube.apply(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: shop}\nspec: {}\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the Sidecar was refused: {stderr}");
    assert!(stderr.contains("Warning:") && stderr.contains("Sidecar"), "no warning from the webhook: {stderr}");

    // Deleting is never refused.
    kube.kubectl_ok(&["delete", "authorizationpolicy", "-n", "shop", "deny-9000"]);

    // Counted under Galley's names, which Istio's Control Plane dashboard reads.
    let (refused, admitted) =
        (controller.metric("galley_validation_failed"), controller.metric("galley_validation_passed"));
    assert!(refused >= 2.0 && admitted >= 2.0, "refused {refused}, admitted {admitted}");
}

#[test]
fn the_manifests_in_deploy_are_accepted_by_the_api_server() {
    let (t, _node, kube) = cluster("kube-manifests");
    // The namespaces they go to (a dry run creates none): mesh-system, and
    // the example namespace of the waypoint template.
    kube.apply_ok("apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh-system}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n");
    for file in [
        "controller/mesh-controller.yaml",
        "daemonset/mesh-node.yaml",
        "waypoint/waypoint.yaml",
        "prometheus/scrape-config.yaml",
    ] {
        // The manifests target current Kubernetes; the one thing this 1.20
        // server lacks (a DaemonSet's maxSurge, 1.22+, without which
        // maxUnavailable must be at least 1) is replaced here, so everything
        // else is still validated field by field.
        let text = deploy(file)
            .replace("rollingUpdate: { maxSurge: 1, maxUnavailable: 0 }", "rollingUpdate: { maxUnavailable: 1 }");
        let copy = t.dir.join(file.replace('/', "-"));
        std::fs::write(&copy, text).unwrap();
        let out = kube.kubectl_ok(&["apply", "--dry-run=server", "-f", copy.to_str().unwrap()]);
        assert!(out.contains("(server dry run)"), "{file}: {out}");
    }
    // (Its scrape job uses Kubernetes service discovery, which Debian's
    // Prometheus is built without: promtool here cannot load it.)
    // Every mesh process is annotated for it.
    for file in ["controller/mesh-controller.yaml", "daemonset/mesh-node.yaml", "waypoint/waypoint.yaml"] {
        assert!(deploy(file).contains("prometheus.io/scrape: \"true\""), "{file} is not annotated for Prometheus");
    }
}

/// The `Accepted` condition on an object's status: (status, message).
fn accepted(kube: &Kube, kind: &str, namespace: &str, name: &str) -> Option<(String, String)> {
    let out = kube.kubectl(&["get", kind, "-n", namespace, name, "-o", "json"]);
    let object: Value = serde_json::from_slice(&out.stdout).ok()?;
    let conditions = object["status"]["conditions"].as_array()?;
    let c = conditions.iter().find(|c| c["type"] == "Accepted")?;
    Some((c["status"].as_str()?.to_owned(), c["message"].as_str()?.to_owned()))
}

#[test]
fn two_controllers_elect_one_leader_which_marks_each_istio_object_accepted_or_not() {
    let (t, node, kube) = cluster("kube-leader");
    kube.apply_ok(&[yaml::namespace("shop", false), yaml::namespace("mesh-system", false)].concat());
    // Objects that got in without admission (no webhook here): one good, one not.
    kube.apply_ok(&yaml::authorization(
        "shop",
        "good",
        "{action: DENY, rules: [{to: [{operation: {ports: ['9000']}}]}]}",
    ));
    kube.apply_ok(&yaml::authorization(
        "shop",
        "bad",
        "{rules: [{from: [{source: {principals: ['not a principal']}}]}]}",
    ));

    let start = |n: u16| {
        let (metrics, webhook) = (format!("127.0.0.1:{n}14"), format!("127.0.0.1:{n}17"));
        let args = ["--webhook-addr", &webhook, "--leader-lease-duration", "3s"];
        kube_controller(&t, &node, &kube, "127.0.0.1:0", &metrics, &args)
    };
    let mut replicas = [start(151), start(152)];
    // They issue from one CA, which the first to start made and keeps in a
    // Secret (not in either's state directory).
    let root = replicas[0].get("/debug/ca");
    assert_eq!(replicas[1].get("/debug/ca"), root, "the replicas share one root");
    let template = r#"go-template={{index .data "root-cert.pem" | base64decode}}"#;
    let in_secret = kube.kubectl_ok(&["get", "secret", "-n", "mesh-system", "mesh-ca", "-o", template]);
    assert_eq!(in_secret.trim(), root.trim(), "the root is the Secret's");
    let leads = |c: &Controller| c.json("/healthz/ready")["leader"] == true;
    eventually("one replica leads", Duration::from_secs(20), || replicas.iter().filter(|c| leads(c)).count() == 1);

    eventually("the leader marks both objects", Duration::from_secs(20), || {
        accepted(&kube, "authorizationpolicy", "shop", "good").is_some_and(|(s, _)| s == "True")
            && accepted(&kube, "authorizationpolicy", "shop", "bad").is_some_and(|(s, _)| s == "False")
    });
    let (_, why) = accepted(&kube, "authorizationpolicy", "shop", "bad").unwrap();
    assert!(
        why.contains("spec.rules[0].from[0].source.principals[0]: \"not a principal\" is not a principal")
            && why.ends_with("no version of it is in force"),
        "{why}"
    );

    // Gateway API's status: a waypoint Gateway is Accepted, and not
    // Programmed while no instance runs; a mesh route gets an entry for
    // the Service it attaches to, beside another controller's entry for
    // its own Gateway, which stays.
    kube.apply_ok(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}\n\
         spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {selector: {app: web}, ports: [{port: 80}]}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: shop}\n\
         spec: {parentRefs: [{group: '', kind: Service, name: web}, {name: ingress}], \
         rules: [{backendRefs: [{name: web, port: 80}]}]}\n",
    );
    let route = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web";
    let theirs = r#"{"status":{"parents":[{"parentRef":{"name":"ingress"},"controllerName":"example.net/gateway","conditions":[{"type":"Accepted","status":"True","reason":"Accepted","message":"theirs","lastTransitionTime":"2026-01-01T00:00:00Z"}]}]}}"#;
    kube.patch_status(route, theirs);
    let jsonpath = |kind: &str, name: &str, path: &str| {
        kube.kubectl(&["get", kind, "-n", "shop", name, "-o", &format!("jsonpath={path}")]).stdout
    };
    eventually("the waypoint Gateway's status is written", Duration::from_secs(20), || {
        jsonpath("gateway", "waypoint", r#"{.status.conditions[?(@.type=="Programmed")].reason}"#) == b"NoResources"
    });
    assert_eq!(jsonpath("gateway", "waypoint", r#"{.status.conditions[?(@.type=="Accepted")].status}"#), b"True");
    eventually("the route's entry is written beside the other controller's", Duration::from_secs(20), || {
        jsonpath("httproute", "web", "{.status.parents[*].controllerName}")
            == b"example.net/gateway istio.io/gateway-controller"
    });
    assert_eq!(
        jsonpath(
            "httproute",
            "web",
            r#"{.status.parents[?(@.controllerName=="istio.io/gateway-controller")].parentRef.kind}"#
        ),
        b"Service"
    );

    // The leader goes away: the other replica takes over within the lease's
    // duration, and marks what changes from then on.
    let leader = replicas.iter().position(&leads).unwrap();
    replicas[leader].proc.kill();
    let follower = &replicas[1 - leader];
    let took = eventually("the other replica leads", Duration::from_secs(20), || leads(follower));
    eprintln!("leadership taken over after {took:?}");
    kube.apply_ok(&yaml::authorization(
        "shop",
        "bad",
        "{action: DENY, rules: [{from: [{source: {principals: ['cluster.local/ns/shop/sa/x']}}]}]}",
    ));
    eventually("the new leader marks the fixed object", Duration::from_secs(20), || {
        accepted(&kube, "authorizationpolicy", "shop", "bad").is_some_and(|(s, _)| s == "True")
    });
}

#[test]
fn the_cni_plugin_lets_a_pod_start_only_once_it_is_enrolled_and_fails_closed_without_the_agent() {
    let Some(mut mesh) = Mesh::start_on_kubernetes("kube-cni", &["node1"]) else { return };
    // Mesh::apply runs mesh-cni ADD for each pod and checks, the moment it
    // returns, that the pod is enrolled exactly when it is captured.
    let (a, plain) = (mesh.t.pod_in("shop", "a"), mesh.t.pod_in("plain", "p"));
    let config = [
        yaml::namespace("shop", true),
        yaml::namespace("plain", false),
        yaml::pod(&a, "node1", "sa-a", "a"),
        yaml::pod(&plain, "node1", "sa-p", "p"),
    ]
    .concat();
    mesh.apply("pods.yaml", &config);
    let agent = &mesh.node("node1").agent;
    let enrolled = |name: &str| agent.config_dump()["pods"].as_array().unwrap().iter().any(|p| p["name"] == name);
    assert!(enrolled("shop/a") && !enrolled("plain/p"));

    // DEL releases the pod's namespace: the agent lets the pod go.
    let (ok, out) = agent.cni("DEL", "shop/a", &a.netns);
    assert!(ok, "mesh-cni DEL: {out}");
    eventually("the deleted pod is unenrolled", Duration::from_secs(10), || !enrolled("shop/a"));

    // Without its agent, a pod starts only in an excluded namespace.
    mesh.nodes[0].agent.proc.kill();
    let agent = &mesh.node("node1").agent;
    let (ok, out) = agent.cni("ADD", "shop/a", &a.netns);
    assert!(!ok && out.contains("unreachable"), "ADD without the agent: {out}");
    let error: Value = serde_json::from_str(&out).expect("a CNI error result");
    assert_eq!(error["code"], 999);
    let (ok, out) = agent.cni("ADD", "kube-system/coredns", &plain.netns);
    assert!(ok, "a kube-system pod starts without the agent: {out}");
    let (ok, out) = agent.cni("DEL", "shop/a", &a.netns);
    assert!(ok, "DEL succeeds without the agent: {out}");
}

/// A gRPC client of Istio's certificate API, built on grpcio and protobuf's
/// own google.protobuf.Struct, with Istio's messages described field by
/// field (not generated from mesh's copy of the proto). Prints `OK n`, the
/// leaf and the last certificate of the chain, or `ERR <code> <details>`.
const ISTIO_CA_CLIENT: &str = r#"
import sys, grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2
addr, ca, token, csr, impersonate = sys.argv[1:6]
F = descriptor_pb2.FieldDescriptorProto
fdp = descriptor_pb2.FileDescriptorProto(name="istio-ca-client.proto", package="istio.v1.auth", syntax="proto3",
                                         dependency=["google/protobuf/struct.proto"])
m = fdp.message_type.add(name="IstioCertificateRequest")
m.field.add(name="csr", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
m.field.add(name="validity_duration", number=3, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
m.field.add(name="metadata", number=4, type=F.TYPE_MESSAGE, type_name=".google.protobuf.Struct", label=F.LABEL_OPTIONAL)
r = fdp.message_type.add(name="IstioCertificateResponse")
r.field.add(name="cert_chain", number=1, type=F.TYPE_STRING, label=F.LABEL_REPEATED)
pool = descriptor_pool.Default()
pool.AddSerializedFile(fdp.SerializeToString())
Req = message_factory.GetMessageClass(pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateRequest"))
Resp = message_factory.GetMessageClass(pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateResponse"))
req = Req(csr=open(csr).read(), validity_duration=3600)
if impersonate:
    req.metadata.fields["ImpersonatedIdentity"].string_value = impersonate
creds = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read())
channel = grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "mesh-controller")])
call = channel.unary_unary("/istio.v1.auth.IstioCertificateService/CreateCertificate",
                           request_serializer=Req.SerializeToString, response_deserializer=Resp.FromString)
try:
    resp = call(req, metadata=[("authorization", "Bearer " + open(token).read().strip())], timeout=20)
    print("OK", len(resp.cert_chain))
    print(resp.cert_chain[0].strip())
    print(resp.cert_chain[-1].strip())
except grpc.RpcError as e:
    print("ERR", e.code().name, e.details())
"#;

/// Istio's plugged-in CA, as its documentation makes one (tools/certs): a
/// root, an intermediate for the cluster, and the files of Secret cacerts.
const PLUGGED_IN_CA: &str = r#"
openssl req -x509 -newkey rsa:2048 -nodes -keyout root-key.pem -out root-cert.pem -days 30 \
  -subj "/O=Istio/CN=Root CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca.csr -subj "/O=Istio/CN=Intermediate CA/L=cluster1" 2>/dev/null
printf 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n' > ca.ext
openssl x509 -req -in ca.csr -CA root-cert.pem -CAkey root-key.pem -CAcreateserial -days 30 -extfile ca.ext \
  -out ca-cert.pem 2>/dev/null
cat ca-cert.pem root-cert.pem > cert-chain.pem
"#;

#[test]
fn istios_own_agents_obtain_mesh_certificates_through_istios_certificate_api() {
    let (t, node, kube) = cluster("kube-istio-ca");
    let pod = |ns: &str, name: &str, sa: &str, on: &str| {
        format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {ns}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{nodeName: {on}, serviceAccountName: {sa}, containers: [{{name: c, image: c}}]}}\n---\n"
        )
    };
    kube.apply_ok(
        &[
            yaml::namespace("shop", true),
            yaml::namespace("istio-system", false),
            yaml::namespace("mesh-system", false),
            pod("shop", "web-1", "web", "node1"),
            pod("shop", "db-1", "db", "node2"),
            pod("istio-system", "ztunnel-node1", "ztunnel", "node1"),
        ]
        .concat(),
    );
    // The cluster comes from Istio with a plugged-in CA: an intermediate in
    // Secret istio-system/cacerts, made as Istio's documentation makes it
    // (RSA keys, openssl). The controller issues from it as it is.
    let pki = t.dir.join("cacerts");
    std::fs::create_dir_all(&pki).unwrap();
    let made = std::process::Command::new("bash").arg("-ec").arg(PLUGGED_IN_CA).current_dir(&pki).output().unwrap();
    assert!(made.status.success(), "making the CA: {}", String::from_utf8_lossy(&made.stderr));
    let files: Vec<String> = ["ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"]
        .iter()
        .map(|f| format!("--from-file={}", pki.join(f).display()))
        .collect();
    let mut create = vec!["create", "secret", "generic", "cacerts", "-n", "istio-system"];
    create.extend(files.iter().map(String::as_str));
    kube.kubectl_ok(&create);
    let args = ["--ca-secret", "istio-system/cacerts"];
    let controller = kube_controller(&t, &node, &kube, "127.0.0.1:15012", "127.0.0.1:15014", &args);
    eventually("the controller knows the pods", Duration::from_secs(10), || {
        controller.json("/debug/model")["workloads"].as_object().is_some_and(|w| w.contains_key("Pod/shop/db-1"))
    });
    let istio_root = std::fs::read_to_string(pki.join("root-cert.pem")).unwrap();
    assert_eq!(controller.get("/debug/ca").trim(), istio_root.trim(), "the mesh trusts the plugged-in CA's root");
    let token = |ns: &str, sa: &str, pod: &str, audience: &str| {
        let uid = kube.kubectl_ok(&["get", "pod", "-n", ns, pod, "-o", "jsonpath={.metadata.uid}"]);
        let file = t.dir.join(format!("token-{sa}-{audience}"));
        std::fs::write(&file, kube.token_request(ns, sa, pod, &uid, audience)).unwrap();
        file
    };
    let (web, ztunnel) =
        (token("shop", "web", "web-1", "istio-ca"), token("istio-system", "ztunnel", "ztunnel-node1", "istio-ca"));
    let web_for_mesh = token("shop", "web", "web-1", "mesh-controller");
    let csr = t.dir.join("csr.pem");
    // A new key (openssl's `-newkey` argument and options) and its CSR, in `csr`.
    let new_csr = |newkey: &[&str]| {
        let key = t.dir.join("key.pem");
        let out = std::process::Command::new("openssl")
            .args(["req", "-new", "-newkey"])
            .args(newkey)
            .args(["-nodes", "-subj", "/O=istio"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl req: {}", String::from_utf8_lossy(&out.stderr));
    };
    new_csr(&["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let root = controller.root_cert();
    let ask = |token: &std::path::Path, impersonate: &str| {
        let pythonpath = format!("PYTHONPATH={}", mesh_tests::EXT_AUTHZ_PYTHONPATH);
        let out = mesh_tests::run_in(
            &node,
            &[
                "env",
                &pythonpath,
                "/usr/bin/python3",
                "-c",
                ISTIO_CA_CLIENT,
                "127.0.0.1:15012",
                root.to_str().unwrap(),
                token.to_str().unwrap(),
                csr.to_str().unwrap(),
                impersonate,
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "the client failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        text
    };
    let san = |text: &str| {
        let leaf = t.dir.join("leaf.pem");
        let pem: String = text.lines().skip(1).take_while(|l| !l.is_empty()).collect::<Vec<_>>().join("\n");
        let end = pem.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
        std::fs::write(&leaf, &pem[..end]).unwrap();
        let out = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(&leaf)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // A workload's own identity, with the chain up to the mesh's root
    // (leaf, the plugged-in intermediate, Istio's root).
    let own = ask(&web, "");
    assert!(own.starts_with("OK 3\n"), "{own}");
    assert!(san(&own).contains("URI:spiffe://cluster.local/ns/shop/sa/web"), "{own}");
    let root_pem = std::fs::read_to_string(&root).unwrap();
    assert!(own.trim_end().ends_with(root_pem.trim_end()), "the chain ends with the mesh's root: {own}");

    // ztunnel, on behalf of a workload on its own node.
    let on_behalf = ask(&ztunnel, "spiffe://cluster.local/ns/shop/sa/web");
    assert!(on_behalf.starts_with("OK "), "{on_behalf}");
    assert!(san(&on_behalf).contains("URI:spiffe://cluster.local/ns/shop/sa/web"));

    // Refused: a workload on another node, an ordinary workload asking for
    // another's identity, a token for another audience.
    let other_node = ask(&ztunnel, "spiffe://cluster.local/ns/shop/sa/db");
    assert!(other_node.starts_with("ERR PERMISSION_DENIED"), "{other_node}");
    let not_agent = ask(&web, "spiffe://cluster.local/ns/shop/sa/db");
    assert!(not_agent.starts_with("ERR PERMISSION_DENIED"), "{not_agent}");
    let audience = ask(&web_for_mesh, "");
    assert!(audience.starts_with("ERR UNAUTHENTICATED") && audience.contains("audience"), "{audience}");

    // Istio's agent makes RSA 2048 keys by default: issued for too.
    new_csr(&["rsa:2048"]);
    let rsa = ask(&web, "");
    assert!(rsa.starts_with("OK 3\n"), "{rsa}");
    assert!(san(&rsa).contains("URI:spiffe://cluster.local/ns/shop/sa/web"), "{rsa}");
}

/// Issue 14's restarts: the controller goes away and an edit is made
/// meanwhile; the API server goes away. The nodes serve throughout; the
/// returning controller resends a node only what differs from what it holds,
/// and the edit made while it was away reaches the nodes; after the API
/// server's return the watches resume (a relist replaces a kind's objects
/// at once, never a part of them), and the next edit is the only push.
#[test]
fn the_controller_and_the_api_server_restart_while_the_nodes_serve() {
    let Some(mut mesh) = Mesh::start_on_kubernetes("kube-restarts", &["node1", "node2"]) else { return };
    let (a, b, _servers) = mesh.a_and_b_serving();
    assert!(reaches(&a, &b), "a → b through the mesh");
    let kubeconfig = mesh.kube.as_ref().unwrap().kubeconfig.display().to_string();
    let deny = yaml::authorization(
        "default",
        "deny-a",
        "{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sa-a]}}]}]}",
    );

    // The controller goes away; a policy is applied while it is.
    mesh.controller.proc.kill();
    mesh.kube.as_ref().unwrap().apply_ok(&deny);
    assert!(reaches(&a, &b), "the nodes serve on what they hold while the controller is away");

    let netns = mesh.controller.netns.clone();
    mesh.controller = mesh.t.start_controller(&netns, &["--kubernetes", "--kubeconfig", &kubeconfig]);
    let took = eventually("the edit made while the controller was away is enforced", Duration::from_secs(20), || {
        !reaches(&a, &b)
    });
    eprintln!("the returning controller's edit enforced {took:?} after it was ready");
    let nodes = mesh.controller.json("/debug/nodes");
    let model = mesh.controller.json("/debug/model");
    let workloads = model["workloads"].as_object().map_or(0, |w| w.len());
    for node in ["node1", "node2"] {
        let resent = nodes["nodes"][node]["resync_resources"].as_u64().expect("resync_resources");
        eprintln!("{node}: {resent} resources resent on its return (the model has {workloads} workloads)");
        assert!(resent <= 2, "{node} was resent {resent} resources for one policy added: {nodes:#}");
    }

    // The API server goes away: the nodes and the controller go on.
    let kube = mesh.kube.as_mut().unwrap();
    kube.kubectl_ok(&["delete", "authorizationpolicy", "-n", "default", "deny-a"]);
    eventually("a is allowed after the policy is deleted", Duration::from_secs(10), || reaches(&a, &b));
    let pushes = mesh.controller.metric("mesh_controller_pushes_total");
    let version = mesh.controller.json("/debug/nodes")["version"].clone();
    kube.stop_apiserver();
    assert!(reaches(&a, &b), "the nodes serve while the API server is down");
    thread::sleep(Duration::from_secs(2));
    assert!(mesh.controller.proc.is_running(), "the controller survives the API server's absence");
    assert_eq!(
        mesh.controller.json("/debug/nodes")["version"],
        version,
        "nothing changed while the API server was away"
    );
    kube.start_apiserver();

    // The watches resume by themselves (kube's backoff, at most 30 s apart);
    // the next edit is the only push each node gets.
    let start = Instant::now();
    kube.apply_ok(&deny);
    let took =
        eventually("an edit after the API server's return is enforced", Duration::from_secs(40), || !reaches(&a, &b));
    eprintln!("the first edit after the API server's return enforced after {took:?}");
    thread::sleep(Duration::from_millis(500));
    let pushed = mesh.controller.metric("mesh_controller_pushes_total") - pushes;
    assert_eq!(pushed, 2.0, "one push per node, for the edit, since the API server went away ({:?})", start.elapsed());
    assert!(mesh.controller.proc.is_running());
}

/// Issue 14 points 6 and 9: pods running before the node's CNI plugin was
/// installed never had a CNI ADD. The agent finds their network namespaces
/// among those the runtime pinned (`--discover-netns-dir`) by their
/// addresses, and enrolls them once `mesh-ctl enroll` has labelled their
/// namespace on the API server; a pod whose address two namespaces hold is
/// left alone until only one does.
#[test]
fn pods_that_predate_the_cni_plugin_are_found_by_their_addresses_and_enrolled() {
    let scratch = mesh_tests::Scratch::new("pinned-netns");
    let pinned = scratch.0.clone();
    let dir = pinned.display().to_string();
    let Some(mesh) =
        Mesh::start_on_kubernetes_with("kube-discover", &["node1", "node2"], &["--discover-netns-dir", &dir])
    else {
        return;
    };
    let kube = mesh.kube.as_ref().unwrap();
    let (a, b, c) = (mesh.t.pod("a"), mesh.t.pod("b"), mesh.t.pod("c"));
    // Created, scheduled and started before mesh was installed: no CNI ADD
    // through mesh-cni; the runtime pinned their namespaces.
    let config = [
        yaml::namespace("default", false),
        yaml::pod(&a, "node1", "sa-a", "a"),
        yaml::pod(&b, "node2", "sa-b", "b"),
        yaml::pod(&c, "node1", "sa-c", "c"),
    ]
    .concat();
    kube.apply_ok(&config);
    let pin = |pod: &Pod, as_name: &str| std::os::unix::fs::symlink(&pod.netns, pinned.join(as_name)).unwrap();
    for (pod, name) in [(&a, "cni-a"), (&b, "cni-b"), (&c, "cni-c")] {
        let (namespace, pod_name) = pod.name.split_once('/').unwrap();
        kube.set_pod_ips(namespace, pod_name, &[pod.ip4.into(), pod.ip6.into()]);
        pin(pod, name);
    }
    // Another namespace holding c's address too (a stale sandbox, say).
    let decoy = mesh.t.pod("decoy");
    let c_address = format!("{}/32", c.ip4);
    mesh_tests::run_in_ok(&decoy.netns, &["ip", "addr", "add", &c_address, "dev", "lo"]);
    pin(&decoy, "cni-decoy");
    let _nginx = mesh.t.nginx(&b, 80, "b\n", 10);

    // `mesh-ctl enroll` labels the Namespace on the API server (with the
    // user's kubeconfig) and waits for the nodes: a and b are found and
    // enrolled, c is not, and it says so.
    let kubeconfig = kube.kubeconfig.display().to_string();
    let out = mesh.ctl(&["enroll", "default", "--wait", "8", "--kubeconfig", &kubeconfig]);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && said.contains("2/3 pods enrolled (node1 1/2, node2 1/1)"), "{said}");
    let labels = kube.kubectl_ok(&["get", "namespace", "default", "-o", "jsonpath={.metadata.labels}"]);
    assert!(labels.contains("\"istio.io/dataplane-mode\":\"ambient\""), "{labels}");
    mesh.wait_ready(&[(&a, "node1", "sa-a"), (&b, "node2", "sa-b")]);
    assert!(reaches(&a, &b), "a → b once both are found and enrolled");
    let tunnels = mesh.metric("node2", "istio_tcp_connections_opened_total", &[("reporter", "destination")]);
    assert!(tunnels >= 1.0, "the connection crossed over HBONE to node2's proxy ({tunnels})");

    let node1 = &mesh.node("node1").agent;
    let enrolled = |name: &str| node1.config_dump()["pods"].as_array().into_iter().flatten().any(|p| p["name"] == name);
    eventually("the agent says why c is left alone", Duration::from_secs(10), || {
        node1.proc.log_text().contains("its address is held by several network namespaces")
    });
    assert!(!enrolled("default/c"), "c enrolled though two namespaces hold its address");

    mesh_tests::run_in_ok(&decoy.netns, &["ip", "addr", "del", &c_address, "dev", "lo"]);
    mesh.wait_ready(&[(&c, "node1", "sa-c")]);
    let dump = node1.config_dump();
    let c_pod = dump["pods"].as_array().unwrap().iter().find(|p| p["name"] == "default/c").unwrap().clone();
    assert_eq!(c_pod["netns"], pinned.join("cni-c").display().to_string(), "c is enrolled in its own namespace");

    // And out again, through the API server.
    let out = mesh.ctl(&["unenroll", "default", "--kubeconfig", &kubeconfig]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        said.contains("label istio.io/dataplane-mode removed in /api/v1/namespaces/default; 3 pods released"),
        "{said}"
    );
    let labels = kube.kubectl_ok(&["get", "namespace", "default", "-o", "jsonpath={.metadata.labels}"]);
    assert!(!labels.contains("dataplane-mode"), "{labels}");
}
