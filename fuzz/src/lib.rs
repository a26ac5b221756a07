//! What the fuzz targets share. Each target can write its own seed corpus,
//! made from the project's own fixtures and types, before it fuzzes:
//! `cargo xtask fuzz` runs it once with `MESH_FUZZ_WRITE_SEEDS=<dir>`.
use std::path::PathBuf;

/// Writes `seeds()` into `$MESH_FUZZ_WRITE_SEEDS` and exits, when that is set.
pub fn write_seeds_if_asked(seeds: impl FnOnce() -> Vec<Vec<u8>>) {
    let Some(dir) = std::env::var_os("MESH_FUZZ_WRITE_SEEDS").map(PathBuf::from) else { return };
    std::fs::create_dir_all(&dir).expect("creating the seed directory");
    for (i, seed) in seeds().into_iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), seed).expect("writing a seed");
    }
    std::process::exit(0);
}

/// Small configurations in the users' YAML, the seeds of the binary formats
/// that are made from a configuration (node updates).
pub const CONFIGS: &[&str] = &[
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
     apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n\
     spec: {nodeName: node1, serviceAccountName: web}\nstatus: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}\n---\n\
     apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
     spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n",
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-web, namespace: shop}\n\
     spec: {selector: {matchLabels: {app: api}}, action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web], \
     ipBlocks: [10.0.0.0/8]}}], to: [{operation: {ports: ['8080'], methods: [GET], paths: ['/api/*']}}], \
     when: [{key: request.auth.claims[iss], values: [issuer]}]}]}\n---\n\
     apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n",
    "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: shop}\n\
     spec: {hosts: [web], http: [{match: [{headers: {end-user: {exact: jason}}, uri: {regex: '/v[0-9]+/.*'}}], \
     route: [{destination: {host: web, subset: v2}, weight: 90}, {destination: {host: web, subset: v1}, weight: 10}], \
     retries: {attempts: 3, perTryTimeout: 2s}, timeout: 10s}]}\n---\n\
     apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: shop}\n\
     spec: {host: web, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}], \
     trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}, outlierDetection: {consecutive5xxErrors: 3}}}\n",
];

/// The controller's whole reading of one YAML text: split, parse, validate,
/// store (keeping the last good version), the model, and the resources
/// nodes are sent.
pub fn read_config(text: &str) -> mesh_controller::distribute::WireSet {
    use mesh_config::{ConfigStore, MeshSettings, Snapshot, split_documents};
    let docs = split_documents(std::path::Path::new("fuzz.yaml"), text);
    let mut store = ConfigStore::default();
    store.apply(Snapshot::from_documents(&docs, vec![]));
    let model = mesh_controller::model::MeshModel::build(&store, &MeshSettings::default());
    mesh_controller::distribute::WireSet::from_model(&model)
}

/// The full update a node is sent for `text`.
pub fn update_for(text: &str) -> mesh_common::api::Update {
    let wire = read_config(text);
    mesh_common::api::Update {
        nonce: 1,
        version: wire.version.clone(),
        full: true,
        resources: wire.resources.values().map(|r| (**r).clone()).collect(),
        removed: vec![],
        more: false,
    }
}
