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

/// Who a reviewed token belongs to.
#[derive(Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to (name, uid), for a projected token.
    pub pod: Option<(String, String)>,
}

/// What a TokenReview's answer says of the caller, when the token is valid
/// for `audience` and a service account's. Pure.
pub fn caller(status: &TokenReviewStatus, audience: &str) -> Result<Caller, String> {
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().unwrap_or("not authenticated");
        return Err(format!("the API server does not accept the token: {why}"));
    }
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Err(format!("the token is not for audience {audience:?}"));
    }
    let user = status.user.as_ref().ok_or("the token names no user")?;
    let username = user.username.as_deref().unwrap_or_default();
    let Some((namespace, service_account)) =
        username.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':'))
    else {
        return Err(format!("the token is of {username:?}, not of a service account"));
    };
    let extra = |key: &str| user.extra.as_ref()?.get(key)?.first().cloned();
    let pod = extra(POD_NAME).zip(extra(POD_UID));
    Ok(Caller { namespace: namespace.to_owned(), service_account: service_account.to_owned(), pod })
}

/// Asks the API server whose `token` is (TokenReview), for `audience`.
pub async fn review(client: &Client, token: &str, audience: &str) -> Result<Caller, String> {
    let review = TokenReview {
        spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![audience.to_owned()]) },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| format!("cannot review the token with the API server: {e}"))?;
    caller(&reviewed.status.unwrap_or_default(), audience)
}

/// The node a token's pod runs on: the pod read back (the same uid, not a
/// namesake made since) and its `spec.nodeName`.
pub async fn node_of_pod(client: &Client, namespace: &str, (name, uid): &(String, String)) -> Result<String, String> {
    let found = Api::<Pod>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|e| format!("cannot read pod {namespace}/{name}: {e}"))?;
    let found = found.ok_or_else(|| format!("the token's pod {namespace}/{name} is gone"))?;
    if found.metadata.uid.as_deref() != Some(uid.as_str()) {
        return Err(format!("the token's pod {namespace}/{name} was replaced"));
    }
    found.spec.and_then(|s| s.node_name).ok_or_else(|| format!("the token's pod {namespace}/{name} is not scheduled"))
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
        let caller = review(&self.client, token, AUDIENCE).await?;
        if (caller.namespace.as_str(), caller.service_account.as_str())
            != (self.namespace.as_str(), self.service_account.as_str())
        {
            return Err(format!(
                "the token is of service account {}/{}, not of the node agents' {}/{}",
                caller.namespace, caller.service_account, self.namespace, self.service_account
            ));
        }
        let pod = caller.pod.ok_or("the token is not bound to a pod (use a projected service-account token)")?;
        node_of_pod(&self.client, &caller.namespace, &pod).await
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
    fn a_valid_service_account_token_for_the_audience_names_its_caller_and_pod() {
        let agent = "system:serviceaccount:mesh-system:mesh-node";
        let pod = Some(("mesh-node-x", "uid-1"));
        let bound = Some(("mesh-node-x".to_owned(), "uid-1".to_owned()));
        let caller = |ns: &str, sa: &str, pod| Ok(Caller { namespace: ns.into(), service_account: sa.into(), pod });
        let cases = [
            (status(true, AUDIENCE, agent, pod), caller("mesh-system", "mesh-node", bound)),
            (status(true, AUDIENCE, agent, None), caller("mesh-system", "mesh-node", None)),
            (status(false, AUDIENCE, agent, pod), Err("does not accept")),
            (status(true, "https://kubernetes.default.svc", agent, pod), Err("audience")),
            (status(true, AUDIENCE, "admin", pod), Err("not of a service account")),
        ];
        for (status, want) in cases {
            match (caller_of(&status), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want),
                (Err(e), Err(text)) => assert!(e.contains(text), "{e:?} does not say {text:?}"),
                (got, want) => panic!("{got:?}, wanted {want:?}"),
            }
        }
        assert!(is_jwt("eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOlsibWVzaCJdfQ.c2lnbmF0dXJl"));
        assert!(!is_jwt("4f0c2a9e1b7d3c5a8e6f0b2d4c6a8e0f4f0c2a9e1b7d3c5a8e6f0b2d4c6a8e0f"));
    }

    fn caller_of(status: &TokenReviewStatus) -> Result<Caller, String> {
        caller(status, AUDIENCE)
    }
}
