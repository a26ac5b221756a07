//! `mesh-ctl graph`: the controller's live service graph (`/graph.json`) as
//! a table, or drawn: Graphviz DOT, SVG (laid out by the same code as the
//! controller's `/graph` page) or PNG (that SVG rasterised by resvg).
use std::{io::Write as _, path::Path};

use mesh_common::graph::{ServiceGraph, Traffic};

use crate::{
    api::{Client, CtlError, Result},
    output::{Format, Report, Table},
};

pub struct Query<'a> {
    pub window: &'a str,
    pub namespace: Option<&'a str>,
}

/// The graph as the controller makes it now.
fn fetch(client: &Client, q: &Query) -> Result<ServiceGraph> {
    let mut path = format!("/graph.json?window={}", q.window);
    if let Some(ns) = q.namespace {
        path.push_str(&format!("&namespace={ns}"));
    }
    let value = client.controller(&path)?;
    serde_json::from_value(value).map_err(|e| CtlError::new(format!("the controller's /graph.json: {e}")))
}

/// The table (and `-o json|yaml`); or, for `-o dot|svg|png`, the drawing
/// written to `file` or standard output (then the report is empty).
pub fn graph(client: &Client, q: &Query, format: Format, file: Option<&Path>) -> Result<Report> {
    let g = fetch(client, q)?;
    let drawing = match format {
        Format::Dot => g.to_dot().into_bytes(),
        Format::Svg => svg(&g)?.into_bytes(),
        Format::Png => png(&svg(&g)?)?,
        Format::Table | Format::Json | Format::Yaml => return Ok(table(&g)),
    };
    match file {
        Some(path) => {
            std::fs::write(path, &drawing).map_err(|e| CtlError::new(format!("writing {}: {e}", path.display())))?
        }
        None => {
            let _ = std::io::stdout().lock().write_all(&drawing);
        }
    }
    Ok(Report::new(serde_json::Value::Null, String::new()))
}

fn svg(g: &ServiceGraph) -> Result<String> {
    g.to_svg().map_err(|e| CtlError::new(format!("laying the graph out: {e}")))
}

/// The SVG drawn at its own size, on white; text in the system's fonts.
fn png(svg: &str) -> Result<Vec<u8>> {
    let mut options = resvg::usvg::Options::default();
    let fonts = options.fontdb_mut();
    fonts.load_system_fonts();
    // layout-rs asks for "Times, serif": whatever serif face is there.
    if let Some(family) = ["Times New Roman", "DejaVu Serif", "Liberation Serif", "DejaVu Sans"]
        .into_iter()
        .find(|f| fonts.faces().any(|face| face.families.iter().any(|(name, _)| name == f)))
    {
        fonts.set_serif_family(family);
    }
    let tree =
        resvg::usvg::Tree::from_str(svg, &options).map_err(|e| CtlError::new(format!("reading the SVG: {e}")))?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| CtlError::new("the graph has no size to draw"))?;
    pixmap.fill(resvg::tiny_skia::Color::WHITE);
    resvg::render(&tree, resvg::tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(|e| CtlError::new(format!("encoding the PNG: {e}")))
}

fn table(g: &ServiceGraph) -> Report {
    let mut t = Table::new(&["FROM", "TO", "REQ/S", "ERRORS", "P99", "BYTES/S", "CONN/S", "MTLS", "DENIED"]);
    for ((from, to), e) in &g.edges {
        t.row(row(&from.label(), &to.label(), e));
    }
    let text = format!("{}over the last {:.0} s\n", t.render("no traffic in the window"), g.window_seconds);
    Report::new(g, text)
}

fn row(from: &str, to: &str, e: &Traffic) -> Vec<String> {
    let http = e.requests_per_second > 0.0;
    let or_dash = |show: bool, s: String| if show { s } else { "-".into() };
    vec![
        from.into(),
        to.into(),
        or_dash(http, format!("{:.1}", e.requests_per_second)),
        or_dash(http, format!("{:.1}%", e.error_ratio * 100.0)),
        e.p99_ms.map_or("-".into(), |p| format!("{p:.0}ms")),
        or_dash(e.bytes_per_second > 0.0, crate::output::human_bytes(e.bytes_per_second as u64)),
        or_dash(e.connections_per_second > 0.0, format!("{:.2}", e.connections_per_second)),
        if e.mtls { "yes" } else { "no" }.into(),
        or_dash(e.denied > 0, e.denied.to_string()),
    ]
}
