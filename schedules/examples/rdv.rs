use burn_parallel_schedules::*;
fn main() {
    let cs = [
        Costs { forward: 1.0, backward: 2.0, backward_input: 1.0, backward_weight: 1.0, comm: 0.0 },
        Costs { forward: 1.0, backward: 2.0, backward_input: 2.0, backward_weight: 0.0, comm: 0.0 },
    ];
    for name in SCHEDULE_NAMES {
        for (p, v, m) in [(2, 1, 4), (4, 1, 8), (2, 2, 4), (4, 2, 8), (4, 2, 5), (8, 2, 16)] {
            let Ok(plan) = schedule_by_name(name).unwrap().plan(&PipelineShape::new(p, v, m)) else { continue };
            let r: Vec<String> =
                cs.iter().map(|c| format!("{:.0}/{:.0}", simulate(&plan, c).unwrap().makespan, rendezvous_makespan(&plan, c).unwrap())).collect();
            println!("{name} p={p} v={v} m={m}: buffered/rendezvous {r:?}");
        }
    }
}
