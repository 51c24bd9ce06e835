//! Pretrain a GPT with tensor, sequence, pipeline and data parallelism: `--tp N` ranks as threads
//! share every layer, `--pp` splits the layers into stages, `--dp` replicates the model.
//!
//! ```text
//! cargo run --release --example gpt_pretrain -- --tp 2 --steps 300
//! cargo run --release --example gpt_pretrain -- --data ../shared/data/tinyshakespeare.txt --tp 2
//! ```
//! Byte-level tokens by default (`--tokenizer gpt2`: GPT-2's BPE; `--shards DIR`: prepared
//! token shards). Without `--data` or `--shards`, trains on a generated corpus.

/// `println!` that ignores a closed stdout (a hung-up terminal: SIGHUP stops the run cleanly,
/// and its last lines must not turn that into a panic).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

mod args;
mod checkpointing;
mod corpus;
mod device;
mod pipelined;
mod report;
#[cfg(test)]
mod tests;
mod training;

use std::time::Duration;

use args::{Args, CommKind, DeviceKind};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use burn_parallel::attention::AttentionCore;
use burn_parallel::comm::ops::all_reduce;
use burn_parallel::data::GlobalSampler;
use burn_parallel::optim::{DistAdamW, DistAdamWConfig};
use burn_parallel::timing;
use burn_parallel::{
    all_ok, run_world, BackwardWith, Comm, ContextParallel, LocalWorldOptions, P2pMode, ParallelBackend, ParallelConfig, ProcessGroups, ReduceOp,
};
use burn_parallel_modules::{Gpt, GptConfig};
use checkpointing::Start;

use burn_parallel::optim::schedule::LrSchedule;
use corpus::{Corpus, Split};
use device::DeviceBytes;
use training::Loop;

/// What a rank reports (rank 0's losses, sample and throughput are printed).
pub(crate) struct Summary {
    /// The global rank.
    pub(crate) rank: usize,
    /// Device bytes in use after the last step (model state), on GPU backends.
    pub(crate) device_bytes: Option<u64>,
    pub(crate) first_loss: f32,
    pub(crate) train_loss: f32,
    pub(crate) val_loss: f32,
    pub(crate) tokens_per_sec: f64,
    pub(crate) sample: String,
    /// Stopped early by this signal after this many steps (`burn_parallel::preempt`).
    pub(crate) stopped: Option<(i32, u64)>,
}

impl Summary {
    /// A run stopped by `signal` after `steps` steps (saved, not evaluated).
    pub(crate) fn stopped(rank: usize, signal: i32, steps: u64) -> Self {
        let nan = f32::NAN;
        Summary {
            rank,
            device_bytes: None,
            first_loss: nan,
            train_loss: nan,
            val_loss: nan,
            tokens_per_sec: 0.0,
            sample: String::new(),
            stopped: Some((signal, steps)),
        }
    }
}

/// The model the flags describe. The vocabulary is the tokenizer's, padded to a multiple of
/// 128 × tp for gpt2 and where tp does not divide the byte vocabulary (or a resumed or
/// initialising checkpoint's padding, see `checkpointing::open_start`).
fn gpt_config(args: &Args) -> GptConfig {
    let used = args.tokenizer.vocab_size();
    let padded = used > 256 || !used.is_multiple_of(args.tp);
    let vocab = args.vocab_override.unwrap_or_else(|| if padded { burn_parallel::data::padded_vocab(used, args.tp) } else { used });
    GptConfig::new(vocab, args.context_override.unwrap_or(args.seq_len), args.d_model, args.heads, args.layers, args.d_ff.unwrap_or(4 * args.d_model))
        .with_vocab_used((vocab > used).then_some(used))
        .with_dropout(args.dropout)
        .with_seed(args.seed)
        .with_sequence_parallel(args.sequence_parallel)
        .with_precision(args.precision)
        .with_recompute(args.recompute)
        .with_loss_chunk((args.loss_chunk > 0).then_some(args.loss_chunk))
        .with_attention(args.attention)
        .with_tie_embeddings(args.tie_embeddings)
        .with_activation(args.activation)
        .with_norm(args.norm)
        .with_position(args.position)
        .with_rope_theta(args.rope_theta)
        .with_rope_scaling(args.rope_scaling)
        .with_bias(!args.no_bias)
        .with_kv_heads(args.kv_heads.filter(|&k| k != args.heads))
        .with_layer_norm_eps(args.norm_eps)
}

/// This rank's optimizer: AdamW (β₂ 0.95) with f32 masters, DP reduction, global clipping
/// (`--clip-grad`), ZeRO-1 (`--zero 1`) and fused updates (`--optimizer-group-mb`).
pub(crate) fn optimizer<B>(args: &Args, groups: &ProcessGroups) -> DistAdamW<B>
where
    B: AutodiffBackend,
    B::InnerBackend: ParallelBackend,
{
    let group_mb = args.optimizer_group_mb.unwrap_or(if args.device == DeviceKind::Cpu { 0 } else { 25 });
    let config = DistAdamWConfig::new()
        .with_beta_2(0.95)
        .with_weight_decay(args.weight_decay)
        .with_zero(args.zero == 1)
        .with_group_bytes(group_mb.saturating_mul(1 << 20));
    DistAdamW::new(config, groups)
}

/// The mean of a per-replica value over the data-parallel group (for logging).
pub(crate) fn dp_mean(value: f32, groups: &ProcessGroups) -> Result<f32, String> {
    let t = burn::tensor::Tensor::<burn::backend::Flex, 1>::from_floats([value], &Default::default());
    Ok(all_reduce(t, ReduceOp::Mean, &groups.dp).map_err(|e| e.to_string())?.into_scalar())
}

/// The learning-rate schedule the flags describe (`burn_parallel::optim::schedule`); an error
/// names the flag.
pub(crate) fn lr_schedule(args: &Args) -> Result<LrSchedule, String> {
    use burn_parallel::optim::schedule::{DecayStyle, LrScheduleConfig, ScheduleError};
    if args.wsd_decay_steps.is_some() && args.lr_decay != DecayStyle::Wsd {
        return Err(format!("--wsd-decay-steps needs --lr-decay wsd (not {})", args.lr_decay));
    }
    let config = LrScheduleConfig::new(args.lr, args.steps)
        .with_warmup_steps(args.warmup)
        .with_decay(args.lr_decay)
        .with_min_ratio(args.min_lr_ratio)
        .with_decay_steps(args.wsd_decay_steps);
    config.init().map_err(|e| match e {
        ScheduleError::BadFloor(_) => format!("--min-lr-ratio: {e}"),
        ScheduleError::DecayTooLong { .. } | ScheduleError::NoDecaySteps => format!("--wsd-decay-steps: {e}"),
        ScheduleError::BadPeak(_) => format!("--lr: {e}"),
    })
}

/// The mean loss of `--eval-batches` batches of `split` (this rank's chunks of each sequence
/// under context parallelism, averaged over the CP group).
fn evaluate<B: ParallelBackend>(gpt: &Gpt<B>, split: &Split, name: &str, args: &Args, device: &B::Device, cp: &ContextParallel) -> Result<f32, String> {
    let mut total = 0.0;
    for i in 0..args.eval_batches {
        let (x, y) = Corpus::eval_batch::<B>(split, args.batch_size, args.seq_len, name, i, device)?;
        total += gpt.loss(cp.split(x, 1), cp.split(y, 1)).into_scalar().elem::<f32>();
    }
    cp_mean(total / args.eval_batches as f32, cp)
}

/// The mean of a value over the context-parallel group (each rank's loss covers its chunks).
pub(crate) fn cp_mean(value: f32, cp: &ContextParallel) -> Result<f32, String> {
    if cp.size() == 1 {
        return Ok(value);
    }
    let t = burn::tensor::Tensor::<burn::backend::Flex, 1>::from_floats([value], &Default::default());
    Ok(all_reduce(t, ReduceOp::Mean, cp.comm()).map_err(|e| e.to_string())?.into_scalar())
}

fn train_rank<B>(args: &Args, comm: Comm, device: B::Device, data: &Corpus, start: &Start) -> Result<Summary, String>
where
    B: AutodiffBackend + ParallelBackend + BackwardWith + DeviceBytes,
    B::InnerBackend: ParallelBackend,
{
    let rank = comm.global_rank();
    let config = gpt_config(args);
    let layout = ParallelConfig::new()
        .with_data_parallel(args.dp)
        .with_context_parallel(args.cp)
        .with_tensor_parallel(args.tp)
        .with_sequence_parallel(args.sequence_parallel);
    let groups = ProcessGroups::new(layout, comm).map_err(|e| e.to_string())?;
    let cp = ContextParallel::new(groups.cp.clone());
    let gpt: Gpt<B> = config.init(&groups.tp, &device).map_err(|e| format!("invalid model for --tp {}: {e}", args.tp))?;
    let gpt = gpt.with_context_parallel(cp.clone());
    let mut optim = optimizer::<B>(args, &groups);
    let same = |p: &str| p.to_string();
    let mut gpt = checkpointing::restore(start, &groups, vec![(gpt, &same)], &mut optim)?.remove(0);
    let mut run = Loop::new(args, &groups, start)?;
    training::sync_timers::<B>(args, &device);
    let sampler = GlobalSampler::new(args.seed, "train");
    while run.running() {
        let data_span = timing::span!(timing::phase::DATA).entered();
        let mbs = Corpus::microbatches::<B>(&data.train, run.samples(), pipelined::microbatches(args), args.seq_len, &sampler, &device)?;
        let mbs = mbs.into_iter().map(|(x, y)| (cp.split(x, 1), cp.split(y, 1))).collect();
        drop(data_span);
        let (loss, grads) = gpt.forward_backward_accumulated(mbs).map_err(|e| e.to_string())?;
        let (mut parts, norm) = optim.step(run.lr(), vec![(gpt, grads)], args.clip_grad).map_err(|e| run.failed(e))?;
        gpt = parts.remove(0);
        if !run.done(loss, norm, |train| checkpointing::snapshot(args, &groups, train, &[(&gpt, &same)], &optim))? {
            break;
        }
        if run.eval_due() {
            let _t = timing::span!(timing::phase::EVAL).entered();
            run.evaluated(evaluate(&gpt.valid(), &data.val, "val", args, &device, &cp)?);
        }
    }
    let ended = run.finish()?;
    if let Some((signal, steps)) = ended.stopped {
        return Ok(Summary::stopped(rank, signal, steps));
    }
    let device_bytes = B::bytes_in_use(&device);
    let model = gpt.valid();
    let train_loss = evaluate(&model, &data.train, "train-eval", args, &device, &cp)?;
    let val_loss = evaluate(&model, &data.val, "val", args, &device, &cp)?;
    let prompt: Vec<usize> = data.val.window(0, args.seq_len.min(16))?.into_iter().map(|t| t as usize).collect();
    let tokens = model.generate(&prompt, args.sample_tokens, args.temperature, args.seed).map_err(|e| e.to_string())?;
    let sample = data.tokenizer.decode(&tokens.iter().map(|&t| t as u32).collect::<Vec<_>>()).map_err(|e| e.to_string())?;
    Ok(Summary { rank, device_bytes, first_loss: ended.first_loss, train_loss, val_loss, tokens_per_sec: ended.tokens_per_sec, sample, stopped: None })
}

/// Before any rank starts on `device`: the precision checked against the backend, the
/// tensor-core switch set, and the fused attention kernels that will run logged.
pub(crate) fn prepare<B: AutodiffBackend + ParallelBackend>(args: &Args, device: &B::Device) -> Result<(), String> {
    args.precision.check::<B::InnerBackend>(device).map_err(|e| format!("--precision: {e}"))?;
    burn_parallel::attention::set_tensor_cores(args.attention_tensor_cores);
    let d_head = args.d_model / args.heads.max(1);
    if args.attention.resolve::<B>(device, d_head, args.dropout) == Ok(AttentionCore::Fused) {
        tracing::info!(kernels = %B::fused_attention_kernels(device, args.precision.dtype(), d_head), "fused attention");
    }
    Ok(())
}

/// Every rank's summary, in rank order.
fn run<B>(args: &Args, device: B::Device, data: &Corpus, start: &Start) -> Result<Vec<Summary>, String>
where
    B: AutodiffBackend + ParallelBackend + BackwardWith + DeviceBytes,
    B::InnerBackend: ParallelBackend,
{
    prepare::<B>(args, &device)?;
    // Thread ranks follow NCCL's point-to-point rules, so what runs here runs on NCCL.
    let opts = LocalWorldOptions { timeout: Duration::from_secs(args.timeout_secs), p2p: P2pMode::Rendezvous };
    let world = args.world();
    if args.pp > 1 {
        let results = run_world(world, opts, |comm| pipelined::train_rank::<B>(args, comm, device.clone(), data, start));
        return all_ok(results);
    }
    let results = run_world(world, opts, |comm| train_rank::<B>(args, comm, device.clone(), data, start));
    all_ok(results)
}

fn load(args: &Args) -> Result<Corpus, String> {
    if let Some(spec) = &args.shards {
        let parts = burn_parallel::data::Blend::parse_spec(spec).map_err(|e| format!("--shards {e}"))?;
        let c = Corpus::from_shards(&parts, args.tokenizer, args.seq_len)?;
        tracing::info!(train_tokens = c.train.len(), val_tokens = c.val.len(), %spec, "token shards");
        return Ok(c);
    }
    let text = match &args.data {
        Some(path) => std::fs::read(path).map_err(|e| format!("cannot read --data {}: {e}", path.display()))?,
        None => corpus::generated(400_000, args.seed).into_bytes(),
    };
    let source = args.data.as_ref().map_or("generated corpus".to_string(), |p| p.display().to_string());
    let c = Corpus::from_text(&text, args.tokenizer, args.seq_len)?;
    tracing::info!(bytes = text.len(), train_tokens = c.train.len(), tokenizer = %args.tokenizer, %source, "corpus");
    Ok(c)
}

/// Logs to stderr at `RUST_LOG`'s level (default info); with `--timers` the phases' times are
/// added up, with `--trace FILE` written as a Chrome trace (keep the guard until the end).
pub(crate) fn init_logging(args: &Args) -> Result<Option<tracing_chrome::FlushGuard>, String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter);
    // (With --trace too: the layer makes spans wait for a GPU, see training::sync_timers.)
    let timers = args.timing().then(burn_parallel::timing::layer);
    let (trace, guard) = match &args.trace {
        Some(path) => {
            // One process per rank (torchrun's RANK, or Slurm's SLURM_PROCID): a file each.
            let rank = burn_parallel::launch::JobEnv::from_env().ok().map(|e| e.rank.to_string());
            let path = trace_path(path, rank.filter(|_| args.comm != CommKind::Local));
            std::fs::File::create(&path).map_err(|e| format!("--trace {}: {e}", path.display()))?;
            let (layer, guard) = burn_parallel::timing::trace_layer(&path);
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(fmt).with(timers).with(trace).init();
    Ok(guard)
}

/// `--trace FILE` of the rank process `rank`: `FILE` with `.rank<N>` before its extension.
fn trace_path(path: &std::path::Path, rank: Option<String>) -> std::path::PathBuf {
    let Some(rank) = rank else { return path.to_path_buf() };
    let stem = path.file_stem().map_or(String::new(), |s| s.to_string_lossy().into_owned());
    let ext = path.extension().map_or(String::new(), |e| format!(".{}", e.to_string_lossy()));
    path.with_file_name(format!("{stem}.rank{rank}{ext}"))
}

fn main() {
    let args = Args::parse_with_presets(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let result = init_logging(&args).and_then(|guard| main_result(&args).map(|()| drop(guard)));
    if let Err(e) = result {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "error: {e}");
        std::process::exit(1);
    }
}

fn main_result(args: &Args) -> Result<(), String> {
    checkpointing::check_args(args)?;
    let mut args = args.clone();
    let start = checkpointing::open_start(&mut args)?;
    let args = &args;
    if args.tp == 0 || args.pp == 0 || args.dp == 0 || args.cp == 0 || args.steps == 0 || args.batch_size == 0 || args.eval_batches == 0 {
        return Err("--tp, --pp, --dp, --cp, --steps, --batch-size and --eval-batches must be at least 1".into());
    }
    args.check_numbers()?;
    args.warn_preset_tokenizer();
    lr_schedule(args)?;
    let config = gpt_config(args);
    config.validate(args.tp).map_err(|e| model_error(args, e))?;
    config.check_seq_len_cp(args.seq_len, args.tp, args.cp).map_err(|e| format!("--seq-len: {e}"))?;
    pipelined::check_args(args)?;
    if args.zero == 1 && args.dp * args.cp == 1 {
        return Err("--zero 1 shards the optimizer over the --dp group (with --cp: its dp × cp ranks): with --dp 1 there is nothing to shard (refused rather than ignored)".into());
    }
    if let Some(path) = &args.timeline {
        pipelined::write_timeline(args, path)?;
    }
    if let Some(path) = &args.metrics {
        // Opened (appending) before training, so a bad path fails now, not on every rank later.
        burn_parallel::metrics::MetricsLog::append(path).map_err(|e| format!("--metrics: {e}"))?;
    }
    if args.comm == CommKind::Nccl && args.device != DeviceKind::Cuda {
        return Err("--comm nccl needs --device cuda".into());
    }
    if args.comm == CommKind::Tcp && args.device != DeviceKind::Cpu {
        return Err("--comm tcp runs CPU ranks: use --device cpu (GPU processes talk NCCL: --comm nccl)".into());
    }
    let data = load(args)?;
    // From here on SIGTERM / SIGHUP / Ctrl-C stop every rank after the same step and save it
    // (before, they end the process at once: there is nothing to save yet).
    burn_parallel::preempt::install();
    tracing::info!(dp = args.dp, cp = args.cp, tp = args.tp, pp = args.pp, sequence_parallel = args.sequence_parallel, device = ?args.device, steps = args.steps, "training");
    let summaries = match args.device {
        DeviceKind::Cpu if args.comm == CommKind::Tcp => vec![device::run_tcp(args, &data, &start)?],
        DeviceKind::Cpu => run::<burn::backend::Autodiff<burn::backend::Flex>>(args, Default::default(), &data, &start)?,
        DeviceKind::Cuda => device::run_cuda(args, &data, &start)?,
        DeviceKind::Wgpu => device::run_wgpu(args, &data, &start)?,
    };
    let summary = &summaries[0];
    if let Some((signal, steps)) = summary.stopped {
        let why = match signal {
            burn_parallel::preempt::TIME_LIMIT => format!("--time-limit-mins {}", args.time_limit_mins.unwrap_or_default()),
            s => format!("signal {s}"),
        };
        let line = match &args.save_dir {
            Some(dir) => format!("stopped by {why} after step {steps} (saved in {}; --resume latest goes on)", dir.display()),
            None if signal == burn_parallel::preempt::TIME_LIMIT => format!("stopped by {why} after step {steps} (no --save-dir: nothing saved)"),
            None => return Err(format!("stopped by {why} after step {steps}: nothing saved (no --save-dir)")),
        };
        say!("{line}");
        return Ok(());
    }
    // One process per rank (NCCL, TCP): rank 0 tells the run; every rank its memory row.
    if summary.rank == 0 {
        say!("dp={} cp={} pp={} tp={} steps={} tokens/s={:.0}", args.dp, args.cp, args.pp, args.tp, args.steps, summary.tokens_per_sec);
        say!("{}", throughput_line(args, summary.tokens_per_sec));
        say!("loss: first step {:.4} -> final train {:.4}, validation {:.4}", summary.first_loss, summary.train_loss, summary.val_loss);
        say!("--- sample ---\n{}\n--------------", summary.sample);
    }
    memory_table(args, &summaries)?;
    Ok(())
}

/// A model error named by the flag behind it.
fn model_error(args: &Args, e: burn_parallel::ConfigError) -> String {
    use burn_parallel::ConfigError::{NotDivisible, ZeroSize};
    let flag = match &e {
        NotDivisible { degree_name: "tensor_parallel", .. } => format!("--tp {}", args.tp),
        NotDivisible { .. } => "--d-model / --heads".into(),
        ZeroSize { what } => {
            let flags =
                [("max_seq_len", "--seq-len"), ("hidden size", "--d-model"), ("layers", "--layers"), ("ffn size", "--d-ff"), ("attention heads", "--heads")];
            flags.iter().find(|(w, _)| w == what).map_or("model".into(), |(_, f)| format!("{f} 0"))
        }
        _ => "model".into(),
    };
    format!("{flag}: {e}")
}

/// Model FLOPs per token (`6·N + 12·L·h·s`), achieved TFLOP/s and MFU against `--peak-tflops`
/// or the detected card's dense peak. N counts the weights a token multiplies: every parameter
/// but the two embeddings (lookups, no FLOPs), and the head's `h·V` (its own, or with
/// `--tie-embeddings` the embedding's: the same matmul, as nanoGPT counts it). Thread ranks
/// share one device; NCCL ranks have one each.
fn throughput_line(args: &Args, tokens_per_sec: f64) -> String {
    let (flops, n) = model_flops(args);
    let achieved = tokens_per_sec * flops / 1e12;
    let devices = if args.comm == CommKind::Nccl { args.world() as f64 } else { 1.0 };
    let peak = args.peak_tflops.or_else(|| device::detected_peak(args));
    let mfu =
        peak.map_or("MFU: pass --peak-tflops".to_string(), |p| format!("MFU {:.1}% of {p} TFLOP/s x {devices} devices", 100.0 * achieved / (p * devices)));
    let total = burn_parallel::memory::model::parameter_count(&gpt_shape(args));
    format!("model FLOPs/token {:.3e} (N = {:.2}M matmul weights of {:.2}M parameters); achieved {achieved:.3} TFLOP/s; {mfu}", flops, n / 1e6, total / 1e6)
}

/// (model FLOPs per token, N): see [`throughput_line`].
fn model_flops(args: &Args) -> (f64, f64) {
    let c = gpt_config(args);
    let wpe = if c.position == burn_parallel::arch::Position::Learned { args.seq_len } else { 0 };
    let embeddings = ((c.vocab_size + wpe) * c.d_model) as f64;
    let untied = burn_parallel::memory::GptShape { tied_embeddings: false, ..gpt_shape(args) };
    let n = burn_parallel::memory::model::parameter_count(&untied) - embeddings;
    (6.0 * n + 12.0 * (c.n_layers * c.d_model * args.seq_len) as f64, n)
}

/// The model's shape as the memory model takes it.
fn gpt_shape(args: &Args) -> burn_parallel::memory::GptShape {
    let c = gpt_config(args);
    burn_parallel::memory::GptShape {
        vocab: c.vocab_size,
        seq: args.seq_len,
        hidden: c.d_model,
        heads: c.n_heads,
        layers: c.n_layers,
        ffn: c.d_ff,
        tied_embeddings: c.tie_embeddings,
        activation: c.activation,
        arch: burn_parallel::arch::Arch { norm: c.norm, position: c.position, no_bias: !c.bias, kv_heads: c.kv_heads },
    }
}

/// The memory model's prediction for this run, per pipeline rank, next to each rank's
/// measurement: on the CPU (thread ranks) the peak host bytes of its thread, which the tracking
/// allocator sees whole; on a GPU the device bytes in use after the last step (cubecl keeps no
/// peak), to compare with the predicted model state (parameters + optimizer state).
fn memory_table(args: &Args, summaries: &[Summary]) -> Result<(), String> {
    let shape = gpt_shape(args);
    let plan = pipelined::memory_plan(args);
    let est = burn_parallel::memory::estimate(&shape, &plan)?;
    // Thread ranks: each thread's bytes; a TCP process: everything it allocates (its rank's).
    let host = args.device == DeviceKind::Cpu && burn_parallel::memory::installed();
    let processes = args.comm != CommKind::Local;
    let mb = |b: f64| format!("{:.2}", b / 1e6);
    if processes && summaries[0].rank != 0 {
        // Rank 0 printed the table's head.
    } else if args.device == DeviceKind::Cpu {
        let whose = if processes { "process" } else { "thread" };
        say!("memory per rank (MB; predicted by burn_parallel::memory, measured: peak host bytes of the rank's {whose} over the whole run, evaluation and checkpoints included):");
        say!("| rank | pp | params | grads | optimizer | activations | predicted peak | measured peak |");
    } else {
        say!("memory per rank (MB; predicted by burn_parallel::memory, measured: device bytes in use after the last step):");
        say!("| rank | pp | params | grads | optimizer | activations | predicted peak | predicted params + optimizer | measured after the last step |");
    }
    for rank in 0..args.world() {
        if processes && summaries.iter().all(|s| s.rank != rank) {
            continue;
        }
        let pp = rank / (args.dp * args.cp * args.tp);
        let e = &est[pp];
        let measured = match args.device {
            DeviceKind::Cpu if host => mb(burn_parallel::memory::peak(rank) as f64),
            DeviceKind::Cpu => "-".into(),
            _ => {
                let device = summaries.iter().find(|s| s.rank == rank).and_then(|s| s.device_bytes);
                format!("{} | {}", mb(e.params + e.optimizer), device.map_or("-".into(), |b| mb(b as f64)))
            }
        };
        let cols = [e.params, e.grads, e.optimizer, e.activations, e.peak].map(mb).join(" | ");
        say!("| {rank} | {pp} | {cols} | {measured} |");
    }
    Ok(())
}

#[global_allocator]
static ALLOC: burn_parallel::memory::TrackingAllocator = burn_parallel::memory::TrackingAllocator;
