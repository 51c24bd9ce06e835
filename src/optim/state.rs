//! [`DistAdamW`]'s state in checkpoints: the same tensor names as Burn's AdamW
//! (`optim.exp_avg.<p>`, `optim.exp_avg_sq.<p>`, counter `optim.step.<p>`), each rank's rows
//! as boxes of the whole tensors; the f32 master weights are saved as the model's weights
//! (`model.<p>`), so a bf16 run's checkpoint holds f32 weights. Who writes: under ZeRO each DP
//! rank its own rows, else DP rank 0; TP-replicated tensors only TP rank 0; a stage replica
//! (tied embeddings' copy on the last stage) never: its owner stage writes the tensor.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor, TensorCreationOptions, TensorData};

use super::{DistAdamW, Groups, Slot};
use crate::checkpoint::{module_tensors, Checkpoint, CheckpointError, HostTensor, Rename, ShardContext, MODEL_PREFIX};
use crate::sharding::{is_stage_replica, placement, tp_split_dim, ShardPlacement};
use crate::CollectiveBackend;

/// A parameter as the visitor sees it.
struct Seen {
    id: ParamId,
    path: String,
    shape: Vec<usize>,
    dtype: DType,
    split_dim: Option<usize>,
    /// A stage replica (tied embeddings): another stage writes it.
    replica: bool,
}

#[derive(Default)]
struct Params {
    path: Vec<String>,
    types: Vec<String>,
    out: Vec<Seen>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Params {
    fn enter_module(&mut self, name: &str, ty: &str) {
        self.path.push(name.into());
        self.types.push(ty.into());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
        self.types.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        let (ty, field) = (self.types.last().map(String::as_str).unwrap_or(""), self.path.last().map(String::as_str).unwrap_or(""));
        let (split_dim, replica) = (tp_split_dim(ty, field), is_stage_replica(ty, field));
        self.out.push(Seen { id: param.id, path: self.path.join("."), shape: value.dims().to_vec(), dtype: value.dtype(), split_dim, replica });
    }
}

fn params<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> Vec<Seen> {
    let mut v = Params::default();
    module.visit(&mut v);
    v.out
}

/// Where this rank's rows `rows` (of dim 0 of its local tensor) sit in the whole tensor.
fn rows_place(s: &Seen, ctx: ShardContext, rows: &Range<usize>) -> (ShardPlacement, Vec<usize>) {
    let mut p = placement(&s.shape, s.split_dim, ctx.tp_rank, ctx.tp_size);
    let mut shape = s.shape.clone();
    if let (Some(o), Some(n)) = (p.offset.first_mut(), shape.first_mut()) {
        *o += rows.start;
        *n = rows.len();
    }
    (p, shape)
}

impl<B> DistAdamW<B>
where
    B: AutodiffBackend,
    B::InnerBackend: CollectiveBackend,
{
    /// This rank's part of a checkpoint of `parts` (module, rename): the model's weights (f32
    /// master rows where there is a master, else the parameters), the moments of the rows this
    /// rank owns, and the step counters.
    pub fn state_tensors<M: AutodiffModule<B>>(&self, parts: &[(&M, Rename<'_>)], ctx: ShardContext) -> (Vec<HostTensor>, BTreeMap<String, u64>) {
        let (mut out, mut counters) = (Vec::new(), BTreeMap::new());
        for (module, rename) in parts {
            // Parameters without a master copy are saved as they are (DP rank 0 writes).
            let plain = module_tensors(*module, *rename, ctx);
            for (s, t) in params::<B, M>(module).into_iter().zip(plain) {
                let name = rename(&s.path);
                let rows = self.owned(s.shape.first().copied().unwrap_or(1));
                let (place, shape) = rows_place(&s, ctx, &rows);
                let write = (ctx.tp_rank == 0 || s.split_dim.is_some()) && (self.sharded() || ctx.dp_rank == 0) && !s.replica;
                let host = |name: String, t: &Tensor<B::InnerBackend, 1>| {
                    let flat = t.clone().into_data();
                    HostTensor { name, data: TensorData::from_bytes(flat.bytes, shape.clone(), flat.dtype), placement: place.clone(), write }
                };
                let slot = self.state.slot(&s.id);
                match slot.as_ref().and_then(|x| x.master.as_ref()) {
                    Some(master) => out.push(host(format!("{MODEL_PREFIX}{name}"), master)),
                    None => out.push(t),
                }
                if let Some(Slot { moments: Some((m, v)), step, .. }) = slot {
                    counters.insert(format!("optim.step.{name}"), step as u64);
                    out.push(host(format!("optim.exp_avg.{name}"), &m));
                    out.push(host(format!("optim.exp_avg_sq.{name}"), &v));
                }
            }
        }
        (out, counters)
    }

    /// Loads this rank's rows of the moments, the step counts and (for non-f32 parameters) the
    /// f32 master weights of `parts` from `ckpt`. Everything is read and checked before the
    /// state changes. The parameters themselves are loaded with
    /// [`load_module_cast`](crate::checkpoint::load_module_cast).
    pub fn load<M: AutodiffModule<B>>(&mut self, ckpt: &Checkpoint, parts: &[(&M, Rename<'_>)], ctx: ShardContext) -> Result<(), CheckpointError> {
        let mut slots = Vec::new();
        for (module, rename) in parts {
            let device: B::Device = module.devices().into_iter().next().unwrap_or_default();
            for s in params::<B, M>(module) {
                let name = rename(&s.path);
                let rows = self.owned(s.shape.first().copied().unwrap_or(1));
                let (place, shape) = rows_place(&s, ctx, &rows);
                let n: usize = shape.iter().product();
                let read = |full: String| -> Result<Tensor<B::InnerBackend, 1>, CheckpointError> {
                    let data = ckpt.read(&full, DType::F32, &place.global_shape, &place.offset, &shape)?;
                    let flat = TensorData::from_bytes(data.bytes, [n], DType::F32);
                    Ok(Tensor::<B::InnerBackend, 1>::from_data(flat, TensorCreationOptions::new(device.clone()).with_dtype(DType::F32)))
                };
                let master = if s.dtype == DType::F32 { None } else { Some(read(format!("{MODEL_PREFIX}{name}"))?) };
                let (moments, step) = match ckpt.metadata().counters.get(&format!("optim.step.{name}")) {
                    Some(&step) => (Some((read(format!("optim.exp_avg.{name}"))?, read(format!("optim.exp_avg_sq.{name}"))?)), step as usize),
                    None => (None, 0),
                };
                slots.push((s.id, n, Slot { master, moments, step }));
            }
        }
        self.state = Groups::from_slots(slots);
        Ok(())
    }
}
