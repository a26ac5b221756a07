//! The model after a change to some pods, from the model before it: the
//! churn of a cluster is pods (scheduled, relabelled, given an address,
//! deleted), and a pod's work is its workload and the endpoints of the
//! services of its namespace, not the mesh's. Anything else (and a
//! waypoint's own pods, which services and policies bind to) rebuilds the
//! model whole. Held equal to [`MeshModel::build`] by a table test.
use super::{
    mesh::{MeshModel, PodContext, Service, pod_workload, slices_of},
    routes::GATEWAY_NAME_LABEL,
    selector_matches,
};
use crate::config::{ApplyReport, ConfigStore, Kind, MeshSettings, ObjectKey, Resource, objects::Labels};

impl MeshModel {
    /// The model of `store`, which is this model's store after the change
    /// `report` says; `None` when the change is not pods alone (build the
    /// model anew).
    pub fn with_pods_changed(
        &self,
        store: &ConfigStore,
        settings: &MeshSettings,
        report: &ApplyReport,
    ) -> Option<Self> {
        let keys: Vec<&ObjectKey> = report.added.iter().chain(&report.updated).chain(&report.removed).collect();
        if keys.iter().any(|k| k.kind != Kind::Pod) {
            return None;
        }
        let mut model = self.clone();
        let ambient = |ns: &str| {
            let key = ObjectKey { kind: Kind::Namespace, namespace: String::new(), name: ns.to_owned() };
            store.objects().get(&key).is_some_and(|s| super::mesh::is_ambient(&s.resource.metadata().labels))
        };
        let node_locality = |node: &str| {
            let key = ObjectKey { kind: Kind::Node, namespace: String::new(), name: node.to_owned() };
            let labels = &store.objects().get(&key)?.resource.metadata().labels;
            Some(super::mesh::locality(labels))
        };
        let cx = PodContext {
            trust_domain: &settings.trust_domain,
            waypoints: &self.waypoints,
            ambient: &ambient,
            node_locality: &node_locality,
        };
        // Each pod's namespace, and its labels before and after the change.
        let mut touched: Vec<(&str, Vec<Labels>)> = Vec::new();
        for key in &keys {
            let uid = format!("Pod/{}/{}", key.namespace, key.name);
            let old = self.workloads.get(&uid);
            let new = match store.objects().get(*key).map(|s| s.resource.as_ref()) {
                Some(Resource::Pod(pod)) => pod_workload(pod, &cx),
                _ => None,
            };
            let labels: Vec<Labels> = old.into_iter().chain(new.as_ref()).map(|w| w.labels.clone()).collect();
            if labels.iter().any(|l| l.contains_key(GATEWAY_NAME_LABEL)) {
                return None; // a waypoint's instance: bindings and policies follow it
            }
            match new {
                Some(w) => model.workloads.insert(uid, w),
                None => model.workloads.remove(&uid),
            };
            touched.push((&key.namespace, labels));
        }
        // The services of those namespaces whose endpoints the pods may be.
        for (namespace, labels) in &touched {
            let prefix = format!("{namespace}/");
            let keys: Vec<String> = model
                .services
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, _)| k.clone())
                .collect();
            for key in keys {
                let svc = &model.services[&key];
                let endpoints = match endpoints_after(&model, store, namespace, svc, labels) {
                    Some(e) if e != svc.endpoints => e,
                    _ => continue,
                };
                if let Some(svc) = model.services.get_mut(&key) {
                    svc.endpoints = endpoints;
                }
            }
        }
        Some(model)
    }
}

/// `svc`'s endpoints in `model` when pods with `labels` (before or after
/// their change) may be among them; `None` when they cannot be.
fn endpoints_after(
    model: &MeshModel,
    store: &ConfigStore,
    namespace: &str,
    svc: &Service,
    labels: &[Labels],
) -> Option<Vec<super::Endpoint>> {
    if !svc.selector.is_empty() {
        let selected = labels.iter().any(|l| selector_matches(&svc.selector, l));
        return selected.then(|| model.endpoints(namespace, &svc.selector));
    }
    // Without a selector: a ServiceEntry's own addresses (no pod's), or a
    // Service's slices, whose endpoints name pods by targetRef.
    let key = |kind| ObjectKey { kind, namespace: namespace.to_owned(), name: svc.name.clone() };
    if store.objects().contains_key(&key(Kind::ServiceEntry)) || !store.objects().contains_key(&key(Kind::Service)) {
        return None;
    }
    Some(model.sliced_endpoints(namespace, &slices_of(store, namespace, &svc.name)))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Document;

    /// One object per path, as the API server's watch gives them.
    fn doc(path: &str, text: &str) -> Document {
        Document { file: PathBuf::from(path), line: 1, text: text.into() }
    }

    fn pod(name: &str, ns: &str, labels: &str, ip: &str, node: &str) -> Document {
        doc(
            &format!("pods/{ns}/{name}"),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
                 spec: {{nodeName: {node}, serviceAccountName: sa-{name}}}\nstatus: {{podIP: {ip}}}\n"
            ),
        )
    }

    const BASE: &[(&str, &str)] = &[
        (
            "ns/shop",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n",
        ),
        ("ns/other", "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n"),
        ("nodes/n1", "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {topology.kubernetes.io/region: eu}}\n"),
        (
            "svc/shop/web",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
             spec: {selector: {app: web}, clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
        ),
        (
            "svc/shop/db",
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.2, ports: [{name: sql, port: 5432}]}\n",
        ),
        (
            "slices/shop/db",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}\n\
             addressType: IPv4\nports: [{name: sql, port: 15432}]\n\
             endpoints: [{addresses: [10.0.0.9], targetRef: {kind: Pod, name: db-0}}]\n",
        ),
        (
            "se/shop/legacy",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: legacy, namespace: shop}\n\
             spec: {hosts: [legacy.example], ports: [{number: 80, name: http}], workloadSelector: {labels: {app: legacy}}}\n",
        ),
        (
            "se/shop/ext",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext, namespace: shop}\n\
             spec: {hosts: [ext.example], ports: [{number: 80, name: http}], resolution: STATIC, endpoints: [{address: 10.0.0.1}]}\n",
        ),
        (
            "gw/shop/waypoint",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
             metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}\n\
             spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n",
        ),
        (
            "ap/shop/web",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: web, namespace: shop}\n\
             spec: {selector: {matchLabels: {app: web}}, rules: [{}]}\n",
        ),
    ];

    fn json(model: &MeshModel) -> serde_json::Value {
        serde_json::to_value(model).unwrap()
    }

    /// After each step the model from the one before, changed by the
    /// step's pods, is the model built anew; steps that are not pods alone
    /// (or touch a waypoint's pods) are refused and built anew.
    #[test]
    fn a_model_changed_by_pods_is_the_model_built_anew() {
        let settings = MeshSettings::default();
        let base: Vec<Document> = BASE.iter().map(|(p, t)| doc(p, t)).collect();
        // (what, documents changed, paths removed, whether the pod path applies)
        let steps: Vec<(&str, Vec<Document>, Vec<&str>, bool)> = vec![
            (
                "two web pods",
                vec![
                    pod("web-1", "shop", "app: web", "10.0.0.1", "n1"),
                    pod("web-2", "shop", "app: web", "10.0.0.2", "n2"),
                ],
                vec![],
                true,
            ),
            ("a pod of no service", vec![pod("job", "shop", "app: job", "10.0.0.3", "n1")], vec![], true),
            ("relabelled out of web", vec![pod("web-2", "shop", "app: other", "10.0.0.2", "n2")], vec![], true),
            (
                "relabelled into a ServiceEntry's selector",
                vec![pod("web-2", "shop", "app: legacy", "10.0.0.2", "n2")],
                vec![],
                true,
            ),
            ("a new address", vec![pod("web-1", "shop", "app: web", "10.0.0.11", "n1")], vec![], true),
            ("the pod a slice names", vec![pod("db-0", "shop", "", "10.0.0.9", "n1")], vec![], true),
            (
                "that pod moves away from the slice's address",
                vec![pod("db-0", "shop", "", "10.0.0.10", "n1")],
                vec![],
                true,
            ),
            ("a pod outside the mesh", vec![pod("old", "other", "app: web", "10.0.1.1", "n1")], vec![], true),
            (
                "opted out",
                vec![pod("web-1", "shop", "app: web, istio.io/dataplane-mode: none", "10.0.0.11", "n1")],
                vec![],
                true,
            ),
            (
                "own locality",
                vec![pod("job", "shop", "app: job, istio-locality: us.us-1", "10.0.0.3", "n1")],
                vec![],
                true,
            ),
            ("deleted", vec![], vec!["pods/shop/web-1", "pods/shop/old"], true),
            (
                "a waypoint's pod",
                vec![pod("waypoint-0", "shop", "gateway.networking.k8s.io/gateway-name: waypoint", "10.0.0.50", "n1")],
                vec![],
                false,
            ),
            (
                "a pod and a policy",
                vec![
                    pod("web-3", "shop", "app: web", "10.0.0.4", "n1"),
                    doc(
                        "ap/shop/web",
                        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: web, namespace: shop}\nspec: {action: DENY, rules: [{}]}\n",
                    ),
                ],
                vec![],
                false,
            ),
            (
                "after the full rebuild, pods again",
                vec![pod("web-4", "shop", "app: web", "10.0.0.5", "n2")],
                vec![],
                true,
            ),
            ("the waypoint's pod goes", vec![], vec!["pods/shop/waypoint-0"], false),
        ];
        let mut store = ConfigStore::default();
        store.apply_changed(&base, &[]);
        let mut model = MeshModel::build(&store, &settings);
        for (what, changed, removed, pods_only) in steps {
            let removed: Vec<PathBuf> = removed.into_iter().map(PathBuf::from).collect();
            let report = store.apply_changed(&changed, &removed);
            assert!(report.changed(), "{what}: a change");
            let full = MeshModel::build(&store, &settings);
            match model.with_pods_changed(&store, &settings, &report) {
                Some(incremental) => {
                    assert!(pods_only, "{what}: taken as pods alone");
                    assert_eq!(json(&incremental), json(&full), "{what}");
                }
                None => assert!(!pods_only, "{what}: refused"),
            }
            model = full;
        }
        let web = &model.services["shop/web"];
        assert_eq!(web.endpoints.len(), 2, "the steps ended with endpoints: {web:?}");
    }
}
