//! The live service graph of the quickstart's mesh, as a person sees it:
//! the controller's `/graph` page loaded in headless Chromium (Debian's
//! package) while the demo's traffic runs and the tester keeps being
//! refused by redis; its DOM must name every service and workload of the
//! demo's path and show each edge with a rate, the denial marked; and a
//! screenshot is taken. `mesh-ctl graph` must draw the same graph as SVG
//! (and PNG and DOT).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{Pod, Proc};
use serde_json::Value;

use super::{ctl, text};

const PAGE: &str = "http://127.0.0.1:15014/graph?window=10s";
const FRONTEND: &str = "frontend.demo.svc.cluster.local";
const BACKEND: &str = "backend.demo.svc.cluster.local";
const REDIS: &str = "redis.demo.svc.cluster.local";

/// The edges the demo's path must show (labels as the page writes them),
/// and whether the rate that shows is requests (else bytes).
const EDGES: &[(&str, &str, bool)] = &[
    ("tester.demo", FRONTEND, false),
    (FRONTEND, "frontend.demo", false),
    ("frontend.demo", BACKEND, true),
    ("backend-1.demo", REDIS, false),
    (REDIS, "redis.demo", false),
];

/// The frontend's traffic, and the tester trying redis (which a policy
/// refuses it) every half second.
fn traffic(tester: &Pod) -> [Proc; 2] {
    let log = Path::new("/dev/null");
    let web = "while true; do curl -s -o /dev/null -m 5 http://10.96.0.30/; sleep 0.1; done";
    let refused = "while true; do timeout 3 redis-cli -h 10.96.0.20 ping; sleep 0.5; done";
    [
        Proc::spawn_in("traffic", &tester.netns, &["sh", "-c", web], log),
        Proc::spawn_in("refused", &tester.netns, &["sh", "-c", refused], log),
    ]
}

/// `<tag ...>` elements of serialized HTML carrying `class` `class`: their attributes.
fn elements(html: &str, tag: &str, class: &str) -> Vec<BTreeMap<String, String>> {
    let open = format!("<{tag} ");
    html.split(&open)
        .skip(1)
        .filter_map(|rest| {
            let tag_text = rest.split('>').next()?;
            let mut attrs = BTreeMap::new();
            for part in tag_text.split("\" ") {
                if let Some((k, v)) = part.split_once("=\"") {
                    attrs.insert(k.trim().to_owned(), v.trim_end_matches('"').replace("&quot;", "\""));
                }
            }
            attrs.get("class").is_some_and(|c| c.split(' ').any(|c| c == class)).then_some(attrs)
        })
        .collect()
}

fn chromium(args: &[&str]) -> std::process::Output {
    Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=8000"])
        .args(args)
        .output()
        .expect("running chromium (Debian's package; cargo xtask test installs it)")
}

/// The page's DOM once it has loaded a graph with every expected edge.
fn page_with_every_edge() -> String {
    let deadline = Instant::now() + mesh_tests::patience(Duration::from_secs(90));
    loop {
        let out = chromium(&["--dump-dom", PAGE]);
        let dom = String::from_utf8_lossy(&out.stdout).into_owned();
        let missing = missing_from_page(&dom);
        if missing.is_empty() {
            return dom;
        }
        assert!(Instant::now() < deadline, "the /graph page lacks {missing:?}:\n{dom}");
        thread::sleep(Duration::from_secs(3));
    }
}

/// What the page does not show yet.
fn missing_from_page(dom: &str) -> Vec<String> {
    let mut missing = Vec::new();
    if !dom.contains("data-loaded=\"true\"") {
        missing.push("a loaded graph".into());
    }
    let vertices: Vec<String> =
        elements(dom, "li", "vertex").into_iter().filter_map(|a| a.get("data-label").cloned()).collect();
    for v in EDGES.iter().flat_map(|(a, b, _)| [a, b]) {
        if !vertices.iter().any(|x| x == v) {
            missing.push(format!("vertex {v}"));
        }
    }
    let edges = elements(dom, "tr", "edge");
    let rate = |e: &BTreeMap<String, String>, key: &str| e.get(key).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    for (from, to, http) in EDGES {
        let shown = edges.iter().any(|e| {
            e.get("data-from").map(String::as_str) == Some(from)
                && e.get("data-to").map(String::as_str) == Some(to)
                && e.get("data-mtls").map(String::as_str) == Some("true")
                && if *http { rate(e, "data-rps") > 0.0 } else { rate(e, "data-bytes-per-second") > 0.0 }
        });
        if !shown {
            missing.push(format!("edge {from} -> {to} with a rate, mTLS"));
        }
    }
    // The refused connections: on the tester's edge to redis (the service,
    // or the workload where the server's node counts it), marked.
    let denied = edges.iter().any(|e| {
        e.get("data-from").map(String::as_str) == Some("tester.demo")
            && e.get("data-to").is_some_and(|t| t.starts_with("redis."))
            && rate(e, "data-denied") > 0.0
            && e.get("class").is_some_and(|c| c.contains("denied"))
    });
    if !denied {
        missing.push("the tester's denied edge to redis, marked".into());
    }
    missing
}

/// Where the screenshot is kept for a person to look at.
fn screenshot_path() -> PathBuf {
    let dir =
        PathBuf::from(std::env::var("MESH_TEST_ARTIFACTS").unwrap_or_else(|_| "/var/tmp/mesh-test-artifacts".into()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join("quickstart-graph.png")
}

pub fn live_graph_page_and_mesh_ctl_graph(tester: &Pod) {
    let _traffic = traffic(tester);
    let dom = page_with_every_edge();
    let rows = elements(&dom, "tr", "edge").len();

    let shot = screenshot_path();
    let _ = std::fs::remove_file(&shot);
    let out = chromium(&["--window-size=1400,1100", &format!("--screenshot={}", shot.display()), PAGE]);
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot ({e}): {}", text(&out)));
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "a screenshot of the page: {} bytes", png.len());

    // mesh-ctl graph: the same edges as a table, SVG, PNG and DOT.
    let out = ctl(&["graph", "--window", "10s", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let graph: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let label = |v: &Value| match v["kind"].as_str() {
        Some("workload") => format!("{}.{}", v["name"].as_str().unwrap(), v["namespace"].as_str().unwrap()),
        Some("service") => v["host"].as_str().unwrap().to_owned(),
        _ => "unknown".into(),
    };
    let edges: Vec<(String, String)> =
        graph["edges"].as_array().expect("edges").iter().map(|e| (label(&e["from"]), label(&e["to"]))).collect();
    for (from, to, _) in EDGES {
        assert!(edges.contains(&(from.to_string(), to.to_string())), "mesh-ctl graph: no {from} -> {to} in {edges:?}");
    }
    let table = ctl(&["graph", "--window", "10s"]);
    assert!(text(&table).contains("frontend.demo") && text(&table).contains("DENIED"), "{}", text(&table));

    let svg = ctl(&["graph", "--window", "10s", "-o", "svg"]);
    assert!(svg.status.success(), "{}", text(&svg));
    let svg = String::from_utf8(svg.stdout).expect("SVG is text");
    let body =
        svg.trim_start().strip_prefix("<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"no\"?>").unwrap_or(&svg);
    assert!(body.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "an SVG document:\n{svg}");
    assert_eq!(svg.matches("<svg").count(), 1, "one document");
    for v in EDGES.iter().flat_map(|(a, b, _)| [a, b]) {
        assert!(svg.contains(&format!(">{v}<")), "the SVG draws {v}");
    }
    assert!(svg.contains("denied"), "the SVG labels the denial");

    let file = std::env::temp_dir().join(format!("mesh-graph-{}.png", std::process::id()));
    let png = ctl(&["graph", "--window", "10s", "-o", "png", "--file", file.to_str().unwrap()]);
    assert!(png.status.success(), "{}", text(&png));
    let bytes = std::fs::read(&file).expect("the PNG written");
    let _ = std::fs::remove_file(&file);
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 5_000, "a drawn PNG: {} bytes", bytes.len());
    let dot = ctl(&["graph", "--window", "10s", "-o", "dot"]);
    assert!(text(&dot).starts_with("digraph mesh {") && text(&dot).contains("style=\"dashed\""), "{}", text(&dot));
    let refused = ctl(&["status", "-o", "svg"]);
    assert_eq!(refused.status.code(), Some(2), "-o svg is for graph only: {}", text(&refused));

    eprintln!("/graph in Chromium: {rows} edges with rates, the denial marked; screenshot {}", shot.display());
}
