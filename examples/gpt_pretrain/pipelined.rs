//! The `--pp N` path: GPT stages on pipeline ranks (each stage tensor-parallel over `--tp`),
//! driven by a schedule chosen by name.

use std::ops::Range;
use std::path::Path;

use burn::tensor::backend::AutodiffBackend;
use burn_parallel::checkpoint::{Snapshot, TrainState};
use burn_parallel::data::GlobalSampler;
use burn_parallel::optim::DistAdamW;
use burn_parallel::pipeline::{PipelineExecutor, PipelineModel, PipelineOptions};
use burn_parallel::timing;
use burn_parallel::{BackwardWith, Comm, ContextParallel, ParallelBackend, ParallelConfig, ProcessGroups};
use burn_parallel_modules::{GptPipeline, TokenBatch};
use burn_parallel_schedules::{render_svg, schedule_by_name, simulate, Costs, PipelineShape, Schedule};

use super::checkpointing::{self, Start};
use super::corpus::{Corpus, Split};
use super::training::Loop;
use super::{gpt_config, optimizer, Args, Summary};

/// Micro-batches per step: the pipeline's (default 2 × pp), or without a pipeline gradient
/// accumulation over them (default 1).
pub(crate) fn microbatches(args: &Args) -> usize {
    args.microbatches.unwrap_or(if args.pp > 1 { 2 * args.pp } else { 1 })
}

fn virtual_stages(args: &Args) -> usize {
    args.virtual_stages.unwrap_or(if args.schedule.starts_with("interleaved") { 2 } else { 1 })
}

fn schedule(args: &Args) -> Result<Box<dyn Schedule>, String> {
    schedule_by_name(&args.schedule).map_err(|e| e.to_string())
}

/// The pipeline flags, checked before anything is built: `--virtual-stages` needs `--pp` > 1,
/// the schedule must exist, and the micro-batches (pipeline or accumulation) must divide the batch.
pub(crate) fn check_args(args: &Args) -> Result<(), String> {
    if args.pp == 1 && args.virtual_stages.is_some() {
        return Err("--virtual-stages splits a pipeline: it needs --pp 2 or more".into());
    }
    if args.pp > 1 {
        schedule(args)?;
    }
    let m = microbatches(args);
    if m == 0 {
        return Err("--microbatches 0: a step needs at least one micro-batch".into());
    }
    if !args.batch_size.is_multiple_of(m) {
        let hint = if args.microbatches.is_none() && args.pp > 1 { " (the default, 2 x --pp; pass --microbatches)" } else { "" };
        return Err(format!("--batch-size {} is not divisible by --microbatches {m}{hint}", args.batch_size));
    }
    Ok(())
}

/// The memory model's description of this run.
pub(crate) fn memory_plan(args: &Args) -> burn_parallel::memory::TrainPlan {
    let m = microbatches(args);
    burn_parallel::memory::TrainPlan {
        dp: args.dp,
        cp: args.cp,
        pp: args.pp,
        tp: args.tp,
        virtual_stages: if args.pp > 1 { virtual_stages(args) } else { 1 },
        sequence_parallel: args.sequence_parallel,
        microbatch: args.batch_size / m,
        microbatches: m,
        schedule: args.schedule.clone(),
        recompute: args.recompute,
        zero: args.zero == 1,
        precision: args.precision,
        dropout: args.dropout > 0.0,
        loss_chunk: (args.loss_chunk > 0).then_some(args.loss_chunk),
        // What the layers resolve `--attention` to: the fused kernels only on the Cube backends.
        attention: crate::gpt_config(args)
            .attention
            .resolve_with(
                || match args.device != crate::DeviceKind::Cpu && args.d_model / args.heads.max(1) <= 256 {
                    true => Ok(()),
                    false => Err(String::new()),
                },
                args.dropout,
            )
            .unwrap_or_default(),
    }
}

/// Writes the plan's simulated timeline (forward 1, backward 2 = input 1 + weight 1).
pub(crate) fn write_timeline(args: &Args, path: &Path) -> Result<(), String> {
    let shape = PipelineShape::new(args.pp, virtual_stages(args), microbatches(args));
    let plan = schedule(args)?.plan(&shape).map_err(|e| e.to_string())?;
    let sim = simulate(&plan, &Costs::uniform()).map_err(|e| e.to_string())?;
    let title = format!("{}: pp={} micro-batches={} virtual stages={}", args.schedule, args.pp, shape.microbatches, shape.virtual_stages);
    std::fs::write(path, render_svg(&plan, &sim, &title)).map_err(|e| format!("cannot write --timeline {}: {e}", path.display()))?;
    tracing::info!(path = %path.display(), bubble = sim.bubble_fraction, peak_in_flight = ?sim.peak_in_flight, "pipeline timeline");
    Ok(())
}

/// The pipeline's micro-batches of the samples `samples` (of `split`, drawn by `sampler`):
/// this rank's chunks of each sequence under context parallelism.
fn split(args: &Args, split: &Split, samples: Range<u64>, sampler: &GlobalSampler, cp: &ContextParallel) -> Result<Vec<TokenBatch>, String> {
    let mbs = Corpus::microbatches::<burn::backend::Flex>(split, samples, microbatches(args), args.seq_len, sampler, &Default::default())?;
    let ids = |t: burn::tensor::Tensor<burn::backend::Flex, 2, burn::tensor::Int>| cp.split(t, 1).into_data().convert::<i64>();
    Ok(mbs.into_iter().map(|(x, y)| TokenBatch { inputs: ids(x), targets: ids(y) }).collect())
}

type Exec<B> = PipelineExecutor<B, GptPipeline, 3>;

/// This rank's stages with their parameters (and the optimizer's state) from `start`.
fn restore_stages<B>(start: &Start, groups: &ProcessGroups, exec: &mut Exec<B>, optim: &mut DistAdamW<B>) -> Result<(), String>
where
    B: AutodiffBackend + ParallelBackend + BackwardWith,
    B::InnerBackend: ParallelBackend,
{
    let model = exec.model().clone();
    let specs: Vec<_> = exec.stages().iter().map(|s| s.spec.clone()).collect();
    let model = &model;
    let renames: Vec<_> = specs.iter().map(|spec| move |p: &str| PipelineModel::<B, 3>::global_param_path(model, spec, p)).collect();
    let parts = exec.stages().iter().zip(&renames).map(|(s, r)| (s.part.clone(), r as &dyn Fn(&str) -> String)).collect();
    let parts = checkpointing::restore(start, groups, parts, optim)?;
    for (stage, part) in exec.stages_mut().iter_mut().zip(parts) {
        stage.part = part;
    }
    Ok(())
}

pub(crate) fn train_rank<B>(args: &Args, world: Comm, device: B::Device, data: &Corpus, start: &Start) -> Result<Summary, String>
where
    B: AutodiffBackend + ParallelBackend + BackwardWith + crate::device::DeviceBytes,
    B::InnerBackend: ParallelBackend,
{
    let cfg = ParallelConfig::new()
        .with_data_parallel(args.dp)
        .with_tensor_parallel(args.tp)
        .with_pipeline_parallel(args.pp)
        .with_virtual_stages(virtual_stages(args))
        .with_sequence_parallel(args.sequence_parallel)
        .with_context_parallel(args.cp);
    let groups = ProcessGroups::new(cfg, world.clone()).map_err(|e| e.to_string())?;
    let cp = ContextParallel::new(groups.cp.clone());
    let model = GptPipeline { config: gpt_config(args), tp: groups.tp.clone(), cp: Some(cp.clone()) };
    let opts = PipelineOptions { microbatches: microbatches(args), virtual_stages: virtual_stages(args), layout: None };
    let mut exec = Exec::<B>::new(model, schedule(args)?.as_ref(), &opts, groups.pp.clone(), device.clone()).map_err(|e| e.to_string())?;
    let mut optim = optimizer::<B>(args, &groups);
    restore_stages(start, &groups, &mut exec, &mut optim)?;
    if args.tie_embeddings {
        // The first stage's embedding and the last stage's replica: their gradients summed.
        optim.tie(exec.tied_params(), groups.embedding.as_ref()).map_err(|e| e.to_string())?;
    }
    let rank = world.global_rank();
    let mut run = Loop::new(args, &groups, start)?;
    crate::training::sync_timers::<B>(args, &device);
    let sampler = GlobalSampler::new(args.seed, "train");
    while run.running() {
        let mbs = timing::span!(timing::phase::DATA).in_scope(|| split(args, &data.train, run.samples(), &sampler, &cp))?;
        let out = exec.step(&mbs).map_err(|e| e.to_string())?;
        let parts = exec.stages().iter().map(|s| s.part.clone()).zip(out.grads).collect();
        let (parts, norm) = optim.step(run.lr(), parts, args.clip_grad).map_err(|e| run.failed(e))?;
        for (stage, part) in exec.stages_mut().iter_mut().zip(parts) {
            stage.part = part;
        }
        if !run.done(out.loss, norm, |train| snapshot(args, &groups, train, &exec, &optim))? {
            break;
        }
        if run.eval_due() {
            let _t = timing::span!(timing::phase::EVAL).entered();
            run.evaluated(evaluate(args, &exec, &data.val, "val", &cp)?);
        }
    }
    let ended = run.finish()?;
    if let Some((signal, steps)) = ended.stopped {
        return Ok(Summary::stopped(rank, signal, steps));
    }
    let device_bytes = B::bytes_in_use(&device);
    let train_loss = evaluate(args, &exec, &data.train, "train-eval", &cp)?;
    let val_loss = evaluate(args, &exec, &data.val, "val", &cp)?;
    let sample = "(sampling needs the whole model on one rank: run with --pp 1 to see generated text)".to_string();
    Ok(Summary { rank, device_bytes, first_loss: ended.first_loss, train_loss, val_loss, tokens_per_sec: ended.tokens_per_sec, sample, stopped: None })
}

/// This rank's stages, optimizers and streams after `train.step` steps.
fn snapshot<B>(args: &Args, groups: &ProcessGroups, train: &TrainState, exec: &Exec<B>, optim: &DistAdamW<B>) -> Snapshot
where
    B: AutodiffBackend + ParallelBackend + BackwardWith,
    B::InnerBackend: ParallelBackend,
{
    let model = exec.model();
    let renames: Vec<_> = exec.stages().iter().map(|s| move |p: &str| PipelineModel::<B, 3>::global_param_path(model, &s.spec, p)).collect();
    let parts: Vec<_> = exec.stages().iter().zip(&renames).map(|(s, r)| (&s.part, r as &dyn Fn(&str) -> String)).collect();
    checkpointing::snapshot(args, groups, train, &parts, optim)
}

fn evaluate<B, M>(args: &Args, exec: &PipelineExecutor<B, M, 3>, split_data: &Split, name: &str, cp: &ContextParallel) -> Result<f32, String>
where
    B: AutodiffBackend + ParallelBackend + BackwardWith,
    M: burn_parallel::pipeline::PipelineModel<B, 3, MicroBatch = TokenBatch>,
{
    let mut total = 0.0;
    for i in 0..args.eval_batches {
        let first = (i * args.batch_size) as u64;
        let batch = split(args, split_data, first..first + args.batch_size as u64, &GlobalSampler::new(0, name), cp)?;
        total += exec.forward_loss(&batch).map_err(|e| e.to_string())?;
    }
    crate::cp_mean(total / args.eval_batches as f32, cp)
}

#[cfg(test)]
mod tests {

    use super::*;

    fn args(flags: &str) -> Args {
        Args::parse_with_presets(std::iter::once("gpt_pretrain").chain(flags.split_whitespace())).unwrap()
    }

    #[test]
    fn pipeline_flags_are_checked_before_anything_is_built() {
        assert_eq!(check_args(&args("--pp 2")), Ok(()));
        assert_eq!(check_args(&args("--pp 3 --microbatches 4")), Ok(()));
        assert_eq!(check_args(&args("--microbatches 4")), Ok(()), "gradient accumulation");
        let e = check_args(&args("--microbatches 3")).unwrap_err();
        assert_eq!(e, "--batch-size 16 is not divisible by --microbatches 3");
        let e = check_args(&args("--microbatches 0")).unwrap_err();
        assert!(e.contains("at least one micro-batch"), "{e}");
        let e = check_args(&args("--virtual-stages 2")).unwrap_err();
        assert!(e.contains("it needs --pp 2 or more"), "{e}");
        let e = check_args(&args("--pp 3")).unwrap_err();
        assert!(e.contains("--batch-size 16 is not divisible by --microbatches 6 (the default, 2 x --pp"), "{e}");
        let e = check_args(&args("--pp 2 --schedule nope")).unwrap_err();
        assert!(e.contains("unknown schedule"), "{e}");
    }
}
