//! The fused q/k/v layout of our attention, as host data: one place for the layer's
//! initialisation (`burn_parallel_modules::attention`) and the HuggingFace conversions
//! (`checkpoint::hf`, `checkpoint::hf_llama`).
//!
//! For `H` query heads and `G` key/value heads (`G = H` without grouped-query attention) of
//! width `d`, `r = H/G`, the last dimension is grouped per key/value group:
//! `[q_{0} … q_{r−1} k_0 v_0 | q_{r} … q_{2r−1} k_1 v_1 | …]` (Megatron's layout; `r = 1`:
//! `[q_j k_j v_j]` per head), so a contiguous TP split holds whole groups. Separately, q is
//! `[.., H·d]` (heads in order) and k, v are `[.., G·d]`.

use burn::tensor::TensorData;

/// `(rows, last)` of a `[rows, last]` or `[last]` tensor.
fn rows_and_width(t: &TensorData) -> (usize, usize) {
    match t.shape.as_slice() {
        [r, w] => (*r, *w),
        [w] => (1, *w),
        other => panic!("a q/k/v tensor of shape {other:?} (2-d weights or 1-d biases)"),
    }
}

fn f32s(t: &TensorData) -> Vec<f32> {
    t.clone().convert::<f32>().to_vec::<f32>().expect("f32 values")
}

/// The fused tensor of q `[.., H·d]` and k, v `[.., G·d]` (weights `[h_in, ·]` or biases `[·]`).
///
/// # Panics
/// If the widths are not `H·d` and `G·d` for one `d`, or `G` does not divide `H`.
pub fn fuse_qkv_grouped(q: &TensorData, k: &TensorData, v: &TensorData, heads: usize, groups: usize) -> TensorData {
    let (rows, h) = rows_and_width(q);
    let (d, r) = (h / heads, heads / groups);
    let kv = groups * d;
    assert!(h == heads * d && heads == groups * r, "fuse_qkv_grouped: width {h} for {heads} heads in {groups} groups");
    let shape = q.shape.as_slice().to_vec();
    let (q, k, v) = (f32s(q), f32s(k), f32s(v));
    assert_eq!((k.len(), v.len()), (rows * kv, rows * kv), "fuse_qkv_grouped: k and v must be [{rows}, {kv}]");
    let mut out = Vec::with_capacity(rows * (h + 2 * kv));
    for row in 0..rows {
        for g in 0..groups {
            out.extend_from_slice(&q[row * h + g * r * d..row * h + (g + 1) * r * d]);
            out.extend_from_slice(&k[row * kv + g * d..row * kv + (g + 1) * d]);
            out.extend_from_slice(&v[row * kv + g * d..row * kv + (g + 1) * d]);
        }
    }
    let mut shape = shape;
    *shape.last_mut().expect("a dimension") = h + 2 * kv;
    TensorData::new(out, shape)
}

/// q `[.., H·d]`, k and v `[.., G·d]` of a fused tensor `[.., (H + 2G)·d]` (the inverse of
/// [`fuse_qkv_grouped`]).
///
/// # Panics
/// If the width is not `(H + 2G)·d`.
pub fn split_qkv_grouped(fused: &TensorData, heads: usize, groups: usize) -> [TensorData; 3] {
    let (rows, w) = rows_and_width(fused);
    let d = w / (heads + 2 * groups);
    let r = heads / groups;
    assert!(w == (heads + 2 * groups) * d && heads == groups * r, "split_qkv_grouped: width {w} for {heads} heads in {groups} groups");
    let all = f32s(fused);
    let (mut q, mut k, mut v) = (Vec::with_capacity(rows * heads * d), Vec::with_capacity(rows * groups * d), Vec::with_capacity(rows * groups * d));
    for row in all.chunks(w) {
        for group in row.chunks((r + 2) * d) {
            q.extend_from_slice(&group[..r * d]);
            k.extend_from_slice(&group[r * d..(r + 1) * d]);
            v.extend_from_slice(&group[(r + 1) * d..]);
        }
    }
    let shape = |width: usize| if fused.shape.len() == 1 { vec![width] } else { vec![rows, width] };
    [TensorData::new(q, shape(heads * d)), TensorData::new(k, shape(groups * d)), TensorData::new(v, shape(groups * d))]
}

/// The tensors `parts` (`[rows, w_i]`, or `[w_i]`) side by side along the last dimension.
pub fn concat_last(parts: &[TensorData]) -> TensorData {
    let dims: Vec<(usize, usize)> = parts.iter().map(rows_and_width).collect();
    let rows = dims[0].0;
    let values: Vec<Vec<f32>> = parts.iter().map(f32s).collect();
    let width: usize = dims.iter().map(|(_, w)| w).sum();
    let mut out = Vec::with_capacity(rows * width);
    for row in 0..rows {
        for (v, (_, w)) in values.iter().zip(&dims) {
            out.extend_from_slice(&v[row * w..(row + 1) * w]);
        }
    }
    let mut shape = parts[0].shape.as_slice().to_vec();
    *shape.last_mut().expect("a dimension") = width;
    TensorData::new(out, shape)
}

/// `t` (`[rows, Σ w_i]`, or `[Σ w_i]`) cut along the last dimension into `widths`.
///
/// # Panics
/// If the widths do not add up to the last dimension.
pub fn split_last(t: &TensorData, widths: &[usize]) -> Vec<TensorData> {
    let (rows, w) = rows_and_width(t);
    assert_eq!(widths.iter().sum::<usize>(), w, "split_last: {widths:?} of width {w}");
    let all = f32s(t);
    let mut start = 0;
    widths
        .iter()
        .map(|&width| {
            let v: Vec<f32> = all.chunks(w).flat_map(|row| row[start..start + width].to_vec()).collect();
            start += width;
            let mut shape = t.shape.as_slice().to_vec();
            *shape.last_mut().expect("a dimension") = width;
            debug_assert_eq!(v.len(), rows * width);
            TensorData::new(v, shape)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout by hand (2 heads of width 1 sharing one key/value head, and per head), and
    /// the split is the fuse's inverse, for weights and biases.
    #[test]
    fn layout_and_round_trip() {
        let t = |v: Vec<f32>, shape: Vec<usize>| TensorData::new(v, shape);
        let fused = fuse_qkv_grouped(&t(vec![1.0, 2.0], vec![2]), &t(vec![3.0], vec![1]), &t(vec![4.0], vec![1]), 2, 1);
        assert_eq!((fused.shape.as_slice(), fused.to_vec::<f32>().unwrap()), ([4].as_slice(), vec![1.0, 2.0, 3.0, 4.0]));
        let per_head = fuse_qkv_grouped(&t(vec![1.0, 2.0], vec![2]), &t(vec![3.0, 4.0], vec![2]), &t(vec![5.0, 6.0], vec![2]), 2, 2);
        assert_eq!(per_head.to_vec::<f32>().unwrap(), vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
        let (h, heads, groups, d) = (3, 4, 2, 2);
        let q = t((0..h * heads * d).map(|i| i as f32).collect(), vec![h, heads * d]);
        let k = t((0..h * groups * d).map(|i| 100.0 + i as f32).collect(), vec![h, groups * d]);
        let v = t((0..h * groups * d).map(|i| 200.0 + i as f32).collect(), vec![h, groups * d]);
        let fused = fuse_qkv_grouped(&q, &k, &v, heads, groups);
        assert_eq!(fused.shape.as_slice(), [h, (heads + 2 * groups) * d]);
        // Row 0: q heads 0, 1, then k_0, v_0; then q heads 2, 3, k_1, v_1.
        assert_eq!(&fused.to_vec::<f32>().unwrap()[..8], &[0.0, 1.0, 2.0, 3.0, 100.0, 101.0, 200.0, 201.0]);
        assert_eq!(split_qkv_grouped(&fused, heads, groups), [q.clone(), k.clone(), v.clone()]);
        let side = concat_last(&[q.clone(), k.clone(), v.clone()]);
        assert_eq!(side.shape.as_slice(), [h, (heads + 2 * groups) * d]);
        assert_eq!(split_last(&side, &[heads * d, groups * d, groups * d]), vec![q, k, v]);
    }
}
