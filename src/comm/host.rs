//! Host-side collective math on [`TensorData`]: reductions in rank order (so every rank gets
//! bit-identical results), concatenation and splitting along a dimension (dtype-agnostic, on bytes).

use burn::tensor::{DType, TensorData};

use super::ReduceOp;

/// Element-wise reduction of equally shaped tensors, applied in the order given.
/// `f32` is reduced in `f32`; other float dtypes in `f64` and converted back.
pub fn reduce_all(parts: &[&TensorData], op: ReduceOp) -> Result<TensorData, String> {
    let first = parts.first().ok_or("no tensors to reduce")?;
    for (i, p) in parts.iter().enumerate() {
        if p.shape != first.shape || p.dtype != first.dtype {
            return Err(format!("rank 0 has {:?} {:?} but rank {i} has {:?} {:?}", first.shape.as_slice(), first.dtype, p.shape.as_slice(), p.dtype));
        }
    }
    let n = parts.len();
    if first.dtype == DType::F32 {
        let mut acc = first.to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
        for p in &parts[1..] {
            let v = p.as_slice::<f32>().map_err(|e| format!("{e:?}"))?;
            combine(&mut acc, v, op);
        }
        if op == ReduceOp::Mean {
            acc.iter_mut().for_each(|a| *a /= n as f32);
        }
        return Ok(TensorData::new(acc, first.shape.clone()));
    }
    if !matches!(first.dtype, DType::F64 | DType::F16 | DType::BF16 | DType::Flex32) {
        return Err(format!("reductions support float dtypes only, got {:?}", first.dtype));
    }
    let as_f64 = |d: &TensorData| d.clone().convert::<f64>().into_vec::<f64>();
    let mut acc = as_f64(first).map_err(|e| format!("{e:?}"))?;
    for p in &parts[1..] {
        combine(&mut acc, &as_f64(p).map_err(|e| format!("{e:?}"))?, op);
    }
    if op == ReduceOp::Mean {
        acc.iter_mut().for_each(|a| *a /= n as f64);
    }
    Ok(TensorData::new(acc, first.shape.clone()).convert_dtype(first.dtype))
}

fn combine<T: Copy + PartialOrd + std::ops::AddAssign>(acc: &mut [T], v: &[T], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Mean => acc.iter_mut().zip(v).for_each(|(a, b)| *a += *b),
        ReduceOp::Max => acc.iter_mut().zip(v).for_each(|(a, b)| {
            if *b > *a {
                *a = *b
            }
        }),
    }
}

/// `Ok` if every part has the first's shape and dtype (what NCCL's equal-count collectives
/// need), else which ranks differ.
pub fn same_shapes(parts: &[&TensorData]) -> Result<(), String> {
    let Some(first) = parts.first() else { return Ok(()) };
    match parts.iter().position(|p| p.shape != first.shape || p.dtype != first.dtype) {
        None => Ok(()),
        Some(i) => Err(format!(
            "rank 0 has {:?} {:?} but rank {i} has {:?} {:?} (every rank must pass the same shape and dtype)",
            first.shape.as_slice(),
            first.dtype,
            parts[i].shape.as_slice(),
            parts[i].dtype
        )),
    }
}

/// Concatenation along `dim` of tensors whose other dims agree.
pub fn concat_along(parts: &[&TensorData], dim: usize) -> Result<TensorData, String> {
    let first = parts.first().ok_or("no tensors to concatenate")?;
    let shape = first.shape.as_slice();
    if dim >= shape.len() {
        return Err(format!("dim {dim} out of range for shape {shape:?}"));
    }
    let outer: usize = shape[..dim].iter().product();
    let mut total_dim = 0;
    for (i, p) in parts.iter().enumerate() {
        let s = p.shape.as_slice();
        let same_rest = s.len() == shape.len() && s.iter().zip(shape).enumerate().all(|(d, (a, b))| d == dim || a == b);
        if !same_rest || p.dtype != first.dtype {
            return Err(format!("rank 0 has {shape:?} {:?} but rank {i} has {s:?} {:?} (only dim {dim} may differ)", first.dtype, p.dtype));
        }
        total_dim += s[dim];
    }
    let mut out = Vec::with_capacity(first.as_bytes().len() * parts.len());
    for o in 0..outer {
        for p in parts {
            let chunk = p.as_bytes().len() / outer.max(1);
            out.extend_from_slice(&p.as_bytes()[o * chunk..(o + 1) * chunk]);
        }
    }
    let mut new_shape = shape.to_vec();
    new_shape[dim] = total_dim;
    Ok(TensorData::from_bytes_vec(out, new_shape, first.dtype))
}

/// The `index`-th of `n` equal slices along `dim`.
pub fn split_along(data: &TensorData, dim: usize, n: usize, index: usize) -> Result<TensorData, String> {
    let shape = data.shape.as_slice();
    if dim >= shape.len() {
        return Err(format!("dim {dim} out of range for shape {shape:?}"));
    }
    if n == 0 || !shape[dim].is_multiple_of(n) {
        return Err(format!("dim {dim} of size {} is not divisible by {n}", shape[dim]));
    }
    let outer: usize = shape[..dim].iter().product();
    let full = data.as_bytes().len() / outer.max(1);
    let chunk = full / n;
    let mut out = Vec::with_capacity(chunk * outer);
    for o in 0..outer {
        let start = o * full + index * chunk;
        out.extend_from_slice(&data.as_bytes()[start..start + chunk]);
    }
    let mut new_shape = shape.to_vec();
    new_shape[dim] /= n;
    Ok(TensorData::from_bytes_vec(out, new_shape, data.dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: Vec<f32>, s: [usize; 2]) -> TensorData {
        TensorData::new(v, s)
    }

    #[test]
    fn reduce_sum_max_mean() {
        let a = t(vec![1., 5., 3., 0.], [2, 2]);
        let b = t(vec![2., 1., 4., -1.], [2, 2]);
        let s = reduce_all(&[&a, &b], ReduceOp::Sum).unwrap();
        assert_eq!(s.to_vec::<f32>().unwrap(), vec![3., 6., 7., -1.]);
        let m = reduce_all(&[&a, &b], ReduceOp::Max).unwrap();
        assert_eq!(m.to_vec::<f32>().unwrap(), vec![2., 5., 4., 0.]);
        let mean = reduce_all(&[&a, &b], ReduceOp::Mean).unwrap();
        assert_eq!(mean.to_vec::<f32>().unwrap(), vec![1.5, 3., 3.5, -0.5]);
        let c = t(vec![1., 2.], [1, 2]);
        assert!(reduce_all(&[&a, &c], ReduceOp::Sum).unwrap_err().contains("[1, 2]"));
        let h = TensorData::new(vec![1.0f64, 2.0], [2]);
        let r = reduce_all(&[&h, &h], ReduceOp::Sum).unwrap();
        assert_eq!(r.dtype, DType::F64);
        assert_eq!(r.to_vec::<f64>().unwrap(), vec![2., 4.]);
    }

    #[test]
    fn concat_then_split_roundtrip() {
        let a = t(vec![1., 2., 3., 4.], [2, 2]);
        let b = t(vec![5., 6., 7., 8.], [2, 2]);
        let c1 = concat_along(&[&a, &b], 1).unwrap();
        assert_eq!(c1.shape.as_slice(), &[2, 4]);
        assert_eq!(c1.to_vec::<f32>().unwrap(), vec![1., 2., 5., 6., 3., 4., 7., 8.]);
        let c0 = concat_along(&[&a, &b], 0).unwrap();
        assert_eq!(c0.to_vec::<f32>().unwrap(), vec![1., 2., 3., 4., 5., 6., 7., 8.]);
        assert_eq!(split_along(&c1, 1, 2, 1).unwrap().to_vec::<f32>().unwrap(), vec![5., 6., 7., 8.]);
        assert_eq!(split_along(&c0, 0, 2, 0).unwrap().to_vec::<f32>().unwrap(), vec![1., 2., 3., 4.]);
        assert!(split_along(&c1, 1, 3, 0).unwrap_err().contains("not divisible by 3"));
        let ints = TensorData::new(vec![1i64, 2, 3], [3]);
        assert_eq!(concat_along(&[&ints, &ints], 0).unwrap().to_vec::<i64>().unwrap(), vec![1, 2, 3, 1, 2, 3]);
    }
}
