//! Prints bubble and activation-memory tables for pipeline schedules and renders one as SVG.
//!
//! ```text
//! cargo run -p burn-parallel-schedules --example schedule_table -- [--pp 4] [--mb 8] [--vs 2]
//!     [--schedule NAME|all] [--f 1] [--b 2] [--w 1] [--comm 0] [--grid] [--svg FILE.svg]
//! ```
//! `--w` is the weight-gradient share of `--b` used by split-backward schedules (I = b − w).

use burn_parallel_schedules::*;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: schedule_table [--pp P] [--mb M] [--vs V] [--schedule NAME|all] [--f F] [--b B] [--w W] [--comm C] [--grid] [--svg FILE]");
        println!("schedules: {}", SCHEDULE_NAMES.join(", "));
        return;
    }
    let (p, m, v) = (arg(&args, "--pp", 4usize), arg(&args, "--mb", 8usize), arg(&args, "--vs", 2usize));
    let (f, b, w, comm) = (arg(&args, "--f", 1.0), arg(&args, "--b", 2.0), arg(&args, "--w", 1.0), arg(&args, "--comm", 0.0));
    let costs = Costs { forward: f, backward: b, backward_input: b - w, backward_weight: w, comm };
    let which: String = arg(&args, "--schedule", "all".to_string());
    let names: Vec<&str> = if which == "all" { SCHEDULE_NAMES.to_vec() } else { vec![which.as_str()] };
    println!("pp={p} micro-batches={m} (interleaved: {v} chunks/rank), costs F={f} B={b} (I={} W={w}) comm={comm}\n", b - w);
    println!("| schedule | makespan | bubble | theory | peak in-flight per rank | makespan, NCCL rendezvous |");
    println!("|---|---|---|---|---|---|");
    let mut last = None;
    for name in &names {
        let vs = if *name == "interleaved-1f1b" { v } else { 1 };
        let result = schedule_by_name(name).and_then(|s| s.plan(&PipelineShape::new(p, vs, m))).and_then(|plan| simulate(&plan, &costs).map(|s| (plan, s)));
        match result {
            Ok((plan, sim)) => {
                let theory = match *name {
                    "interleaved-1f1b" => format!("{:.1}%", 100.0 * (p - 1) as f64 / (vs * m + p - 1) as f64),
                    "gpipe" | "1f1b" => format!("{:.1}%", 100.0 * (p - 1) as f64 / (m + p - 1) as f64),
                    _ => "-".into(),
                };
                let rdv = rendezvous_makespan(&plan, &costs).map_or("deadlock".into(), |t| format!("{t:.1}"));
                println!("| {name} | {:.1} | {:.1}% | {theory} | {:?} | {rdv} |", sim.makespan, 100.0 * sim.bubble_fraction, sim.peak_in_flight);
                last = Some((name.to_string(), plan, sim));
            }
            Err(e) => println!("| {name} | error: {e} | | | | |"),
        }
    }
    let Some((name, plan, sim)) = last else { return };
    if args.iter().any(|a| a == "--grid") {
        println!("\n{name}:\n{}", render_grid(&plan, &sim, costs.forward.min(costs.backward_weight).max(0.5)));
    }
    if let Some(path) = args.iter().position(|a| a == "--svg").and_then(|i| args.get(i + 1)) {
        let svg = render_svg(&plan, &sim, &format!("{name}: pp={p} micro-batches={m}"));
        std::fs::write(path, svg).unwrap_or_else(|e| panic!("writing {path}: {e}"));
        println!("wrote {path} ({name})");
    }
}
