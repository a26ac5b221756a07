//! Kubernetes' and Istio's objects as their docs publish them and as an API
//! server returns them load unchanged through the reading the controller and
//! `mesh-ctl check` do; a misspelt field is still refused with its line and
//! field.
use mesh_config::{Document, parse_document};

fn doc(text: &str) -> Document {
    Document { file: "k8s.yaml".into(), line: 1, text: text.into() }
}

#[test]
fn published_and_served_objects_load() {
    for text in [
        // kubernetes.io, "Pods": a Pod with volumes, probes and a security context.
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: nginx\n  labels: {app: nginx}\nspec:\n  restartPolicy: Always\n  \
         securityContext: {runAsNonRoot: true}\n  containers:\n  - name: nginx\n    image: nginx:1.14.2\n    ports:\n    - containerPort: 80\n    \
         volumeMounts: [{name: cache, mountPath: /cache}]\n    readinessProbe: {httpGet: {path: /, port: 80}}\n  volumes:\n  - name: cache\n    emptyDir: {}\n  \
         tolerations: [{key: example, operator: Exists}]\n",
        // kubernetes.io, "Service": type NodePort with a fixed nodePort.
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: my-service\nspec:\n  type: NodePort\n  selector: {app.kubernetes.io/name: MyApp}\n  \
         ports:\n  - port: 80\n    targetPort: 80\n    nodePort: 30007\n",
        // A Service as `kubectl get -o yaml` prints it from an API server.
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n  uid: 5b2d\n  resourceVersion: \"812\"\n  \
         creationTimestamp: \"2026-12-05T02:00:00Z\"\n  annotations: {kubectl.kubernetes.io/last-applied-configuration: '{}'}\n\
         spec:\n  clusterIP: 10.96.0.50\n  clusterIPs: [10.96.0.50]\n  internalTrafficPolicy: Cluster\n  ipFamilies: [IPv4]\n  \
         ipFamilyPolicy: SingleStack\n  sessionAffinity: None\n  type: ClusterIP\n  selector: {app: web}\n  \
         ports:\n  - {name: http, port: 80, protocol: TCP, targetPort: 8080}\nstatus:\n  loadBalancer: {}\n",
        // kubernetes.io, "Service accounts": no token mounted.
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: build-robot\nautomountServiceAccountToken: false\n",
        // istio.io, an AuthorizationPolicy with the status Istio writes on it.
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: httpbin\n  namespace: foo\n  generation: 2\n\
         spec:\n  selector: {matchLabels: {app: httpbin}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/default/sa/sleep]}\n\
         status:\n  observedGeneration: \"2\"\n  validationMessages: []\n",
    ] {
        if let Err((_, problems)) = parse_document(&doc(text)) {
            panic!("rejected:\n{text}\n{problems:?}");
        }
    }
}

#[test]
fn a_misspelt_field_of_a_kubernetes_kind_is_still_refused_with_line_and_field() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  nodeNme: node1\n  containers: []\n";
    let (_, problems) = parse_document(&doc(text)).expect_err("a misspelt field");
    let p = &problems[0];
    assert_eq!((p.line, p.field.as_deref()), (5, Some("spec.nodeNme")), "{problems:?}");
    assert!(p.to_string().starts_with("k8s.yaml:5: Pod default/a: spec.nodeNme: unknown field `nodeNme`"), "{p}");
}

/// Istio's workload names, from pods as an API server returns them: a
/// Deployment's (its ReplicaSet's name less the pod-template-hash), a
/// CronJob's (its Job's less the timestamp), a StatefulSet's, a DeploymentConfig's, a bare pod's own.
#[test]
fn a_pods_workload_is_named_as_istio_names_it() {
    use mesh_config::Resource;
    let pod = |name: &str, generate: &str, owner: Option<(&str, &str)>, labels: &str| {
        let owners = owner.map_or(String::new(), |(kind, owner)| {
            format!(
                "  ownerReferences:\n  - {{apiVersion: apps/v1, kind: {kind}, name: {owner}, uid: 1f2e, controller: true, blockOwnerDeletion: true}}\n"
            )
        });
        let generate = if generate.is_empty() { String::new() } else { format!("  generateName: {generate}\n") };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  uid: 9a8b\n{generate}{owners}  labels: {{{labels}}}\nspec: {{}}\n"
        )
    };
    for (text, want) in [
        (
            pod(
                "reviews-v1-5f9b8c7d4-x2k4z",
                "reviews-v1-5f9b8c7d4-",
                Some(("ReplicaSet", "reviews-v1-5f9b8c7d4")),
                "app: reviews, pod-template-hash: 5f9b8c7d4",
            ),
            "reviews-v1",
        ),
        (pod("rs-only-abcde", "rs-only-", Some(("ReplicaSet", "rs-only")), "app: x"), "rs-only"),
        (pod("report-28391520-q7d2x", "report-28391520-", Some(("Job", "report-28391520")), "app: report"), "report"),
        (pod("backup-x7q2z", "backup-", Some(("Job", "backup")), "app: backup"), "backup"),
        (pod("db-0", "db-", Some(("StatefulSet", "db")), "app: db"), "db"),
        (pod("web-1-abcde", "web-1-", Some(("ReplicationController", "web-1")), "deploymentconfig: web"), "web"),
        (pod("debug", "", Some(("ReplicaSet", "debug-rs")), "app: debug"), "debug"),
        (pod("plain", "", None, "app: plain"), "plain"),
    ] {
        let (_, resource) = parse_document(&doc(&text)).unwrap_or_else(|(_, p)| panic!("rejected:\n{text}\n{p:?}"));
        let Resource::Pod(p) = resource else { panic!("not a pod") };
        assert_eq!(p.workload_name(), want, "{text}");
    }
}
