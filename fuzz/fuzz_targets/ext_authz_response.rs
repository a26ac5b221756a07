//! The waypoint's reading of an external authorizer's answer: a gRPC
//! `CheckResponse` (protobuf) and an HTTP answer (status, headers, body),
//! each turned into a verdict and its header edits.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mesh_common::{api, ext_authz as pb};
use prost::Message as _;

fuzz_target!(
    init: {
        mesh_fuzz::write_seeds_if_asked(|| {
            let header = |k: &str, v: &str| pb::HeaderValueOption {
                header: Some(pb::HeaderValue { key: k.into(), value: v.into(), ..Default::default() }),
                ..Default::default()
            };
            let ok = pb::CheckResponse {
                status: Some(pb::RpcStatus { code: 0, ..Default::default() }),
                http_response: Some(pb::check_response::HttpResponse::OkResponse(pb::OkHttpResponse {
                    headers: vec![header("x-user", "jason")],
                    headers_to_remove: vec!["authorization".into()],
                    ..Default::default()
                })),
                ..Default::default()
            };
            let denied = pb::CheckResponse {
                status: Some(pb::RpcStatus { code: 7, ..Default::default() }),
                http_response: Some(pb::check_response::HttpResponse::DeniedResponse(pb::DeniedHttpResponse {
                    headers: vec![header("x-reason", "no")],
                    body: "denied".into(),
                    ..Default::default()
                })),
                ..Default::default()
            };
            vec![ok.encode_to_vec(), denied.encode_to_vec()]
        });
    },
    |data: &[u8]| {
        if let Ok(response) = pb::CheckResponse::decode(data) {
            let _ = mesh_waypoint::ext_authz::grpc_verdict(response);
        }
        // The same bytes as an HTTP answer: a status, then header lines, then the body.
        let provider = api::ExtAuthz {
            headers_to_downstream_on_deny: vec!["x-*".into()],
            headers_to_upstream_on_allow: vec!["x-user".into()],
            ..Default::default()
        };
        let text = String::from_utf8_lossy(data);
        let mut lines = text.split('\n');
        let status = lines.next().and_then(|s| s.trim().parse::<u16>().ok()).unwrap_or(200);
        let Ok(status) = http::StatusCode::from_u16(status) else { return };
        let mut headers = http::HeaderMap::new();
        for line in lines.by_ref().take_while(|l| !l.trim().is_empty()) {
            if let Some((k, v)) = line.split_once(':')
                && let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.trim().as_bytes()), http::HeaderValue::from_str(v.trim()))
            {
                headers.append(k, v);
            }
        }
        let body: Vec<&str> = lines.collect();
        let _ = mesh_waypoint::ext_authz::http_verdict(&provider, status, &headers, Bytes::from(body.join("\n")));
    }
);
