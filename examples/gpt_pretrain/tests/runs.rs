//! The example's flags, presets, numbers and reports, in real processes.

use super::*;

/// Fused optimizer updates (`--optimizer-group-mb`, the GPU devices' default) print the
/// per-parameter losses bit for bit, also across a resume (the loaded state regroups).
#[test]
fn fused_optimizer_updates_print_the_per_parameter_losses() {
    let dir = fresh("fused-optim");
    let base = format!("{TINY} --steps 4 --dp 2 --zero 1 --precision bf16 --clip-grad 0.5");
    let per_parameter = losses(&base);
    assert_eq!(per_parameter.len(), 4, "{per_parameter:?}");
    let fused = format!("{base} --optimizer-group-mb 1");
    assert_eq!(losses(&fused), per_parameter);
    let first = losses(&format!("{fused} --exit-at-step 2 --save-dir {}", dir.display()));
    let rest = losses(&format!("{fused} --resume latest --save-dir {}", dir.display()));
    assert_eq!([first, rest].concat(), per_parameter);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_memory_flags_are_clear_errors() {
    let e = parse_error(&format!("{TINY} --precision f16"));
    assert!(e.contains("f16") && e.contains("bf16"), "an unknown precision names the known ones: {e}");
    let e = parse_error(&format!("{TINY} --recompute everything"));
    assert!(e.contains("everything") && e.contains("selective"), "an unknown recompute mode names the known ones: {e}");
    let e = parse_error(&format!("{TINY} --attention sparse"));
    assert!(e.contains("sparse") && e.contains("composed"), "{e}");
    let e = error_of(&format!("{TINY} --steps 1 --attention fused"));
    assert!(e.contains("no fused attention kernels"), "fused attention on the CPU backend is refused: {e}");
    let e = parse_error(&format!("{TINY} --attention chunked:0"));
    assert!(e.contains("chunked:0") && e.contains("chunked:ROWS"), "{e}");
    let e = error_of(&format!("{TINY} --steps 1 --attention chunked:4 --dropout 0.1"));
    assert!(e.contains("chunked attention has no dropout"), "{e}");
    let e = parse_error(&format!("{TINY} --attention-tensor-cores maybe"));
    assert!(e.contains("maybe") && e.contains("--attention-tensor-cores"), "{e}");
    let e = parse_error(&format!("{TINY} --tokenizer gpt4"));
    assert!(e.contains("gpt4"), "{e}");
    let e = error_of(&format!("{TINY} --steps 1 --zero 1"));
    assert!(e.contains("--zero 1") && e.contains("--dp 1"), "ZeRO without data parallelism is refused: {e}");
}

/// Sizes of zero, a dropout that is no probability and numbers no run can use are refused
/// before anything is built, naming the value (they panicked deep inside or trained silently).
#[test]
fn bad_model_and_optimisation_numbers_are_clear_errors() {
    for (flags, want) in [
        ("--d-model 0", "--d-model 0: hidden size must be at least 1 (got 0)"),
        ("--seq-len 0", "--seq-len 0: max_seq_len must be at least 1 (got 0)"),
        ("--layers 0", "--layers 0: layers must be at least 1 (got 0)"),
        ("--d-ff 0", "--d-ff 0: ffn size must be at least 1 (got 0)"),
        ("--heads 0", "--heads 0: attention heads must be at least 1 (got 0)"),
        ("--heads 5", "--d-model / --heads: hidden size = 128 is not divisible by attention heads = 5"),
        ("--dropout 1.5", "model: dropout 1.5 is not a probability in [0, 1)"),
        ("--lr=-1", "--lr -1: must be a finite number at least 0"),
        ("--lr nan", "--lr NaN: must be a finite number at least 0"),
        ("--weight-decay=-0.1", "--weight-decay -0.1: must be a finite number at least 0"),
        ("--temperature=-1", "--temperature -1: must be a finite number at least 0"),
        ("--clip-grad 0", "--clip-grad 0: must be a finite number above 0"),
        ("--peak-tflops 0", "--peak-tflops 0: must be a finite number above 0"),
        ("--min-lr-ratio 1.5", "--min-lr-ratio: the final learning rate must be 0 to 1 times the peak, got 1.5"),
        ("--wsd-decay-steps 2", "--wsd-decay-steps needs --lr-decay wsd (not cosine)"),
        ("--lr-decay wsd --warmup 0 --wsd-decay-steps 2", "--wsd-decay-steps: 2 decay steps do not fit the 1 steps after the warm-up"),
        ("--save-dir x --export /nonexistent/dir/m.safetensors", "the directory /nonexistent/dir does not exist (checked before training)"),
    ] {
        // Not TINY: its size flags would be given twice. Refused before the default model is built.
        let e = error_of(&format!("--steps 1 --eval-batches 1 {flags}"));
        assert!(e.contains(want), "{flags}: {e}");
    }
    // An export into the save directory, or next to it in a directory the run makes, is fine.
    for flags in ["--save-dir /nonexistent/a/ck --export /nonexistent/a/m.safetensors", "--save-dir ./ck --export ck/m.safetensors"] {
        let args = Args::parse_with_presets(format!("gpt_pretrain {flags}").split_whitespace()).unwrap();
        assert_eq!(super::super::checkpointing::check_args(&args), Ok(()), "{flags}");
    }
}

/// The byte vocabulary is padded (masked) where --tp does not divide 256, as GPT-2's always is.
#[test]
fn the_byte_vocabulary_is_padded_where_tp_does_not_divide_it() {
    let l = loss_values(&losses(
        "--d-model 48 --heads 3 --seq-len 16 --batch-size 4 --eval-batches 1 --sample-tokens 4 --eval-every 0 --print-every 1 --steps 2 --tp 3",
    ));
    assert!(l.len() == 2 && l.iter().all(|x| x.is_finite()), "{l:?}");
    let args = Args::parse_with_presets(["gpt_pretrain", "--tp", "3"]).unwrap();
    let c = super::super::gpt_config(&args);
    assert_eq!((c.vocab_size, c.vocab_used), (384, Some(256)));
    let args = Args::parse_with_presets(["gpt_pretrain", "--tp", "4"]).unwrap();
    assert_eq!((super::super::gpt_config(&args).vocab_size, super::super::gpt_config(&args).vocab_used), (256, None));
}

#[test]
fn a_preset_sets_the_shape_and_explicit_flags_override_it() {
    let parse = |flags: &str| Args::parse_with_presets(std::iter::once("gpt_pretrain".to_string()).chain(flags.split_whitespace().map(String::from))).unwrap();
    let a = parse("--model gpt2-124m");
    assert_eq!((a.d_model, a.layers, a.seq_len, a.loss_chunk, a.lr), (768, 12, 1024, 1024, 6e-4));
    let a = parse("--model gpt2-350m");
    assert_eq!((a.d_model, a.layers, a.heads, a.lr), (1024, 24, 16, 3e-4));
    let a = parse("--model gpt2-124m --layers 2 --seq-len 64 --loss-chunk 0 --lr 1e-3");
    assert_eq!((a.d_model, a.layers, a.seq_len, a.loss_chunk, a.lr), (768, 2, 64, 0, 1e-3));
    assert_eq!(parse("").lr, 3e-3);
    // Llama 3's presets: the block's flags, its scaled RoPE, explicit flags over each.
    let a = parse("--model llama3.2-1b");
    assert_eq!((a.d_model, a.layers, a.heads, a.kv_heads, a.d_ff, a.seq_len, a.batch_size), (2048, 16, 32, Some(8), Some(8192), 8192, 8));
    assert_eq!((a.norm.to_string(), a.position.to_string(), a.activation.to_string()), ("rms-norm".into(), "rope".into(), "swiglu".into()));
    assert!(a.no_bias && a.tie_embeddings && a.rope_theta == 500000.0 && a.lr == 3e-4);
    assert_eq!(a.rope_scaling.map(|s| s.to_string()), Some("llama3:32,1,4,8192".into()));
    let a = parse("--model llama3.1-70b --kv-heads 16 --rope-scaling llama3 --rope-theta 10000 --d-ff 100");
    assert_eq!((a.d_model, a.kv_heads, a.d_ff, a.rope_theta, a.lr, a.tie_embeddings), (8192, Some(16), Some(100), 10000.0, 1.5e-4, false));
    assert_eq!(a.rope_scaling, Some(burn_parallel::arch::RopeScaling::LLAMA3_1));
    // Switches a preset sets can be turned off.
    let a = parse("--model llama3.2-3b --tie-embeddings false --no-bias false");
    assert!(!a.tie_embeddings && !a.no_bias && a.d_model == 3072);
    assert!(parse("--tie-embeddings").tie_embeddings && !parse("").tie_embeddings && parse("--no-bias --tie-embeddings true").no_bias);
}

/// A Llama preset shrunk by flags trains (its block, scaled RoPE and tied embeddings through
/// the example), and an unknown model names the choices.
#[test]
fn a_shrunk_llama_preset_trains() {
    let run = losses(&format!("{TINY} --model llama3.2-1b --kv-heads 2 --layers 2 --d-ff 64 --tokenizer byte --steps 2"));
    assert_eq!(run.len(), 2, "{run:?}");
    assert!(parse_error(&format!("{TINY} --model llama2-7b")).contains("unknown model \"llama2-7b\" (choose tiny, gpt2-124m"));
}

/// `--attention chunked:ROWS` (CPU: Burn ops on query chunks) trains with the composed run's
/// losses (printed to 4 decimals), at tp 1 and tp 2 with sequence parallelism.
#[test]
fn chunked_attention_prints_the_composed_losses() {
    for layout in ["", "--tp 2 --sequence-parallel"] {
        let composed = losses(&format!("{TINY} --steps 3 {layout} --attention composed"));
        let chunked = losses(&format!("{TINY} --steps 3 {layout} --attention chunked:5"));
        assert_eq!(composed.len(), 3, "{composed:?}");
        assert_eq!(chunked, composed, "{layout}");
    }
}

/// `--microbatches M` without a pipeline is gradient accumulation: it prints the losses of the
/// pipeline over the same M micro-batches bit for bit (with dropout; tp 2, SP, bf16, full
/// recompute), and those of one micro-batch within f32 rounding (no dropout: masks of other
/// shapes draw other values).
#[test]
fn gradient_accumulation_prints_the_pipelines_losses() {
    for layout in ["--dropout 0.1", "--tp 2 --sequence-parallel --precision bf16 --recompute full"] {
        let base = format!("{TINY} --steps 3 --layers 2 --microbatches 4 {layout}");
        let accumulated = losses(&base);
        assert_eq!(accumulated.len(), 3, "{accumulated:?}");
        assert_eq!(losses(&format!("{base} --pp 2")), accumulated, "{layout}");
    }
    let one = loss_values(&losses(&format!("{TINY} --steps 3 --layers 2")));
    let four = loss_values(&losses(&format!("{TINY} --steps 3 --layers 2 --microbatches 4")));
    assert_eq!(one.len(), 3);
    for (a, b) in one.iter().zip(&four) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "one micro-batch {one:?}, four {four:?}");
    }
}

/// `--metrics FILE`: one JSON line per step (its loss the printed one, bit for bit; the gradient
/// norm; the tokens seen) and one per evaluation; a resumed run appends.
#[test]
fn metrics_are_json_lines_and_a_resume_appends() {
    use burn_parallel::metrics::{EvalMetrics, StepMetrics};
    let dir = fresh("metrics");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("metrics.jsonl");
    let tiny = TINY.replace("--eval-every 0", "--eval-every 2");
    let base = format!("{tiny} --layers 2 --steps 4 --save-dir {} --metrics {}", dir.join("ckpt").display(), file.display());
    let printed = [losses(&format!("{base} --exit-at-step 3")), losses(&format!("{base} --resume latest"))].concat();
    let text = std::fs::read_to_string(&file).unwrap();
    let steps: Vec<StepMetrics> = text.lines().filter(|l| l.contains("\"loss\"")).map(|l| serde_json::from_str(l).unwrap()).collect();
    let evals: Vec<EvalMetrics> = text.lines().filter(|l| l.contains("val_loss")).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(steps.iter().map(|s| s.step).collect::<Vec<_>>(), [1, 2, 3, 4], "{text}");
    let logged: Vec<String> = steps.iter().map(|s| format!("step {} loss {:?}", s.step, s.loss)).collect();
    assert_eq!(logged, printed);
    assert!(steps.iter().all(|s| s.grad_norm.is_some_and(|n| n.is_finite() && n > 0.0) && s.tokens_seen == s.step * 4 * 16), "{text}");
    assert_eq!(evals.iter().map(|e| e.step).collect::<Vec<_>>(), [2], "{text}");
    let e = error_of(&format!("{TINY} --steps 1 --metrics {}", dir.join("missing/m.jsonl").display()));
    assert!(e.contains("--metrics: cannot open the metrics file"), "{e}");
    // A full disk ends the metrics file, not the run.
    let o = child(&format!("{TINY} --steps 2 --metrics /dev/full")).env("RUST_LOG", "warn").output().unwrap();
    let log = super::text(&o);
    assert!(o.status.success() && log.contains("--metrics: no more records are written"), "{log}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `--lr-decay`: the learning rate each step logs (`--metrics`) is the schedule's
/// (`burn_parallel::optim::schedule`): WSD holds the peak, then falls to the floor at the end.
#[test]
fn the_learning_rate_follows_the_chosen_schedule() {
    use burn_parallel::metrics::StepMetrics;
    let dir = fresh("schedule");
    std::fs::create_dir_all(&dir).unwrap();
    let lrs = |flags: &str, name: &str| {
        let file = dir.join(name);
        losses(&format!("{TINY} --steps 6 --warmup 1 --lr 0.001 --metrics {} {flags}", file.display()));
        let text = std::fs::read_to_string(&file).unwrap();
        text.lines().filter(|l| l.contains("\"loss\"")).map(|l| serde_json::from_str::<StepMetrics>(l).unwrap().lr).collect::<Vec<f64>>()
    };
    let wsd = lrs("--lr-decay wsd --wsd-decay-steps 2 --min-lr-ratio 0", "wsd.jsonl");
    assert_eq!(wsd, [0.001, 0.001, 0.001, 0.001, 0.0005, 0.0], "peak, stable, then linear to 0 over the last 2");
    let constant = lrs("--lr-decay constant", "constant.jsonl");
    assert!(constant.iter().all(|&l| l == 0.001), "{constant:?}");
    let linear = lrs("--lr-decay linear", "linear.jsonl");
    assert!(linear[1..].windows(2).all(|w| w[1] < w[0]) && (linear[5] - 0.001 * (0.1 + 0.9 * 0.2)).abs() < 1e-12, "{linear:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// GPT-2 124M multiplies by 85.06M block weights and the 768 × 50304 head per token (the
/// embeddings are lookups): 6 · 123.69M + 12 · 12 · 768 · 1024 FLOPs.
#[test]
fn model_flops_of_gpt2_124m_count_the_matmul_weights_only() {
    let args = Args::parse_with_presets(["gpt_pretrain", "--model", "gpt2-124m", "--tokenizer", "gpt2"].map(String::from)).unwrap();
    let (flops, n) = super::super::model_flops(&args);
    let expected_n = 85_056_000.0 + 768.0 * 50_304.0;
    assert!((n / expected_n - 1.0).abs() < 1e-3, "N {n} vs {expected_n}");
    let expected = 6.0 * expected_n + 12.0 * 12.0 * 768.0 * 1024.0;
    assert!((flops / expected - 1.0).abs() < 1e-3, "FLOPs/token {flops} vs {expected}");
    // Tied embeddings: the same matmuls (the head multiplies by the embedding's table), and
    // GPT-2's 124.48M parameters (wte 50304 x 768, wpe 1024 x 768, the blocks, the final layer
    // norm).
    let tied = Args::parse_with_presets(["gpt_pretrain", "--model", "gpt2-124m", "--tie-embeddings"].map(String::from)).unwrap();
    assert_eq!(super::super::model_flops(&tied), (flops, n));
    let total = burn_parallel::memory::model::parameter_count(&super::super::gpt_shape(&tied));
    let blocks = 12.0 * (12.0 * 768.0 * 768.0 + 13.0 * 768.0);
    assert_eq!(total, 50_304.0 * 768.0 + 1024.0 * 768.0 + blocks + 2.0 * 768.0);
    assert_eq!(total, 124_475_904.0);
}

/// The log names the attention kernels that run: on wgpu, with `--attention-tensor-cores false`,
/// the FMA kernels, switched to.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_logs_which_attention_kernels_run() {
    let o = child(&format!("{TINY} --steps 1 --device wgpu --attention-tensor-cores false")).env("RUST_LOG", "info").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let log = String::from_utf8_lossy(&o.stderr);
    let line = log.lines().find(|l| l.contains("fused attention")).unwrap_or_else(|| panic!("no 'fused attention' line in:\n{log}"));
    assert!(line.contains("FMA kernels (tensor cores switched off)"), "{line}");
}

/// `--device wgpu` (burn's `Wgpu`: the `Fusion<CubeBackend>` path that `Cuda` takes, with the
/// fused attention and layer-norm kernels, the device-side norm and loss sums and the chunked
/// cross-entropy; lavapipe in CI) trains with the CPU run's losses, tp 2 with SP, pp 2 × dp 2
/// with ZeRO and recompute, and cp 2 × tp 2 with SP (the fused kernels at each query chunk's
/// offset; the CPU composes); every rank's device bytes after the last step are the predicted
/// model state; a checkpoint saved on wgpu resumes on the CPU with the CPU's losses.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_training_prints_the_cpu_losses_and_its_checkpoint_resumes_on_the_cpu() {
    let close = |a: &[String], b: &[String], what: &str| {
        let (a, b) = (loss_values(a), loss_values(b));
        assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() < 2e-4, "{what}: step {} loss {x} on wgpu, {y} on the CPU ({a:?} vs {b:?})", i + 1);
        }
    };
    for (layout, world) in [
        ("--tp 2 --sequence-parallel --loss-chunk 24 --clip-grad 0.5", 2),
        ("--pp 2 --dp 2 --microbatches 2 --zero 1 --recompute selective", 4),
        ("--cp 2 --tp 2 --sequence-parallel", 4),
    ] {
        let base = format!("{TINY} --steps 3 --layers 2 {layout}");
        let cpu = losses(&base);
        assert_eq!(cpu.len(), 3, "{layout}: {cpu:?}");
        let o = run(&format!("{base} --device wgpu"));
        assert!(o.status.success(), "--device wgpu {layout} failed:\n{}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        close(&step_lines(&out), &cpu, layout);
        // The memory table: each rank's device bytes after the last step against the predicted
        // parameters + optimizer state (MB, 2 decimals).
        let rows: Vec<Vec<f64>> = out
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| rank"))
            .map(|l| l.split('|').filter_map(|c| c.trim().parse().ok()).collect())
            .collect();
        assert_eq!(rows.len(), world, "{layout}: one row per rank:\n{out}");
        for r in &rows {
            let (state, measured) = (r[r.len() - 2], r[r.len() - 1]);
            assert!((measured - state).abs() <= 0.1 * state + 0.01, "{layout}: rank {} holds {measured} MB after the last step, predicted {state}", r[0]);
        }
    }
    let dir = fresh("wgpu-to-cpu");
    let base = format!("{TINY} --steps 4 --layers 2 --tp 2 --dropout 0.1");
    let whole = losses(&base);
    let first = losses(&format!("{base} --device wgpu --exit-at-step 2 --save-dir {}", dir.display()));
    let rest = losses(&format!("{base} --resume latest --save-dir {}", dir.display()));
    close(&[first, rest].concat(), &whole, "saved on wgpu, resumed on the CPU");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `--tie-embeddings`: pipeline stages split over tp print one rank's losses (within f32
/// rounding: the embedding's two gradients meet in another order), not the untied model's; a
/// checkpoint or an exported model goes only into a model tied the same way.
#[test]
fn tied_embeddings_train_alike_on_any_layout_and_load_only_when_tied_alike() {
    let base = format!("{TINY} --steps 3 --layers 2 --microbatches 2 --clip-grad 0.5 --tie-embeddings");
    let one = loss_values(&losses(&base));
    // The same global batch: --batch-size is per DP replica.
    for layout in ["--pp 2 --tp 2", "--pp 2 --dp 2 --zero 1 --sequence-parallel --tp 2"] {
        let split = loss_values(&losses(&format!(
            "{} {layout}",
            if layout.contains("--dp 2") { base.replace("--batch-size 4", "--batch-size 2") } else { base.clone() }
        )));
        assert_eq!(split.len(), 3);
        for (a, b) in one.iter().zip(&split) {
            assert!((a - b).abs() <= 2e-5 * a.abs(), "{layout}: {split:?} vs one rank {one:?}");
        }
    }
    let untied = loss_values(&losses(&format!("{TINY} --steps 3 --layers 2 --microbatches 2 --clip-grad 0.5")));
    assert!((untied[2] - one[2]).abs() > 1e-4, "tied {one:?} vs untied {untied:?}");
    let dir = fresh("tied");
    let file = dir.join("tied.safetensors");
    losses(&format!("{base} --pp 2 --save-dir {} --export {}", dir.display(), file.display()));
    let e = error_of(&format!("{TINY} --steps 4 --layers 2 --save-dir {} --resume latest", dir.display()));
    assert!(e.contains("tied to the token embedding (it has no head.weight): pass --tie-embeddings"), "{e}");
    let e = error_of(&format!("{TINY} --steps 4 --layers 2 --init-from {}", file.display()));
    assert!(e.contains("--init-from") && e.contains("pass --tie-embeddings"), "{e}");
    let resumed = losses(&format!("{} --save-dir {} --resume latest", base.replace("--steps 3", "--steps 4"), dir.display()));
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    let untied_dir = fresh("untied");
    losses(&format!("{TINY} --steps 1 --layers 2 --save-dir {}", untied_dir.display()));
    let e = error_of(&format!("{base} --save-dir {} --resume latest", untied_dir.display()));
    assert!(e.contains("head has its own weight (head.weight), not tied to the token embedding: drop --tie-embeddings"), "{e}");
    for d in [dir, untied_dir] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Llama-style blocks (`--norm rms-norm --position rope --activation swiglu --no-bias
/// --kv-heads 2`): split
/// over pp × tp with SP, or dp × tp with ZeRO-1, the runs print one rank's losses (within f32
/// rounding), not the GPT-2 model's; a checkpoint resumes at another layout, and only into the
/// same architecture (each flag named); unknown names are refused.
#[test]
fn llama_style_runs_train_alike_on_any_layout_and_resume_only_alike() {
    let arch = "--norm rms-norm --position rope --rope-theta 500000 --activation swiglu --no-bias --kv-heads 2 --d-ff 64";
    let base = format!("{TINY} --steps 3 --layers 2 --microbatches 2 --clip-grad 0.5 {arch}");
    let one = loss_values(&losses(&base));
    for layout in ["--pp 2 --tp 2 --sequence-parallel", "--dp 2 --zero 1 --tp 2"] {
        let flags = if layout.contains("--dp 2") { base.replace("--batch-size 4", "--batch-size 2") } else { base.clone() };
        let split = loss_values(&losses(&format!("{flags} {layout}")));
        assert_eq!(split.len(), 3);
        for (a, b) in one.iter().zip(&split) {
            assert!((a - b).abs() <= 2e-5 * a.abs(), "{layout}: {split:?} vs one rank {one:?}");
        }
    }
    let gpt2 = loss_values(&losses(&base.replace(arch, "--d-ff 64")));
    assert!((gpt2[2] - one[2]).abs() > 1e-4, "llama {one:?} vs gpt-2 {gpt2:?}");
    let dir = fresh("llama");
    losses(&format!("{base} --pp 2 --tp 2 --save-dir {}", dir.display()));
    let resumed = losses(&format!("{} --save-dir {} --resume latest", base.replace("--steps 3", "--steps 4"), dir.display()));
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    for (flag, other, named) in [
        ("--norm rms-norm", "--norm layer-norm", "--norm"),
        ("--position rope", "--position learned", "--position"),
        ("--no-bias", "", "--no-bias"),
        ("--rope-theta 500000", "--rope-theta 10000", "--rope-theta"),
        ("--kv-heads 2", "--kv-heads 1", "--kv-heads"),
        ("--rope-theta 500000", "--rope-theta 500000 --rope-scaling llama3:8,1,4,64", "--rope-scaling"),
    ] {
        let e = error_of(&format!("{} --save-dir {} --resume latest", base.replace("--steps 3", "--steps 5").replace(flag, other), dir.display()));
        assert!(e.contains("the checkpoint is of another model") && e.contains(&format!("({named})")), "{flag}: {e}");
    }
    let e = error_of(&format!("{} --save-dir {} --resume latest", base.replace("--steps 3", "--steps 5").replace("swiglu", "gelu"), dir.display()));
    assert!(e.contains("pass --activation swiglu"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
    assert!(parse_error(&format!("{TINY} --norm batch-norm")).contains("choose layer-norm or rms-norm"));
    assert!(parse_error(&format!("{TINY} --position alibi")).contains("choose learned or rope"));
    assert!(parse_error(&format!("{TINY} --rope-scaling yarn")).contains("write llama3 or llama3:FACTOR,LOW,HIGH,ORIGINAL_CONTEXT"));
    let e = error_of(&format!("{TINY} --steps 1 --rope-scaling llama3"));
    assert!(e.contains("RoPE scaling needs rotary positions"), "{e}");
    let e = error_of(&format!("{} --steps 1 --position rope", TINY.replace("--d-model 32", "--d-model 24").replace("--heads 4", "--heads 8")));
    assert!(e.contains("even head width") && e.contains("head width 3"), "{e}");
    let e = error_of(&format!("{TINY} --steps 1 --kv-heads 2 --tp 4"));
    assert!(e.contains("key/value heads = 2 is not divisible by tensor_parallel = 4"), "{e}");
}

/// `--tokenizer llama3:PATH` (here a tiktoken file of cl100k_base's ranks: Llama 3's format and
/// split pattern, 100256 ranks + 256 special tokens) feeds training from the text corpus and
/// from prepared u32 shards (`<|begin_of_text|>` before each document, `<|end_of_text|>` after);
/// the first loss is about
/// ln V; a checkpoint of it resumes only with a tokenizer of its vocabulary.
#[test]
fn a_llama3_tokenizer_file_feeds_text_and_shards() {
    let dir = fresh("llama3-tokenizer");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokenizer.model");
    burn_parallel::data::write_cl100k_tiktoken(&file).unwrap();
    let tok = format!("--tokenizer llama3:{}", file.display());
    let text = loss_values(&losses(&format!("{TINY} --steps 2 {tok} --save-dir {}", dir.join("ck").display())));
    assert!((text[0] - (100512f32).ln()).abs() < 0.5, "{text:?}");
    let tokenizer: burn_parallel::data::Tokenizer = format!("llama3:{}", file.display()).parse().unwrap();
    let docs: Vec<String> = (0..40).map(|i| format!("Document {i}: the quick brown fox jumps over the lazy dog, {} times.", i * 7)).collect();
    let shards = dir.join("shards");
    burn_parallel::data::prepare(&docs, tokenizer, &shards, 200, 0.2).unwrap();
    let first = std::fs::read(shards.join("train_000000.bin")).unwrap();
    assert_eq!(i32::from_le_bytes(first[..4].try_into().unwrap()), 20240801, "llm.c's u32 shards");
    let token = |i: usize| u32::from_le_bytes(first[1024 + 4 * i..1028 + 4 * i].try_into().unwrap());
    assert_eq!(token(0), 100256, "<|begin_of_text|> first");
    let first_doc = tokenizer.encode(&docs[0]).unwrap();
    assert_eq!(token(first_doc.len() + 1), 100257, "<|end_of_text|> after the document");
    assert_eq!(token(first_doc.len() + 2), 100256, "the next document begins");
    let from_shards = losses(&format!("{TINY} --steps 2 {tok} --shards {}", shards.display()));
    assert_eq!(from_shards.len(), 2, "{from_shards:?}");
    let e = error_of(&format!("{TINY} --steps 3 --save-dir {} --resume latest", dir.join("ck").display()));
    assert!(e.contains("another tokenizer: a vocabulary of 100512 tokens there, 256 here"), "{e}");
    let resumed = losses(&format!("{TINY} --steps 3 {tok} --save-dir {} --resume latest", dir.join("ck").display()));
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    std::fs::remove_dir_all(dir).unwrap();
}
