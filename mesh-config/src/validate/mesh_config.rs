//! What Istio rejects in the `MeshConfig` of its ConfigMap: YAML that does
//! not parse, extension providers without a name (or with one twice),
//! with no provider or more than one, and external authorizers without a
//! service and port, with a bad timeout, error status or header pattern.
use mesh_common::parse_duration;

use super::{Issues, jwt::is_header_name, valid_segment, valid_subdomain};
use crate::{
    objects::{
        IntOrString,
        mesh_config::{ConfigMap, ExtAuthzBody, ExtensionProvider, MESH_CONFIG_KEY},
    },
    parse::strip_location,
};

pub(super) fn check_config_map(cm: &ConfigMap, out: &mut Issues) {
    let at = format!("data.{MESH_CONFIG_KEY}");
    let config = match cm.mesh_config() {
        None => return,
        Some(Err((path, message))) => {
            let field = if path.is_empty() { at } else { format!("{at}.{path}") };
            out.push((field, strip_location(&message)));
            return;
        }
        Some(Ok(c)) => c,
    };
    let mut names = std::collections::BTreeSet::new();
    for (i, p) in config.extension_providers.iter().enumerate() {
        let at = format!("{at}.extensionProviders[{i}]");
        if p.name.is_empty() {
            out.push((format!("{at}.name"), "is required".into()));
        } else if !names.insert(p.name.as_str()) {
            out.push((format!("{at}.name"), format!("{:?} names another provider too: names must be unique", p.name)));
        }
        check_provider(p, &at, out);
    }
}

fn check_provider(p: &ExtensionProvider, at: &str, out: &mut Issues) {
    match p.kinds().as_slice() {
        [] => out.push((
            at.to_owned(),
            "sets no provider (envoyExtAuthzHttp, envoyExtAuthzGrpc, zipkin, opentelemetry, ...)".into(),
        )),
        [_] => {}
        more => out.push((at.to_owned(), format!("sets {}: a provider is exactly one of them", more.join(", ")))),
    }
    if let Some(h) = &p.envoy_ext_authz_http {
        let at = format!("{at}.envoyExtAuthzHttp");
        check_authorizer(&h.service, h.port.as_ref(), h.timeout.as_deref(), h.status_on_error.as_ref(), &at, out);
        if let Some(prefix) = &h.path_prefix
            && !prefix.is_empty()
            && !prefix.starts_with('/')
        {
            out.push((format!("{at}.pathPrefix"), format!("{prefix:?} must start with '/'")));
        }
        for (name, list) in [
            ("includeHeadersInCheck", &h.include_headers_in_check),
            ("includeRequestHeadersInCheck", &h.include_request_headers_in_check),
            ("headersToUpstreamOnAllow", &h.headers_to_upstream_on_allow),
            ("headersToDownstreamOnDeny", &h.headers_to_downstream_on_deny),
            ("headersToDownstreamOnAllow", &h.headers_to_downstream_on_allow),
        ] {
            for (j, pattern) in list.iter().enumerate() {
                let bare = pattern.strip_prefix('*').or_else(|| pattern.strip_suffix('*')).unwrap_or(pattern);
                if !is_header_name(bare) {
                    out.push((
                        format!("{at}.{name}[{j}]"),
                        format!("{pattern:?} is not a header name, prefix* or *suffix"),
                    ));
                }
            }
        }
        for name in h.include_additional_headers_in_check.keys() {
            if !is_header_name(name) {
                out.push((format!("{at}.includeAdditionalHeadersInCheck"), format!("{name:?} is not a header name")));
            }
        }
        check_body(h.include_request_body_in_check.as_ref(), &at, out);
    }
    if let Some(g) = &p.envoy_ext_authz_grpc {
        let at = format!("{at}.envoyExtAuthzGrpc");
        check_authorizer(&g.service, g.port.as_ref(), g.timeout.as_deref(), g.status_on_error.as_ref(), &at, out);
        check_body(g.include_request_body_in_check.as_ref(), &at, out);
    }
    for (kind, t) in [("zipkin", &p.zipkin), ("opentelemetry", &p.opentelemetry)] {
        let Some(t) = t else { continue };
        let at = format!("{at}.{kind}");
        let timeout = t.http.as_ref().and_then(|h| h.timeout.as_deref());
        check_authorizer(&t.service, t.port.as_ref(), timeout, None, &at, out);
    }
}

/// A service the proxies call: `[<namespace>/]<hostname>`, a port, a timeout, an error status.
fn check_authorizer(
    service: &str,
    port: Option<&IntOrString>,
    timeout: Option<&str>,
    status: Option<&IntOrString>,
    at: &str,
    out: &mut Issues,
) {
    // `[<namespace>/]<hostname>`.
    let (ns, host) = service.split_once('/').map_or((None, service), |(n, h)| (Some(n), h));
    if service.is_empty() {
        out.push((format!("{at}.service"), "is required".into()));
    } else if ns.is_some_and(|n| !valid_segment(n)) || !valid_subdomain(&host.to_ascii_lowercase()) {
        out.push((format!("{at}.service"), format!("{service:?}: expected [<namespace>/]<hostname>")));
    }
    match port.map(IntOrString::as_number) {
        None => out.push((format!("{at}.port"), "is required".into())),
        Some(Some(p)) if (1..=65535).contains(&p) => {}
        Some(_) => out.push((format!("{at}.port"), "must be a port number (1-65535)".into())),
    }
    if let Some(t) = timeout
        && let Err(e) = parse_duration(t)
    {
        out.push((format!("{at}.timeout"), e));
    }
    if let Some(s) = status
        && !s.as_number().is_some_and(|c| (100..=599).contains(&c))
    {
        out.push((format!("{at}.statusOnError"), "must be an HTTP status code (100-599)".into()));
    }
}

fn check_body(body: Option<&ExtAuthzBody>, at: &str, out: &mut Issues) {
    if let Some(b) = body
        && b.max_request_bytes.is_some_and(|m| !(0..=i64::from(u32::MAX)).contains(&m))
    {
        out.push((
            format!("{at}.includeRequestBodyInCheck.maxRequestBytes"),
            "must be between 0 and 4294967295".into(),
        ));
    }
}
