//! ZeRO-1 sharding of parameters over the data-parallel group: rows of dim 0.
//!
//! Each parameter (this TP rank's local tensor) is split along dim 0, as torch FSDP2 does: DP
//! rank `j` of `d` owns rows `[⌊j·n/d⌋, ⌊(j+1)·n/d⌋)` (1-D tensors: elements). A shard is
//! therefore a box of the whole tensor, which is what checkpoints store, so a checkpoint saved
//! with ZeRO loads without it and at any other dp. A bucket of parameters travels as one
//! `[d, seg]` tensor: row `j` holds, parameter after parameter, the rows rank `j` owns (padded
//! to the longest rank's segment): one reduce-scatter of gradients and one all-gather of
//! updated values per bucket, each rank's part contiguous.

use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::comm::ops::{all_gather, reduce_scatter};
use crate::error::CommError;
use crate::{CollectiveBackend, Comm, ReduceOp};

/// Rows of dim 0 that DP rank `j` of `d` owns in a tensor of `n` rows.
pub fn owned_rows(n: usize, d: usize, j: usize) -> Range<usize> {
    (j * n / d)..((j + 1) * n / d)
}

/// The layout of one parameter in a bucket: its rows and the elements per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSplit {
    /// Rows of dim 0 (elements for a 1-D tensor).
    pub rows: usize,
    /// Elements per row.
    pub row_len: usize,
}

impl RowSplit {
    /// The split of a tensor of `shape`.
    pub fn of(shape: &[usize]) -> Self {
        let rows = shape.first().copied().unwrap_or(1);
        let row_len = shape.iter().skip(1).product();
        Self { rows, row_len }
    }

    /// Element range of rank `j`'s rows in the flattened tensor.
    pub fn elements(&self, d: usize, j: usize) -> Range<usize> {
        let r = owned_rows(self.rows, d, j);
        r.start * self.row_len..r.end * self.row_len
    }
}

/// Packs full flat tensors (`splits[i]` describes `full[i]`) into the `[d, seg]` send buffer of
/// a reduce-scatter: row `j` is rank `j`'s rows of every tensor, zero-padded to `seg`.
fn pack<B: Backend>(full: Vec<Tensor<B, 1>>, splits: &[RowSplit], d: usize) -> Tensor<B, 2> {
    let seg = (0..d).map(|j| splits.iter().map(|s| s.elements(d, j).len()).sum::<usize>()).max().unwrap_or(0);
    let (device, dtype) = (full[0].device(), full[0].dtype());
    // Views of every rank's rows, padded, then one copy into the send buffer.
    let mut parts = Vec::with_capacity(d * (full.len() + 1));
    for j in 0..d {
        let mut used = 0;
        for (t, s) in full.iter().zip(splits) {
            let r = s.elements(d, j);
            used += r.len();
            if !r.is_empty() {
                parts.push(t.clone().slice(r));
            }
        }
        if used < seg {
            parts.push(Tensor::<B, 1>::zeros([seg - used], (&device, dtype)));
        }
    }
    drop(full);
    Tensor::cat(parts, 0).reshape([d, seg])
}

/// Splits this rank's packed segment back into its shards of each tensor.
fn unpack_own<B: Backend>(segment: Tensor<B, 1>, splits: &[RowSplit], d: usize, j: usize) -> Vec<Tensor<B, 1>> {
    let mut at = 0;
    splits
        .iter()
        .map(|s| {
            let n = s.elements(d, j).len();
            let part = segment.clone().slice(at..at + n);
            at += n;
            part
        })
        .collect()
}

/// Reduce-scatter (mean) of full gradients `full` over `dp`: this rank's shard of each.
pub fn reduce_scatter_shards<B: CollectiveBackend>(full: Vec<Tensor<B, 1>>, splits: &[RowSplit], dp: &Comm) -> Result<Vec<Tensor<B, 1>>, CommError> {
    let (d, j) = (dp.size(), dp.rank());
    let packed = pack(full, splits, d);
    let mine = reduce_scatter(packed, 0, ReduceOp::Mean, dp)?;
    let seg = mine.dims()[1];
    Ok(unpack_own(mine.reshape([seg]), splits, d, j))
}

/// All-gather of shards `own` (this rank's rows of each tensor) over `dp`: the full tensors.
pub fn all_gather_shards<B: CollectiveBackend>(own: Vec<Tensor<B, 1>>, splits: &[RowSplit], dp: &Comm) -> Result<Vec<Tensor<B, 1>>, CommError> {
    let (d, j) = (dp.size(), dp.rank());
    let dtype = own[0].dtype();
    let device = own[0].device();
    let seg = (0..d).map(|r| splits.iter().map(|s| s.elements(d, r).len()).sum::<usize>()).max().unwrap_or(0);
    let used: usize = splits.iter().map(|s| s.elements(d, j).len()).sum();
    let mut parts: Vec<Tensor<B, 1>> = own.into_iter().filter(|t| t.dims()[0] > 0).collect();
    if used < seg {
        parts.push(Tensor::<B, 1>::zeros([seg - used], (&device, dtype)));
    }
    let gathered = all_gather(Tensor::cat(parts, 0).reshape([1, seg]), 0, dp)?;
    let per_rank: Vec<Vec<Tensor<B, 1>>> = (0..d).map(|r| unpack_own(gathered.clone().slice(r..r + 1).reshape([seg]), splits, d, r)).collect();
    Ok((0..splits.len()).map(|i| Tensor::cat(per_rank.iter().map(|p| p[i].clone()).filter(|t| t.dims()[0] > 0).collect(), 0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_cover_every_row_once_even_when_uneven() {
        for (n, d) in [(10, 4), (3, 4), (8, 2), (1, 3)] {
            let all: Vec<usize> = (0..d).flat_map(|j| owned_rows(n, d, j)).collect();
            assert_eq!(all, (0..n).collect::<Vec<_>>(), "n {n} d {d}");
        }
        assert_eq!(RowSplit::of(&[6, 4, 2]).elements(4, 1), 8..24);
        assert_eq!(RowSplit::of(&[5]).elements(2, 1), 2..5);
    }
}
