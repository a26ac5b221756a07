//! The configuration pipeline over a real directory: every problem is reported
//! once, precisely, and never costs the objects that are fine.
mod common;

use std::path::Path;

use common::TempDir;
use mesh_controller::config::{ConfigStore, Kind, ObjectKey, Snapshot, read_dir};

fn load(dir: &Path, store: &mut ConfigStore) -> Vec<String> {
    let (docs, problems) = read_dir(dir);
    store.apply(Snapshot::from_documents(&docs, problems));
    store.problems().iter().map(|p| p.to_string()).collect()
}

fn key(kind: Kind, ns: &str, name: &str) -> ObjectKey {
    ObjectKey { kind, namespace: ns.into(), name: name.into() }
}

const GOOD: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web}
  annotations:
    mesh.io/netns: /run/netns/web-1
spec:
  serviceAccountName: web
  nodeName: node1
status:
  podIP: 10.0.0.5
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-frontend
  namespace: shop
spec:
  selector:
    matchLabels: {app: web}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/shop/sa/frontend]
";

#[test]
fn each_problem_is_reported_once_and_valid_objects_are_served() {
    let dir = TempDir::new("problems");
    dir.write("good.yaml", GOOD);
    dir.write("broken.yaml", "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: [unclosed\n");
    dir.write(
        "mixed.yaml",
        "\
apiVersion: networking.istio.io/v1
kind: Frobnicator
metadata: {name: x}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPrt: 8080
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: bad-principal
  namespace: shop
spec:
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/shop/sa/frontend
        - not a principal
",
    );
    dir.write("z-duplicate.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n");
    // Valid Kubernetes objects of kinds mesh does not read: warnings, not problems.
    dir.write(
        "app.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  replicas: 2\n\
         ---\napiVersion: cert-manager.io/v1\nkind: Certificate\nmetadata:\n  name: web-tls\n",
    );

    let mut store = ConfigStore::default();
    let problems = load(&dir.0, &mut store);
    let d = dir.0.display();
    let expected = [
        format!("{d}/broken.yaml:5: invalid YAML: did not find expected ',' or ']', while parsing a flow sequence"),
        format!("{d}/mixed.yaml:2: kind: unknown kind \"Frobnicator\" in Istio's group networking.istio.io"),
        format!("{d}/mixed.yaml:14: Service shop/web: spec.ports[0].targetPrt: unknown field `targetPrt`"),
        format!(
            "{d}/mixed.yaml:27: AuthorizationPolicy shop/bad-principal: spec.rules[0].from[0].source.principals[1]: \"not a principal\" is not a principal"
        ),
        format!("{d}/z-duplicate.yaml:1: Namespace shop: metadata.name: duplicate: already defined at {d}/good.yaml:1"),
    ];
    assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    for (got, want) in problems.iter().zip(&expected) {
        assert!(got.starts_with(want.as_str()), "\n got: {got}\nwant: {want}...");
    }
    let keys: Vec<&ObjectKey> = store.objects().keys().collect();
    assert_eq!(
        keys,
        vec![
            &key(Kind::Namespace, "", "shop"),
            &key(Kind::Pod, "shop", "web-1"),
            &key(Kind::AuthorizationPolicy, "shop", "allow-frontend"),
        ]
    );
    let not_read: Vec<String> = store.not_read().iter().map(ToString::to_string).collect();
    assert_eq!(
        not_read,
        [
            format!(
                "{d}/app.yaml:1: Deployment shop/web: kind: Deployment (apps/v1) is not a kind mesh reads: accepted, no effect on the mesh"
            ),
            format!(
                "{d}/app.yaml:9: Certificate web-tls: kind: Certificate (cert-manager.io/v1) is not a kind mesh reads: accepted, no effect on the mesh"
            ),
        ]
    );
}

#[test]
fn a_bad_new_version_keeps_the_last_good_one_in_force() {
    let dir = TempDir::new("last-good");
    dir.write("good.yaml", GOOD);
    let mut store = ConfigStore::default();
    assert!(load(&dir.0, &mut store).is_empty());
    let generation = store.generation();
    let policy = key(Kind::AuthorizationPolicy, "shop", "allow-frontend");
    let before = store.objects()[&policy].clone();

    // The policy now names a port that cannot be.
    dir.write(
        "good.yaml",
        &GOOD.replace(
            "principals: [cluster.local/ns/shop/sa/frontend]",
            "principals: [cluster.local/ns/shop/sa/frontend]\n    to:\n    - operation:\n        ports: ['99999']",
        ),
    );
    let problems = load(&dir.0, &mut store);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains(
            "good.yaml:37: AuthorizationPolicy shop/allow-frontend: spec.rules[0].to[0].operation.ports[0]: 99999"
        ),
        "{}",
        problems[0]
    );
    assert_eq!(store.objects()[&policy], before, "the last good version stays in force");
    assert_eq!(store.generation(), generation, "nothing changed");

    // A file that no longer parses at all keeps everything it defined.
    dir.write("good.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop\n");
    let problems = load(&dir.0, &mut store);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(store.objects().len(), 3);

    // Fixed and trimmed: the removal is real.
    dir.write("good.yaml", GOOD.split("---").next().unwrap());
    assert!(load(&dir.0, &mut store).is_empty());
    assert_eq!(store.objects().len(), 1);
    assert!(store.generation() > generation);
}
