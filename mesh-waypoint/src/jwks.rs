//! The key sets RequestAuthentication rules verify with: inline `jwks`
//! parsed once, `jwksUri` fetched over HTTP or HTTPS (through the mesh, as
//! this waypoint over HBONE, when the host is a mesh service or workload;
//! directly otherwise, with the system's trust roots for HTTPS), refreshed
//! every `refresh` (Istio's default: 20 minutes), retried sooner after a
//! failure, and the last good set kept while refreshes fail. A request
//! that arrives before the first fetch has ended waits for it, up to the
//! rule's timeout, as Envoy's remote JWKS does.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http::{Request, Uri, header};
use http_body_util::{BodyExt as _, Limited};
use hyper_util::rt::TokioIo;
use mesh_common::{
    api::JwtRule,
    authz::jwt::{self, JwtError},
};
use mesh_proxy::state::view::Upstream;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::watch,
};
use tracing::{info, warn};

use crate::{Waypoint, body::empty, lock};
use jsonwebtoken::jwk::JwkSet;

/// Istio's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(20 * 60);
/// Istio's default jwtRules `timeout`.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A key set larger than this is refused (Envoy's limit is similar).
const MAX_JWKS_BYTES: usize = 1 << 20;

pub struct Jwks {
    refresh_ms: AtomicU64,
    /// By inline text.
    inline: Mutex<HashMap<String, Result<Arc<JwkSet>, String>>>,
    /// By URI: the newest good set (`None` until the first fetch succeeds).
    remote: Mutex<HashMap<String, watch::Receiver<Option<Arc<JwkSet>>>>>,
}

impl Default for Jwks {
    fn default() -> Self {
        Jwks {
            refresh_ms: AtomicU64::new(DEFAULT_REFRESH.as_millis() as u64),
            inline: Mutex::default(),
            remote: Mutex::default(),
        }
    }
}

impl Jwks {
    pub fn set_refresh(&self, every: Duration) {
        self.refresh_ms.store(every.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    fn refresh(&self) -> Duration {
        Duration::from_millis(self.refresh_ms.load(Ordering::Relaxed))
    }

    /// The keys `rule` verifies with.
    pub async fn keys(&self, wp: &Arc<Waypoint>, rule: &JwtRule) -> Result<Arc<JwkSet>, JwtError> {
        if !rule.jwks.is_empty() {
            // Looked up by the borrowed text: a request copies nothing.
            let mut inline = lock(&self.inline);
            let parsed = match inline.get(&rule.jwks) {
                Some(p) => p.clone(),
                None => {
                    let p = jwt::parse_jwks(&rule.jwks).map(Arc::new);
                    inline.insert(rule.jwks.clone(), p.clone());
                    p
                }
            };
            return parsed.map_err(|e| {
                warn!(policy = %rule.policy, issuer = %rule.issuer, "inline jwks unusable: {e}");
                JwtError::KeysUnavailable
            });
        }
        let uri = source(rule);
        let mut rx = {
            let mut remote = lock(&self.remote);
            match remote.get(uri.as_ref()) {
                Some(rx) => rx.clone(),
                None => {
                    let uri = uri.into_owned();
                    let (tx, rx) = watch::channel(None);
                    remote.insert(uri.clone(), rx.clone());
                    tokio::spawn(refresher(Arc::downgrade(wp), uri, timeout_of(rule), tx));
                    rx
                }
            }
        };
        let wait = rx.wait_for(Option::is_some);
        match tokio::time::timeout(timeout_of(rule), wait).await {
            Ok(Ok(keys)) => Ok(keys.clone().expect("waited for a key set")),
            _ => Err(JwtError::KeysUnavailable),
        }
    }
}

/// Where a rule's keys come from: its `jwksUri`, or (with neither that nor
/// inline `jwks`, as Istio does) the issuer's OpenID Connect discovery
/// document, which names the JWKS.
fn source(rule: &JwtRule) -> std::borrow::Cow<'_, str> {
    if rule.jwks_uri.is_empty() {
        format!("{}{DISCOVERY}", rule.issuer.trim_end_matches('/')).into()
    } else {
        rule.jwks_uri.as_str().into()
    }
}

const DISCOVERY: &str = "/.well-known/openid-configuration";

fn timeout_of(rule: &JwtRule) -> Duration {
    if rule.timeout_ms > 0 { Duration::from_millis(rule.timeout_ms) } else { FETCH_TIMEOUT }
}

/// Fetches `uri` now and every refresh interval while a service's rules
/// still name it; after a failure, again within a second, then backing off
/// (the set in force stays).
async fn refresher(wp: Weak<Waypoint>, uri: String, timeout: Duration, tx: watch::Sender<Option<Arc<JwkSet>>>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let Some(waypoint) = wp.upgrade() else { return };
        let view = waypoint.proxy.state.view();
        if !view.services().any(|s| s.jwt_rules.iter().any(|r| r.jwks.is_empty() && source(r) == uri)) {
            lock(&waypoint.jwks.remote).remove(&uri);
            return; // no rule names it any more
        }
        drop(view);
        let refresh = waypoint.jwks.refresh();
        let fetched = tokio::time::timeout(timeout, fetch_keys(&waypoint, &uri))
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        let next = match fetched.and_then(|text| jwt::parse_jwks(&text)) {
            Ok(keys) => {
                waypoint.metrics.jwks_fetched(&uri, "success");
                let changed = tx.borrow().as_deref() != Some(&keys);
                if changed {
                    info!(%uri, keys = keys.keys.len(), "JWKS fetched");
                    tx.send_replace(Some(Arc::new(keys)));
                }
                backoff = Duration::from_secs(1);
                refresh
            }
            Err(e) => {
                waypoint.metrics.jwks_fetched(&uri, "failure");
                let kept = if tx.borrow().is_some() { "keeping the last good key set" } else { "no key set yet" };
                warn!(%uri, "JWKS fetch failed: {e}; {kept}");
                let wait = backoff.min(refresh);
                backoff = (backoff * 2).min(Duration::from_secs(60));
                wait
            }
        };
        drop(waypoint);
        tokio::time::sleep(next).await;
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The key set at `uri`, or at the `jwks_uri` a discovery document names.
async fn fetch_keys(wp: &Waypoint, uri: &str) -> Result<String, String> {
    let text = fetch(wp, uri).await?;
    if !uri.ends_with(DISCOVERY) {
        return Ok(text);
    }
    let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("discovery document: {e}"))?;
    let jwks_uri = doc.get("jwks_uri").and_then(|v| v.as_str()).ok_or("discovery document has no jwks_uri")?;
    fetch(wp, jwks_uri).await
}

/// GET `uri`: its body when the answer is 200.
async fn fetch(wp: &Waypoint, uri: &str) -> Result<String, String> {
    let u: Uri = uri.parse().map_err(|e| format!("bad URI: {e}"))?;
    let https = u.scheme_str() == Some("https");
    let host = u.host().ok_or("no host")?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = u.port_u16().unwrap_or(if https { 443 } else { 80 });
    let io: Box<dyn Io> = match mesh_upstream(wp, &host, port)? {
        Some(up) => {
            let me = wp.identity().ok_or("this waypoint has no identity yet")?;
            Box::new(crate::upstream::open(&wp.proxy, &me, &up).await.map_err(|e| e.to_string())?)
        }
        None => {
            let tcp =
                TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connect {host}:{port}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            Box::new(tcp)
        }
    };
    let io: Box<dyn Io> = if https { Box::new(tls(&host, io).await?) } else { io };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let path = u.path_and_query().map_or("/", |p| p.as_str());
    let authority = u.authority().map_or(host.clone(), |a| a.to_string());
    let req = Request::get(path)
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/json")
        .body(empty())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("HTTP {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES).collect().await.map_err(|e| e.to_string())?;
    String::from_utf8(body.to_bytes().to_vec()).map_err(|_| "not UTF-8".into())
}

/// How to reach `host:port` through the mesh (its first endpoint); `None`: outside the mesh.
fn mesh_upstream(wp: &Waypoint, host: &str, port: u16) -> Result<Option<Upstream>, String> {
    Ok(crate::upstream::in_mesh(&wp.proxy.state.view(), host, port)?.into_iter().next())
}

/// TLS to a JWKS server, verified against the system's trust roots.
async fn tls(host: &str, io: Box<dyn Io>) -> Result<tokio_rustls::client::TlsStream<Box<dyn Io>>, String> {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
    for cert in rustls::pki_types::CertificateDer::pem_file_iter("/etc/ssl/certs/ca-certificates.crt")
        .map_err(|e| format!("system trust roots: {e}"))?
        .flatten()
    {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, io).await.map_err(|e| format!("TLS: {e}"))
}
