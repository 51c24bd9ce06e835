//! The on-disk format (version 1): names, the metadata file, dtypes and chunk boxes.
//!
//! ```text
//! SAVE_DIR/
//!   latest                    "step-000200\n" (updated atomically after each commit)
//!   step-000100/              a committed checkpoint: valid iff metadata.json exists
//!   step-000200/
//!     metadata.json           written last, before the directory is renamed into place
//!     rank-00000.safetensors  the chunks rank 0 wrote (each tensor name at most once per file)
//!     rank-00001.safetensors  ...
//!   .tmp-step-000300/         a save in progress (or killed): never read, removed by the next save
//! ```

use std::collections::BTreeMap;

use burn::tensor::DType;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::topology::ParallelConfig;

/// `format` of every metadata file.
pub const FORMAT_NAME: &str = "burn-parallel-checkpoint";
/// The metadata version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The commit marker of a checkpoint directory.
pub const METADATA_FILE: &str = "metadata.json";
/// The pointer to the newest committed checkpoint of a save directory.
pub const LATEST_FILE: &str = "latest";
/// Prefix of a save in progress.
pub const TMP_PREFIX: &str = ".tmp-";
/// Prefix of a checkpoint being deleted or replaced.
pub const TRASH_PREFIX: &str = ".trash-";

/// `step-000200` (at least six digits, so names sort by step).
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// The step of a directory named by [`step_dir_name`].
pub fn parse_step_dir(name: &str) -> Option<u64> {
    name.strip_prefix("step-").filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())).and_then(|d| d.parse().ok())
}

/// The data file of `rank`.
pub fn rank_file_name(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

/// A rank's description of what it wrote (merged into the metadata by rank 0, then removed).
pub(crate) fn fragment_file_name(rank: usize) -> String {
    format!("rank-{rank:05}.json")
}

/// The training position a resume continues from (the same on every rank).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Tokens consumed by training so far (all data-parallel replicas together).
    pub tokens_seen: u64,
    /// Global sample counter: samples consumed so far by all replicas together. The data
    /// position, independent of the data-parallel degree.
    pub samples_seen: u64,
    /// Learning rate of the last step (informational: the schedule is a function of `step`).
    pub lr: f64,
}

/// One saved piece of a tensor: a box of the whole tensor, stored under the tensor's name in
/// `file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMeta {
    /// Data file (relative to the checkpoint directory).
    pub file: String,
    /// Offset of the chunk in the whole tensor, per dimension.
    pub offset: Vec<usize>,
    /// Shape of the chunk.
    pub shape: Vec<usize>,
    /// CRC-32 (IEEE) of the chunk's bytes.
    pub crc32: u32,
    /// The chunk's name inside `file` when it is not the tensor's (an imported file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl ChunkMeta {
    /// The name of the chunk inside its file.
    pub fn key<'a>(&'a self, tensor: &'a str) -> &'a str {
        self.key.as_deref().unwrap_or(tensor)
    }
}

/// A whole tensor: its shape, dtype and the chunks that cover it exactly once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorMeta {
    /// Element type (safetensors names: `F32`, `BF16`, ...).
    pub dtype: Dtype,
    /// Global (unsharded) shape.
    pub shape: Vec<usize>,
    /// The chunks, sorted by offset.
    pub chunks: Vec<ChunkMeta>,
}

/// `metadata.json`: everything about a checkpoint but the tensor bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metadata {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`] when written by this build.
    pub version: u32,
    /// The step this checkpoint was taken after.
    pub step: u64,
    /// The parallel layout that wrote it (any other layout can load it).
    pub layout: ParallelConfig,
    /// Training position.
    pub train: TrainState,
    /// Named counters: random streams (`rng.<stream>` = draws so far), optimizer step counts
    /// (`optim.step.<parameter>`).
    pub counters: BTreeMap<String, u64>,
    /// Free-form sections from the caller (e.g. `model`: the model config, `args`: the run's
    /// arguments).
    pub sections: BTreeMap<String, serde_json::Value>,
    /// Every data file with its size in bytes (a truncated file is caught before it is parsed).
    pub files: BTreeMap<String, u64>,
    /// Every tensor by name (`model.<parameter path>`, `optim.exp_avg.<parameter path>`, ...).
    pub tensors: BTreeMap<String, TensorMeta>,
}

/// What one rank wrote, merged by rank 0 into the [`Metadata`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Fragment {
    pub rank: usize,
    pub file: Option<(String, u64)>,
    pub tensors: Vec<(String, Dtype, Vec<usize>, ChunkMeta)>,
    pub counters: BTreeMap<String, u64>,
}

/// The safetensors dtype of a Burn dtype (`None` for quantized and other types not saved).
pub fn to_safetensors_dtype(d: DType) -> Option<Dtype> {
    Some(match d {
        DType::F64 => Dtype::F64,
        DType::F32 | DType::Flex32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I16 => Dtype::I16,
        DType::I8 => Dtype::I8,
        DType::U64 => Dtype::U64,
        DType::U32 => Dtype::U32,
        DType::U16 => Dtype::U16,
        DType::U8 => Dtype::U8,
        _ => return None,
    })
}

/// The Burn dtype of a safetensors dtype (`None` for types Burn has no tensor of).
pub fn to_burn_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U64 => DType::U64,
        Dtype::U32 => DType::U32,
        Dtype::U16 => DType::U16,
        Dtype::U8 => DType::U8,
        _ => return None,
    })
}

/// Number of elements of a shape.
pub(crate) fn volume(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The intersection of two boxes `(offset, shape)`, if not empty.
pub(crate) fn intersect(a: (&[usize], &[usize]), b: (&[usize], &[usize])) -> Option<(Vec<usize>, Vec<usize>)> {
    let (mut off, mut shape) = (Vec::with_capacity(a.0.len()), Vec::with_capacity(a.0.len()));
    for d in 0..a.0.len() {
        let lo = a.0[d].max(b.0[d]);
        let hi = (a.0[d] + a.1[d]).min(b.0[d] + b.1[d]);
        if hi <= lo {
            return None;
        }
        off.push(lo);
        shape.push(hi - lo);
    }
    Some((off, shape))
}

/// Copies the box `region` (global offset and shape) from `src` (row-major bytes of the box
/// `src_box`) into `dst` (row-major bytes of the box `dst_box`); both boxes contain `region`.
pub(crate) fn copy_region(src: &[u8], src_box: (&[usize], &[usize]), dst: &mut [u8], dst_box: (&[usize], &[usize]), region: (&[usize], &[usize]), elem: usize) {
    let rank = region.1.len();
    if rank == 0 {
        dst[..elem].copy_from_slice(&src[..elem]);
        return;
    }
    if volume(region.1) == 0 {
        return;
    }
    let strides = |shape: &[usize]| {
        let mut s = vec![elem; rank];
        for d in (0..rank - 1).rev() {
            s[d] = s[d + 1] * shape[d + 1];
        }
        s
    };
    let (ss, ds) = (strides(src_box.1), strides(dst_box.1));
    let run = region.1[rank - 1] * elem;
    let mut idx = vec![0usize; rank - 1];
    loop {
        let (mut so, mut dof) = (0, 0);
        for d in 0..rank {
            let g = region.0[d] + if d < rank - 1 { idx[d] } else { 0 };
            so += (g - src_box.0[d]) * ss[d];
            dof += (g - dst_box.0[d]) * ds[d];
        }
        dst[dof..dof + run].copy_from_slice(&src[so..so + run]);
        // Odometer over every dimension but the last.
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < region.1[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_step_and_parse_back() {
        assert_eq!(step_dir_name(200), "step-000200");
        assert_eq!(parse_step_dir("step-000200"), Some(200));
        assert_eq!(parse_step_dir("step-12345678"), Some(12_345_678));
        assert_eq!(parse_step_dir(".tmp-step-000200"), None);
        assert_eq!(parse_step_dir("step-"), None);
        assert_eq!(parse_step_dir("step-1a"), None);
    }

    #[test]
    fn region_copy_assembles_a_box_from_two_chunks() {
        // A 4 x 6 tensor of u8 0..24, saved as two column halves; read the box rows 1..3, cols 2..5.
        let full: Vec<u8> = (0..24).collect();
        let half = |c0: usize| -> Vec<u8> { (0..4).flat_map(|r| (c0..c0 + 3).map(move |c| (r * 6 + c) as u8)).collect() };
        let (left, right) = (half(0), half(3));
        let want_box: (&[usize], &[usize]) = (&[1, 2], &[2, 3]);
        let mut out = vec![0u8; 6];
        for (chunk, off) in [(&left, [0usize, 0usize]), (&right, [0, 3])] {
            let cbox: (&[usize], &[usize]) = (&off, &[4, 3]);
            let (ro, rs) = intersect(cbox, want_box).unwrap();
            copy_region(chunk, cbox, &mut out, want_box, (&ro, &rs), 1);
        }
        let full = &full;
        let expect: Vec<u8> = (1..3).flat_map(|r| (2..5).map(move |c| full[r * 6 + c])).collect();
        assert_eq!(out, expect);
        assert_eq!(intersect((&[0, 0], &[2, 2]), (&[2, 0], &[2, 2])), None);
    }
}
