//! Fields Kubernetes defines that mesh does not read. The typed objects
//! reject unknown fields, so a typo (`targetPrt`) is caught with its line; but
//! a real object, written by hand or read back from an API server, carries
//! many fields mesh has no use for (`spec.volumes`, `spec.ipFamilies`,
//! `metadata.ownerReferences`, a status). Those are removed before the typed
//! parse: accepted, ignored, and left out of the stored object, so a change
//! to one of them (a pod's conditions) is no change to the mesh.
use serde_yaml_ng::{Mapping, Value};

use crate::Kind;

/// `metadata` fields of every object, beyond those `ObjectMeta` models. The
/// bookkeeping ones change with every write (`resourceVersion`), so keeping
/// them would make every status update a change to push to the nodes.
const METADATA: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "generateName",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "ownerReferences",
    "finalizers",
];

/// The annotation where `kubectl apply` keeps what it applied last.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// `v1/PodSpec`, as of Kubernetes 1.34, less `serviceAccountName`, `nodeName`
/// and `containers`.
const POD_SPEC: &[&str] = &[
    "activeDeadlineSeconds",
    "affinity",
    "automountServiceAccountToken",
    "dnsConfig",
    "dnsPolicy",
    "enableServiceLinks",
    "ephemeralContainers",
    "hostAliases",
    "hostIPC",
    "hostNetwork",
    "hostPID",
    "hostUsers",
    "hostname",
    "hostnameOverride",
    "imagePullSecrets",
    "initContainers",
    "nodeSelector",
    "os",
    "overhead",
    "preemptionPolicy",
    "priority",
    "priorityClassName",
    "readinessGates",
    "resourceClaims",
    "resources",
    "restartPolicy",
    "runtimeClassName",
    "schedulerName",
    "schedulingGates",
    "securityContext",
    "serviceAccount",
    "setHostnameAsFQDN",
    "shareProcessNamespace",
    "subdomain",
    "terminationGracePeriodSeconds",
    "tolerations",
    "topologySpreadConstraints",
    "volumes",
];

/// `v1/PodStatus`, less `podIP`, `podIPs` and `phase`.
const POD_STATUS: &[&str] = &[
    "conditions",
    "containerStatuses",
    "ephemeralContainerStatuses",
    "extendedResourceClaimStatus",
    "hostIP",
    "hostIPs",
    "initContainerStatuses",
    "message",
    "nominatedNodeName",
    "observedGeneration",
    "qosClass",
    "reason",
    "resize",
    "resourceClaimStatuses",
    "startTime",
];

/// `v1/ServiceSpec`, less `selector`, `ports`, `clusterIP(s)` and `type`.
const SERVICE_SPEC: &[&str] = &[
    "allocateLoadBalancerNodePorts",
    "externalIPs",
    "externalName",
    "externalTrafficPolicy",
    "healthCheckNodePort",
    "internalTrafficPolicy",
    "ipFamilies",
    "ipFamilyPolicy",
    "loadBalancerClass",
    "loadBalancerIP",
    "loadBalancerSourceRanges",
    "publishNotReadyAddresses",
    "sessionAffinity",
    "sessionAffinityConfig",
    "topologyKeys",
    "trafficDistribution",
];

/// `v1/ServicePort`, less what `ServicePort` models.
const SERVICE_PORT: &[&str] = &["nodePort"];

/// `discovery.k8s.io/v1/Endpoint` (and v1beta1's `topology`), less what
/// `SliceEndpoint` models: where an endpoint runs, not where it is.
const SLICE_ENDPOINT: &[&str] = &["hostname", "nodeName", "zone", "hints", "deprecatedTopology", "topology"];

/// Top-level fields of `v1/ServiceAccount` and `v1/ConfigMap`.
const SERVICE_ACCOUNT: &[&str] = &["secrets", "imagePullSecrets", "automountServiceAccountToken"];
const CONFIG_MAP: &[&str] = &["binaryData", "immutable"];

/// Removes from `object` (a whole document, of `kind`) the fields above, and
/// the status of every kind but Pod (whose `podIP` mesh reads): Istio and
/// Gateway API controllers write status, and mesh reads none of it.
pub fn remove(kind: Kind, object: &mut Value) {
    let Some(top) = object.as_mapping_mut() else { return };
    if let Some(Value::Mapping(meta)) = top.get_mut("metadata") {
        if kind == Kind::Pod {
            // A pod's workload is named after its controller (Istio's rule):
            // the owners are kept, as far as that needs them.
            let keep = ["generateName", "ownerReferences"];
            let drop: Vec<&str> = METADATA.iter().copied().filter(|k| !keep.contains(k)).collect();
            drop_from(meta, &drop);
            if let Some(Value::Sequence(owners)) = meta.get_mut("ownerReferences") {
                for owner in owners {
                    drop_keys(Some(owner), &["apiVersion", "uid", "blockOwnerDeletion"]);
                }
            }
        } else {
            drop_from(meta, METADATA);
        }
        // kubectl's copy of the object as last applied: not the object's meaning.
        if let Some(Value::Mapping(annotations)) = meta.get_mut("annotations") {
            annotations.remove(LAST_APPLIED);
        }
    }
    match kind {
        Kind::Pod => {
            drop_keys(top.get_mut("spec"), POD_SPEC);
            drop_keys(top.get_mut("status"), POD_STATUS);
        }
        Kind::Service => {
            if let Some(spec) = top.get_mut("spec") {
                if let Some(Value::Sequence(ports)) = spec.get_mut("ports") {
                    for port in ports {
                        drop_keys(Some(port), SERVICE_PORT);
                    }
                }
                drop_keys(Some(spec), SERVICE_SPEC);
            }
        }
        Kind::EndpointSlice => {
            if let Some(Value::Sequence(endpoints)) = top.get_mut("endpoints") {
                for endpoint in endpoints {
                    drop_keys(Some(endpoint), SLICE_ENDPOINT);
                }
            }
        }
        Kind::ServiceAccount => drop_from(top, SERVICE_ACCOUNT),
        Kind::ConfigMap => drop_from(top, CONFIG_MAP),
        _ => {}
    }
    if kind != Kind::Pod {
        top.remove("status");
    }
}

fn drop_keys(value: Option<&mut Value>, names: &[&str]) {
    if let Some(Value::Mapping(map)) = value {
        drop_from(map, names);
    }
}

fn drop_from(map: &mut Mapping, names: &[&str]) {
    map.retain(|k, _| !k.as_str().is_some_and(|k| names.contains(&k)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(kind: Kind, yaml: &str) -> Value {
        let mut value: Value = serde_yaml_ng::from_str(yaml).unwrap();
        remove(kind, &mut value);
        value
    }

    #[test]
    fn what_kubernetes_adds_is_removed_and_what_mesh_reads_or_a_typo_is_kept() {
        let cases: &[(Kind, &str, &str)] = &[
            (
                Kind::Pod,
                "metadata: {name: a-1-x, uid: u1, generateName: a-1-, labels: {app: a}, ownerReferences: [{apiVersion: apps/v1, \
                 kind: ReplicaSet, name: a-1, uid: u2, controller: true, blockOwnerDeletion: true}]}\n\
                 spec: {nodeName: n, volumes: [], restartPolicy: Always, nodeNme: typo}\n\
                 status: {podIP: 10.0.0.1, conditions: [], hostIP: 1.2.3.4}",
                "metadata: {name: a-1-x, generateName: a-1-, labels: {app: a}, ownerReferences: [{kind: ReplicaSet, name: a-1, \
                 controller: true}]}\nspec: {nodeName: n, nodeNme: typo}\nstatus: {podIP: 10.0.0.1}",
            ),
            (
                Kind::Service,
                "metadata: {name: s}\n\
                 spec: {ipFamilies: [IPv4], sessionAffinity: None, ports: [{port: 80, nodePort: 30080, targetPrt: 1}]}\n\
                 status: {loadBalancer: {}}",
                "metadata: {name: s}\nspec: {ports: [{port: 80, targetPrt: 1}]}",
            ),
            (Kind::ServiceAccount, "metadata: {name: sa}\nsecrets: [{name: t}]", "metadata: {name: sa}"),
            (
                Kind::EndpointSlice,
                "metadata: {name: e}\naddressType: IPv4\n\
                 endpoints: [{addresses: [10.0.0.1], nodeName: n, zone: z, hints: {}, adresses: typo}]",
                "metadata: {name: e}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1], adresses: typo}]",
            ),
            (
                Kind::AuthorizationPolicy,
                "metadata: {name: p, finalizers: [x], ownerReferences: [{kind: X, name: y}], annotations: {kubectl.kubernetes.io/last-applied-configuration: '{}', a: b}}\n\
                 spec: {}\nstatus: {validationMessages: []}",
                "metadata: {name: p, annotations: {a: b}}\nspec: {}",
            ),
        ];
        for (kind, input, want) in cases {
            let want: Value = serde_yaml_ng::from_str(want).unwrap();
            assert_eq!(after(*kind, input), want, "{kind:?}: {input}");
        }
    }
}
