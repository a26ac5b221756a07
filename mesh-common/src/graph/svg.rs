//! The graph drawn as SVG. rust-sugiyama lays it out (Sugiyama's layered
//! method: cycles broken by a feedback arc set, ranks, crossing reduction,
//! Brandes-Köpf coordinates); this file only draws its result: a vertex's
//! shape and name at its place, an edge as an arrow with its summary.
use std::fmt::Write as _;

use rust_sugiyama::{configure::Config, from_vertices_and_edges};

use super::{ServiceGraph, Traffic, Vertex, summary};

const FONT: f64 = 13.0;
/// Roughly a character's width at [`FONT`] in a sans-serif face.
const CHAR: f64 = 7.4;
const BOX_HEIGHT: f64 = 32.0;
/// Room between ranks for the edges' labels, given to the layout as part of a vertex's height.
const LABEL_ROOM: f64 = 56.0;
const SPACING: f64 = 36.0;
const MARGIN: f64 = 20.0;

fn box_width(v: &Vertex) -> f64 {
    v.label().chars().count() as f64 * CHAR + 28.0
}

/// The drawing of a graph without edges.
const EMPTY: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"320\" height=\"40\" viewBox=\"0 0 320 40\">\
<text x=\"10\" y=\"25\" font-family=\"sans-serif\" font-size=\"14\">no traffic in the window</text></svg>\n";

pub fn draw(g: &ServiceGraph) -> String {
    let vertices = g.vertices();
    if vertices.is_empty() {
        return EMPTY.to_owned();
    }
    let index = |v: &Vertex| vertices.binary_search(&v).map(|i| i as u32).unwrap_or(0);
    let sizes: Vec<(u32, (f64, f64))> =
        vertices.iter().enumerate().map(|(i, v)| (i as u32, (box_width(v), BOX_HEIGHT + LABEL_ROOM))).collect();
    let edges: Vec<(u32, u32)> = g.edges.keys().filter(|(a, b)| a != b).map(|(a, b)| (index(a), index(b))).collect();
    let config = Config { vertex_spacing: SPACING, ..Config::default() };
    // Each connected part is laid out on its own: side by side.
    let mut at = vec![(0.0, 0.0); vertices.len()];
    let (mut left, mut height) = (MARGIN, 0.0f64);
    for (part, _, _) in from_vertices_and_edges(&sizes, &edges, &config) {
        let min_x = part.iter().map(|(i, (x, _))| x - box_width(vertices[*i]) / 2.0).fold(f64::MAX, f64::min);
        let mut right = left;
        for (i, (x, y)) in part {
            let (px, py) = (left + x - min_x, MARGIN + BOX_HEIGHT / 2.0 + y);
            at[i] = (px, py);
            right = f64::max(right, px + box_width(vertices[i]) / 2.0);
            height = height.max(py + BOX_HEIGHT / 2.0);
        }
        left = right + SPACING * 2.0;
    }
    let (width, height) = (left - SPACING * 2.0 + MARGIN, height + MARGIN);

    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"{FONT}\">\n\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"6\" \
         markerHeight=\"6\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" \
         fill=\"context-stroke\"/></marker></defs>\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for ((from, to), t) in &g.edges {
        edge(&mut out, at[index(from) as usize], at[index(to) as usize], t);
    }
    for (i, v) in vertices.iter().enumerate() {
        vertex(&mut out, v, at[i]);
    }
    out.push_str("</svg>\n");
    out
}

fn edge(out: &mut String, (x1, y1): (f64, f64), (x2, y2): (f64, f64), t: &Traffic) {
    // From the border of one box to the border of the other, down or up.
    let half = BOX_HEIGHT / 2.0;
    let (y1, y2) = match y2.total_cmp(&y1) {
        std::cmp::Ordering::Greater => (y1 + half, y2 - half),
        std::cmp::Ordering::Less => (y1 - half, y2 + half),
        std::cmp::Ordering::Equal => (y1, y2),
    };
    let (stroke, dash) = if t.denied > 0 { ("#c00", " stroke-dasharray=\"6 4\"") } else { ("#444", "") };
    let width = if t.mtls { 2.2 } else { 1.0 };
    let _ = writeln!(
        out,
        "<g class=\"edge\"><line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{stroke}\" \
         stroke-width=\"{width}\"{dash} marker-end=\"url(#arrow)\"/>"
    );
    let label = summary(t, false);
    if !label.is_empty() {
        let (mx, my) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
        let w = label.chars().count() as f64 * CHAR * 0.85 + 6.0;
        let _ = writeln!(
            out,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"16\" fill=\"white\" opacity=\"0.85\"/>\
             <text x=\"{mx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" fill=\"{stroke}\">{}</text>",
            mx - w / 2.0,
            my - 8.0,
            my + 4.0,
            xml(&label)
        );
    }
    out.push_str("</g>\n");
}

fn vertex(out: &mut String, v: &Vertex, (x, y): (f64, f64)) {
    let (w, h) = (box_width(v), BOX_HEIGHT);
    let shape = match v {
        // Services are boxes, workloads ellipses, as in Kiali's and Graphviz's habits.
        Vertex::Service { .. } => format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{h}\" rx=\"4\" fill=\"#eef4ff\" stroke=\"#36c\"/>",
            x - w / 2.0,
            y - h / 2.0
        ),
        _ => format!(
            "<ellipse cx=\"{x:.1}\" cy=\"{y:.1}\" rx=\"{:.1}\" ry=\"{:.1}\" fill=\"#f4fff0\" stroke=\"#393\"/>",
            w / 2.0,
            h / 2.0
        ),
    };
    let _ = writeln!(
        out,
        "<g class=\"vertex\">{shape}<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text></g>",
        y + FONT * 0.35,
        xml(&v.label())
    );
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
