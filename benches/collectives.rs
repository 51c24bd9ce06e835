//! The local (threads-as-ranks) backend's collective overhead on CPU: all-reduce, all-gather and
//! reduce-scatter on host `TensorData` for 2 and 4 ranks, 4 KiB to 64 MiB, with bus bandwidth
//! (nccl-tests' definition) and the ratio to one `memcpy` (a `Vec` clone) of the per-rank buffer
//! measured in the same run. `cargo bench --bench collectives`. The NCCL numbers come from `device_check nccl-bench`.

use std::time::Instant;

use burn::tensor::TensorData;
use burn_parallel::{all_ok, run_world, Comm, LocalWorldOptions, ReduceOp};

fn time_op(n_ranks: usize, floats: usize, op: &'static str, iters: usize) -> f64 {
    let res = run_world(n_ranks, LocalWorldOptions::default(), move |c: Comm| {
        let data = TensorData::new(vec![c.rank() as f32; floats], [n_ranks, floats / n_ranks]);
        let run = |d: TensorData| match op {
            "all_reduce" => c.all_reduce(d, ReduceOp::Sum),
            "all_gather" => c.all_gather(d, 0),
            _ => c.reduce_scatter(d, 0, ReduceOp::Sum),
        };
        run(data.clone())?;
        c.barrier()?;
        let start = Instant::now();
        for _ in 0..iters {
            run(data.clone())?;
        }
        c.barrier()?;
        Ok::<f64, burn_parallel::CommError>(start.elapsed().as_secs_f64() / iters as f64)
    });
    all_ok(res).expect("collective failed").into_iter().fold(0.0, f64::max)
}

fn memcpy(floats: usize, iters: usize) -> f64 {
    let v = vec![1.0f32; floats];
    let start = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(v.clone());
    }
    start.elapsed().as_secs_f64() / iters as f64
}

fn main() {
    println!("| op | ranks | size | µs | bus GB/s | vs memcpy |");
    println!("|---|---|---|---|---|---|");
    for kib in [4usize, 256, 16 * 1024, 64 * 1024] {
        let floats = kib * 256;
        let iters = (64 * 1024 / kib).clamp(3, 200);
        let copy = memcpy(floats, iters);
        for n in [2usize, 4] {
            for op in ["all_reduce", "all_gather", "reduce_scatter"] {
                let t = time_op(n, floats, op, iters);
                // nccl-tests' sizes: the buffer (all-reduce, reduce-scatter input) or the gathered
                // output (all-gather); bus factor 2(n−1)/n (all-reduce) or (n−1)/n.
                let bytes = (floats * 4 * if op == "all_gather" { n } else { 1 }) as f64;
                let factor = if op == "all_reduce" { 2.0 * (n - 1) as f64 / n as f64 } else { (n - 1) as f64 / n as f64 };
                let size = if kib >= 1024 { format!("{} MiB", kib / 1024) } else { format!("{kib} KiB") };
                println!("| {op} | {n} | {size} | {:.0} | {:.2} | {:.1}× |", t * 1e6, bytes / t * factor / 1e9, t / copy);
            }
        }
    }
}
