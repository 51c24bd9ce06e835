//! The attention op on `Autodiff<Flex>` (the composed default bodies behind the autodiff op)
//! against Burn's autodiff of plain masked-softmax attention.

use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Tensor, TensorData};

use super::{causal_attention, causal_attention_chunked, causal_attention_chunked_lse, causal_attention_lse, AttentionCore, AttentionKernel, MASKED};

type A = Autodiff<Flex>;

/// The reference: `scale·q·kᵀ` with the future (`j > i`) set to [`MASKED`], `[b, H, s, s]`
/// (its own mask, deliberately not the `future_mask` under test).
fn masked_scores(q: Tensor<A, 4>, k: Tensor<A, 4>, scale: f32) -> Tensor<A, 4> {
    let s = q.dims()[2];
    let device = q.device();
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    let i = Tensor::<A, 1, burn::tensor::Int>::arange(0..s as i64, &device);
    let future = i.clone().reshape([1, s]).expand([s, s]).greater(i.reshape([s, 1]).expand([s, s]));
    scores.mask_fill(future.reshape([1, 1, s, s]), MASKED)
}

fn data(seed: u64, shape: [usize; 4]) -> TensorData {
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v = (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect::<Vec<_>>();
    TensorData::new(v, shape)
}

fn max_diff(a: Tensor<A, 4>, b: Tensor<A, 4>) -> f32 {
    (a - b).abs().max().into_scalar()
}

/// `(o, dq, dk, dv)` for `y = Σ o ∘ w` through `attend`.
fn run(attend: impl Fn(Tensor<A, 4>, Tensor<A, 4>, Tensor<A, 4>) -> Tensor<A, 4>, shape: [usize; 4]) -> [Tensor<A, 4>; 4] {
    let dev = Default::default();
    let [q, k, v] = [1, 2, 3].map(|s| Tensor::<A, 4>::from_data(data(s, shape), &dev).require_grad());
    let w = Tensor::<A, 4>::from_data(data(4, shape), &dev);
    let o = attend(q.clone(), k.clone(), v.clone());
    let grads = (o.clone() * w).sum().backward();
    let g = |t: &Tensor<A, 4>| Tensor::from_inner(t.grad(&grads).expect("tracked"));
    [o.detach(), g(&q), g(&k), g(&v)]
}

#[test]
fn the_attention_op_equals_autodiff_of_masked_softmax() {
    for shape in [[2, 3, 7, 8], [1, 2, 1, 4], [1, 1, 33, 16]] {
        let scale = 1.0 / (shape[3] as f32).sqrt();
        let ours = run(|q, k, v| causal_attention(q, k, v, scale), shape);
        let reference = run(|q, k, v| softmax(masked_scores(q, k, scale), 3).matmul(v), shape);
        for (i, (a, b)) in ours.into_iter().zip(reference).enumerate() {
            let d = max_diff(a, b);
            assert!(d < 1e-5, "{shape:?}: output {i} (o, dq, dk, dv) differs by {d}");
        }
    }
}

#[test]
fn lse_is_the_log_sum_exp_of_the_visible_scores() {
    let dev = Default::default();
    let [q, k, v] = [1, 2, 3].map(|s| Tensor::<A, 4>::from_data(data(s, [1, 1, 3, 2]), &dev));
    let (_, lse) = causal_attention_lse(q.clone(), k.clone(), v, 0.5);
    let (q, k) = (q.into_data().to_vec::<f32>().unwrap(), k.into_data().to_vec::<f32>().unwrap());
    let lse = lse.into_data().to_vec::<f32>().unwrap();
    for i in 0..3 {
        let s = (0..=i).map(|j| 0.5 * (q[2 * i] * k[2 * j] + q[2 * i + 1] * k[2 * j + 1]));
        let want = s.map(f32::exp).sum::<f32>().ln();
        assert!((lse[i] - want).abs() < 1e-6, "row {i}: {} vs {want}", lse[i]);
    }
}

#[test]
fn bf16_inputs_give_bf16_outputs_close_to_f32() {
    let shape = [1, 2, 9, 8];
    let dev = Default::default();
    let [q, k, v] = [1, 2, 3].map(|s| Tensor::<A, 4>::from_data(data(s, shape), &dev));
    let f = causal_attention(q.clone(), k.clone(), v.clone(), 0.35);
    let h = causal_attention(q.cast(DType::BF16), k.cast(DType::BF16), v.cast(DType::BF16), 0.35);
    assert_eq!(h.dtype(), DType::BF16);
    let d = max_diff(f, h.cast(DType::F32));
    assert!(d < 2e-2, "bf16 attention differs from f32 by {d}");
}

#[test]
fn kernel_choice_parses_and_resolves() {
    assert_eq!("fused".parse::<AttentionKernel>().unwrap(), AttentionKernel::Fused);
    assert_eq!("flash".parse::<AttentionKernel>().unwrap(), AttentionKernel::Fused);
    assert_eq!(
        "bogus".parse::<AttentionKernel>().unwrap_err().to_string(),
        "unknown attention kernel \"bogus\" (choose auto, composed, fused, chunked or chunked:ROWS with ROWS > 0)"
    );
    let dev = Default::default();
    assert_eq!(AttentionKernel::Auto.resolve::<A>(&dev, 64, 0.0), Ok(AttentionCore::Composed), "Flex composes");
    let e = AttentionKernel::Fused.resolve::<A>(&dev, 64, 0.0).unwrap_err();
    assert!(e.contains("no fused attention kernels"), "{e}");
    let e = AttentionKernel::Fused.resolve::<A>(&dev, 64, 0.1).unwrap_err();
    assert!(e.contains("attention dropout is 0.1"), "{e}");
}

#[test]
fn the_chunked_op_equals_autodiff_of_masked_softmax() {
    // Chunks of one row, of a few rows (the last one short), of all rows and more than all.
    for (shape, rows) in [([2, 3, 7, 8], 1), ([2, 3, 7, 8], 3), ([1, 1, 33, 16], 8), ([1, 2, 5, 4], 5), ([1, 2, 5, 4], 64)] {
        let scale = 1.0 / (shape[3] as f32).sqrt();
        let ours = run(|q, k, v| causal_attention_chunked(q, k, v, scale, rows), shape);
        let reference = run(|q, k, v| softmax(masked_scores(q, k, scale), 3).matmul(v), shape);
        for (i, (a, b)) in ours.into_iter().zip(reference).enumerate() {
            let d = max_diff(a, b);
            assert!(d < 1e-5, "{shape:?} rows {rows}: output {i} (o, dq, dk, dv) differs by {d}");
        }
    }
}

#[test]
fn chunked_lse_and_bf16_match_the_composed_op() {
    let dev = Default::default();
    let shape = [2, 2, 11, 8];
    let [q, k, v] = [1, 2, 3].map(|s| Tensor::<A, 4>::from_data(data(s, shape), &dev));
    let (o, lse) = causal_attention_lse(q.clone(), k.clone(), v.clone(), 0.35);
    let (oc, lsec) = causal_attention_chunked_lse(q.clone(), k.clone(), v.clone(), 0.35, 4);
    assert!(max_diff(o.clone(), oc) < 1e-6);
    let d: f32 = (lse - lsec).abs().max().into_scalar();
    assert!(d < 1e-6, "lse differs by {d}");
    let h = causal_attention_chunked(q.cast(DType::BF16), k.cast(DType::BF16), v.cast(DType::BF16), 0.35, 4);
    assert_eq!(h.dtype(), DType::BF16);
    let d = max_diff(o, h.cast(DType::F32));
    assert!(d < 2e-2, "bf16 chunked attention differs from f32 by {d}");
}

/// bf16 in: the chunked op's matmuls run in bf16 (softmax, `P`, `dS` and the accumulators in
/// f32); o, dq, dk and dv stay within bf16 rounding of the f32 reference (relative to each
/// tensor's largest entry), for chunks of one row, a few rows and all rows.
#[test]
fn bf16_chunked_gradients_are_close_to_f32() {
    let bf = |t: Tensor<A, 4>| t.cast(DType::BF16);
    for (shape, rows) in [([1, 2, 9, 8], 1), ([2, 2, 13, 16], 4), ([1, 1, 33, 64], 64)] {
        let scale = 1.0 / (shape[3] as f32).sqrt();
        let ours = run(
            |q, k, v| {
                let o = causal_attention_chunked(bf(q), bf(k), bf(v), scale, rows);
                assert_eq!(o.dtype(), DType::BF16, "bf16 in, bf16 out");
                o.cast(DType::F32)
            },
            shape,
        );
        let reference = run(|q, k, v| softmax(masked_scores(q, k, scale), 3).matmul(v), shape);
        for (i, (a, b)) in ours.into_iter().zip(reference).enumerate() {
            let big: f32 = b.clone().abs().max().into_scalar();
            let d = max_diff(a, b);
            assert!(d <= 2e-2 * big, "{shape:?} rows {rows}: output {i} (o, dq, dk, dv) differs by {d} (largest entry {big})");
        }
    }
}

#[test]
fn chunked_choice_parses_and_resolves() {
    assert_eq!("chunked".parse::<AttentionKernel>().unwrap(), AttentionKernel::Chunked(super::DEFAULT_CHUNK_ROWS));
    assert_eq!("chunked:64".parse::<AttentionKernel>().unwrap(), AttentionKernel::Chunked(64));
    assert_eq!(AttentionKernel::Chunked(64).to_string().parse::<AttentionKernel>().unwrap(), AttentionKernel::Chunked(64));
    for bad in ["chunked:0", "chunked:x", "chunked:"] {
        let e = bad.parse::<AttentionKernel>().unwrap_err().to_string();
        assert!(e.contains(&format!("{bad:?}")) && e.contains("chunked:ROWS"), "{e}");
    }
    let dev = Default::default();
    assert_eq!(AttentionKernel::Chunked(16).resolve::<A>(&dev, 64, 0.0), Ok(AttentionCore::Chunked(16)), "any backend chunks");
    let e = AttentionKernel::Chunked(16).resolve::<A>(&dev, 64, 0.1).unwrap_err();
    assert!(e.contains("chunked attention has no dropout") && e.contains("0.1"), "{e}");
    assert!(AttentionKernel::Chunked(0).resolve::<A>(&dev, 64, 0.0).is_err());
    assert_eq!(AttentionKernel::Auto.resolve::<A>(&dev, 64, 0.1), Ok(AttentionCore::Composed), "dropout composes");
}

/// The packed op on a fused `[b, s, 3·H·d]` projection equals three tracked slices of it (head
/// `j`'s q, k, v at columns `3jd`, `3jd + d`, `3jd + 2d`) through the attention op: the context
/// and `dqkv`, fused and chunked (a short last chunk), one and several heads.
#[test]
fn attention_of_a_fused_projection_equals_attention_of_its_slices() {
    use super::causal_attention_qkv;
    let dev = Default::default();
    for (heads, d, s, rows) in [(3, 4, 7, None), (3, 4, 7, Some(3)), (1, 8, 5, None), (2, 16, 33, Some(8))] {
        let w = 3 * heads * d;
        let qkv = Tensor::<A, 4>::from_data(data(9, [2, s, w, 1]), &dev).reshape([2, s, w]).require_grad();
        let upstream = Tensor::<A, 4>::from_data(data(10, [2, s, heads * d, 1]), &dev).reshape([2, s, heads * d]);
        let scale = 1.0 / (d as f32).sqrt();
        let packed = causal_attention_qkv(qkv.clone(), heads, scale, rows);
        let part = |i: usize| Tensor::stack::<4>((0..heads).map(|j| qkv.clone().narrow(2, (3 * j + i) * d, d)).collect(), 1);
        let o = match rows {
            None => causal_attention(part(0), part(1), part(2), scale),
            Some(r) => causal_attention_chunked(part(0), part(1), part(2), scale, r),
        };
        let sliced = o.swap_dims(1, 2).reshape([2, s, heads * d]);
        let grad = |y: Tensor<A, 3>| qkv.grad(&(y * upstream.clone()).sum().backward()).expect("tracked");
        let context = (packed.clone() - sliced.clone()).abs().max().into_scalar();
        let dqkv = (grad(packed) - grad(sliced)).abs().max().into_scalar();
        assert!(context < 1e-6 && dqkv < 1e-6, "heads {heads} d {d} s {s} rows {rows:?}: context differs by {context}, dqkv by {dqkv}");
    }
}

#[test]
#[should_panic(expected = "width 20 is not 3 × 2 heads")]
fn a_projection_width_that_is_not_three_whole_heads_panics_with_the_numbers() {
    let qkv = Tensor::<A, 3>::zeros([1, 2, 20], &Default::default());
    super::causal_attention_qkv(qkv, 2, 1.0, None);
}

/// Context parallelism's chunk: queries at positions 4..9 of 13 against all 13 keys (rows 2 at
/// a time) equal those rows of the whole causal attention, with every gradient (the keys past
/// position 8 get none).
#[test]
fn queries_at_an_offset_equal_the_rows_of_the_whole_attention() {
    let (shape, offset, rows) = ([2, 3, 13, 8], 4, 5);
    let scale = 1.0 / 8f32.sqrt();
    let dev = Default::default();
    let w = Tensor::<A, 4>::from_data(data(4, [2, 3, rows, 8]), &dev);
    let grads_of = |attend: &dyn Fn(Tensor<A, 4>, Tensor<A, 4>, Tensor<A, 4>) -> Tensor<A, 4>| {
        let [q, k, v] = [1, 2, 3].map(|s| Tensor::<A, 4>::from_data(data(s, shape), &dev).require_grad());
        let o = attend(q.clone(), k.clone(), v.clone());
        let grads = (o.clone() * w.clone()).sum().backward();
        let g = |t: &Tensor<A, 4>| Tensor::<A, 4>::from_inner(t.grad(&grads).expect("tracked"));
        [o.detach(), g(&q), g(&k), g(&v)]
    };
    let ours = grads_of(&|q, k, v| super::causal_attention_chunked_at(q.narrow(2, offset, rows), k, v, scale, 2, offset));
    let whole = grads_of(&|q, k, v| softmax(masked_scores(q, k, scale), 3).matmul(v).narrow(2, offset, rows));
    for (i, (a, b)) in ours.into_iter().zip(whole).enumerate() {
        let d = max_diff(a, b);
        assert!(d < 1e-5, "output {i} (o, dq, dk, dv) differs by {d}");
    }
}

/// The softmax op (attention through it, forward and gradients, masked scores included)
/// equals Burn's composed softmax under autodiff within f32 rounding (1e-5); masked entries
/// get exactly zero probability and gradient; a bf16 input stays bf16.
#[test]
fn the_softmax_op_equals_autodiff_of_burns_softmax() {
    let shape = [2, 3, 7, 4];
    let ours = run(|q, k, v| super::softmax(masked_scores(q, k, 0.5)).matmul(v), shape);
    let reference = run(|q, k, v| softmax(masked_scores(q, k, 0.5), 3).matmul(v), shape);
    for (name, (a, b)) in ["o", "dq", "dk", "dv"].iter().zip(ours.into_iter().zip(reference)) {
        let diff = max_diff(a, b);
        assert!(diff < 1e-5, "{name}: {diff}");
    }
    let dev = Default::default();
    // The masked entries' probability and gradient are exactly zero.
    let p = super::softmax(Tensor::<A, 2>::from_data([[0.5f32, MASKED], [1.0, 2.0]], &dev));
    assert_eq!(p.into_data().to_vec::<f32>().unwrap()[1], 0.0);
    let x = Tensor::<A, 2>::from_data([[0.5f32, MASKED, 0.1]], &dev).require_grad();
    let grads = (super::softmax(x.clone()) * Tensor::from_data([[1.0f32, 5.0, -2.0]], &dev)).sum().backward();
    assert_eq!(x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap()[1], 0.0);
    let half = super::softmax(Tensor::<A, 2>::from_data([[0.5f32, 0.25]], &dev).cast(DType::BF16));
    assert_eq!(half.dtype(), DType::BF16);
}
