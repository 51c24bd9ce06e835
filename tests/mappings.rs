//! Every differentiable mapping, forward and backward, against the math, for tp ∈ {1, 2, 4},
//! with different inputs and upstream gradients on every rank (so a wrong reduction shows).

mod common;

use burn::tensor::TensorData;
use burn_parallel::comm::{concat_along, reduce_all, split_along};
use burn_parallel::mappings::*;
use burn_parallel::ReduceOp;
use common::{leaf, max_abs_diff, randn, world, B};

#[derive(Debug, Clone, Copy)]
enum Map {
    CopyToTp,
    ReduceFromTp,
    ScatterToTp,
    GatherFromTp,
    ScatterToSp,
    GatherFromSp,
    ReduceScatterToSp,
}

const ALL: [Map; 7] = [Map::CopyToTp, Map::ReduceFromTp, Map::ScatterToTp, Map::GatherFromTp, Map::ScatterToSp, Map::GatherFromSp, Map::ReduceScatterToSp];

/// Input shape per rank and output shape per rank for a world of `t`.
fn shapes(m: Map, t: usize) -> ([usize; 3], [usize; 3]) {
    let full = [2, 4 * t, 3 * t];
    match m {
        Map::CopyToTp | Map::ReduceFromTp => (full, full),
        Map::ScatterToTp => (full, [2, 4 * t, 3]),
        Map::GatherFromTp => ([2, 4 * t, 3], full),
        Map::ScatterToSp | Map::ReduceScatterToSp => (full, [2, 4, 3 * t]),
        Map::GatherFromSp => ([2, 4, 3 * t], full),
    }
}

fn refs(v: &[TensorData]) -> Vec<&TensorData> {
    v.iter().collect()
}

/// Expected (output, input grad) of rank `r` given every rank's input `xs` and upstream `gs`.
fn expected(m: Map, r: usize, xs: &[TensorData], gs: &[TensorData]) -> (TensorData, TensorData) {
    let t = xs.len();
    let sum = |v: &[TensorData]| reduce_all(&refs(v), ReduceOp::Sum).unwrap();
    let cat = |v: &[TensorData], d| concat_along(&refs(v), d).unwrap();
    let split = |x: &TensorData, d| split_along(x, d, t, r).unwrap();
    match m {
        Map::CopyToTp => (xs[r].clone(), sum(gs)),
        Map::ReduceFromTp => (sum(xs), gs[r].clone()),
        Map::ScatterToTp => (split(&xs[r], 2), cat(gs, 2)),
        Map::GatherFromTp => (cat(xs, 2), split(&gs[r], 2)),
        Map::ScatterToSp => (split(&xs[r], 1), cat(gs, 1)),
        Map::GatherFromSp => (cat(xs, 1), split(&sum(gs), 1)),
        Map::ReduceScatterToSp => (split(&sum(xs), 1), cat(gs, 1)),
    }
}

fn check(m: Map, t: usize) {
    let (in_shape, out_shape) = shapes(m, t);
    let xs: Vec<TensorData> = (0..t).map(|r| randn(&format!("x{r}"), in_shape)).collect();
    let gs: Vec<TensorData> = (0..t).map(|r| randn(&format!("g{r}"), out_shape)).collect();
    let out = world(t, |c| {
        let r = c.rank();
        let x = leaf::<3>(xs[r].clone());
        let y = match m {
            Map::CopyToTp => copy_to_tp(x.clone(), &c),
            Map::ReduceFromTp => reduce_from_tp(x.clone(), &c),
            Map::ScatterToTp => scatter_to_tp(x.clone(), &c),
            Map::GatherFromTp => gather_from_tp(x.clone(), &c),
            Map::ScatterToSp => scatter_to_sp(x.clone(), 1, &c),
            Map::GatherFromSp => gather_from_sp(x.clone(), 1, &c),
            Map::ReduceScatterToSp => reduce_scatter_to_sp(x.clone(), 1, &c),
        };
        let g = burn::tensor::Tensor::<B, 3>::from_data(gs[r].clone(), &Default::default());
        let grads = (y.clone() * g).sum().backward();
        Ok((y.into_data(), x.grad(&grads).ok_or("no input grad")?.into_data()))
    });
    for (r, (y, dx)) in out.iter().enumerate() {
        let (ey, edx) = expected(m, r, &xs, &gs);
        let dy = max_abs_diff(&ey, y).unwrap_or_else(|e| panic!("{m:?} tp={t} rank {r} output: {e}"));
        let dd = max_abs_diff(&edx, dx).unwrap_or_else(|e| panic!("{m:?} tp={t} rank {r} grad: {e}"));
        assert!(dy <= 1e-5, "{m:?} tp={t} rank {r}: output off by {dy}");
        assert!(dd <= 1e-5, "{m:?} tp={t} rank {r}: input grad off by {dd}");
    }
}

#[test]
fn every_mapping_matches_the_math() {
    for m in ALL {
        for t in [1, 2, 4] {
            check(m, t);
        }
    }
}

#[test]
fn a_group_of_one_is_the_identity() {
    let x = randn("x", [2, 3, 4]);
    let out = world(1, |c| {
        let y = reduce_scatter_to_sp(gather_from_tp(copy_to_tp(leaf::<3>(x.clone()), &c), &c), 1, &c);
        Ok(y.into_data())
    });
    assert_eq!(max_abs_diff(&x, &out[0]).unwrap(), 0.0);
}

/// The negative control: without f (copy_to_tp) before a column-split product, the input
/// gradient misses the other ranks' contributions — the check above would catch that.
#[test]
fn without_f_the_input_gradient_is_wrong() {
    let x = randn("x", [2, 4]);
    let w = randn("w", [4, 6]);
    let run = |use_f: bool| {
        world(2, |c| {
            let xl = leaf::<2>(x.clone());
            let wl = leaf::<2>(split_along(&w, 1, 2, c.rank()).unwrap());
            let xin = if use_f { copy_to_tp(xl.clone(), &c) } else { xl.clone() };
            let y = gather_from_tp(xin.matmul(wl), &c);
            let grads = y.sum().backward();
            Ok(xl.grad(&grads).unwrap().into_data())
        })
    };
    let (good, bad) = (run(true), run(false));
    let reference = world(1, |_| {
        let xl = leaf::<2>(x.clone());
        let grads = xl.clone().matmul(leaf::<2>(w.clone())).sum().backward();
        Ok(xl.grad(&grads).unwrap().into_data())
    });
    assert!(max_abs_diff(&reference[0], &good[0]).unwrap() < 1e-5);
    assert!(max_abs_diff(&reference[0], &bad[0]).unwrap() > 1e-2);
}
