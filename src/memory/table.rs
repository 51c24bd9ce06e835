//! The memory model's per-rank table.

use super::model::RankMemory;

/// A per-rank table (MB).
pub fn table(estimates: &[RankMemory]) -> String {
    let mb = |x: f64| x / 1e6;
    let mut s = String::from(
        "| pp rank | params | grads | optimizer | activations (in flight) | transient | optimizer step | peak |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in estimates {
        s.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} ({}) | {:.2} | {:.2} | {:.2} |\n",
            r.pp_rank,
            mb(r.params),
            mb(r.grads),
            mb(r.optimizer),
            mb(r.activations),
            r.in_flight,
            mb(r.transient),
            mb(r.optimizer_step),
            mb(r.peak)
        ));
    }
    s
}
