//! One rank of a GPT training run at any dp × cp × pp × tp (× virtual stages, SP) layout, with
//! checkpoints: the harness of the checkpoint tests.

use std::path::Path;

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::checkpoint::*;
use burn_parallel::comm::ops::all_reduce;
use burn_parallel::data::GlobalSampler;
use burn_parallel::data_parallel::{all_reduce_gradients, clip_grad_norm};
use burn_parallel::pipeline::{PipelineExecutor, PipelineModel, PipelineOptions};
use burn_parallel::rng::{HostRng, RandomStreams};
use burn_parallel::{Comm, ContextParallel, ParallelConfig, ProcessGroups, ReduceOp};
use burn_parallel_modules::{Gpt, GptConfig, GptPipeline, GptStage, TokenBatch};
use burn_parallel_schedules::schedule_by_name;

use super::{Inner, B};

/// Sequences per step over all replicas.
pub const GLOBAL_BATCH: usize = 8;
/// Tokens per sequence.
pub const SEQ: usize = 8;
/// Vocabulary.
pub const VOCAB: usize = 32;

/// A parallel layout of the test GPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub dp: usize,
    pub pp: usize,
    pub tp: usize,
    pub v: usize,
    pub sp: bool,
    /// Context-parallel ranks per replica.
    pub cp: usize,
}

/// `dp × pp × tp`, one virtual stage, no SP, no context parallelism.
pub const fn layout(dp: usize, pp: usize, tp: usize) -> Layout {
    Layout { dp, pp, tp, v: 1, sp: false, cp: 1 }
}

impl Layout {
    pub fn world(&self) -> usize {
        self.dp * self.cp * self.pp * self.tp
    }
    pub fn config(&self) -> ParallelConfig {
        ParallelConfig::new()
            .with_data_parallel(self.dp)
            .with_pipeline_parallel(self.pp)
            .with_tensor_parallel(self.tp)
            .with_virtual_stages(self.v)
            .with_sequence_parallel(self.sp)
            .with_context_parallel(self.cp)
    }
    fn per_replica(&self) -> usize {
        GLOBAL_BATCH / self.dp
    }
    fn schedule(&self) -> &'static str {
        if self.v > 1 {
            "interleaved-1f1b"
        } else {
            "1f1b"
        }
    }
}

/// The test GPT: 4 heads of width 4, 4 layers (8 for `layers`), vocabulary 32.
pub fn gpt(layers: usize, sp: bool, dropout: f64) -> GptConfig {
    GptConfig::new(VOCAB, SEQ, 16, 4, layers, 32).with_sequence_parallel(sp).with_dropout(dropout)
}

/// A learnable token corpus: the target of token `t` is `(3t + 1) mod V` shifted by one.
fn corpus() -> Vec<i64> {
    let mut rng = HostRng::new(5, "ckpt-corpus");
    (0..4096).map(|_| (rng.next_u64() % VOCAB as u64) as i64).collect()
}

/// The global samples `samples` as `(inputs, targets)` `[n, SEQ]`.
pub fn samples(range: std::ops::Range<u64>) -> (TensorData, TensorData) {
    let data = corpus();
    let sampler = GlobalSampler::new(9, "train");
    let n = (range.end - range.start) as usize;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for i in range {
        let s = sampler.window_start(i, data.len(), SEQ);
        x.extend_from_slice(&data[s..s + SEQ]);
        y.extend(data[s..s + SEQ].iter().map(|t| (3 * t + 1) % VOCAB as i64));
    }
    (TensorData::new(x, [n, SEQ]), TensorData::new(y, [n, SEQ]))
}

type Exec = PipelineExecutor<B, GptPipeline, 3>;
type Optim<M> = OptimizerAdaptor<AdamW, M, B>;

fn adamw<M: AutodiffModule<B>>() -> Optim<M> {
    AdamWConfig::new().with_weight_decay(0.1).init()
}

/// This rank's model and optimizer state.
pub enum Runner {
    Flat { gpt: Box<Gpt<B>>, optim: Optim<Gpt<B>> },
    Piped { exec: Box<Exec>, optims: Vec<Optim<GptStage<B>>> },
}

/// One rank of a run.
pub struct Rank {
    pub layout: Layout,
    pub groups: ProcessGroups,
    pub runner: Runner,
    pub train: TrainState,
}

impl Rank {
    /// This rank of `layout` with the GPT `config`, fresh from the seed.
    pub fn new(layout: Layout, config: &GptConfig, comm: Comm) -> Result<Self, String> {
        let groups = ProcessGroups::new(layout.config(), comm).map_err(|e| e.to_string())?;
        let cp = ContextParallel::new(groups.cp.clone());
        let runner = if layout.pp == 1 {
            let gpt = config.init(&groups.tp, &Default::default()).map(|g| g.with_context_parallel(cp)).map_err(|e| e.to_string())?;
            Runner::Flat { gpt: Box::new(gpt), optim: adamw() }
        } else {
            let m = layout.per_replica().min(4);
            let opts = PipelineOptions { microbatches: m, virtual_stages: layout.v, layout: None };
            let model = GptPipeline { config: config.clone(), tp: groups.tp.clone(), cp: Some(cp) };
            let sched = schedule_by_name(layout.schedule()).unwrap();
            let exec = Exec::new(model, sched.as_ref(), &opts, groups.pp.clone(), Default::default()).map_err(|e| e.to_string())?;
            let optims = exec.stages().iter().map(|_| adamw()).collect();
            Runner::Piped { exec: Box::new(exec), optims }
        };
        Ok(Self { layout, groups, runner, train: TrainState::default() })
    }

    /// One optimizer step (lr 3e-3, clipping at 1); returns the loss (mean over replicas).
    pub fn step(&mut self) -> Result<f32, String> {
        let range = GlobalSampler::replica_samples(self.train.samples_seen, self.layout.per_replica(), self.groups.coords.dp);
        let (x, y) = samples(range);
        // This rank's chunks of each sequence (all of it without context parallelism).
        let cp = ContextParallel::new(self.groups.cp.clone());
        let (x, y) = (cp.split_data(&x, 1)?, cp.split_data(&y, 1)?);
        let (g, lr) = (&self.groups, 3e-3);
        let loss = match &mut self.runner {
            Runner::Flat { gpt, optim } => {
                let loss = gpt.loss(Tensor::<B, 2, Int>::from_data(x, &Default::default()), Tensor::from_data(y, &Default::default()));
                let grads = GradientsParams::from_grads(loss.backward(), &**gpt);
                let grads = all_reduce_gradients(&**gpt, grads, &g.dp, 4096).map_err(|e| e.to_string())?;
                let (_, mut grads) = clip_grad_norm::<B, _>(vec![(&**gpt, grads)], 1.0, &g.tp, &g.pp).map_err(|e| e.to_string())?;
                **gpt = optim.step(lr, (**gpt).clone(), grads.remove(0));
                loss.into_scalar()
            }
            Runner::Piped { exec, optims } => {
                let m = exec.plan().shape.microbatches;
                let cut = |d: &TensorData, i| burn_parallel::comm::split_along(d, 0, m, i).unwrap();
                let mbs: Vec<_> = (0..m).map(|i| TokenBatch { inputs: cut(&x, i), targets: cut(&y, i) }).collect();
                let out = exec.step(&mbs).map_err(|e| e.to_string())?;
                let synced: Vec<_> = exec.stages().iter().zip(out.grads).map(|(s, gr)| all_reduce_gradients(&s.part, gr, &g.dp, 4096).unwrap()).collect();
                // Tied embeddings: the two copies' gradients summed after the DP reduction.
                let synced = match exec.model().config.tie_embeddings {
                    true => exec.all_reduce_tied_grads(synced, g.embedding.as_ref()).map_err(|e| e.to_string())?,
                    false => synced,
                };
                let parts = exec.stages().iter().map(|s| &s.part).zip(synced).collect();
                let (_, grads) = clip_grad_norm::<B, _>(parts, 1.0, &g.tp, &g.pp).map_err(|e| e.to_string())?;
                exec.update(optims, lr, grads);
                out.loss
            }
        };
        self.train.step += 1;
        self.train.samples_seen += GLOBAL_BATCH as u64;
        let t = Tensor::<Inner, 1>::from_floats([loss], &Default::default());
        Ok(all_reduce(t, ReduceOp::Mean, &g.dp).map_err(|e| e.to_string())?.into_scalar())
    }

    /// This rank's snapshot.
    pub fn snapshot(&self) -> Snapshot {
        let ctx = ShardContext::new(&self.groups);
        let (mut tensors, mut counters) = (Vec::new(), std::collections::BTreeMap::new());
        let mut add = |tensors_: Vec<HostTensor>, counters_: std::collections::BTreeMap<String, u64>| {
            tensors.extend(tensors_);
            counters.extend(counters_);
        };
        match &self.runner {
            Runner::Flat { gpt, optim } => {
                let same = |p: &str| p.to_string();
                add(module_tensors(&**gpt, &same, ctx), stream_counters(&gpt.random_streams()));
                let (t, c) = adamw_tensors(optim, &**gpt, &same, ctx);
                add(t, c);
            }
            Runner::Piped { exec, optims } => {
                for (s, o) in exec.stages().iter().zip(optims) {
                    let rename = |p: &str| PipelineModel::<B, 3>::global_param_path(exec.model(), &s.spec, p);
                    add(module_tensors(&s.part, &rename, ctx), stream_counters(&s.part.random_streams()));
                    let (t, c) = adamw_tensors(o, &s.part, &rename, ctx);
                    add(t, c);
                }
            }
        }
        Snapshot { step: self.train.step, layout: self.layout.config(), train: self.train.clone(), tensors, counters, sections: Default::default() }
    }

    /// Everything from `ckpt` (model, optimizer, streams, position).
    pub fn restore(&mut self, ckpt: &Checkpoint) -> Result<(), CheckpointError> {
        let ctx = ShardContext::new(&self.groups);
        match &mut self.runner {
            Runner::Flat { gpt, optim } => {
                let same = |p: &str| p.to_string();
                **gpt = load_module(ckpt, (**gpt).clone(), MODEL_PREFIX, &same, ctx)?;
                *optim = load_adamw(ckpt, optim.clone(), &**gpt, &same, ctx)?;
                restore_streams(ckpt, &gpt.random_streams());
            }
            Runner::Piped { exec, optims } => {
                let model = exec.model().clone();
                for (s, o) in exec.stages_mut().iter_mut().zip(optims.iter_mut()) {
                    let spec = s.spec.clone();
                    let rename = |p: &str| PipelineModel::<B, 3>::global_param_path(&model, &spec, p);
                    s.part = load_module(ckpt, s.part.clone(), MODEL_PREFIX, &rename, ctx)?;
                    *o = load_adamw(ckpt, o.clone(), &s.part, &rename, ctx)?;
                    restore_streams(ckpt, &s.part.random_streams());
                }
            }
        }
        self.train = ckpt.metadata().train.clone();
        Ok(())
    }
}

/// What a run does: start (fresh, or from a checkpoint), train `steps`, save into `save`.
pub struct Plan<'a> {
    pub layout: Layout,
    pub config: GptConfig,
    pub load: Option<&'a Path>,
    pub steps: usize,
    pub save: Option<&'a Path>,
    pub async_save: bool,
}

/// Runs `plan` on a thread world; returns rank 0's losses.
pub fn run(plan: &Plan<'_>) -> Vec<f32> {
    super::world(plan.layout.world(), |comm| {
        let mut rank = Rank::new(plan.layout, &plan.config, comm.clone())?;
        if let Some(dir) = plan.load {
            rank.restore(&Checkpoint::open(dir).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        }
        let losses = (0..plan.steps).map(|_| rank.step()).collect::<Result<Vec<_>, _>>()?;
        if let Some(dir) = plan.save {
            let options = CheckpointOptions { dir: dir.to_path_buf(), keep: 0, async_save: plan.async_save };
            let mut saver = Checkpointer::new(options, comm);
            saver.save(rank.snapshot()).map_err(|e| e.to_string())?;
            saver.finish().map_err(|e| e.to_string())?;
        }
        Ok(losses)
    })
    .remove(0)
}

/// A fresh directory under the system's temporary directory.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("bp-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
