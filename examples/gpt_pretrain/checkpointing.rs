//! How the example uses `burn_parallel::checkpoint`: its flags, what a snapshot holds (the model
//! parts of this rank with the optimizer's f32 masters and moments, the dropout streams, the
//! training position, the model config and the arguments), resuming and initialising from an
//! exported model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn_parallel::checkpoint::*;
use burn_parallel::optim::DistAdamW;
use burn_parallel::rng::RandomStreams;
use burn_parallel::{CollectiveBackend, ProcessGroups};

use super::{gpt_config, Args};

/// Where training starts: a fresh run, a checkpoint to resume, or an exported model to start from.
pub(crate) enum Start {
    /// Step 0 from the seed.
    Fresh,
    /// Everything from a checkpoint.
    Resume(Checkpoint),
    /// Weights only, from a `model.safetensors`.
    InitFrom(Checkpoint),
}

impl Start {
    /// The training position to start from.
    pub(crate) fn train_state(&self) -> TrainState {
        match self {
            Start::Resume(c) => c.metadata().train.clone(),
            _ => TrainState::default(),
        }
    }
}

/// The checkpoint flags, checked before anything is built.
pub(crate) fn check_args(args: &Args) -> Result<(), String> {
    let save = args.save_dir.is_some();
    if !save && (args.save_every > 0 || args.async_save || args.export.is_some()) {
        return Err("--save-every, --async-save and --export need --save-dir".into());
    }
    if args.init_from.is_some() && args.resume.as_ref().is_some_and(|r| r != "auto") {
        return Err("--resume and --init-from exclude each other (--init-from loads weights only; --resume auto takes both: the newest checkpoint if there is one, else the weights)".into());
    }
    if let Some(spec @ ("latest" | "auto")) = args.resume.as_deref() {
        if !save {
            return Err(format!("--resume {spec} looks in --save-dir: pass it"));
        }
    }
    if let Some(file) = &args.export {
        let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        // The save directory (and the directories above it) are made by the run.
        let plain = |p: &std::path::Path| p.components().filter(|c| *c != std::path::Component::CurDir).collect::<PathBuf>();
        let made = args.save_dir.as_deref().is_some_and(|s| plain(s).starts_with(plain(dir)));
        if !dir.is_dir() && !made {
            return Err(format!("--export {}: the directory {} does not exist (checked before training)", file.display(), dir.display()));
        }
    }
    if let Some(n) = args.exit_at_step {
        if n == 0 || n > args.steps {
            return Err(format!("--exit-at-step {n} must be between 1 and --steps {}", args.steps));
        }
    }
    Ok(())
}

/// Opens what `--resume` or `--init-from` name, and checks it is of this model. Its padded
/// vocabulary is kept where the new `--tp` divides it (the padding to a multiple of 128 × tp
/// differs between tp sizes); elsewhere it is padded anew ([`repadded`]).
pub(crate) fn open_start(args: &mut Args) -> Result<Start, String> {
    let resume = match (args.resume.as_deref(), &args.save_dir) {
        // A first start (or a restart before the first save) has nothing to resume.
        (Some("auto"), Some(dir)) if latest_checkpoint(dir).map_err(|e| format!("--resume auto: {e}"))?.is_none() => {
            tracing::info!(dir = %dir.display(), "--resume auto: no checkpoint yet, starting afresh");
            None
        }
        (spec, _) => spec.map(String::from),
    };
    if let Some(file) = args.init_from.as_ref().filter(|_| resume.is_none()) {
        let ckpt = Checkpoint::open_safetensors(file, MODEL_PREFIX).map_err(|e| format!("--init-from: {e}"))?;
        check_tokenizer(&ckpt, args, &format!("--init-from {}", file.display()))?;
        check_tying(&ckpt, args, &format!("--init-from {}", file.display()))?;
        check_activation(&ckpt, args, &format!("--init-from {}", file.display()))?;
        check_same_model(&ckpt, args, &format!("--init-from {}", file.display()))?;
        keep_saved_vocab(args, saved_vocab(&ckpt));
        keep_saved_context(args, &ckpt);
        return Ok(Start::InitFrom(repadded(ckpt, args)));
    }
    let Some(spec) = &resume else { return Ok(Start::Fresh) };
    let path = match (spec.as_str(), &args.save_dir) {
        ("latest" | "auto", Some(dir)) => dir.clone(),
        _ => PathBuf::from(spec),
    };
    let ckpt = Checkpoint::open(&path).map_err(|e| format!("--resume {spec}: {e}"))?;
    keep_saved_vocab(args, saved_vocab(&ckpt));
    check_same_model(&ckpt, args, &format!("--resume {}", ckpt.dir().display()))?;
    keep_saved_context(args, &ckpt);
    check_tying(&ckpt, args, &format!("--resume {}", ckpt.dir().display()))?;
    check_activation(&ckpt, args, &format!("--resume {}", ckpt.dir().display()))?;
    warn_schedule_changes(&ckpt, args);
    tracing::info!(dir = %ckpt.dir().display(), step = ckpt.metadata().step, layout = ?ckpt.metadata().layout, "resuming");
    Ok(Start::Resume(repadded(ckpt, args)))
}

/// This run keeps a saved (padded) vocabulary of `saved` rows where `--tp` divides it and it
/// holds the tokenizer's.
fn keep_saved_vocab(args: &mut Args, saved: Option<usize>) {
    if let Some(v) = saved.filter(|&v| v.is_multiple_of(args.tp) && v >= args.tokenizer.vocab_size()) {
        args.vocab_override = Some(v);
    }
}

/// A rotary model trained (or imported) with a longer context than this run's `--seq-len`
/// keeps it as its `max_seq_len` (no table depends on it: it bounds generation, and what an
/// export tells HuggingFace, `max_position_embeddings`).
fn keep_saved_context(args: &mut Args, ckpt: &Checkpoint) {
    if args.position == burn_parallel::arch::Position::Rope {
        args.context_override = saved_field(ckpt, "max_seq_len").filter(|&s| s > args.seq_len);
    }
}

/// The checkpoint's (padded) vocabulary: the token embedding's rows.
fn saved_vocab(ckpt: &Checkpoint) -> Option<usize> {
    ckpt.tensor(&format!("{MODEL_PREFIX}wte.weight")).ok().map(|t| t.shape[0])
}

/// `ckpt`, read with this run's vocabulary padding where it differs from the saved one (a
/// `--tp` that does not divide the saved padded vocabulary, e.g. 256 bytes saved at tp 1 and
/// resumed at tp 3, which pads to 384): the token embedding's rows and the head's columns load
/// where both have them; rows past the saved ones are zero, saved padding past ours is dropped.
/// Both are padding (masked: never a token, never in the loss), so the model is the same.
fn repadded(ckpt: Checkpoint, args: &Args) -> Checkpoint {
    if saved_vocab(&ckpt) == Some(gpt_config(args).vocab_size) {
        return ckpt;
    }
    tracing::info!(saved = ?saved_vocab(&ckpt), ours = gpt_config(args).vocab_size, "the vocabulary is padded anew for --tp {}", args.tp);
    ckpt.with_resizable(|name| match name {
        n if n.ends_with("wte.weight") => Some(0),
        n if n.ends_with("head.weight") => Some(1),
        _ => None,
    })
}

/// A number of the checkpoint's saved model config.
fn saved_field(ckpt: &Checkpoint, key: &str) -> Option<usize> {
    ckpt.metadata().sections.get("model").and_then(|m| m.get(key)).and_then(|v| v.as_u64()).map(|v| v as usize)
}

/// The saved model config's tokenizer vocabulary (`vocab_used`, or the whole vocabulary where
/// unpadded) must be this run's (`what`: the flag and its value, for the message).
fn check_tokenizer(ckpt: &Checkpoint, args: &Args, what: &str) -> Result<(), String> {
    let tokens = saved_field(ckpt, "vocab_used").or_else(|| saved_field(ckpt, "vocab_size"));
    match tokens.filter(|&t| t != args.tokenizer.vocab_size()) {
        Some(tokens) => Err(format!(
            "{what}: the checkpoint is of another tokenizer: a vocabulary of {tokens} tokens there, {} here (--tokenizer {})",
            args.tokenizer.vocab_size(),
            args.tokenizer
        )),
        None => Ok(()),
    }
}

/// A model with tied embeddings has no `head.weight` (its head is the token embedding); one
/// with an untied head has it: the checkpoint (or exported model) must be of the kind this run
/// builds (`what`: the flag and its value, for the message).
fn check_tying(ckpt: &Checkpoint, args: &Args, what: &str) -> Result<(), String> {
    let own_head = ckpt.tensor(&format!("{MODEL_PREFIX}head.weight")).is_ok();
    match (own_head, args.tie_embeddings) {
        (true, true) => Err(format!("{what}: the checkpoint's head has its own weight (head.weight), not tied to the token embedding: drop --tie-embeddings")),
        (false, false) => Err(format!("{what}: the checkpoint's head is tied to the token embedding (it has no head.weight): pass --tie-embeddings")),
        _ => Ok(()),
    }
}

/// The saved model config's MLP activation (GeLU where a config predates the field; nothing
/// to check in a file without a config) must be this run's: the weights would load, but they
/// were trained for the other function (GPT-2's are for the tanh approximation).
fn check_activation(ckpt: &Checkpoint, args: &Args, what: &str) -> Result<(), String> {
    let Some(model) = ckpt.metadata().sections.get("model") else { return Ok(()) };
    let saved: burn_parallel::activation::Activation = match model.get("activation") {
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| format!("{what}: the checkpoint's activation: {e}"))?,
        None => Default::default(),
    };
    match saved == args.activation {
        true => Ok(()),
        false => Err(format!(
            "{what}: the checkpoint's model computes its MLPs with --activation {saved}, this run with {}: pass --activation {saved}",
            args.activation
        )),
    }
}

/// The shape-defining fields of the model config in the checkpoint (or exported model) must
/// equal this run's, and its tokenizer's vocabulary too: the heads too, which no tensor shape
/// shows (the fused q/k/v columns are grouped per head). `what`: the flag and its value.
fn check_same_model(ckpt: &Checkpoint, args: &Args, what: &str) -> Result<(), String> {
    let ours = serde_json::to_value(gpt_config(args)).expect("config serialises");
    let Some(theirs) = ckpt.metadata().sections.get("model") else { return Ok(()) };
    check_tokenizer(ckpt, args, what)?;
    // The vocabulary's padding may differ (the tokens are checked above): see `repadded`.
    // Rotary positions have no table: the context length is free (a Llama fine-tuned shorter).
    let rotary = ours.get("position") == Some(&serde_json::json!("Rope"));
    let keys = ["max_seq_len", "d_model", "n_heads", "n_layers", "d_ff", "layer_norm_eps"];
    for key in keys.into_iter().filter(|k| !(rotary && *k == "max_seq_len")) {
        if theirs.get(key) != ours.get(key) {
            return Err(format!(
                "{what}: the checkpoint is of another model: {key} = {} there, {} here{}",
                theirs.get(key).map_or("(none)".into(), |v| v.to_string()),
                ours.get(key).map_or("(none)".into(), |v| v.to_string()),
                if key == "layer_norm_eps" { " (--norm-eps)" } else { "" }
            ));
        }
    }
    check_architecture(theirs, &ours, what)
}

/// The Llama-style choices (norms, positions, biases, key/value heads; RoPE's θ and scaling where
/// positions are rotary) of the saved config must be this run's; a config from before them had
/// GPT-2's. Under `--init-from` RoPE's θ and scaling may change (they have no weights: a
/// long-context extension of a pretrained model), with a warning; a resume keeps them.
fn check_architecture(theirs: &serde_json::Value, ours: &serde_json::Value, what: &str) -> Result<(), String> {
    use serde_json::json;
    let rotary = ours.get("position") == Some(&json!("Rope"));
    let fields = [
        ("norm", json!("LayerNorm"), "--norm"),
        ("position", json!("Learned"), "--position"),
        ("bias", json!(true), "--no-bias"),
        ("kv_heads", json!(null), "--kv-heads"),
    ];
    let rope = [("rope_theta", json!(10000.0), "--rope-theta"), ("rope_scaling", json!(null), "--rope-scaling")];
    // One key/value head per head is no grouping: the same as none.
    let plain = |m: &serde_json::Value| m.get("kv_heads").filter(|&k| Some(k) == m.get("n_heads")).is_some();
    let (mut theirs, mut ours) = (theirs.clone(), ours.clone());
    for m in [&mut theirs, &mut ours] {
        if plain(m) {
            m["kv_heads"] = json!(null);
        }
    }
    for (key, default, flag) in fields.into_iter().chain(rope.into_iter().filter(|_| rotary)) {
        let (then, now) = (theirs.get(key).unwrap_or(&default), ours.get(key).unwrap_or(&default));
        let same_number = then.as_f64().zip(now.as_f64()).is_some_and(|(a, b)| a == b);
        if then != now && !same_number {
            if key.starts_with("rope_") && what.starts_with("--init-from") {
                tracing::warn!("{what}: {key} = {then} there, {now} here ({flag}): the rotary frequencies change from the model's");
                continue;
            }
            return Err(format!("{what}: the checkpoint is of another model: {key} = {then} there, {now} here ({flag})"));
        }
    }
    Ok(())
}

/// The flags that shape the learning rate (and where the weights first came from) as saved and
/// as now: a resume follows this run's, so a change jumps the learning rate (Megatron refuses
/// it unless told to override; here it is a warning: extending --steps is common).
fn warn_schedule_changes(ckpt: &Checkpoint, args: &Args) {
    let Some(saved) = ckpt.metadata().sections.get("args") else { return };
    let now = serde_json::to_value(args).expect("arguments serialise");
    let keys = ["lr", "warmup", "steps", "lr_decay", "min_lr_ratio", "wsd_decay_steps", "init_from"];
    let changed: Vec<String> = keys
        .iter()
        .filter_map(|k| {
            let (then, here) = (saved.get(*k)?, now.get(*k)?);
            (then != here).then(|| format!("--{} {then} there, {here} here", k.replace('_', "-")))
        })
        .collect();
    if !changed.is_empty() {
        tracing::warn!(
            "--resume: the learning-rate schedule's flags differ from the checkpoint's ({}): this run's apply from the resumed step on",
            changed.join("; ")
        );
    }
}

/// This rank's checkpointer (`None` without `--save-dir`); refuses a save directory that holds
/// a newer checkpoint than the one this run starts from.
pub(crate) fn saver(args: &Args, groups: &ProcessGroups, start_step: u64) -> Result<Option<Checkpointer>, String> {
    let Some(dir) = &args.save_dir else { return Ok(None) };
    check_timeline(dir, start_step).map_err(|e| format!("--save-dir: {e}"))?;
    let options = CheckpointOptions { dir: dir.clone(), keep: args.keep, async_save: args.async_save };
    Ok(Some(Checkpointer::new(options, groups.world.clone())))
}

/// One model part of this rank (the whole model, or a pipeline stage) and how its parameter
/// paths map to the unsplit model's.
pub(crate) type Part<'a, M> = (&'a M, &'a dyn Fn(&str) -> String);

/// An owned model part and its rename.
pub(crate) type OwnedPart<'a, M> = (M, &'a dyn Fn(&str) -> String);

/// This rank's state after `train.step` steps.
pub(crate) fn snapshot<B, M>(args: &Args, groups: &ProcessGroups, train: &TrainState, parts: &[Part<'_, M>], optim: &DistAdamW<B>) -> Snapshot
where
    B: AutodiffBackend,
    B::InnerBackend: CollectiveBackend,
    M: AutodiffModule<B> + RandomStreams,
{
    let ctx = ShardContext::new(groups);
    let (tensors, mut counters) = optim.state_tensors(parts, ctx);
    for (module, _) in parts {
        counters.extend(stream_counters(&module.random_streams()));
    }
    let sections = BTreeMap::from([
        ("model".to_string(), serde_json::to_value(gpt_config(args)).expect("config serialises")),
        ("args".to_string(), serde_json::to_value(args).expect("arguments serialise")),
    ]);
    Snapshot { step: train.step, layout: groups.config.clone(), train: train.clone(), tensors, counters, sections }
}

/// Loads `start` into this rank's parts and optimizer (weights only for `--init-from`). The
/// checkpoint's f32 weights are converted to the parameters' dtype (bf16 under `--precision
/// bf16`); the optimizer takes its f32 masters and moments from the checkpoint, and from an
/// `--init-from` file of f32 weights its masters (fresh moments): a bf16 run starts from the
/// exported values, not from their bf16 rounding.
pub(crate) fn restore<B, M>(start: &Start, groups: &ProcessGroups, parts: Vec<OwnedPart<'_, M>>, optim: &mut DistAdamW<B>) -> Result<Vec<M>, String>
where
    B: AutodiffBackend,
    B::InnerBackend: CollectiveBackend,
    M: AutodiffModule<B> + RandomStreams,
{
    let ctx = ShardContext::new(groups);
    let (ckpt, full) = match start {
        Start::Fresh => return Ok(parts.into_iter().map(|(m, _)| m).collect()),
        Start::Resume(c) => (c, true),
        Start::InitFrom(c) => (c, false),
    };
    let at = |e: CheckpointError| format!("{}: {e}", ckpt.dir().display());
    let mut modules = Vec::new();
    for (module, rename) in &parts {
        let module = load_module_cast(ckpt, module.clone(), MODEL_PREFIX, *rename, ctx).map_err(at)?;
        if full {
            let missing = restore_streams(ckpt, &module.random_streams());
            if !missing.is_empty() && ckpt.metadata().layout == groups.config {
                return Err(format!("{}: no state of the random streams {missing:?} (saved at the same layout)", ckpt.dir().display()));
            }
        }
        modules.push(module);
    }
    // An exported file has no optimizer counters: `load` then reads the f32 masters only.
    let f32_weights = ckpt.metadata().tensors.values().all(|t| t.dtype == safetensors::Dtype::F32);
    if full || f32_weights {
        let refs: Vec<Part<'_, M>> = modules.iter().zip(&parts).map(|(m, (_, r))| (m, *r)).collect();
        optim.load(ckpt, &refs, ctx).map_err(at)?;
    }
    Ok(modules)
}

/// Whether to save after `done` steps of a run that ends at `last` (or stops now: `stop`, a
/// signal every rank agreed on).
pub(crate) fn due(args: &Args, done: u64, last: u64, stop: Option<i32>) -> bool {
    args.save_dir.is_some() && (stop.is_some() || (args.save_every > 0 && done.is_multiple_of(args.save_every as u64)) || done == last)
}

/// Saves (or, between saves, commits a finished asynchronous save).
pub(crate) fn after_step(saver: &mut Option<Checkpointer>, save: Option<Snapshot>) -> Result<(), String> {
    let Some(saver) = saver else { return Ok(()) };
    let res = match save {
        Some(snapshot) => {
            let step = snapshot.step;
            saver.save(snapshot).map(|r| {
                if let Some(dir) = r.committed {
                    tracing::info!(step, dir = %dir.display(), bytes = r.bytes, secs = r.blocked_secs, "checkpoint saved");
                }
            })
        }
        None => saver.poll().map(|_| ()),
    };
    res.map_err(|e| format!("checkpoint: {e}"))
}

/// The error of optimizer step `step` (0-based), naming it. A non-finite gradient norm (every
/// rank gets it at the same step) first completes the save in flight (`--async-save`), so the
/// newest checkpoint is the last good one.
pub(crate) fn step_failed(saver: &mut Option<Checkpointer>, step: usize, e: burn_parallel::optim::OptimError) -> String {
    let msg = format!("step {}: {e}", step + 1);
    match (saver, &e) {
        (Some(s), burn_parallel::optim::OptimError::NonFinite { .. }) => match s.finish() {
            Ok(_) => msg,
            Err(f) => format!("{msg}; the checkpoint being saved failed too: {f}"),
        },
        _ => msg,
    }
}

/// Ends the run's saving: waits for an asynchronous save; `--export` writes the newest
/// checkpoint's model (rank 0).
pub(crate) fn finish(args: &Args, saver: &mut Option<Checkpointer>, rank: usize) -> Result<(), String> {
    if let Some(s) = saver {
        s.finish().map_err(|e| format!("checkpoint: {e}"))?;
    }
    if let (Some(out), Some(dir), 0) = (&args.export, &args.save_dir, rank) {
        export(dir, out)?;
    }
    Ok(())
}

fn export(dir: &Path, out: &Path) -> Result<(), String> {
    let ckpt = Checkpoint::open(dir).map_err(|e| format!("--export: {e}"))?;
    let bytes = export_model(&ckpt, out).map_err(|e| format!("--export: {e}"))?;
    tracing::info!(from = %ckpt.dir().display(), to = %out.display(), bytes, "model exported");
    Ok(())
}
