//! The example's flags, and the model presets they select.

use std::path::PathBuf;

use burn_parallel::attention::AttentionKernel;
use burn_parallel::data::Tokenizer;
use burn_parallel::optim::schedule::DecayStyle;
use burn_parallel::precision::Precision;
use burn_parallel::presets::{LlamaValues, ModelPreset, PresetValues};
use burn_parallel::recompute::Recompute;
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub(crate) enum DeviceKind {
    /// CPU (burn-flex).
    Cpu,
    /// One CUDA GPU shared by the rank threads (needs `--features cuda`).
    Cuda,
    /// The default wgpu adapter (Vulkan/Metal/DX12) shared by the rank threads (needs
    /// `--features wgpu`): burn's `Wgpu`, the same `Fusion<CubeBackend>` path and kernels as
    /// `Cuda` (CI runs it on lavapipe, software Vulkan). f32 only where the adapter has no bf16.
    Wgpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub(crate) enum CommKind {
    /// Ranks are threads of this process (any device).
    Local,
    /// One process per rank and GPU, NCCL between them (`--device cuda`; start with
    /// `burn-parallel launch --nproc-per-node N -- gpt_pretrain ...`, torchrun or Slurm; without
    /// those variables: a world of one).
    Nccl,
    /// One process per rank on the CPU, TCP between them (`--device cpu`; start with `burn-parallel
    /// launch` as for NCCL): the thread ranks' numbers bit for bit, from separate processes.
    Tcp,
}

/// Pretrain a small GPT on a text file with tensor parallelism across local threads.
#[derive(Parser, Debug, Clone, serde::Serialize)]
#[command(version, about)]
pub(crate) struct Args {
    /// Text file to train on (tokenized with --tokenizer). Default: a generated corpus built into
    /// the example.
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Prepared token shards (`DIR/train_*.bin`, `DIR/val_*.bin` from `burn-parallel prepare`,
    /// or llm.c's `*_train_*.bin`, `*_val*.bin`), memory-mapped, instead of --data. Several
    /// datasets blended by weight: WEIGHT:DIR,WEIGHT:DIR,... (Megatron's --data-path W1 P1 W2
    /// P2; e.g. 0.7:web,0.3:books: every global batch of up to 1000 samples takes each in
    /// proportion within 2 samples; validation blends their val shards alike).
    #[arg(long)]
    pub(crate) shards: Option<String>,
    /// byte (vocabulary 256, padded as gpt2's where --tp does not divide it), gpt2 (GPT-2's BPE,
    /// vocabulary 50257 padded to a multiple of 128 x --tp; padded logits are masked: never
    /// sampled, never in the loss), or llama3:PATH (Llama 3's BPE from its tokenizer.model, the
    /// hub repository's original/tokenizer.model: vocabulary 128256).
    #[arg(long, default_value = "byte", value_parser = parse_tokenizer)]
    pub(crate) tokenizer: Tokenizer,
    /// Model size: tiny, gpt2-124m, gpt2-350m, gpt2-774m, gpt2-1.5b (GPT-2's shapes, context
    /// 1024, the gpt2 tokenizer, batch 8, GPT-3's learning rate for the size: 6e-4, 3e-4,
    /// 2.5e-4, 2e-4), llama3.2-1b, llama3.2-3b, llama3.1-8b, llama3.1-70b, llama3.1-405b
    /// (Llama 3's blocks: widths, 8 key/value heads, SwiGLU, RMS norms, RoPE θ 500000 with Llama
    /// 3.1's scaling, tied embeddings for 3.2; context 8192, batch 8; learning rate 3e-4, 1.5e-4
    /// for 70B, 8e-5 for 405B; the gpt2 tokenizer unless --tokenizer llama3:PATH gives Llama 3's
    /// tokenizer.model, which is not shipped: the vocabulary is then GPT-2's, not 128256, and
    /// a warning says so); explicit flags override it.
    #[arg(long, default_value = "tiny", value_parser = parse_preset)]
    pub(crate) model: ModelPreset,
    /// Peak TFLOP/s of one device for the MFU line (default: the detected card's bf16/f32 dense
    /// peak on CUDA; none on CPU).
    #[arg(long)]
    pub(crate) peak_tflops: Option<f64>,
    /// Compute the cross-entropy this many token rows at a time in training steps (its f32
    /// softmax is never whole: [b·s, V/t] f32 is 6.6 GB for GPT-2 at b 32, s 1024); 0: whole.
    /// Default 0 for the tiny model, 1024 for the GPT-2 presets.
    #[arg(long, default_value_t = 0)]
    pub(crate) loss_chunk: usize,
    /// The padded vocabulary of a checkpoint being resumed (set by the program).
    #[arg(skip)]
    pub(crate) vocab_override: Option<usize>,
    /// The longer context of a rotary checkpoint being resumed or initialised from (set by the
    /// program).
    #[arg(skip)]
    pub(crate) context_override: Option<usize>,
    /// Tensor-parallel degree: ranks (threads) that each hold 1/tp of every layer.
    #[arg(long, default_value_t = 1)]
    pub(crate) tp: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300)]
    pub(crate) steps: usize,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub(crate) device: DeviceKind,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    pub(crate) batch_size: usize,
    /// Tokens per sequence (context length).
    #[arg(long, default_value_t = 64)]
    pub(crate) seq_len: usize,
    /// Model width.
    #[arg(long, default_value_t = 128)]
    pub(crate) d_model: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4)]
    pub(crate) layers: usize,
    /// Attention heads (divisible by --tp).
    #[arg(long, default_value_t = 4)]
    pub(crate) heads: usize,
    /// MLP inner width (default 4 × d_model).
    #[arg(long)]
    pub(crate) d_ff: Option<usize>,
    /// Tied embeddings (GPT-2's, Megatron's default): the head is the token embedding, V·h
    /// fewer parameters (GPT-2 124M has 124M with it, 163M without). Under --pp the last stage
    /// holds a replica; costs one all-reduce of its V/tp·h gradient between the first and last
    /// stage per step. Off by default (the GPT-2 presets too: the device benchmark's PyTorch
    /// model is untied; on for Llama 3.2's); `--tie-embeddings false` unties a preset's.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub(crate) tie_embeddings: bool,
    /// The MLPs' activation: gelu (x·Φ(x)), or gelu-tanh (GPT-2's tanh approximation,
    /// HuggingFace's gelu_new: what pretrained GPT-2 weights expect; composed of Burn's ops, it
    /// keeps two [b·s, ffn/tp] tensors more per block).
    /// SwiGLU (Llama's, `swiglu`) adds a gate projection (h·ffn/tp more weights per block) and
    /// keeps three [b·s, ffn/tp] tensors more per block; Llama sizes --d-ff at about 8/3 × d_model.
    #[arg(long, default_value = "gelu", value_parser = parse_activation)]
    pub(crate) activation: burn_parallel::activation::Activation,
    /// The norms: layer-norm (GPT-2), or rms-norm (Llama: x/√(mean(x²)+ε)·γ, no β; one f32
    /// statistic per row instead of two; fused kernels on wgpu/CUDA, composed ops on the CPU).
    #[arg(long, default_value = "layer-norm", value_parser = parse_norm)]
    pub(crate) norm: burn_parallel::arch::Norm,
    /// Positions: learned (GPT-2's wpe table), or rope (Llama's rotary embedding of queries and
    /// keys, rotate-half pairs; no wpe; costs a few element-wise ops per block). Needs an even
    /// head width.
    #[arg(long, default_value = "learned", value_parser = parse_position)]
    pub(crate) position: burn_parallel::arch::Position,
    /// The norms' ε (layer norm or RMS norm; Llama's files say 1e-5 or 1e-6).
    #[arg(long, default_value_t = 1e-5)]
    pub(crate) norm_eps: f64,
    /// RoPE's base θ (with --position rope; Llama 2: 10000, Llama 3: 500000).
    #[arg(long, default_value_t = 10000.0)]
    pub(crate) rope_theta: f64,
    /// Llama 3.1's long-context RoPE frequency scaling (with --position rope): `llama3`
    /// (factor 8, low 1, high 4, original context 8192) or `llama3:FACTOR,LOW,HIGH,ORIGINAL`
    /// (Llama 3.2: llama3:32,1,4,8192); Megatron's --use-rope-scaling / --rope-scaling-factor.
    /// No cost: the tables change, nothing else. --init-from may change it (and --rope-theta):
    /// a long-context extension; --resume keeps it.
    #[arg(long)]
    pub(crate) rope_scaling: Option<burn_parallel::arch::RopeScaling>,
    /// No biases in the attention's and the MLPs' projections (Llama; its presets set it,
    /// `--no-bias false` keeps them).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub(crate) no_bias: bool,
    /// Grouped-query attention: this many key/value heads, each shared by --heads / N query
    /// heads (Llama 2 70B, Llama 3: 8); must divide --heads and be divisible by --tp. The
    /// q/k/v projection shrinks to (heads + 2N)·head-width columns. Default: one per head.
    #[arg(long)]
    pub(crate) kv_heads: Option<usize>,
    /// Dropout probability.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) dropout: f64,
    /// Peak learning rate (linear warm-up, then --lr-decay to --min-lr-ratio of it); a GPT-2
    /// preset sets its own (see --model).
    #[arg(long, default_value_t = 3e-3)]
    pub(crate) lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 20)]
    pub(crate) warmup: usize,
    /// The decay after the warm-up, over the rest of --steps: cosine, linear, constant, or wsd
    /// (warm-up, stable, decay: the peak until the last --wsd-decay-steps, then linear)
    /// (`burn_parallel::optim::schedule`).
    #[arg(long, default_value_t = DecayStyle::Cosine)]
    pub(crate) lr_decay: DecayStyle,
    /// The learning rate the decay falls to, as a fraction of the peak (Megatron's --min-lr /
    /// --lr): linear and cosine reach it at --steps, one past the last step (as Megatron's);
    /// wsd at the last step.
    #[arg(long, default_value_t = 0.1)]
    pub(crate) min_lr_ratio: f64,
    /// --lr-decay wsd: steps of the final decay (default: a tenth of the steps after the warm-up).
    #[arg(long)]
    pub(crate) wsd_decay_steps: Option<usize>,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.1)]
    pub(crate) weight_decay: f32,
    /// Seed of weights, dropout, batches and sampling.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Evaluate the validation loss every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub(crate) eval_every: usize,
    /// Batches per evaluation.
    #[arg(long, default_value_t = 8)]
    pub(crate) eval_batches: usize,
    /// Tokens to generate at the end (bytes with --tokenizer byte, BPE tokens with gpt2).
    #[arg(long, default_value_t = 300)]
    pub(crate) sample_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    pub(crate) temperature: f64,
    /// Seconds any collective may wait for a peer before failing.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_secs: u64,
    /// CUDA only: directory of cubecl's kernel and autotune caches (default: the user cache dir).
    #[arg(long)]
    pub(crate) kernel_cache: Option<PathBuf>,
    /// Sequence parallelism over the TP group: layer norms and dropouts on sequence shards
    /// (--seq-len must be divisible by --tp).
    #[arg(long)]
    pub(crate) sequence_parallel: bool,
    /// Data-parallel degree: model replicas, each on its own data (world = dp × cp × pp × tp threads).
    #[arg(long, default_value_t = 1)]
    pub(crate) dp: usize,
    /// Context-parallel degree: each sequence split over this many ranks in load-balanced
    /// chunks, keys and values all-gathered in every attention (Megatron's
    /// --context-parallel-size; costs an all-gather per layer forward, a reduce-scatter
    /// backward). --seq-len must be divisible by 2 × cp; every --attention core runs under it
    /// (fused and chunked: each of a rank's two query chunks at its positions).
    #[arg(long, default_value_t = 1)]
    pub(crate) cp: usize,
    /// Clip the global gradient norm (over all TP/PP ranks, each parameter counted once) to this.
    #[arg(long)]
    pub(crate) clip_grad: Option<f32>,
    /// Pipeline-parallel degree: ranks holding consecutive stages (world = dp × cp × pp × tp threads).
    #[arg(long, default_value_t = 1)]
    pub(crate) pp: usize,
    /// Pipeline schedule: gpipe, 1f1b, interleaved-1f1b, zb-h1.
    #[arg(long, default_value = "1f1b")]
    pub(crate) schedule: String,
    /// Micro-batches per step (must divide --batch-size): the pipeline's (default 2 × pp), or with
    /// --pp 1 gradient accumulation (default 1): one micro-batch's activations at a time, the
    /// same data and (within rounding) the same step.
    #[arg(long)]
    pub(crate) microbatches: Option<usize>,
    /// Model chunks per pipeline rank (interleaved-1f1b; default 2 for it, else 1).
    #[arg(long)]
    pub(crate) virtual_stages: Option<usize>,
    /// How ranks talk: threads of this process, or processes over NCCL (GPUs) or TCP (CPUs).
    #[arg(long, value_enum, default_value_t = CommKind::Local)]
    pub(crate) comm: CommKind,
    /// Write the pipeline plan's timeline (simulated with forward 1, backward 2) to this SVG file.
    #[arg(long)]
    pub(crate) timeline: Option<PathBuf>,
    /// Checkpoint directory: `step-N/` checkpoints (each rank writes its own shards) and a
    /// `latest` pointer. A checkpoint is also saved after the last step.
    #[arg(long)]
    pub(crate) save_dir: Option<PathBuf>,
    /// Save a checkpoint every N steps (0: only after the last step).
    #[arg(long, default_value_t = 0)]
    pub(crate) save_every: usize,
    /// Keep the newest K checkpoints in --save-dir (0: all).
    #[arg(long, default_value_t = 3)]
    pub(crate) keep: usize,
    /// Write checkpoints in a background thread (training waits only for the copy to host memory).
    #[arg(long)]
    pub(crate) async_save: bool,
    /// Resume from a checkpoint directory, `latest` (the newest in --save-dir) or `auto` (the
    /// newest in --save-dir if there is one, else a fresh start or --init-from's weights: for
    /// jobs that restart themselves, e.g. `burn-parallel launch --max-restarts`): model,
    /// optimizer, data position, dropout streams, step. Any dp/cp/pp/tp/SP layout can load it.
    #[arg(long)]
    pub(crate) resume: Option<String>,
    /// Stop after this step (saving a checkpoint with --save-dir), as a pre-empted job would;
    /// the learning-rate schedule still spans --steps.
    #[arg(long)]
    pub(crate) exit_at_step: Option<usize>,
    /// At the end, write the newest checkpoint's model as one unsharded safetensors file.
    #[arg(long)]
    pub(crate) export: Option<PathBuf>,
    /// Initialise the weights from a model.safetensors (as written by --export) at any layout.
    #[arg(long)]
    pub(crate) init_from: Option<PathBuf>,
    /// Stop (and save, with --save-dir) after the first step that ends this many minutes after
    /// training started (a scheduler's time limit; Megatron's --exit-duration-in-mins); the run
    /// exits 0 and `--resume latest` goes on.
    #[arg(long)]
    pub(crate) time_limit_mins: Option<f64>,
    /// Append one JSON line per step (step, loss, lr, grad_norm, tokens_seen, tokens_per_sec,
    /// elapsed_secs) and per evaluation (step, val_loss) to this file (`burn_parallel::metrics`;
    /// a resumed run appends: the last record of a step counts).
    #[arg(long)]
    pub(crate) metrics: Option<PathBuf>,
    /// Print `step N loss L` every N steps on stdout (L printed exactly: bit-for-bit comparable).
    #[arg(long, default_value_t = 0)]
    pub(crate) print_every: usize,
    /// At the end, print where the time went (Megatron's timers): per phase (step, data,
    /// forward-backward or the pipeline's forward/backward/p2p, gradient reduction, norm,
    /// optimizer, ZeRO gather, stop check, checkpoint, eval) the least, mean and most ms per
    /// step of a rank and the slowest rank (`burn_parallel::timing`; one all-gather at the end).
    #[arg(long)]
    pub(crate) timers: bool,
    /// Also print the timers every N steps (covering the steps since the last print; recorded
    /// in --metrics too): Megatron's timers at each log interval. Turns --timers on.
    #[arg(long, default_value_t = 0)]
    pub(crate) timers_every: usize,
    /// Write every rank's phases as a Chrome trace (open in Perfetto or chrome://tracing: one
    /// row per rank thread, forward/backward per micro-batch and stage). One process per rank
    /// (--comm tcp|nccl): each writes FILE with `.rank<N>` before its extension.
    #[arg(long)]
    pub(crate) trace: Option<PathBuf>,
    /// Compute precision: f32, or bf16 (bf16 parameters and activations; f32 master weights,
    /// AdamW state, gradient accumulation and reduction; softmax, log-sum-exp and layer-norm
    /// statistics in f32). Costs nothing extra; halves parameter and activation bytes.
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    pub(crate) precision: Precision,
    /// 1: distributed optimizer (ZeRO-1): master weights and AdamW moments sharded over the
    /// --dp group (gradients reduce-scattered, parameters all-gathered once per step: the same
    /// traffic as the all-reduce it replaces). Needs --dp 2 or more.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub(crate) zero: u8,
    /// Fused AdamW updates: consecutive parameters updated as one flat f32 tensor of up to this
    /// many MiB (its moments and master each that size; a few kernels per group instead of ~16
    /// operations per parameter; bitwise the same values). Default: 25 on --device cuda|wgpu, 0 (one parameter at a time) on the
    /// CPU, where each intermediate is materialised for the whole group (more memory) and
    /// large parameters update faster one by one.
    #[arg(long)]
    pub(crate) optimizer_group_mb: Option<usize>,
    /// Activation recompute: none; selective (rerun the composed attention core in the backward:
    /// drops the [b, heads, s, s] tensors for a few % more compute; the same as none with a
    /// fused or chunked core, which keeps no such tensor); full (keep each block's input,
    /// rerun the block: +1 forward of every block, about +1/3 of the step's FLOPs); full:N
    /// (full for the first N blocks of each pipeline stage or model chunk, the others keep
    /// their activations: Megatron's --recompute-method block --recompute-num-layers N; +1
    /// forward of N blocks).
    #[arg(long, default_value = "none", value_parser = parse_recompute)]
    pub(crate) recompute: Recompute,
    /// Attention core: auto (the fused flash-attention kernels on CUDA/wgpu when --dropout is 0:
    /// no [b, heads, s, s] tensor stored; composed Burn ops on CPU); composed; fused (an error
    /// where the backend has no kernels or --dropout > 0); chunked[:ROWS] (Burn ops on ROWS
    /// queries at a time, default 256, any backend: no [b, heads, s, s] tensor stored; the
    /// backward recomputes the scores, one matmul more of attention's six, but the masked half
    /// of the scores is never computed; --dropout must be 0). The same under --cp.
    #[arg(long, default_value = "auto", value_parser = parse_attention)]
    pub(crate) attention: AttentionKernel,
    /// The fused attention kernels on tensor cores for bf16 (CUDA's 16×16×16 wmma; cooperative
    /// matrices on Vulkan) where the device has them: true; false runs the FMA kernels, as
    /// f32 does (to compare, or to rule the tensor-core kernels out). The log says which run.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) attention_tensor_cores: bool,
}

fn parse_attention(s: &str) -> Result<AttentionKernel, String> {
    s.parse().map_err(|e: burn_parallel::attention::UnknownAttentionKernel| e.to_string())
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    s.parse().map_err(|e: burn_parallel::precision::PrecisionError| e.to_string())
}

fn parse_preset(s: &str) -> Result<ModelPreset, String> {
    s.parse().map_err(|e: burn_parallel::arch::UnknownChoice| e.to_string())
}

fn parse_tokenizer(s: &str) -> Result<Tokenizer, String> {
    s.parse().map_err(|e: burn_parallel::data::TokenizerError| e.to_string())
}

impl Args {
    /// Parses `argv`; `--model` sets the size flags not given explicitly.
    pub(crate) fn parse_with_presets<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Self::command().try_get_matches_from(argv)?;
        let mut args = Self::from_arg_matches(&matches)?;
        let default = |id: &str| matches.value_source(id) != Some(clap::parser::ValueSource::CommandLine);
        let p = args.model.values();
        let set = |id: &str, field: &mut usize, value: usize| {
            if default(id) {
                *field = value;
            }
        };
        set("d_model", &mut args.d_model, p.d_model);
        set("layers", &mut args.layers, p.layers);
        set("heads", &mut args.heads, p.heads);
        set("seq_len", &mut args.seq_len, p.seq_len);
        set("batch_size", &mut args.batch_size, p.batch_size);
        if default("tokenizer") {
            args.tokenizer = if args.model == ModelPreset::Tiny { Tokenizer::Byte } else { Tokenizer::Gpt2 };
        }
        if default("lr") {
            args.lr = p.lr;
        }
        if default("loss_chunk") && args.model != ModelPreset::Tiny {
            args.loss_chunk = 1024;
        }
        if let Some(l) = p.llama {
            args.apply_llama(&p, &l, &default);
        }
        Ok(args)
    }

    /// A Llama preset without Llama 3's tokenizer trains on another vocabulary: said once.
    pub(crate) fn warn_preset_tokenizer(&self) {
        let llama = self.model.values().llama.is_some();
        if llama && !matches!(self.tokenizer, Tokenizer::Llama3(_)) {
            tracing::warn!(
                "--model {}: Llama 3's vocabulary (128256) needs --tokenizer llama3:PATH to its tokenizer.model; this run's is {}'s ({} tokens)",
                self.model,
                self.tokenizer,
                self.tokenizer.vocab_size()
            );
        }
    }

    /// A Llama preset's block where its flags are not given (`--no-bias` and
    /// `--tie-embeddings` are switches: a preset turns them on).
    fn apply_llama(&mut self, p: &PresetValues, l: &LlamaValues, default: &dyn Fn(&str) -> bool) {
        use burn_parallel::arch::{Norm, Position};
        if default("d_ff") {
            self.d_ff = Some(p.d_ff);
        }
        if default("kv_heads") {
            self.kv_heads = Some(l.kv_heads);
        }
        if default("norm") {
            self.norm = Norm::RmsNorm;
        }
        if default("position") {
            self.position = Position::Rope;
        }
        if default("activation") {
            self.activation = burn_parallel::activation::Activation::SwiGlu;
        }
        if default("rope_theta") {
            self.rope_theta = l.rope_theta;
        }
        if default("rope_scaling") {
            self.rope_scaling = Some(l.rope_scaling);
        }
        if default("norm_eps") {
            self.norm_eps = p.norm_eps;
        }
        if default("no_bias") {
            self.no_bias = true;
        }
        if default("tie_embeddings") {
            self.tie_embeddings = p.tie_embeddings;
        }
    }

    /// Ranks of the run: dp × cp × pp × tp.
    pub(crate) fn world(&self) -> usize {
        self.dp * self.cp * self.pp * self.tp
    }

    /// Whether the phases are timed: `--timers`, `--timers-every` or `--trace` (a trace's
    /// spans wait for a GPU through the same layer).
    pub(crate) fn timing(&self) -> bool {
        self.timers || self.timers_every > 0 || self.trace.is_some()
    }

    /// The numbers no run can use (a negative learning rate, a clip that is not positive, ...):
    /// an error naming the flag. Sizes and degrees are checked with the model.
    pub(crate) fn check_numbers(&self) -> Result<(), String> {
        let at_least_0: fn(f64) -> bool = |v| v.is_finite() && v >= 0.0;
        let above_0: fn(f64) -> bool = |v| v.is_finite() && v > 0.0;
        let checks = [
            ("--lr", Some(self.lr), at_least_0, "at least 0"),
            ("--weight-decay", Some(f64::from(self.weight_decay)), at_least_0, "at least 0"),
            ("--temperature", Some(self.temperature), at_least_0, "at least 0 (0: greedy)"),
            ("--clip-grad", self.clip_grad.map(f64::from), above_0, "above 0"),
            ("--peak-tflops", self.peak_tflops, above_0, "above 0"),
            ("--time-limit-mins", self.time_limit_mins, at_least_0, "at least 0"),
        ];
        match checks.into_iter().find(|(_, value, ok, _)| value.is_some_and(|v| !ok(v))) {
            Some((flag, Some(value), _, want)) => Err(format!("{flag} {}: must be a finite number {want}", value as f32)),
            _ => Ok(()),
        }
    }
}

fn parse_norm(s: &str) -> Result<burn_parallel::arch::Norm, String> {
    s.parse().map_err(|e: burn_parallel::arch::UnknownChoice| e.to_string())
}

fn parse_position(s: &str) -> Result<burn_parallel::arch::Position, String> {
    s.parse().map_err(|e: burn_parallel::arch::UnknownChoice| e.to_string())
}

fn parse_activation(s: &str) -> Result<burn_parallel::activation::Activation, String> {
    s.parse().map_err(|e: burn_parallel::activation::UnknownActivation| e.to_string())
}

fn parse_recompute(s: &str) -> Result<Recompute, String> {
    s.parse().map_err(|e: burn_parallel::recompute::UnknownRecompute| e.to_string())
}
