//! Joining on Kubernetes without a shared secret: the node agent presents
//! its pod's projected service-account token (audience [`AUDIENCE`]), the
//! controller asks the API server who that is (TokenReview), checks that it
//! is the node agents' service account, and takes the node name from the
//! Node the token's pod is scheduled on. A node can then only obtain the
//! certificates of pods scheduled on it, as with its own join token, and a
//! stolen token names one node only (and expires with its pod).
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};

/// The audience node agents request their token for (the DaemonSet's
/// projected volume): a token for the API server itself is not accepted.
pub const AUDIENCE: &str = "mesh-controller";

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Whether `token` is a JWT (three dot-separated parts), as Kubernetes'
/// tokens are; mesh's own join tokens are hex.
pub fn is_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.len() > 32
}

/// The pod a reviewed token was issued to.
#[derive(Debug, PartialEq, Eq)]
pub struct TokenPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// What a TokenReview's answer says of the caller: the pod its token is
/// bound to, when the token is valid, for [`AUDIENCE`], and of
/// `namespace/service_account`. Pure.
pub fn token_pod(status: &TokenReviewStatus, namespace: &str, service_account: &str) -> Result<TokenPod, String> {
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().unwrap_or("not authenticated");
        return Err(format!("the API server does not accept the token: {why}"));
    }
    if !status.audiences.iter().flatten().any(|a| a == AUDIENCE) {
        return Err(format!("the token is not for audience {AUDIENCE:?}"));
    }
    let user = status.user.as_ref().ok_or("the token names no user")?;
    let username = user.username.as_deref().unwrap_or_default();
    let expected = format!("system:serviceaccount:{namespace}:{service_account}");
    if username != expected {
        return Err(format!("the token is of {username:?}, not of the node agents' {expected:?}"));
    }
    let extra = |key: &str| user.extra.as_ref()?.get(key)?.first().cloned();
    let (Some(name), Some(uid)) = (extra(POD_NAME), extra(POD_UID)) else {
        return Err("the token is not bound to a pod (use a projected service-account token)".into());
    };
    Ok(TokenPod { namespace: namespace.to_owned(), name, uid })
}

/// Verifies node agents' service-account tokens with the API server.
pub struct TokenJoin {
    pub client: Client,
    pub namespace: String,
    pub service_account: String,
}

impl TokenJoin {
    /// The node whose agent holds `token`, or why it is refused.
    pub async fn node_of(&self, token: &str) -> Result<String, String> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![AUDIENCE.to_owned()]) },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("cannot review the token with the API server: {e}"))?;
        let status = reviewed.status.unwrap_or_default();
        let pod = token_pod(&status, &self.namespace, &self.service_account)?;
        let found = Api::<Pod>::namespaced(self.client.clone(), &pod.namespace)
            .get_opt(&pod.name)
            .await
            .map_err(|e| format!("cannot read pod {}/{}: {e}", pod.namespace, pod.name))?;
        let found = found.ok_or_else(|| format!("the token's pod {}/{} is gone", pod.namespace, pod.name))?;
        if found.metadata.uid.as_deref() != Some(pod.uid.as_str()) {
            return Err(format!("the token's pod {}/{} was replaced", pod.namespace, pod.name));
        }
        found
            .spec
            .and_then(|s| s.node_name)
            .ok_or_else(|| format!("the token's pod {}/{} is not scheduled", pod.namespace, pod.name))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn status(authenticated: bool, audience: &str, user: &str, pod: Option<(&str, &str)>) -> TokenReviewStatus {
        let mut extra = BTreeMap::new();
        if let Some((name, uid)) = pod {
            extra.insert(POD_NAME.to_owned(), vec![name.to_owned()]);
            extra.insert(POD_UID.to_owned(), vec![uid.to_owned()]);
        }
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(vec![audience.to_owned()]),
            user: Some(UserInfo { username: Some(user.to_owned()), extra: Some(extra), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_node_agents_pod_bound_token_for_mesh_names_a_pod() {
        let agent = "system:serviceaccount:mesh-system:mesh-node";
        let pod = Some(("mesh-node-x", "uid-1"));
        let cases = [
            (status(true, AUDIENCE, agent, pod), Ok("mesh-node-x")),
            (status(false, AUDIENCE, agent, pod), Err("does not accept")),
            (status(true, "https://kubernetes.default.svc", agent, pod), Err("audience")),
            (status(true, AUDIENCE, "system:serviceaccount:shop:web", pod), Err("not of the node agents'")),
            (status(true, AUDIENCE, agent, None), Err("not bound to a pod")),
        ];
        for (status, want) in cases {
            let got = token_pod(&status, "mesh-system", "mesh-node");
            match (got, want) {
                (Ok(p), Ok(name)) => assert_eq!((p.name.as_str(), p.uid.as_str()), (name, "uid-1")),
                (Err(e), Err(text)) => assert!(e.contains(text), "{e:?} does not say {text:?}"),
                (got, want) => panic!("{got:?}, wanted {want:?}"),
            }
        }
        assert!(is_jwt("eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOlsibWVzaCJdfQ.c2lnbmF0dXJl"));
        assert!(!is_jwt("4f0c2a9e1b7d3c5a8e6f0b2d4c6a8e0f4f0c2a9e1b7d3c5a8e6f0b2d4c6a8e0f"));
    }
}
