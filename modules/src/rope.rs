//! Rotary position embedding (RoPE) of the fused q/k/v projection.
//!
//! For position `p` and head dim `d`, pairs `(x_i, x_{i+d/2})`, `i < d/2` (the rotate-half
//! convention of Megatron and HuggingFace's Llama) are rotated by `p·θ^(−2i/d)`:
//! `x' = x·cos + rotate_half(x)·sin` with `rotate_half(x) = [−x_{d/2..d}, x_{0..d/2}]`, applied to
//! the query and the key of every head, the value untouched. It works on the fused projection
//! `[b, s, 3h/t]` grouped per head (`[q_j k_j v_j]`; grouped-query attention: per key/value
//! group, `[q_{g,0} … q_{g,r−1} k_g v_g]`) in place of the layout, so every attention core
//! (composed, fused kernels, chunked) takes the rotated tensor as it is. No parameters and no
//! communication: a TP rank's heads are whole and the sequence is whole inside attention (under
//! SP after the all-gather; a pipeline stage sees whole sequences), so position `p` is the row
//! index; under context parallelism the rows are the rank's chunks ([`rope_qkv_at`] with their
//! positions), rotated before the keys are gathered. The tables are built on the device from `θ^(−2i/d)` (scaled as Llama 3.1 does with
//! [`RopeScaling`](burn_parallel::arch::RopeScaling); computed in f64, then rounded to f32; HuggingFace computes it in f32, an ulp apart) times the positions in f32, as HuggingFace
//! multiplies them, and cast to the activations' dtype.
//! Under autodiff the rotation keeps only the two `[s, (r + 2)·d]` tables. They are built per
//! call (per block and micro-batch: a few small device ops and a `d/2`-float upload).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::arch::Rope;

/// `cos` and `sin` tables `[1, s, 1, parts, d]` of the fused layout: the queries' and key's
/// angles (the first `parts − 1`), ones and zeros for the value (the last).
fn tables<B: Backend>(positions: Option<&[usize]>, d: usize, parts: usize, rope: &Rope, like: &Tensor<B, 3>) -> (Tensor<B, 5>, Tensor<B, 5>) {
    let device = like.device();
    let s = like.dims()[1];
    let half = d / 2;
    let inv_freq: Vec<f32> = rope.inv_freq(d).into_iter().map(|f| f as f32).collect();
    let inv_freq = Tensor::<B, 1>::from_data(TensorData::new(inv_freq, [half]), &device);
    let pos = match positions {
        Some(p) => Tensor::<B, 1, Int>::from_data(TensorData::new(p.iter().map(|&x| x as i64).collect::<Vec<_>>(), [s]), &device),
        None => Tensor::<B, 1, Int>::arange(0..s as i64, &device),
    }
    .float();
    let angles = pos.reshape([s, 1]) * inv_freq.reshape([1, half]); // [s, d/2]
    let full = |t: Tensor<B, 2>| Tensor::cat(vec![t.clone(), t], 1).reshape([s, 1, d]); // [s, 1, d]
    let (cos, sin) = (full(angles.clone().cos()), full(angles.sin()));
    let (ones, zeros) = (Tensor::ones([s, 1, d], &device), Tensor::zeros([s, 1, d], &device));
    let layout = |qk: Tensor<B, 3>, v: Tensor<B, 3>| {
        let mut all = vec![qk; parts - 1];
        all.push(v);
        Tensor::cat(all, 1).reshape([1, s, 1, parts, d]).cast(like.dtype())
    };
    (layout(cos, ones), layout(sin, zeros))
}

/// RoPE of a fused projection `qkv [b, s, groups·(r + 2)·d]` grouped per key/value group
/// (`[q_{g,0} … q_{g,r−1} k_g v_g]`, `d` wide each; `r = 1`: per head, `[q_j k_j v_j]`): queries
/// and keys rotated by their row's position, values unchanged; `rope`: the base and any
/// frequency scaling ([`Rope::inv_freq`]).
///
/// # Panics
/// If `d` is odd or the width is not `groups·(r + 2)·d`.
pub fn rope_qkv<B: Backend>(qkv: Tensor<B, 3>, groups: usize, r: usize, d: usize, rope: &Rope) -> Tensor<B, 3> {
    rotate(qkv, groups, r, d, rope, None)
}

/// [`rope_qkv`] of rows at the given positions (context parallelism's chunks; one per row).
///
/// # Panics
/// As [`rope_qkv`], and if `positions` is not one per row.
pub fn rope_qkv_at<B: Backend>(qkv: Tensor<B, 3>, groups: usize, r: usize, d: usize, rope: &Rope, positions: &[usize]) -> Tensor<B, 3> {
    assert_eq!(positions.len(), qkv.dims()[1], "rope_qkv_at: one position per row");
    rotate(qkv, groups, r, d, rope, Some(positions))
}

fn rotate<B: Backend>(qkv: Tensor<B, 3>, groups: usize, r: usize, d: usize, rope: &Rope, positions: Option<&[usize]>) -> Tensor<B, 3> {
    let [b, s, w] = qkv.dims();
    let parts = r + 2;
    assert!(d.is_multiple_of(2) && w == groups * parts * d, "rope_qkv: width {w} is not {groups} groups × {parts} × {d} with {d} even");
    let (cos, sin) = tables(positions, d, parts, rope, &qkv);
    let x = qkv.reshape([b, s, groups, parts, d]);
    let half = d / 2;
    let x1 = x.clone().slice([0..b, 0..s, 0..groups, 0..parts, 0..half]);
    let x2 = x.clone().slice([0..b, 0..s, 0..groups, 0..parts, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 4);
    (x * cos + rotated * sin).reshape([b, s, w])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// Against the formula by hand in f64: one head, positions 0..5, d = 4.
    #[test]
    fn rotates_queries_and_keys_by_position_and_leaves_values() {
        let (s, d, theta) = (5, 4, 100.0f64);
        let vals: Vec<f32> = (0..s * 3 * d).map(|i| ((i * 5) % 11) as f32 / 4.0 - 1.0).collect();
        let x = Tensor::<Flex, 3>::from_data(TensorData::new(vals.clone(), [1, s, 3 * d]), &Default::default());
        let out: Vec<f32> = rope_qkv(x, 1, 1, d, &Rope::new(theta)).into_data().to_vec().unwrap();
        for p in 0..s {
            for part in 0..3 {
                let at = |i: usize| vals[p * 3 * d + part * d + i] as f64;
                for i in 0..d {
                    let (j, sign) = if i < d / 2 { (i + d / 2, -1.0) } else { (i - d / 2, 1.0) };
                    let angle = p as f64 * theta.powf(-2.0 * (i % (d / 2)) as f64 / d as f64);
                    let want = if part == 2 { at(i) } else { at(i) * angle.cos() + sign * at(j) * angle.sin() };
                    let got = out[p * 3 * d + part * d + i] as f64;
                    assert!((got - want).abs() < 1e-5, "p {p} part {part} i {i}: {got} vs {want}");
                }
            }
        }
    }
}
