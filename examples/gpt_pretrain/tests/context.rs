//! `--cp`: context parallelism in the example, in real processes.

use super::processes::{finish, ranks};
use super::*;

/// `--cp` prints the losses of whole sequences (within f32 rounding: the sums run in another
/// order) on every layout it combines with; a checkpoint saved with it resumes without it; TCP
/// rank processes print the thread ranks' losses bit for bit.
#[test]
fn context_parallel_runs_print_the_losses_of_whole_sequences() {
    let base = format!("{TINY} --layers 2 --steps 4");
    let close = |what: &str, want: &[f32], got: &[f32]| {
        assert_eq!(got.len(), want.len(), "{what}: {got:?}");
        for (a, b) in want.iter().zip(got) {
            assert!((a - b).abs() <= 1e-4 * a.abs(), "{what}: {got:?} vs {want:?}");
        }
    };
    let whole = loss_values(&losses(&base));
    assert_eq!(whole.len(), 4, "{whole:?}");
    for layout in [
        "--cp 2",
        "--cp 4",
        "--cp 2 --tp 2 --sequence-parallel",
        "--cp 2 --pp 2 --microbatches 4",
        "--cp 2 --recompute selective",
        "--cp 2 --attention chunked:3",
    ] {
        close(layout, &whole, &loss_values(&losses(&format!("{base} {layout}"))));
    }
    let dp2 = loss_values(&losses(&format!("{base} --dp 2 --zero 1")));
    close("--cp 2 --dp 2 --zero 1", &dp2, &loss_values(&losses(&format!("{base} --cp 2 --dp 2 --zero 1"))));
    let dir = fresh("cp");
    let first = losses(&format!("{base} --cp 2 --tp 2 --exit-at-step 2 --save-dir {}", dir.display()));
    let rest = losses(&format!("{base} --tp 2 --resume latest --save-dir {}", dir.display()));
    close("saved at cp 2, resumed without", &whole, &loss_values(&[first, rest].concat()));
    std::fs::remove_dir_all(dir).unwrap();
    let threads = losses(&format!("{base} --cp 2"));
    let out = finish(ranks(2, &format!("{base} --cp 2")));
    for (rank, (status, stdout, stderr)) in out.iter().enumerate() {
        assert!(status.success(), "rank {rank}: {status:?}\n{stdout}\n{stderr}");
    }
    assert_eq!(step_lines(&out[0].1), threads, "TCP rank processes and thread ranks differ");
}

#[test]
fn bad_context_parallel_flags_are_clear_errors() {
    let e = error_of(&format!("{TINY} --steps 1 --cp 3"));
    assert_eq!(e, "--seq-len: sequence length = 16 is not divisible by 2 × context_parallel (two chunks per rank) = 6");
    // The CPU backend has no fused kernels, with or without context parallelism.
    let e = error_of(&format!("{TINY} --steps 1 --cp 2 --attention fused"));
    assert!(e.contains("has no fused attention kernels"), "{e}");
    let e = error_of(&format!("{} --steps 1 --cp 2 --tp 4 --sequence-parallel", TINY.replace("--seq-len 16", "--seq-len 20")));
    assert_eq!(e, "--seq-len: sequence length / context_parallel = 10 is not divisible by tensor_parallel (sequence parallelism) = 4");
    let e = error_of(&format!("{TINY} --steps 1 --cp 0"));
    assert!(e.contains("--cp"), "{e}");
}
