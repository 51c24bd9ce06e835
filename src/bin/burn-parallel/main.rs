//! The `burn-parallel` command: `launch` starts a multi-process job (torchrun-style);
//! `checkpoint inspect|verify|diff|export|export-hf|import-hf` looks at, compares and converts
//! checkpoints; `prepare` writes token shards;
//! `memory` prints the memory model's per-rank table.
//!
//! ```text
//! burn-parallel launch --nproc-per-node 4 -- ./my_training_program --its-flags
//! burn-parallel checkpoint export ckpt/ --out model.safetensors
//! ```

use std::path::PathBuf;

use burn_parallel::launch::{launch, rendezvous, JobEnv, LaunchOptions};
use clap::{Parser, Subcommand};

mod checkpoint_cmd;

#[derive(Parser)]
#[command(version, about = "burn-parallel: model-parallel training on Burn")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start PROGRAM once per local rank with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    /// MASTER_ADDR and MASTER_PORT set; prefix output by rank; if one rank fails, stop the others
    /// and exit with its code (or, with --max-restarts, start them all again).
    Launch {
        /// Processes on this node (one per GPU).
        #[arg(long, default_value_t = 1)]
        nproc_per_node: usize,
        /// Nodes in the job.
        #[arg(long, default_value_t = 1)]
        nnodes: usize,
        /// This node's index.
        #[arg(long, default_value_t = 0)]
        node_rank: usize,
        /// Host of rank 0.
        #[arg(long, default_value = "127.0.0.1")]
        master_addr: String,
        /// Rendezvous port on rank 0.
        #[arg(long, default_value_t = 29500)]
        master_port: u16,
        /// On Ctrl-C / SIGTERM / SIGHUP: seconds the ranks get (the signal passed on) to save
        /// and exit before they are killed.
        #[arg(long, default_value_t = 30)]
        stop_grace_secs: u64,
        /// When a rank fails: stop the others and start every rank again, up to this many times
        /// (torchrun's flag; they see TORCHELASTIC_RESTART_COUNT). With `gpt_pretrain --save-dir
        /// D --resume auto` the job goes on from its newest checkpoint.
        #[arg(long, default_value_t = 0)]
        max_restarts: usize,
        /// The job id the ranks' rendezvous checks, so that two jobs given one port never mix
        /// (torchrun's --rdzv-id; the ranks see BURN_PARALLEL_JOB_ID). Default: this
        /// environment's (BURN_PARALLEL_JOB_ID, TORCHELASTIC_RUN_ID, SLURM_JOB_ID), else a fresh
        /// one on one node; with --nnodes > 1 give every node's launcher the same one.
        #[arg(long)]
        job_id: Option<String>,
        /// With --nnodes > 1: the port node 0's launcher listens on for the other nodes'
        /// launchers (torchrun's rendezvous endpoint; default: --master-port + 1). Node 0's
        /// launcher decides for all: a rank failing anywhere stops every node's ranks at once,
        /// and every node starts again with the same TORCHELASTIC_RESTART_COUNT.
        #[arg(long)]
        rdzv_port: Option<u16>,
        /// Seconds node 0's launcher waits for every node's to join, and on a restart for every
        /// node to stop its ranks.
        #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
        rdzv_timeout_secs: u64,
        /// Seconds without a heartbeat (sent every sixth of it) after which a node's launcher
        /// counts as gone: every node stops its ranks and the job fails naming it.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        node_timeout_secs: u64,
        /// The program and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Inspect, verify, compare, export or import checkpoints (exit 2 on an error).
    Checkpoint {
        #[command(subcommand)]
        action: checkpoint_cmd::CheckpointCmd,
    },
    /// Tokenize text files into binary token shards (`OUT/train_NNNNNN.bin`, `OUT/val_000000.bin`:
    /// llm.c's format, u16 tokens; u32 for Llama 3's vocabulary), one document per text file or
    /// per JSON line, for `gpt_pretrain --shards OUT`; streamed (a corpus larger than memory
    /// prepares).
    Prepare {
        /// byte, gpt2, or llama3:PATH (Llama 3's tokenizer.model).
        #[arg(long, default_value = "gpt2")]
        tokenizer: String,
        /// Output directory: new, or empty (shards written in OUT/.partial, then moved in).
        #[arg(long)]
        out: PathBuf,
        /// Tokens per training shard.
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: usize,
        /// The last fraction of the tokens becomes the validation shard.
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
        /// text (each file one document), jsonl (JSON Lines: each line an object whose
        /// --json-key field is a document, as Megatron's preprocess_data.py reads), or auto
        /// (jsonl for `.jsonl` files, text otherwise).
        #[arg(long, default_value = "auto", value_parser = ["auto", "text", "jsonl"])]
        format: String,
        /// The JSON Lines field that holds each document's text.
        #[arg(long, default_value = "text")]
        json_key: String,
        /// Tokenizer threads (default: the cores; memory: about 5 MB of text and tokens each).
        #[arg(long)]
        workers: Option<usize>,
        /// Text or JSON Lines files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Predict every pipeline rank's memory (parameters, gradients, optimizer state,
    /// activations, peak) of a GPT training run: the model of `burn_parallel::memory`.
    Memory(Box<MemoryArgs>),
    /// Join a rendezvous from the environment and print what rank 0 handed out (a smoke test).
    #[command(hide = true)]
    RendezvousCheck,
}

/// The run the memory model describes (the example's flags and defaults).
#[derive(clap::Args)]
struct MemoryArgs {
    /// A named model (its shape, vocabulary and context; explicit flags override each):
    /// tiny (the default), gpt2-124m … gpt2-1.5b, llama3.2-1b, llama3.2-3b, llama3.1-8b,
    /// llama3.1-70b, llama3.1-405b (vocabulary 128256, context 8192, Llama 3's block).
    #[arg(long, default_value = "tiny", value_parser = parse_preset)]
    model: burn_parallel::presets::ModelPreset,
    /// Vocabulary (default: the model's).
    #[arg(long)]
    vocab: Option<usize>,
    /// Context length (default: the model's).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Width.
    #[arg(long)]
    d_model: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    heads: Option<usize>,
    /// Blocks.
    #[arg(long)]
    layers: Option<usize>,
    /// MLP width (default: the Llama model's, else 4 x d-model).
    #[arg(long)]
    d_ff: Option<usize>,
    /// Tied embeddings: the head is the token embedding (no head parameters of its own; the
    /// last pipeline stage holds a replica). Default: the model's (Llama 3.2's are tied);
    /// `--tie-embeddings false` unties.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    tie_embeddings: Option<bool>,
    /// The MLPs' activation: gelu, gelu-tanh (GPT-2's approximation; keeps two [N, ffn/tp]
    /// tensors more per block) or swiglu (a gate projection; three more). Default: the model's.
    #[arg(long, value_parser = parse_activation)]
    activation: Option<burn_parallel::activation::Activation>,
    /// The norms: layer-norm or rms-norm (no β, one f32 statistic per row). Default: the model's.
    #[arg(long, value_parser = parse_norm)]
    norm: Option<burn_parallel::arch::Norm>,
    /// Positions: learned (a wpe table) or rope (none). Default: the model's.
    #[arg(long, value_parser = parse_position)]
    position: Option<burn_parallel::arch::Position>,
    /// No biases in the attention's and MLPs' projections (default: the model's; a Llama model
    /// has none; `--no-bias false` keeps them).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    no_bias: Option<bool>,
    /// Key/value heads (grouped-query attention; default: the model's, else one per head).
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Sequences per step per data-parallel replica (default: the model's: 16 tiny, 8 GPT-2 and
    /// Llama).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Data-parallel degree.
    #[arg(long, default_value_t = 1)]
    dp: usize,
    /// Context-parallel degree (each sequence split over this many ranks; any attention core).
    #[arg(long, default_value_t = 1)]
    cp: usize,
    /// Pipeline-parallel degree.
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Tensor-parallel degree.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Chunks per pipeline rank (interleaved-1f1b; default 2 for it, else 1: as the example).
    #[arg(long)]
    virtual_stages: Option<usize>,
    /// Micro-batches per step: the pipeline's (default 2 x pp), or without a pipeline gradient
    /// accumulation over them (default 1).
    #[arg(long)]
    microbatches: Option<usize>,
    /// Pipeline schedule.
    #[arg(long, default_value = "1f1b")]
    schedule: String,
    /// Sequence parallelism.
    #[arg(long)]
    sequence_parallel: bool,
    /// none, selective, full, or full:N (the first N blocks of each stage).
    #[arg(long, default_value = "none")]
    recompute: String,
    /// 1: ZeRO-1.
    #[arg(long, default_value_t = 0)]
    zero: u8,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Dropout on.
    #[arg(long)]
    dropout: bool,
    /// Cross-entropy rows per chunk (default: 1024 for a named model, as gpt_pretrain; 0: the
    /// whole logits at once).
    #[arg(long)]
    loss_chunk: Option<usize>,
    /// Attention core: composed (keeps the s² tensors), fused (the flash-attention kernels of
    /// CUDA/wgpu; also what auto gives there) or chunked[:ROWS] (Burn ops, any backend); fused
    /// and chunked keep the f32 log-sum-exp instead, and need no dropout.
    #[arg(long, default_value = "composed")]
    attention: String,
}

/// `prepare`'s flags.
struct PrepareArgs<'a> {
    tokenizer: &'a str,
    out: &'a std::path::Path,
    shard_tokens: usize,
    val_fraction: f64,
    format: &'a str,
    json_key: &'a str,
    workers: usize,
    files: &'a [PathBuf],
}

fn prepare(a: PrepareArgs) -> Result<(), String> {
    use burn_parallel::data::InputFormat;
    let tokenizer: burn_parallel::data::Tokenizer = a.tokenizer.parse().map_err(|e: burn_parallel::data::TokenizerError| e.to_string())?;
    let jsonl = |f: &PathBuf| f.extension().is_some_and(|e| e == "jsonl");
    let format = match a.format {
        "jsonl" => InputFormat::Jsonl { key: a.json_key.to_string() },
        "auto" if a.files.iter().all(jsonl) => InputFormat::Jsonl { key: a.json_key.to_string() },
        "auto" if a.files.iter().any(jsonl) => return Err("--format auto: some files are .jsonl and some are not; give --format".into()),
        _ => InputFormat::Text,
    };
    let (out, tokenizer_name) = (a.out, tokenizer.to_string());
    let o = burn_parallel::data::PrepareOptions { tokenizer, shard_tokens: a.shard_tokens, val_fraction: a.val_fraction, workers: a.workers };
    let r = burn_parallel::data::prepare_files(a.files, &format, out, &o).map_err(|e| e.to_string())?;
    println!("{} train tokens, {} validation tokens ({tokenizer_name}) in {} shards under {}", r.train_tokens, r.val_tokens, r.files.len(), out.display());
    Ok(())
}

/// The attention core of `--attention` for a plan (no backend: `auto` as on CUDA).
fn attention_core(name: &str, dropout: bool) -> Result<burn_parallel::attention::AttentionCore, String> {
    let kernel: burn_parallel::attention::AttentionKernel = name.parse().map_err(|e: burn_parallel::attention::UnknownAttentionKernel| e.to_string())?;
    use burn_parallel::attention::AttentionKernel::{Auto, Composed};
    if dropout && !matches!(kernel, Auto | Composed) {
        return Err(format!("--attention {kernel} has no dropout (drop --dropout, or use --attention composed)"));
    }
    kernel.resolve_with(|| Ok(()), if dropout { 0.1 } else { 0.0 })
}

/// The model `--model` names with the flags given over it, and the batch size.
fn memory_shape(a: &MemoryArgs) -> (burn_parallel::memory::GptShape, usize) {
    let p = a.model.values();
    let mut shape = p.shape(a.seq_len.unwrap_or(p.seq_len));
    // A named model's vocabulary padded as gpt_pretrain pads it (a multiple of 128 × tp).
    let tiny = a.model == burn_parallel::presets::ModelPreset::Tiny;
    shape.vocab = a.vocab.unwrap_or(if tiny { shape.vocab } else { burn_parallel::data::padded_vocab(shape.vocab, a.tp) });
    shape.hidden = a.d_model.unwrap_or(shape.hidden);
    shape.heads = a.heads.unwrap_or(shape.heads);
    shape.layers = a.layers.unwrap_or(shape.layers);
    shape.ffn = a.d_ff.unwrap_or(if p.llama.is_some() { p.d_ff } else { 4 * shape.hidden });
    shape.tied_embeddings = a.tie_embeddings.unwrap_or(shape.tied_embeddings);
    shape.activation = a.activation.unwrap_or(shape.activation);
    shape.arch.norm = a.norm.unwrap_or(shape.arch.norm);
    shape.arch.position = a.position.unwrap_or(shape.arch.position);
    shape.arch.no_bias = a.no_bias.unwrap_or(shape.arch.no_bias);
    shape.arch.kv_heads = a.kv_heads.or(shape.arch.kv_heads);
    (shape, a.batch_size.unwrap_or(p.batch_size))
}

fn memory(a: MemoryArgs) -> Result<(), String> {
    use burn_parallel::memory::{estimate, model::table, TrainPlan};
    let (shape, batch_size) = memory_shape(&a);
    if a.pp == 1 && a.virtual_stages.is_some_and(|v| v != 1) {
        return Err("--virtual-stages splits a pipeline: it needs --pp 2 or more".into());
    }
    let m = a.microbatches.unwrap_or(if a.pp > 1 { 2 * a.pp } else { 1 });
    if m == 0 || !batch_size.is_multiple_of(m) {
        return Err(format!("--batch-size {batch_size} is not divisible by --microbatches {m}"));
    }
    let plan = TrainPlan {
        dp: a.dp,
        cp: a.cp,
        pp: a.pp,
        tp: a.tp,
        virtual_stages: a.virtual_stages.unwrap_or(if a.pp > 1 && a.schedule.starts_with("interleaved") { 2 } else { 1 }),
        sequence_parallel: a.sequence_parallel,
        microbatch: batch_size / m,
        microbatches: m,
        schedule: a.schedule,
        recompute: a.recompute.parse().map_err(|e: burn_parallel::recompute::UnknownRecompute| e.to_string())?,
        zero: a.zero == 1,
        precision: a.precision.parse().map_err(|e: burn_parallel::precision::PrecisionError| e.to_string())?,
        dropout: a.dropout,
        // As gpt_pretrain: 1024 rows for a named model, 0 for the whole logits.
        loss_chunk: a.loss_chunk.map_or((a.model != burn_parallel::presets::ModelPreset::Tiny).then_some(1024), |c| (c > 0).then_some(c)),
        attention: attention_core(&a.attention, a.dropout)?,
    };
    let est = estimate(&shape, &plan)?;
    println!("{shape:?}\n{plan:?}\nMB per rank (every TP and DP rank of a pipeline stage alike):\n{}", table(&est));
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let code = match Cli::parse().command {
        Cmd::Launch {
            nproc_per_node,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            stop_grace_secs,
            max_restarts,
            job_id,
            rdzv_port,
            rdzv_timeout_secs,
            node_timeout_secs,
            command,
        } => {
            let secs = std::time::Duration::from_secs;
            let options = LaunchOptions {
                nnodes,
                node_rank,
                master_addr,
                master_port,
                grace: secs(stop_grace_secs),
                max_restarts,
                job_id,
                rdzv_port,
                rdzv_timeout: secs(rdzv_timeout_secs),
                node_timeout: secs(node_timeout_secs),
                ..LaunchOptions::new(nproc_per_node, command)
            };
            match launch(&options) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("burn-parallel launch: {e}");
                    2
                }
            }
        }
        Cmd::Checkpoint { action } => match checkpoint_cmd::run(action) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("burn-parallel checkpoint: {e}");
                2
            }
        },
        Cmd::Prepare { tokenizer, out, shard_tokens, val_fraction, format, json_key, workers, files } => {
            let workers = workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let (format, json_key) = (format.as_str(), json_key.as_str());
            match prepare(PrepareArgs { tokenizer: &tokenizer, out: &out, shard_tokens, val_fraction, format, json_key, workers, files: &files }) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("burn-parallel prepare: {e}");
                    2
                }
            }
        }
        Cmd::Memory(a) => match memory(*a) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("burn-parallel memory: {e}");
                2
            }
        },
        Cmd::RendezvousCheck => match JobEnv::from_env() {
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
            Ok(env) => {
                let blob = (env.rank == 0).then(|| format!("id-of-a-world-of-{}", env.world_size).into_bytes());
                match rendezvous(&env, blob) {
                    Ok(b) => {
                        println!("rank {} of {} got {}", env.rank, env.world_size, String::from_utf8_lossy(&b));
                        0
                    }
                    Err(e) => {
                        eprintln!("rank {}: {e}", env.rank);
                        3
                    }
                }
            }
        },
    };
    std::process::exit(code);
}

fn parse_norm(s: &str) -> Result<burn_parallel::arch::Norm, String> {
    s.parse().map_err(|e: burn_parallel::arch::UnknownChoice| e.to_string())
}

fn parse_position(s: &str) -> Result<burn_parallel::arch::Position, String> {
    s.parse().map_err(|e: burn_parallel::arch::UnknownChoice| e.to_string())
}

fn parse_preset(s: &str) -> Result<burn_parallel::presets::ModelPreset, String> {
    s.parse().map_err(|e: burn_parallel::arch::UnknownChoice| e.to_string())
}

fn parse_activation(s: &str) -> Result<burn_parallel::activation::Activation, String> {
    s.parse().map_err(|e: burn_parallel::activation::UnknownActivation| e.to_string())
}
