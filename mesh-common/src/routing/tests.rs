use super::*;

fn vm(kind: Kind) -> Option<api::ValueMatch> {
    Some(api::ValueMatch { kind: Some(kind), invert: false })
}

fn named(name: &str, kind: Kind, invert: bool) -> api::NamedMatch {
    api::NamedMatch { name: name.into(), value: Some(api::ValueMatch { kind: Some(kind), invert }) }
}

fn backend(service: &str, weight: u32) -> api::WeightedBackend {
    api::WeightedBackend { namespace: "shop".into(), service: service.into(), weight, ..Default::default() }
}

fn routes() -> CompiledRoutes {
    let route = |name: &str, matches: Vec<api::HttpMatch>, backends| api::HttpRoute {
        name: name.into(),
        matches,
        backends,
        ..Default::default()
    };
    CompiledRoutes::from_wire(&api::HttpRoutes {
        namespace: "shop".into(),
        service: "reviews".into(),
        routes: vec![
            route(
                "jason",
                vec![api::HttpMatch {
                    headers: vec![named("end-user", Kind::Exact("jason".into()), false)],
                    ..Default::default()
                }],
                vec![backend("v2", 1)],
            ),
            route(
                "api",
                vec![
                    api::HttpMatch {
                        path: vm(Kind::PathPrefix("/api".into())),
                        method: vm(Kind::Exact("GET".into())),
                        ..Default::default()
                    },
                    api::HttpMatch { path: vm(Kind::Regex("/v[0-9]+/items".into())), ..Default::default() },
                ],
                vec![backend("api", 1)],
            ),
            route(
                "query",
                vec![api::HttpMatch {
                    query: vec![named("debug", Kind::Present(true), false)],
                    headers: vec![named("x-skip", Kind::Present(true), true)],
                    ..Default::default()
                }],
                vec![backend("debug", 1)],
            ),
            route("split", vec![], vec![backend("v1", 90), backend("v3", 10)]),
        ],
    })
    .unwrap()
}

#[test]
fn first_matching_route_wins() {
    let r = routes();
    // (method, path, headers, the route that takes it)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("GET", "/", &[("end-user", "jason")], "jason"),
        ("GET", "/", &[("End-User", "jason")], "jason"),
        ("GET", "/", &[("end-user", "jasonx")], "split"),
        ("GET", "/api", &[], "api"),
        ("GET", "/api/x?y=1", &[], "api"),
        ("GET", "/apix", &[], "split"),
        ("POST", "/api/x", &[], "split"),
        ("POST", "/v12/items", &[], "api"),
        ("POST", "/v12/items/1", &[], "split"),
        ("GET", "/?debug", &[], "query"),
        ("GET", "/?a=1&debug=yes", &[], "query"),
        ("GET", "/?debug=1", &[("x-skip", "")], "split"),
        ("GET", "/?debugger=1", &[], "split"),
    ];
    for (method, path, headers, want) in cases {
        let req = RequestFacts { method, path, authority: "reviews", port: 9080, headers: *headers };
        assert_eq!(r.select(&req).map(|r| r.wire.name.as_str()), Some(*want), "{method} {path} {headers:?}");
    }
}

#[test]
fn explain_says_why_each_route_was_passed_over() {
    let r = routes();
    let headers: &[(&str, &str)] = &[];
    let req = RequestFacts { method: "POST", path: "/api/x", authority: "reviews", port: 80, headers };
    let tried = r.explain(&req);
    let names: Vec<&str> = tried.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["jason", "api", "query", "split"]);
    assert_eq!(tried[0].1, Err(Mismatch("header end-user = \"jason\" (got nothing)".into())));
    let api = tried[1].1.as_ref().unwrap_err().0.clone();
    assert!(api.contains("method = \"GET\" (got \"POST\")") && api.contains("; or path ~"), "{api}");
    assert!(tried[3].1.is_ok());
}

#[test]
fn weights_split_rolls_in_proportion() {
    let r = routes();
    let split = &r.routes[3];
    let mut counts = std::collections::BTreeMap::new();
    for i in 0..1000u64 {
        let roll = (i * (u64::from(u32::MAX) + 1)).div_ceil(1000) as u32; // evenly spread over u32
        *counts.entry(split.backend(roll).unwrap().0.service.clone()).or_insert(0) += 1;
    }
    assert_eq!(counts.into_iter().collect::<Vec<_>>(), [("v1".to_string(), 900), ("v3".to_string(), 100)]);
    assert_eq!(split.backend(u32::MAX).unwrap(), (&backend("v3", 10), "shop/v3"));
    let none = CompiledRoutes::from_wire(&api::HttpRoutes {
        routes: vec![api::HttpRoute { backends: vec![backend("x", 0)], ..Default::default() }],
        ..Default::default()
    })
    .unwrap();
    assert!(none.routes[0].backend(7).is_none(), "all weights zero: no backend");
}

#[test]
fn bad_regex_is_an_error_naming_the_route() {
    let err = CompiledRoutes::from_wire(&api::HttpRoutes {
        routes: vec![api::HttpRoute {
            name: "r".into(),
            matches: vec![api::HttpMatch { path: vm(Kind::Regex("(".into())), ..Default::default() }],
            ..Default::default()
        }],
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.starts_with("r: regex \"(\""), "{err}");
}

#[test]
fn rewrites() {
    for (path, prefix_matched, full, prefix, want) in [
        ("/api/v1/x?q=1", Some("/api"), "", "/backend", "/backend/v1/x?q=1"),
        ("/api", Some("/api"), "", "/", "/"),
        ("/api/x", Some("/api"), "", "/", "/x"),
        ("/api/x", Some("/api"), "/fixed", "", "/fixed"),
        ("/api/x", None, "", "/b", "/api/x"),
    ] {
        assert_eq!(rewrite_path(path, prefix_matched, full, prefix), want, "{path}");
    }
}

#[test]
fn header_edits_remove_then_set_then_add() {
    let ops = api::HeaderOps {
        set: [("x-b".to_string(), "1".to_string())].into(),
        add: [("x-a".to_string(), "2".to_string())].into(),
        remove: vec!["x-c".into()],
    };
    let edits: Vec<HeaderEdit<'_>> = edit_headers(&ops).collect();
    assert_eq!(edits, [HeaderEdit::Remove("x-c"), HeaderEdit::Set("x-b", "1"), HeaderEdit::Add("x-a", "2")]);
}
