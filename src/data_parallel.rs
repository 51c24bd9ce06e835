//! Data parallelism and global gradient clipping.
//!
//! - [`all_reduce_gradients`]: averages every parameter gradient over the data-parallel group,
//!   flattened into buckets of about `bucket_bytes` (one all-reduce per bucket, not per parameter),
//!   in the module's visiting order (identical on every replica). Run it after the pipeline flush;
//!   every replica then applies the same optimizer step, so parameters and optimizer state stay
//!   identical across the group.
//! - [`global_grad_norm`] / [`clip_grad_norm`]: the L2 norm of **all** gradients of the model,
//!   every parameter counted once: TP-sharded parameters (the weights of `ColumnLinear`, the
//!   weight of `RowLinear`, the vocab-parallel embedding — recognised by their module type) are
//!   summed over the TP group ([`crate::sharding`]), replicated ones counted once, and the per-stage sums added over the
//!   pipeline group. Data-parallel replicas hold identical (already averaged) gradients and are
//!   not summed. Burn's own clipping is per tensor; this is the global clipping of Megatron and
//!   `torch.nn.utils.clip_grad_norm_`.

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};

use crate::comm::ops::all_reduce;
use crate::error::CommError;
use crate::{CollectiveBackend, Comm, ReduceOp};

/// Default bucket size of [`all_reduce_gradients`] (as PyTorch DDP).
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

struct Flatten<'a, I: burn::tensor::backend::Backend> {
    grads: &'a mut GradientsParams,
    flat: Vec<(ParamId, Tensor<I, 1>)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            let n = g.shape().num_elements();
            self.flat.push((param.id, g.reshape([n])));
        }
    }
}

struct Unflatten<'a, I: burn::tensor::backend::Backend> {
    grads: &'a mut GradientsParams,
    flat: std::collections::HashMap<ParamId, Tensor<I, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.flat.remove(&param.id) {
            let dims: [usize; D] = param.val().dims();
            self.grads.register::<B::InnerBackend, D>(param.id, g.reshape(dims));
        }
    }
}

/// Averages `grads` of `module` over the data-parallel group `dp`, in buckets of about
/// `bucket_bytes` (see the module docs). A group of one returns `grads` unchanged.
pub fn all_reduce_gradients<B, M>(module: &M, mut grads: GradientsParams, dp: &Comm, bucket_bytes: usize) -> Result<GradientsParams, CommError>
where
    B: AutodiffBackend,
    B::InnerBackend: CollectiveBackend,
    M: AutodiffModule<B>,
{
    if dp.size() == 1 {
        return Ok(grads);
    }
    let mut flatten = Flatten::<B::InnerBackend> { grads: &mut grads, flat: Vec::new() };
    module.visit(&mut flatten);
    let flat = flatten.flat;
    let mut reduced = std::collections::HashMap::with_capacity(flat.len());
    let mut bucket: Vec<(ParamId, Tensor<B::InnerBackend, 1>)> = Vec::new();
    let mut bytes = 0;
    let total = flat.len();
    for (i, (id, g)) in flat.into_iter().enumerate() {
        bytes += g.shape().num_elements() * g.dtype().size();
        bucket.push((id, g));
        if bytes >= bucket_bytes || i + 1 == total {
            let sizes: Vec<usize> = bucket.iter().map(|(_, g)| g.shape().num_elements()).collect();
            let (ids, parts): (Vec<ParamId>, Vec<_>) = std::mem::take(&mut bucket).into_iter().unzip();
            let summed = all_reduce(Tensor::cat(parts, 0), ReduceOp::Mean, dp)?;
            let pieces = summed.split_with_sizes(sizes, 0);
            reduced.extend(ids.into_iter().zip(pieces));
            bytes = 0;
        }
    }
    let mut unflatten = Unflatten::<B::InnerBackend> { grads: &mut grads, flat: reduced };
    module.visit(&mut unflatten);
    Ok(grads)
}

/// Sums of squared gradients of one module, per parameter, on the device: (TP-sharded
/// parameters, replicated parameters).
struct SquareSums<'a, B: Backend> {
    grads: &'a GradientsParams,
    device: Option<B::Device>,
    types: Vec<String>,
    path: Vec<String>,
    sharded: Vec<Tensor<B, 1>>,
    replicated: Vec<Tensor<B, 1>>,
}

/// `Σ parts` (one-element tensors) on the device, 0 for none: the norm's partial sums stay on
/// the device until the one read of the total (a read per parameter would drain a GPU's
/// stream ~150 times a step for GPT-2).
pub(crate) fn device_sum<B: Backend>(parts: Vec<Tensor<B, 1>>, device: &B::Device) -> Tensor<B, 1> {
    if parts.is_empty() {
        Tensor::zeros([1], device)
    } else {
        Tensor::cat(parts, 0).sum()
    }
}

impl<B: Backend> SquareSums<'_, B> {
    fn leaf(&self) -> (&str, &str) {
        (self.types.last().map(String::as_str).unwrap_or(""), self.path.last().map(String::as_str).unwrap_or(""))
    }
    fn is_sharded(&self) -> bool {
        let (ty, field) = self.leaf();
        crate::sharding::tp_split_dim(ty, field).is_some()
    }
    fn is_replica(&self) -> bool {
        let (ty, field) = self.leaf();
        crate::sharding::is_stage_replica(ty, field)
    }
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquareSums<'_, B::InnerBackend> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.types.push(container_type.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
        self.types.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) else { return };
        self.device.get_or_insert_with(|| g.device());
        // In f32 whatever the gradient dtype: an f16 sum of squares overflows at a norm of 256.
        let sq = g.cast(burn::tensor::DType::F32).powi_scalar(2).sum();
        // The parameter's own field name is the last path element for parameters of a struct.
        if self.is_replica() {
            // The last stage's copy of tied embeddings: the first stage counts it.
        } else if self.is_sharded() {
            self.sharded.push(sq);
        } else {
            self.replicated.push(sq);
        }
    }
}

/// The global L2 norm of the gradients of `parts` (this rank's stages with their gradients),
/// summed over the `tp` and `pp` groups as described in the module docs. Every rank of the TP
/// and PP groups must call it.
pub fn global_grad_norm<B, M>(parts: &[(&M, &GradientsParams)], tp: &Comm, pp: &Comm) -> Result<f32, CommError>
where
    B: AutodiffBackend,
    B::InnerBackend: CollectiveBackend,
    M: AutodiffModule<B>,
{
    let (mut sharded, mut replicated, mut device) = (Vec::new(), Vec::new(), None);
    for (module, grads) in parts {
        let mut v = SquareSums::<B::InnerBackend> { grads, device: None, types: Vec::new(), path: Vec::new(), sharded: Vec::new(), replicated: Vec::new() };
        module.visit(&mut v);
        sharded.extend(v.sharded);
        replicated.extend(v.replicated);
        device = device.or(v.device);
    }
    let device = device.unwrap_or_default();
    let t = device_sum(sharded, &device);
    let sharded = if tp.size() > 1 { all_reduce(t, ReduceOp::Sum, tp)? } else { t };
    let stage_total = sharded + device_sum(replicated, &device);
    let total = if pp.size() > 1 { all_reduce(stage_total, ReduceOp::Sum, pp)? } else { stage_total };
    Ok(total.into_scalar().elem::<f32>().sqrt())
}

/// Scales every gradient of `module` in `grads` by `factor`.
pub fn scale_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M, grads: GradientsParams, factor: f32) -> GradientsParams {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f32,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads.register::<B::InnerBackend, D>(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut grads = grads;
    module.visit(&mut Scale { grads: &mut grads, factor });
    grads
}

/// Clips the gradients of `parts` so that their global norm is at most `max_norm`; returns the
/// norm before clipping. Scale factor `max_norm / (norm + 1e-6)` when the norm exceeds it.
pub fn clip_grad_norm<B, M>(parts: Vec<(&M, GradientsParams)>, max_norm: f32, tp: &Comm, pp: &Comm) -> Result<(f32, Vec<GradientsParams>), CommError>
where
    B: AutodiffBackend,
    B::InnerBackend: CollectiveBackend,
    M: AutodiffModule<B>,
{
    let refs: Vec<(&M, &GradientsParams)> = parts.iter().map(|(m, g)| (*m, g)).collect();
    let norm = global_grad_norm::<B, M>(&refs, tp, pp)?;
    let factor = if norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
    let grads = parts.into_iter().map(|(m, g)| if factor < 1.0 { scale_gradients::<B, M>(m, g, factor) } else { g }).collect();
    Ok((norm, grads))
}
