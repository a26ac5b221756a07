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
