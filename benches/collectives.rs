//! Collective overhead on CPU, host `TensorData`, 2 and 4 ranks, 4 KiB to 64 MiB: the local
//! (threads-as-ranks) backend, and `TcpComm` (each rank its own connections over loopback, as
//! `--comm tcp`'s processes have), with bus bandwidth (nccl-tests' definition) and the ratio to
//! one `memcpy` (a `Vec` clone) of the per-rank buffer measured in the same run.
//! `cargo bench --bench collectives`. The NCCL numbers come from `device_check nccl-bench`.

use std::time::{Duration, Instant};

use burn::tensor::TensorData;
use burn_parallel::{Comm, LocalWorld, ReduceOp, TcpComm};

fn world(kind: &str, n: usize) -> Vec<Comm> {
    match kind {
        "tcp" => TcpComm::loopback_world(n, Duration::from_secs(120)).expect("TCP world"),
        _ => {
            let w = LocalWorld::new(n);
            (0..n).map(|r| w.communicator(r)).collect()
        }
    }
}

/// Seconds per call, the slowest rank's.
fn time_op(comms: Vec<Comm>, floats: usize, op: &'static str, iters: usize) -> f64 {
    let n_ranks = comms.len();
    let each = |c: Comm| {
        let data = TensorData::new(vec![c.rank() as f32; floats], [n_ranks, floats / n_ranks]);
        let run = |d: TensorData| match op {
            "all_reduce" => c.all_reduce(d, ReduceOp::Sum),
            "all_gather" => c.all_gather(d, 0),
            _ => c.reduce_scatter(d, 0, ReduceOp::Sum),
        };
        run(data.clone()).expect("collective");
        c.barrier().expect("barrier");
        let start = Instant::now();
        for _ in 0..iters {
            run(data.clone()).expect("collective");
        }
        c.barrier().expect("barrier");
        start.elapsed().as_secs_f64() / iters as f64
    };
    std::thread::scope(|s| comms.into_iter().map(|c| s.spawn(move || each(c))).collect::<Vec<_>>().into_iter().map(|h| h.join().unwrap()).fold(0.0, f64::max))
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
    println!("| comm | op | ranks | size | µs | bus GB/s | vs memcpy |");
    println!("|---|---|---|---|---|---|---|");
    for kib in [4usize, 256, 16 * 1024, 64 * 1024] {
        let floats = kib * 256;
        let iters = (64 * 1024 / kib).clamp(3, 200);
        let copy = memcpy(floats, iters);
        for n in [2usize, 4] {
            for op in ["all_reduce", "all_gather", "reduce_scatter"] {
                for kind in ["local", "tcp"] {
                    let t = time_op(world(kind, n), floats, op, iters);
                    // nccl-tests' sizes: the buffer (all-reduce, reduce-scatter input) or the
                    // gathered output (all-gather); bus factor 2(n−1)/n (all-reduce) or (n−1)/n.
                    let bytes = (floats * 4 * if op == "all_gather" { n } else { 1 }) as f64;
                    let factor = if op == "all_reduce" { 2.0 * (n - 1) as f64 / n as f64 } else { (n - 1) as f64 / n as f64 };
                    let size = if kib >= 1024 { format!("{} MiB", kib / 1024) } else { format!("{kib} KiB") };
                    println!("| {kind} | {op} | {n} | {size} | {:.0} | {:.2} | {:.1}× |", t * 1e6, bytes / t * factor / 1e9, t / copy);
                }
            }
        }
    }
}
