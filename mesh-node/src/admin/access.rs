//! Who may use the admin API. Mutations (enrolling pods, reporting network
//! namespaces) only from this node itself: a caller on loopback, or one
//! whose address is the address it called (Linux drops packets from outside
//! that claim a local source, so only a process on this node can connect
//! that way). Other hosts may only read, and only with the bearer token of
//! `--admin-token-file`; without one configured they may not read at all.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{ConnectInfo, Request, State, connect_info::Connected},
    http::{HeaderMap, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    serve::IncomingStream,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tracing::warn;

/// Both ends of an admin connection.
#[derive(Clone, Copy, Debug)]
pub struct AdminPeer {
    pub remote: SocketAddr,
    pub local: Option<SocketAddr>,
}

impl Connected<IncomingStream<'_, TcpListener>> for AdminPeer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        AdminPeer { remote: *stream.remote_addr(), local: stream.io().local_addr().ok() }
    }
}

/// Whether a caller is on this node.
pub fn is_local(peer: AdminPeer) -> bool {
    mesh_common::admin::is_local_caller(peer.remote.ip(), peer.local.map(|l| l.ip()))
}

/// Why a request was refused: the status, the metric's reason and the answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: &'static str,
}

/// The decision for one request. `token` is the configured token, if any.
pub fn decide(method: &Method, local: bool, presented: Option<&str>, token: Option<&[u8]>) -> Result<(), Refusal> {
    if local {
        return Ok(());
    }
    if !matches!(*method, Method::GET | Method::HEAD) {
        return Err(Refusal {
            status: StatusCode::FORBIDDEN,
            reason: "remote_mutation",
            message: "the admin API takes changes only from this node (loopback or the node's own address); \
                      other hosts may only read",
        });
    }
    let Some(token) = token else {
        return Err(Refusal {
            status: StatusCode::FORBIDDEN,
            reason: "no_token_configured",
            message: "this node serves its admin API to other hosts only with a token: \
                      start mesh-node with --admin-token-file",
        });
    };
    match presented {
        Some(p) if same_secret(p.as_bytes(), token) => Ok(()),
        Some(_) => Err(Refusal {
            status: StatusCode::UNAUTHORIZED,
            reason: "wrong_token",
            message: "the bearer token is not this node's admin token",
        }),
        None => Err(Refusal {
            status: StatusCode::UNAUTHORIZED,
            reason: "no_token",
            message: "reading this node's admin API from another host needs its token \
                      (Authorization: Bearer; mesh-ctl --admin-token-file)",
        }),
    }
}

/// Compares digests in constant time, so neither the token's bytes nor its
/// length can be learnt from how long a refusal takes.
fn same_secret(presented: &[u8], token: &[u8]) -> bool {
    let digest = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b);
    bool::from(digest(presented).as_ref().ct_eq(digest(token).as_ref()))
}

/// The token of `Authorization: Bearer TOKEN`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The token file, read again at each remote request so a rotated token
/// (a Kubernetes Secret updated in place) takes effect without a restart;
/// when it cannot be read, the last token read stays in force.
pub struct TokenFile {
    path: PathBuf,
    last: Mutex<Vec<u8>>,
}

impl TokenFile {
    /// Reads `path` once; an unreadable or empty file is an error at start.
    pub fn open(path: PathBuf) -> anyhow::Result<TokenFile> {
        let token = read_token(&path)?;
        Ok(TokenFile { path, last: Mutex::new(token) })
    }

    async fn current(&self) -> Vec<u8> {
        let path = self.path.clone();
        match tokio::task::spawn_blocking(move || read_token(&path)).await {
            Ok(Ok(token)) => {
                *self.last.lock().unwrap() = token.clone();
                token
            }
            Ok(Err(e)) => {
                warn!(error = %e, "keeping the admin token read before");
                self.last.lock().unwrap().clone()
            }
            Err(_) => self.last.lock().unwrap().clone(),
        }
    }
}

fn read_token(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("admin token file {}: {e}", path.display()))?;
    let token = text.trim();
    anyhow::ensure!(!token.is_empty(), "admin token file {} is empty", path.display());
    Ok(token.as_bytes().to_vec())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The guard's state: the token (if any) and the refusal counter.
#[derive(Clone)]
pub struct Access {
    token: Option<Arc<TokenFile>>,
    refused: Family<ReasonLabel, Counter>,
}

impl Access {
    pub fn new(token: Option<TokenFile>, registry: &mut Registry) -> Access {
        let refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "mesh_node_admin_requests_refused",
            "Admin API requests refused (remote_mutation, no_token_configured, no_token, wrong_token)",
            refused.clone(),
        );
        Access { token: token.map(Arc::new), refused }
    }
}

/// Middleware: refuses what [`decide`] refuses, with a log line and a metric.
pub async fn guard(
    State(access): State<Access>,
    ConnectInfo(peer): ConnectInfo<AdminPeer>,
    request: Request,
    next: Next,
) -> Response {
    let local = is_local(peer);
    let token = match (&access.token, local) {
        (Some(file), false) => Some(file.current().await),
        _ => None,
    };
    match decide(request.method(), local, bearer(request.headers()), token.as_deref()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            warn!(
                peer = %peer.remote, method = %request.method(), path = %request.uri().path(),
                reason = refusal.reason, "admin API request refused"
            );
            access.refused.get_or_create(&ReasonLabel { reason: refusal.reason }).inc();
            let mut response =
                (refusal.status, axum::Json(serde_json::json!({ "error": refusal.message }))).into_response();
            if refusal.status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, "Bearer".parse().unwrap());
            }
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let t: &[u8] = b"s3cret";
        let ok = |m: Method, local, presented, token| decide(&m, local, presented, token).map_err(|r| r.reason);
        let cases = [
            (Method::POST, true, None, None, Ok(())),
            (Method::DELETE, true, None, Some(t), Ok(())),
            (Method::GET, true, None, Some(t), Ok(())),
            (Method::POST, false, Some("s3cret"), Some(t), Err("remote_mutation")),
            (Method::PUT, false, None, None, Err("remote_mutation")),
            (Method::DELETE, false, Some("s3cret"), Some(t), Err("remote_mutation")),
            (Method::GET, false, None, None, Err("no_token_configured")),
            (Method::GET, false, Some("s3cret"), None, Err("no_token_configured")),
            (Method::GET, false, None, Some(t), Err("no_token")),
            (Method::GET, false, Some("s3cre"), Some(t), Err("wrong_token")),
            (Method::GET, false, Some("s3cret!"), Some(t), Err("wrong_token")),
            (Method::GET, false, Some("s3cret"), Some(t), Ok(())),
            (Method::HEAD, false, Some("s3cret"), Some(t), Ok(())),
        ];
        for (method, local, presented, token, want) in cases {
            assert_eq!(ok(method.clone(), local, presented, token), want, "{method} local={local} {presented:?}");
        }
    }

    #[test]
    fn bearer_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
