//! The Kubernetes API as `mesh-ctl` uses it: with the user's own credentials
//! (`--kubeconfig`, `$KUBECONFIG`, `~/.kube/config` or in-cluster), as
//! kubectl would, never with the controller's.
use std::path::Path;

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, ResourceExt as _,
    api::{Patch, PatchParams},
};

use crate::api::{CtlError, Result};

/// Sets label `label` of Namespace `namespace` to `want` (`None`: removes
/// it) on the API server. `false`: it already was as wanted.
pub fn label_namespace(kubeconfig: Option<&Path>, namespace: &str, label: &str, want: Option<&str>) -> Result<bool> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CtlError::new(format!("starting the Kubernetes client: {e}")))?;
    runtime.block_on(async {
        let client = mesh_common::kube_client::client(kubeconfig).await.map_err(CtlError::new)?;
        let api: Api<Namespace> = Api::all(client);
        let current = api.get(namespace).await.map_err(|e| match e {
            kube::Error::Api(status) if status.is_not_found() => {
                CtlError::new(format!("no namespace {namespace} on the API server"))
                    .hint(format!("kubectl create namespace {namespace}"))
            }
            e => CtlError::new(format!("reading namespace {namespace} from the API server: {e}")),
        })?;
        if current.labels().get(label).map(String::as_str) == want {
            return Ok(false);
        }
        let patch = serde_json::json!({ "metadata": { "labels": { label: want } } });
        api.patch(namespace, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(|e| {
            CtlError::new(format!("labelling namespace {namespace}: {e}"))
                .hint("the kubeconfig's user needs `patch` on namespaces")
        })?;
        Ok(true)
    })
}
