//! Timeline rendering to SVG: one row per rank, one box per computation, coloured by kind
//! (F blue, B green, I light green, W orange) and labelled with the micro-batch (and the stage
//! when a rank holds several).

use std::fmt::Write;

use crate::action::{Op, Plan};
use crate::simulate::Simulation;

fn colour(op: Op) -> &'static str {
    match op {
        Op::F => "#4C78A8",
        Op::B => "#54A24B",
        Op::I => "#88D27A",
        Op::W => "#F58518",
        _ => "#BBBBBB",
    }
}

/// An SVG document of the simulated timeline of `plan`, with `title` on top.
pub fn render_svg(plan: &Plan, sim: &Simulation, title: &str) -> String {
    let (left, top, row_h, unit) = (70.0, 40.0, 34.0, 28.0);
    let width = left + sim.makespan * unit + 20.0;
    let height = top + row_h * sim.timeline.len() as f64 + 30.0;
    let multi = plan.shape.virtual_stages > 1;
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="monospace" font-size="11">"#);
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="10" y="20" font-size="14">{}</text>"#, escape(title));
    for (r, slots) in sim.timeline.iter().enumerate() {
        let y = top + r as f64 * row_h;
        let _ = writeln!(s, r#"<text x="10" y="{:.1}">rank {r}</text>"#, y + row_h / 2.0 + 4.0);
        let _ = writeln!(s, r##"<rect x="{left}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="#F4F4F4"/>"##, sim.makespan * unit, row_h - 6.0);
        for slot in slots {
            let x = left + slot.start * unit;
            let w = (slot.end - slot.start) * unit;
            let a = slot.action;
            let label = if multi { format!("{}{}", a.mb, ["", "'", "\"", "*"][(a.stage / plan.shape.ranks).min(3)]) } else { a.mb.to_string() };
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{}" stroke="white"><title>{a}</title></rect>"#,
                row_h - 6.0,
                colour(a.op)
            );
            let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" fill="white" text-anchor="middle">{label}</text>"#, x + w / 2.0, y + row_h / 2.0 + 1.0);
        }
    }
    let y = top + row_h * sim.timeline.len() as f64 + 16.0;
    let legend = "F forward  B backward  I input-grad  W weight-grad";
    let _ = writeln!(s, r#"<text x="{left}" y="{y:.1}">{legend}; bubble {:.1}%</text>"#, 100.0 * sim.bubble_fraction);
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
