//! Propagation and sampling, by the headers a hop sends on.
use bytes::Bytes;

use super::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    pairs.iter().map(|(k, v)| (http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap())).collect()
}

/// The headers the CLIENT span sends upstream, for a request that came with `incoming`.
fn hop(percentage: f64, incoming: &[(&str, &str)]) -> HeaderMap {
    let tracing = api::Tracing { sampling_percentage: percentage, ..Default::default() };
    let mut h = headers(incoming);
    let start = Start {
        service: "web.default.svc.cluster.local",
        port: 80,
        method: "GET",
        authority: "web",
        path: "/",
        protocol: "HTTP/1.1",
        request_id: "r1",
        peer_addr: "10.0.0.1:5000".parse().unwrap(),
        source_principal: None,
        connection_id: None,
    };
    let mut t = RequestTrace::start(unreported(percentage), &tracing, &h, start);
    t.start_client(&mut h, "GET", || ("outbound|80||web.default.svc.cluster.local".into(), "http://web/".into()));
    t.end(End {
        status: 200,
        response_flags: "-",
        request_size: 0,
        response_size: 0,
        upstream_address: None,
        destination_principal: None,
    });
    h
}

fn get<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).map_or("", |v| v.to_str().unwrap())
}

/// (trace id, span id, sampled) of each format the hop sent.
fn sent(h: &HeaderMap) -> [(String, String, bool); 3] {
    let w3c: Vec<&str> = get(h, "traceparent").split('-').collect();
    let single: Vec<&str> = get(h, "b3").split('-').collect();
    [
        (w3c[1].into(), w3c[2].into(), w3c[3] == "01"),
        (single[0].into(), single[1].into(), single[2] == "1"),
        (get(h, "x-b3-traceid").into(), get(h, "x-b3-spanid").into(), get(h, "x-b3-sampled") == "1"),
    ]
}

/// What a caller sent, and whether it sampled.
type Caller<'a> = (&'a str, &'a [(&'a str, &'a str)], bool);

#[test]
fn every_format_continues_the_callers_trace() {
    let cases: &[Caller] = &[
        ("W3C, sampled", &[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")], true),
        ("W3C, not sampled", &[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")], false),
        (
            "B3 multi",
            &[
                ("x-b3-traceid", TRACE),
                ("x-b3-spanid", SPAN),
                ("x-b3-parentspanid", "1111111111111111"),
                ("x-b3-sampled", "1"),
            ],
            true,
        ),
        ("B3 single", &[("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1")], true),
        ("B3 single, not sampled", &[("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0")], false),
    ];
    // The caller's decision holds whatever the percentage.
    for percentage in [0.0, 100.0] {
        for (what, incoming, sampled) in cases {
            let h = hop(percentage, incoming);
            for (format, (trace, span, s)) in ["traceparent", "b3", "x-b3-*"].iter().zip(sent(&h)) {
                assert_eq!(trace, TRACE, "{what} at {percentage}%: {format} keeps the trace");
                assert_ne!(span, SPAN, "{what}: {format} names this hop's span, not the caller's");
                assert_eq!(span.len(), 16, "{what}: {format}");
                assert_eq!(s, *sampled, "{what} at {percentage}%: {format} keeps the caller's decision");
            }
            assert!(h.get("x-b3-parentspanid").is_none(), "{what}: the caller's parent is not passed on");
        }
    }
}

#[test]
fn a_new_trace_is_sampled_by_percentage() {
    for (percentage, sampled) in [(0.0, 0), (100.0, 20)] {
        let mut traces = std::collections::HashSet::new();
        let mut count = 0;
        for _ in 0..20 {
            let h = hop(percentage, &[]);
            let [w3c, single, multi] = sent(&h);
            assert_eq!(w3c, single);
            assert_eq!(w3c, multi);
            count += usize::from(w3c.2);
            traces.insert(w3c.0);
        }
        assert_eq!(count, sampled, "{percentage}%");
        assert_eq!(traces.len(), 20, "each request without a trace begins its own");
    }
    // 50 %: by trace id, so about half.
    let sampled = (0..400).filter(|_| sent(&hop(50.0, &[]))[0].2).count();
    assert!((120..=280).contains(&sampled), "{sampled} of 400 at 50%");
}

#[test]
fn custom_tags_and_zipkin_service_name() {
    use api::custom_tag::Value;
    let h = headers(&[("x-user", "ana")]);
    let tag = |name: &str, value: Value, default: &str| api::CustomTag {
        name: name.into(),
        value: Some(value),
        default_value: default.into(),
    };
    let tags = [
        tag("cluster", Value::Literal("east".into()), ""),
        tag("user", Value::Header("x-user".into()), ""),
        tag("tenant", Value::Header("x-tenant".into()), "none"),
        tag("absent", Value::Header("x-tenant".into()), ""),
        tag("home", Value::Environment("MESH_TEST_SURELY_UNSET".into()), "unset"),
    ];
    let got: Vec<String> =
        tags.iter().filter_map(|t| custom_tag(t, &h)).map(|kv| format!("{}={}", kv.key, kv.value)).collect();
    assert_eq!(got, ["cluster=east", "user=ana", "tenant=none", "home=unset"]);

    let body = Bytes::from(
        r#"[{"id":"a","parentId":"0000000000000000","localEndpoint":{"ipv4":"10.0.0.1"}},{"id":"b","parentId":"00f067aa0ba902b7"}]"#,
    );
    let v: serde_json::Value = serde_json::from_slice(&export::mend_zipkin(body, "waypoint.default")).unwrap();
    assert_eq!(v[0]["localEndpoint"]["serviceName"], "waypoint.default");
    assert_eq!(v[0]["localEndpoint"]["ipv4"], "10.0.0.1");
    assert!(v[0].get("parentId").is_none(), "a root span has no parent");
    assert_eq!(v[1]["localEndpoint"]["serviceName"], "waypoint.default");
    assert_eq!(v[1]["parentId"], SPAN);
}

#[test]
fn a_long_url_tag_is_cut_as_envoy_cuts_it() {
    // Envoy's default, or the provider's maxTagLength.
    let short = "http://web/".to_owned();
    assert_eq!(url_tag(short.clone(), MAX_PATH_TAG_LENGTH), short);
    let long = format!("http://web/?q={}", "a".repeat(400));
    assert_eq!(url_tag(long.clone(), MAX_PATH_TAG_LENGTH), long[..MAX_PATH_TAG_LENGTH]);
    assert_eq!(url_tag(long.clone(), 20), long[..20], "a provider's maxTagLength");
    // Never inside a character.
    let wide = format!("http://web/{}", "é".repeat(200));
    let cut = url_tag(wide, MAX_PATH_TAG_LENGTH);
    assert!(cut.len() <= MAX_PATH_TAG_LENGTH && cut.len() >= MAX_PATH_TAG_LENGTH - 1, "{}", cut.len());
}
