//! Validation at admission, as Istio's Galley did: the API server asks the
//! controller (a ValidatingWebhookConfiguration, `deploy/controller/`) about
//! every create and update of a kind mesh reads, and the controller answers
//! with the validator `mesh-ctl check` and the configuration pipeline use,
//! on the object as the Kubernetes source will read it. So `kubectl apply`
//! of a bad AuthorizationPolicy is refused with the field and the reason,
//! and what mesh accepts but does not enforce comes back as kubectl warnings.
//!
//! [`review`] decides (pure, table-tested); [`serve`] is the HTTPS endpoint
//! and [`patch_ca_bundle`] tells the API server which CA signs it.
use std::{net::SocketAddr, sync::Arc};

use axum::{Json, Router, routing::post};
use k8s_openapi::{ByteString, api::admissionregistration::v1::ValidatingWebhookConfiguration};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, PostParams},
    core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use mesh_config::{Kind, not_enforced, parse_document};
use prometheus_client::metrics::counter::Counter;
use tracing::info;

use crate::{
    kubernetes,
    serving::{self, ServingCert, TlsListener},
};

/// The path the webhook configuration names.
pub const PATH: &str = "/validate";

/// The answer to one admission request. Objects of kinds mesh does not read
/// are allowed (the configuration may send more than it should); deletions
/// always are.
pub fn review(request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let allow = AdmissionResponse::from(request);
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return allow;
    }
    let Some(object) = request.object.clone() else { return allow };
    let gvk = &request.kind;
    let api_version = if gvk.group.is_empty() { gvk.version.clone() } else { format!("{}/{}", gvk.group, gvk.version) };
    let Ok(Some(kind)) = Kind::from_type(&api_version, &gvk.kind) else { return allow };
    let resource = ApiResource {
        group: gvk.group.clone(),
        version: gvk.version.clone(),
        api_version,
        kind: gvk.kind.clone(),
        plural: request.resource.resource.clone(),
    };
    match parse_document(&kubernetes::document(kind, &resource, object)) {
        Ok((_, resource)) => {
            let warnings: Vec<String> = not_enforced(&resource)
                .into_iter()
                .map(|(field, message)| match field {
                    Some(field) => format!("{field}: {message}"),
                    None => message,
                })
                .collect();
            let mut response = allow;
            response.warnings = (!warnings.is_empty()).then_some(warnings);
            response
        }
        Err((_, problems)) => {
            let reasons: Vec<String> = problems
                .iter()
                .map(|p| match &p.field {
                    Some(field) => format!("{field}: {}", p.message),
                    None => p.message.clone(),
                })
                .collect();
            allow.deny(reasons.join("; "))
        }
    }
}

async fn validate(Json(body): Json<AdmissionReview<DynamicObject>>) -> Json<AdmissionReview<DynamicObject>> {
    let request: Result<AdmissionRequest<DynamicObject>, _> = body.try_into();
    let response = match request {
        Ok(request) => {
            let response = review(&request);
            let (passed, failed) = &*VALIDATIONS;
            if response.allowed {
                passed.inc()
            } else {
                failed.inc()
            };
            if !response.allowed {
                info!(
                    kind = %request.kind.kind,
                    name = %request.name,
                    namespace = request.namespace.as_deref().unwrap_or(""),
                    reason = %response.result.message,
                    "admission refused"
                );
            }
            response
        }
        Err(e) => AdmissionResponse::invalid(e.to_string()),
    };
    Json(response.into_review())
}

/// Serves the webhook on `listener` over TLS with `cert`, until the process ends.
/// Reviews that admitted and refused an object (Galley's
/// `galley_validation_passed` and `_failed`, which the HTTP port exposes).
pub static VALIDATIONS: std::sync::LazyLock<(Counter, Counter)> = std::sync::LazyLock::new(Default::default);

pub fn serve(listener: tokio::net::TcpListener, cert: Arc<ServingCert>) -> anyhow::Result<SocketAddr> {
    let local = listener.local_addr()?;
    let config = Arc::new(serving::webhook_config(cert)?);
    let connections = serving::incoming("admission webhook", listener, config);
    let router = Router::new().route(PATH, post(validate));
    tokio::spawn(async move { axum::serve(TlsListener { connections, local }, router).await });
    Ok(local)
}

/// Sets the CA bundle of every webhook of the ValidatingWebhookConfiguration
/// `name` to the mesh's trust bundle, as istiod does for its own: the
/// manifests need not carry a CA, and a rotated root reaches the API server.
pub async fn patch_ca_bundle(client: &Client, name: &str, trust_bundle: &str) -> anyhow::Result<()> {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let mut config = api.get(name).await?;
    let bundle = ByteString(trust_bundle.as_bytes().to_vec());
    let mut changed = false;
    for webhook in config.webhooks.iter_mut().flatten() {
        if webhook.client_config.ca_bundle.as_ref() != Some(&bundle) {
            webhook.client_config.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    if changed {
        api.replace(name, &PostParams::default(), &config).await?;
        info!(webhook_configuration = name, "CA bundle set");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An AdmissionReview as the API server sends it.
    fn request(
        operation: &str,
        group: &str,
        version: &str,
        kind: &str,
        object: serde_json::Value,
    ) -> AdmissionRequest<DynamicObject> {
        let plural = format!("{}s", kind.to_ascii_lowercase());
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u1",
                "kind": {"group": group, "version": version, "kind": kind},
                "resource": {"group": group, "version": version, "resource": plural},
                "name": object["metadata"]["name"],
                "namespace": "shop",
                "operation": operation,
                "userInfo": {"username": "admin"},
                "object": object,
                "dryRun": false,
            }
        }))
        .unwrap();
        review.try_into().unwrap()
    }

    #[test]
    fn objects_are_judged_as_the_controller_will_read_them() {
        let policy =
            |spec: serde_json::Value| serde_json::json!({"metadata": {"name": "p", "namespace": "shop"}, "spec": spec});
        // (operation, group, version, kind, object, allowed, in the message or a warning)
        let cases = [
            (
                "CREATE",
                "security.istio.io",
                "v1",
                "AuthorizationPolicy",
                policy(serde_json::json!({"action": "DENY", "rules": [{}]})),
                true,
                "",
            ),
            (
                "CREATE",
                "security.istio.io",
                "v1beta1",
                "AuthorizationPolicy",
                policy(serde_json::json!({"rules": [{"from": [{"source": {"principals": ["not a principal"]}}]}]})),
                false,
                "spec.rules[0].from[0].source.principals[0]: \"not a principal\" is not a principal",
            ),
            (
                "UPDATE",
                "security.istio.io",
                "v1",
                "AuthorizationPolicy",
                policy(serde_json::json!({"acton": "DENY"})),
                false,
                "spec.acton: unknown field `acton`",
            ),
            // Deleting is never refused, whatever the object was.
            (
                "DELETE",
                "security.istio.io",
                "v1",
                "AuthorizationPolicy",
                policy(serde_json::json!({"acton": "DENY"})),
                true,
                "",
            ),
            // Not a kind mesh reads: none of its business.
            (
                "CREATE",
                "apps",
                "v1",
                "Deployment",
                serde_json::json!({"metadata": {"name": "d"}, "spec": {"x": 1}}),
                true,
                "",
            ),
            // Accepted, with what mesh does instead as a warning.
            (
                "CREATE",
                "networking.istio.io",
                "v1",
                "Sidecar",
                serde_json::json!({"metadata": {"name": "s", "namespace": "shop"}, "spec": {}}),
                true,
                "Sidecar",
            ),
        ];
        for (operation, group, version, kind, object, allowed, text) in cases {
            let what = format!("{operation} {kind} {object}");
            let response = review(&request(operation, group, version, kind, object));
            assert_eq!(response.allowed, allowed, "{what}: {}", response.result.message);
            let said = format!("{} {}", response.result.message, response.warnings.unwrap_or_default().join(" "));
            assert!(said.contains(text), "{what}: {said:?} does not say {text:?}");
        }
    }
}
