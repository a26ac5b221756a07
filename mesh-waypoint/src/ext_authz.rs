//! External authorization (AuthorizationPolicy `action: CUSTOM`): a request
//! a CUSTOM policy's rules match is first sent to the policy's provider, an
//! authorizer speaking Envoy's ext_authz protocol, before DENY and ALLOW are
//! evaluated, as Istio orders them.
//!
//! - `envoyExtAuthzHttp`: the request's method, `pathPrefix` + path, Host,
//!   `Authorization` and the headers `includeRequestHeadersInCheck` names
//!   (plus `includeAdditionalHeadersInCheck`), without a body, over
//!   HTTP/1.1. 200 allows (`headersToUpstreamOnAllow` copied onto the
//!   request, `headersToDownstreamOnAllow` onto its response); any other
//!   status denies with that status, body and (`headersToDownstreamOnDeny`)
//!   headers.
//! - `envoyExtAuthzGrpc`: `envoy.service.auth.v3.Authorization/Check` with
//!   the request's attributes (every header); status OK allows with the
//!   `ok_response` edits, any other code denies with `denied_response`.
//!
//! An authorizer that cannot be asked (unreachable, timed out, a broken
//! answer) denies with `statusOnError` (403), or allows with `failOpen`.
//! The authorizer is reached as the JWKS server is: through the mesh (over
//! HBONE, as this waypoint, on the shared connection pools) when it is a
//! mesh service or workload, directly otherwise.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use mesh_common::{api, ext_authz as pb};
use mesh_proxy::state::view::Upstream;

use crate::{
    Waypoint,
    body::{BoxError, HttpBody, empty, full},
    engine::Downstream,
    upstream::Sender,
};

/// Istio's default provider `timeout`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// An authorizer's answer larger than this is an error.
const MAX_ANSWER_BYTES: usize = 64 << 10;

/// The authorizer's decision.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Allow(Allowed),
    /// The answer the client gets instead of the upstream's, and why (for the log).
    Deny {
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
        why: String,
    },
}

/// What an allowing authorizer asks of the request and of its response.
#[derive(Debug, Default, PartialEq)]
pub struct Allowed {
    pub request_edits: Vec<Edit>,
    pub remove: Vec<HeaderName>,
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
}

/// A header edit, with Envoy's `HeaderAppendAction`.
#[derive(Debug, PartialEq)]
pub struct Edit {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub action: Action,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Action {
    Append,
    AddIfAbsent,
    Overwrite,
    OverwriteIfExists,
}

impl Allowed {
    /// Applies the request edits (the request the routes, the policies and
    /// the upstream then see).
    pub fn edit_request(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            // Envoy never lets an authorizer remove the Host header.
            if *name != header::HOST {
                headers.remove(name);
            }
        }
        for e in &self.request_edits {
            let present = headers.contains_key(&e.name);
            match e.action {
                Action::Append => drop(headers.append(e.name.clone(), e.value.clone())),
                Action::AddIfAbsent if !present => drop(headers.insert(e.name.clone(), e.value.clone())),
                Action::Overwrite => drop(headers.insert(e.name.clone(), e.value.clone())),
                Action::OverwriteIfExists if present => drop(headers.insert(e.name.clone(), e.value.clone())),
                _ => {}
            }
        }
    }
}

/// The request as the authorizer is told of it.
pub struct Check<'a> {
    pub method: &'a Method,
    /// Normalized, with the query.
    pub path_and_query: &'a str,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    pub request_id: &'a str,
    pub protocol: &'a str,
}

/// Asks `provider` about the request; an error is already turned into the
/// verdict `failOpen` and `statusOnError` give. Counted by result.
pub async fn check(wp: &Arc<Waypoint>, ds: &Downstream, provider: &api::ExtAuthz, req: &Check<'_>) -> Verdict {
    let timeout = if provider.timeout_ms > 0 { Duration::from_millis(provider.timeout_ms) } else { DEFAULT_TIMEOUT };
    let asked =
        async { if provider.grpc { ask_grpc(wp, ds, provider, req).await } else { ask_http(wp, provider, req).await } };
    let answer = tokio::time::timeout(timeout, asked).await.unwrap_or_else(|_| Err("timed out".into()));
    let verdict = answer.unwrap_or_else(|e| {
        wp.metrics.ext_authz(&provider.name, "error");
        let outcome = if provider.fail_open { "allowing (failOpen)" } else { "denying" };
        tracing::warn!(
            request_id = req.request_id,
            provider = %provider.name,
            authorizer = %format!("{}:{}", provider.host, provider.port),
            "external authorizer could not be asked: {e}; {outcome}"
        );
        on_error(provider, &e)
    });
    match &verdict {
        Verdict::Allow(_) => wp.metrics.ext_authz(&provider.name, "allowed"),
        Verdict::Deny { .. } => wp.metrics.ext_authz(&provider.name, "denied"),
    }
    verdict
}

/// The verdict when the authorizer cannot be asked (`error` says why).
pub fn on_error(provider: &api::ExtAuthz, error: &str) -> Verdict {
    if provider.fail_open {
        return Verdict::Allow(Allowed::default());
    }
    let status = u16::try_from(provider.status_on_error)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::FORBIDDEN);
    Verdict::Deny { status, headers: Vec::new(), body: Bytes::new(), why: format!("could not be asked ({error})") }
}

/// The verdict for a CUSTOM policy whose provider MeshConfig does not define.
pub fn undefined() -> Verdict {
    Verdict::Deny {
        status: StatusCode::FORBIDDEN,
        headers: Vec::new(),
        body: Bytes::from_static(b"RBAC: access denied"),
        why: "the CUSTOM policy's provider is not defined in MeshConfig.extensionProviders".into(),
    }
}

/// A connection to the authorizer.
async fn connect(
    wp: &Waypoint,
    provider: &api::ExtAuthz,
) -> Result<(Upstream, Sender, Arc<crate::breaker::Cluster>), String> {
    let cluster = format!("ext-authz/{}", provider.name);
    crate::upstream::connect_host(wp, &cluster, &provider.host, provider.port, provider.grpc).await
}

async fn ask_http(wp: &Waypoint, provider: &api::ExtAuthz, req: &Check<'_>) -> Result<Verdict, String> {
    let request = http_check(provider, req)?;
    let (up, sender, cluster) = connect(wp, provider).await?;
    let Sender::H1(mut s, uses, permit) = sender else { return Err("expected an HTTP/1.1 connection".into()) };
    let response = s.send_request(request).await;
    wp.upstreams.release(up.addr(), Sender::H1(s, uses + 1, permit), &cluster, None);
    let (parts, body) = response.map_err(|e| e.to_string())?.into_parts();
    let body = Limited::new(body, MAX_ANSWER_BYTES).collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(http_verdict(provider, parts.status, &parts.headers, body))
}

/// The check request of the HTTP protocol: the client's method and path
/// (behind `pathPrefix`), its Host and the headers the provider includes, no body.
pub fn http_check(provider: &api::ExtAuthz, req: &Check<'_>) -> Result<Request<HttpBody>, String> {
    let path = format!("{}{}", provider.path_prefix.trim_end_matches('/'), req.path_and_query);
    let mut b = Request::builder().method(req.method.clone()).uri(path);
    let headers = b.headers_mut().ok_or("bad check request")?;
    for (name, value) in req.headers {
        let always = *name == header::AUTHORIZATION;
        if always || provider.include_request_headers.iter().any(|p| matches_pattern(p, name.as_str())) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(header::HOST, HeaderValue::from_str(req.host).map_err(|e| e.to_string())?);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    for (name, value) in &provider.additional_headers {
        let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_str(value)) else {
            continue;
        };
        headers.insert(name, value);
    }
    b.body(empty()).map_err(|e| e.to_string())
}

/// Istio's header patterns: `exact`, `prefix*`, `*suffix` (lowercase).
fn matches_pattern(pattern: &str, name: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix('*') {
        name.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        name.ends_with(suffix)
    } else {
        name == pattern
    }
}

/// The HTTP authorizer's answer as a verdict.
pub fn http_verdict(provider: &api::ExtAuthz, status: StatusCode, headers: &HeaderMap, body: Bytes) -> Verdict {
    let picked = |patterns: &[String]| -> Vec<(HeaderName, HeaderValue)> {
        headers
            .iter()
            .filter(|(n, _)| patterns.iter().any(|p| matches_pattern(p, n.as_str())))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    };
    if status == StatusCode::OK {
        let request_edits = picked(&provider.headers_to_upstream_on_allow)
            .into_iter()
            .map(|(name, value)| Edit { name, value, action: Action::Overwrite })
            .collect();
        return Verdict::Allow(Allowed {
            request_edits,
            remove: Vec::new(),
            response_headers: picked(&provider.headers_to_downstream_on_allow),
        });
    }
    // Unless the provider names them, every header but Host goes to the client.
    let hop = |n: &HeaderName| {
        [header::HOST, header::CONNECTION, header::TRANSFER_ENCODING, header::CONTENT_LENGTH].contains(n)
    };
    let headers = if provider.headers_to_downstream_on_deny.is_empty() {
        headers.iter().filter(|(n, _)| !hop(n)).map(|(n, v)| (n.clone(), v.clone())).collect()
    } else {
        let mut patterns = provider.headers_to_downstream_on_deny.clone();
        patterns.extend(["www-authenticate", "location"].map(String::from));
        picked(&patterns).into_iter().filter(|(n, _)| !hop(n)).collect()
    };
    Verdict::Deny { status, headers, body, why: format!("answered {status}") }
}

async fn ask_grpc(
    wp: &Waypoint,
    ds: &Downstream,
    provider: &api::ExtAuthz,
    req: &Check<'_>,
) -> Result<Verdict, String> {
    let (_, sender, _) = connect(wp, provider).await?;
    let Sender::H2(s) = sender else { return Err("expected an HTTP/2 connection".into()) };
    // tonic speaks the gRPC framing over the pooled HTTP/2 connection.
    let service = GrpcOverH2(s);
    let origin = format!("http://{}:{}", provider.host, provider.port).parse().map_err(|_| "bad authorizer host")?;
    let mut client = pb::authorization_client::AuthorizationClient::with_origin(service, origin);
    let answer =
        client.check(grpc_check(ds, req)).await.map_err(|s| format!("gRPC {:?}: {}", s.code(), s.message()))?;
    Ok(grpc_verdict(answer.into_inner()))
}

/// A pooled HTTP/2 connection as the transport tonic's client calls.
struct GrpcOverH2(hyper::client::conn::http2::SendRequest<HttpBody>);

type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

impl tower::Service<Request<tonic::body::Body>> for GrpcOverH2 {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(BoxError::from)
    }

    fn call(&mut self, r: Request<tonic::body::Body>) -> Answer {
        let mut sender = self.0.clone();
        Box::pin(async move {
            // A unary call's one message, held whole (tonic's body is not Sync, the pool's is).
            let (parts, body) = r.into_parts();
            let body = body.collect().await.map_err(|s| BoxError::from(s.to_string()))?.to_bytes();
            sender.send_request(Request::from_parts(parts, full(body))).await.map_err(BoxError::from)
        })
    }
}

/// The request's attributes as Envoy's ext_authz gRPC protocol sends them.
pub fn grpc_check(ds: &Downstream, req: &Check<'_>) -> pb::CheckRequest {
    let peer = |addr: SocketAddr, principal: String| pb::attribute_context::Peer {
        address: Some(pb::Address {
            socket_address: Some(pb::SocketAddress {
                address: addr.ip().to_canonical().to_string(),
                port_value: u32::from(addr.port()),
                ..Default::default()
            }),
        }),
        principal,
        ..Default::default()
    };
    let mut headers = std::collections::BTreeMap::<String, String>::new();
    for (name, value) in req.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers.entry(name.as_str().to_owned()).and_modify(|v| *v = format!("{v},{value}")).or_insert(value.into());
    }
    headers.insert(":method".into(), req.method.to_string());
    headers.insert(":path".into(), req.path_and_query.to_owned());
    headers.insert(":authority".into(), req.host.to_owned());
    // `path` is the request target with its query, as Envoy sends it; `query` the query alone.
    let query = req.path_and_query.split_once('?').map_or("", |(_, q)| q);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    pb::CheckRequest {
        attributes: Some(pb::AttributeContext {
            source: Some(peer(ds.peer_addr, ds.peer.as_ref().map(ToString::to_string).unwrap_or_default())),
            destination: Some(peer(ds.destination, String::new())),
            request: Some(pb::attribute_context::Request {
                time: Some(pb::Timestamp { seconds: now.as_secs() as i64, nanos: now.subsec_nanos() as i32 }),
                http: Some(pb::attribute_context::HttpRequest {
                    id: req.request_id.to_owned(),
                    method: req.method.to_string(),
                    headers,
                    path: req.path_and_query.to_owned(),
                    host: req.host.to_owned(),
                    scheme: "http".into(),
                    query: query.to_owned(),
                    protocol: req.protocol.to_owned(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}

/// The gRPC authorizer's answer as a verdict.
pub fn grpc_verdict(r: pb::CheckResponse) -> Verdict {
    let header = |o: &pb::HeaderValueOption| {
        let h = o.header.as_ref()?;
        let value = if h.raw_value.is_empty() { h.value.as_bytes() } else { h.raw_value.as_slice() };
        Some((HeaderName::try_from(h.key.as_str()).ok()?, HeaderValue::from_bytes(value).ok()?))
    };
    let code = r.status.as_ref().map_or(0, |s| s.code);
    if code == 0 {
        let ok = match r.http_response {
            Some(pb::check_response::HttpResponse::OkResponse(ok)) => ok,
            _ => pb::OkHttpResponse::default(),
        };
        let request_edits = ok
            .headers
            .iter()
            .filter_map(|o| {
                let (name, value) = header(o)?;
                Some(Edit { name, value, action: append_action(o) })
            })
            .collect();
        return Verdict::Allow(Allowed {
            request_edits,
            remove: ok.headers_to_remove.iter().filter_map(|n| HeaderName::try_from(n.as_str()).ok()).collect(),
            response_headers: ok.response_headers_to_add.iter().filter_map(header).collect(),
        });
    }
    let denied = match r.http_response {
        Some(
            pb::check_response::HttpResponse::DeniedResponse(d) | pb::check_response::HttpResponse::ErrorResponse(d),
        ) => d,
        _ => pb::DeniedHttpResponse::default(),
    };
    let status = denied
        .status
        .and_then(|s| u16::try_from(s.code).ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .filter(|c| c.as_u16() >= 200)
        .unwrap_or(StatusCode::FORBIDDEN);
    let why = format!("answered gRPC code {code}, HTTP {status}");
    Verdict::Deny { status, headers: denied.headers.iter().filter_map(header).collect(), body: denied.body.into(), why }
}

/// Envoy's rule for an allowing answer's headers: `append` when set (true:
/// append, false: overwrite), else `append_action`, whose default for
/// ext_authz answers is to overwrite.
fn append_action(o: &pb::HeaderValueOption) -> Action {
    use pb::header_value_option::HeaderAppendAction as A;
    if let Some(append) = &o.append {
        return if append.value { Action::Append } else { Action::Overwrite };
    }
    match A::try_from(o.append_action) {
        Ok(A::AddIfAbsent) => Action::AddIfAbsent,
        Ok(A::OverwriteIfExists) => Action::OverwriteIfExists,
        _ => Action::Overwrite,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> api::ExtAuthz {
        api::ExtAuthz {
            name: "authz".into(),
            host: "authz.shop.svc.cluster.local".into(),
            port: 8000,
            path_prefix: "/check/".into(),
            include_request_headers: vec!["x-ext-authz".into(), "x-user-*".into(), "*-token".into()],
            additional_headers: [("x-added".to_owned(), "yes".to_owned())].into(),
            headers_to_upstream_on_allow: vec!["x-result".into()],
            headers_to_downstream_on_allow: vec!["set-cookie".into()],
            ..Default::default()
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (HeaderName::try_from(*k).unwrap(), HeaderValue::from_str(v).unwrap())).collect()
    }

    #[test]
    fn the_http_check_request() {
        let h = headers(&[
            ("authorization", "Bearer t"),
            ("x-ext-authz", "allow"),
            ("x-user-id", "7"),
            ("refresh-token", "r"),
            ("x-other", "no"),
            ("content-length", "42"),
        ]);
        let check = Check {
            method: &Method::POST,
            path_and_query: "/api/x?q=1",
            host: "web.shop",
            headers: &h,
            request_id: "r1",
            protocol: "HTTP/1.1",
        };
        let req = http_check(&provider(), &check).unwrap();
        assert_eq!((req.method(), req.uri().to_string().as_str()), (&Method::POST, "/check/api/x?q=1"));
        let got: Vec<(&str, &str)> = req.headers().iter().map(|(k, v)| (k.as_str(), v.to_str().unwrap())).collect();
        for want in [
            ("authorization", "Bearer t"),
            ("x-ext-authz", "allow"),
            ("x-user-id", "7"),
            ("refresh-token", "r"),
            ("host", "web.shop"),
            ("content-length", "0"),
            ("x-added", "yes"),
        ] {
            assert!(got.contains(&want), "{want:?} in {got:?}");
        }
        assert!(!got.iter().any(|(k, _)| *k == "x-other"), "{got:?}");
    }

    #[test]
    fn http_answers() {
        let p = provider();
        let answer = headers(&[("x-result", "ok"), ("set-cookie", "a=1"), ("x-internal", "1")]);
        let Verdict::Allow(allowed) = http_verdict(&p, StatusCode::OK, &answer, Bytes::new()) else { panic!() };
        assert_eq!(allowed.request_edits.len(), 1);
        assert_eq!(
            (allowed.request_edits[0].name.as_str(), allowed.request_edits[0].action),
            ("x-result", Action::Overwrite)
        );
        assert_eq!(
            allowed.response_headers.len(),
            1,
            "only headersToDownstreamOnAllow: {:?}",
            allowed.response_headers
        );

        // Denied: its status and body; without headersToDownstreamOnDeny, every header but Host.
        let answer = headers(&[("www-authenticate", "Basic"), ("host", "authz"), ("x-why", "nope")]);
        let Verdict::Deny { status, headers: h, body, .. } =
            http_verdict(&p, StatusCode::UNAUTHORIZED, &answer, Bytes::from_static(b"no"))
        else {
            panic!()
        };
        assert_eq!((status, body.as_ref()), (StatusCode::UNAUTHORIZED, b"no".as_ref()));
        let names: Vec<&str> = h.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["www-authenticate", "x-why"]);
        // With it: those, and WWW-Authenticate and Location always.
        let listed = api::ExtAuthz { headers_to_downstream_on_deny: vec!["x-why".into()], ..p.clone() };
        let answer = headers(&[("www-authenticate", "Basic"), ("x-why", "nope"), ("x-internal", "1")]);
        let Verdict::Deny { headers: h, .. } = http_verdict(&listed, StatusCode::FORBIDDEN, &answer, Bytes::new())
        else {
            panic!()
        };
        let names: Vec<&str> = h.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["www-authenticate", "x-why"]);
        // A 5xx from the authorizer is its answer too (Envoy: any status but 200 denies).
        assert!(matches!(
            http_verdict(&p, StatusCode::BAD_GATEWAY, &HeaderMap::new(), Bytes::new()),
            Verdict::Deny { status: StatusCode::BAD_GATEWAY, .. }
        ));
    }

    fn option(key: &str, value: &str, append: Option<bool>, action: i32) -> pb::HeaderValueOption {
        pb::HeaderValueOption {
            header: Some(pb::HeaderValue { key: key.into(), value: value.into(), ..Default::default() }),
            append: append.map(|value| pb::BoolValue { value }),
            append_action: action,
            ..Default::default()
        }
    }

    #[test]
    fn grpc_answers_and_header_actions() {
        use pb::header_value_option::HeaderAppendAction as A;
        let ok = pb::CheckResponse {
            status: Some(pb::RpcStatus { code: 0, message: String::new() }),
            http_response: Some(pb::check_response::HttpResponse::OkResponse(pb::OkHttpResponse {
                headers: vec![
                    option("x-set", "new", None, 0),
                    option("x-appended", "2", Some(true), 0),
                    option("x-absent", "a", None, A::AddIfAbsent as i32),
                    option("x-kept", "b", None, A::AddIfAbsent as i32),
                    option("x-only-if", "c", None, A::OverwriteIfExists as i32),
                    option("x-missing", "d", None, A::OverwriteIfExists as i32),
                ],
                headers_to_remove: vec!["x-secret".into(), "host".into()],
                response_headers_to_add: vec![option("x-to-client", "1", None, 0)],
            })),
        };
        let Verdict::Allow(allowed) = grpc_verdict(ok) else { panic!() };
        let mut h = headers(&[
            ("host", "web"),
            ("x-set", "old"),
            ("x-appended", "1"),
            ("x-kept", "mine"),
            ("x-only-if", "old"),
            ("x-secret", "s"),
        ]);
        allowed.edit_request(&mut h);
        let all = |name: &str| h.get_all(name).iter().map(|v| v.to_str().unwrap().to_owned()).collect::<Vec<_>>();
        assert_eq!(all("x-set"), ["new"]);
        assert_eq!(all("x-appended"), ["1", "2"]);
        assert_eq!(all("x-absent"), ["a"]);
        assert_eq!(all("x-kept"), ["mine"]);
        assert_eq!(all("x-only-if"), ["c"]);
        assert!(all("x-missing").is_empty() && all("x-secret").is_empty());
        assert_eq!(all("host"), ["web"], "the authorizer cannot remove Host");
        assert_eq!(allowed.response_headers.len(), 1);

        // Denied: its HTTP status (403 when it sets none), headers and body.
        let denied = |status: Option<u32>| pb::CheckResponse {
            status: Some(pb::RpcStatus { code: 7, message: "no".into() }),
            http_response: Some(pb::check_response::HttpResponse::DeniedResponse(pb::DeniedHttpResponse {
                status: status.map(|code| pb::HttpStatus { code }),
                headers: vec![option("x-why", "policy", None, 0)],
                body: "denied".into(),
            })),
        };
        let Verdict::Deny { status, headers: h, body, .. } = grpc_verdict(denied(Some(401))) else { panic!() };
        assert_eq!((status, h.len(), body.as_ref()), (StatusCode::UNAUTHORIZED, 1, b"denied".as_ref()));
        assert!(matches!(grpc_verdict(denied(None)), Verdict::Deny { status: StatusCode::FORBIDDEN, .. }));
        // A non-OK status without any HTTP response denies with 403.
        let bare =
            pb::CheckResponse { status: Some(pb::RpcStatus { code: 16, message: String::new() }), http_response: None };
        assert!(matches!(grpc_verdict(bare), Verdict::Deny { status: StatusCode::FORBIDDEN, .. }));
        // No status at all is OK (proto3's default).
        assert!(matches!(grpc_verdict(pb::CheckResponse::default()), Verdict::Allow(_)));
    }

    #[test]
    fn errors_fail_closed_unless_fail_open() {
        let closed = provider();
        assert!(matches!(on_error(&closed, "refused"), Verdict::Deny { status: StatusCode::FORBIDDEN, .. }));
        let status = api::ExtAuthz { status_on_error: 503, ..provider() };
        assert!(matches!(on_error(&status, "refused"), Verdict::Deny { status: StatusCode::SERVICE_UNAVAILABLE, .. }));
        let open = api::ExtAuthz { fail_open: true, ..provider() };
        assert_eq!(on_error(&open, "refused"), Verdict::Allow(Allowed::default()));
    }
}
