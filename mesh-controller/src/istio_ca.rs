//! Istio's certificate API (`istio.v1.auth.IstioCertificateService/
//! CreateCertificate`) on the node API's port (15012, as istiod serves it),
//! so Istio's own agents (istio-agent, ztunnel) obtain certificates from
//! the mesh's CA and a cluster can move from Istio ambient to mesh node by
//! node, both trusting one root. The caller is authenticated by its
//! Kubernetes token (`authorization: Bearer`, audience `istio-ca`, checked
//! with TokenReview) and gets the identity of its own service account; a
//! node agent of a service account named in `--istio-ca-impersonators` may
//! ask on behalf of a workload (`ImpersonatedIdentity`), and only of one
//! scheduled on its own node. The answer is leaf → intermediates → root.
//!
//! [`grant`] is the rule (pure, table-tested).
use std::sync::Arc;

use kube::Client;
use mesh_common::{
    identity::SpiffeId,
    istio_ca::{
        IstioCertificateRequest, IstioCertificateResponse, istio_certificate_service_server::IstioCertificateService,
        value::Kind,
    },
};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::{
    ca::{self, CertificateAuthority},
    node_api::{
        Hub,
        service_account::{self, Caller},
    },
};

/// The audience Istio's agents request their tokens for.
pub const AUDIENCE: &str = "istio-ca";
/// The metadata key of a node agent's request on behalf of a workload.
const IMPERSONATED: &str = "ImpersonatedIdentity";

/// Whose certificate a caller may obtain.
#[derive(Debug, PartialEq, Eq)]
pub enum Grant {
    /// Its own service account's identity.
    Own(SpiffeId),
    /// A workload's, if that workload runs on the caller's node.
    OnBehalf(SpiffeId),
}

pub fn grant(
    caller: &Caller,
    impersonated: Option<&str>,
    trust_domain: &str,
    impersonators: &[(String, String)],
) -> Result<Grant, Status> {
    let Some(identity) = impersonated else {
        let own = SpiffeId::new(trust_domain, &caller.namespace, &caller.service_account)
            .map_err(|e| Status::invalid_argument(format!("the caller's identity: {e}")))?;
        return Ok(Grant::Own(own));
    };
    let allowed = impersonators.iter().any(|(ns, sa)| *ns == caller.namespace && *sa == caller.service_account);
    if !allowed {
        return Err(Status::permission_denied(format!(
            "service account {}/{} may not ask for others' certificates (--istio-ca-impersonators)",
            caller.namespace, caller.service_account
        )));
    }
    let identity: SpiffeId =
        identity.parse().map_err(|e| Status::invalid_argument(format!("{IMPERSONATED} {identity:?}: {e}")))?;
    if identity.trust_domain() != trust_domain {
        return Err(Status::permission_denied(format!("{identity} is not in trust domain {trust_domain}")));
    }
    Ok(Grant::OnBehalf(identity))
}

pub struct IstioCa {
    pub ca: Arc<CertificateAuthority>,
    pub hub: Arc<Hub>,
    pub client: Client,
    pub trust_domain: String,
    pub impersonators: Vec<(String, String)>,
}

#[tonic::async_trait]
impl IstioCertificateService for IstioCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let bearer = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        let token = bearer
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("no `authorization: Bearer <Kubernetes token>`"))?
            .to_owned();
        let req = request.into_inner();
        let impersonated = req.metadata.as_ref().and_then(|m| m.fields.get(IMPERSONATED)).and_then(|v| match &v.kind {
            Some(Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        });
        let caller = service_account::review(&self.client, &token, AUDIENCE).await.map_err(Status::unauthenticated)?;
        let identity = match grant(&caller, impersonated.as_deref(), &self.trust_domain, &self.impersonators)? {
            Grant::Own(identity) => identity,
            Grant::OnBehalf(identity) => {
                let pod = caller.pod.as_ref().ok_or_else(|| {
                    Status::permission_denied("a node agent's token must be bound to its pod to name its node")
                })?;
                let node = service_account::node_of_pod(&self.client, &caller.namespace, pod)
                    .await
                    .map_err(Status::permission_denied)?;
                ca::may_issue(&self.hub.current().model, &node, &identity)
                    .map_err(|e| Status::permission_denied(e.to_string()))?;
                identity
            }
        };
        let issued = self
            .ca
            .issue(&req.csr, &identity, OffsetDateTime::now_utc())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        info!(
            caller = %format!("{}/{}", caller.namespace, caller.service_account),
            identity = %identity,
            "certificate issued through Istio's API"
        );
        let mut cert_chain = vec![issued.cert_pem];
        cert_chain.extend(issued.chain_pem);
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(ns: &str, sa: &str) -> Caller {
        Caller { namespace: ns.into(), service_account: sa.into(), pod: None }
    }

    #[test]
    fn a_caller_gets_its_own_identity_and_only_node_agents_ask_for_others() {
        let ztunnel = vec![("istio-system".to_owned(), "ztunnel".to_owned())];
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let cases: [(Caller, Option<&str>, Result<String, tonic::Code>); 5] = [
            (caller("shop", "web"), None, Ok(format!("own {web}"))),
            (caller("istio-system", "ztunnel"), Some(web), Ok(format!("on behalf {web}"))),
            (caller("shop", "web"), Some("spiffe://cluster.local/ns/shop/sa/db"), Err(tonic::Code::PermissionDenied)),
            (
                caller("istio-system", "ztunnel"),
                Some("spiffe://other.td/ns/a/sa/b"),
                Err(tonic::Code::PermissionDenied),
            ),
            (caller("istio-system", "ztunnel"), Some("not an id"), Err(tonic::Code::InvalidArgument)),
        ];
        for (who, asked, want) in cases {
            let got = grant(&who, asked, "cluster.local", &ztunnel).map(|g| match g {
                Grant::Own(id) => format!("own {id}"),
                Grant::OnBehalf(id) => format!("on behalf {id}"),
            });
            assert_eq!(got.map_err(|s| s.code()), want, "{who:?} asking for {asked:?}");
        }
    }
}
