//! HuggingFace GPT-2 interop against an independent numpy GPT-2 (`tests/gpt2_numpy.py`): a
//! random model in `GPT2LMHeadModel`'s layout, written and run by numpy, imported
//! (`checkpoint::hf::import_hf`) and loaded at tp 1 and 2 gives numpy's logits; our GPTs (tied or
//! not, GeLU or its tanh approximation, a padded vocabulary) exported with `export_hf` give numpy
//! our logits. Skips, saying so, without python3 with numpy and safetensors (CI installs them).

mod common;
#[path = "common/numpy.rs"]
mod numpy;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use burn_parallel::activation::Activation;
use burn_parallel::checkpoint::hf::{export_hf, import_hf};
use burn_parallel::checkpoint::*;
use burn_parallel::ParallelConfig;
use burn_parallel_modules::GptConfig;
use common::runner::temp_dir;
use common::*;
use numpy::{assert_close, ours, python};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gpt2_numpy.py");
const BIN: &str = env!("CARGO_BIN_EXE_burn-parallel");

fn numpy_logits(dir: &Path) -> Vec<f32> {
    numpy::logits(SCRIPT, dir)
}

#[test]
fn an_imported_huggingface_gpt2_gives_numpys_logits_at_tp_1_and_2() {
    if !python() {
        return;
    }
    for (activation, tied) in [("gelu_new", true), ("gelu", false)] {
        let dir = temp_dir(&format!("hf-import-{activation}"));
        let made = Command::new("python3")
            .arg(SCRIPT)
            .args(["make"])
            .arg(&dir)
            .args(["2", "16", "4", "50", "8", "7", activation, if tied { "tied" } else { "untied" }])
            .status();
        assert!(made.unwrap().success());
        let file = dir.join("ours.safetensors");
        if tied {
            // Through the command line: it names the flags the model needs.
            let o = Command::new(BIN).args(["checkpoint", "import-hf"]).arg(&dir).arg("--out").arg(&file).output().unwrap();
            let text = String::from_utf8_lossy(&o.stdout);
            let flags = "--d-model 16 --heads 4 --layers 2 --d-ff 64 --seq-len 8 --tie-embeddings --activation gelu-tanh";
            assert!(o.status.success() && text.contains(flags), "{text}{}", String::from_utf8_lossy(&o.stderr));
        } else {
            let burn_parallel::checkpoint::hf::HfConfig::Gpt2(hf) = import_hf(&dir, &file).unwrap() else { panic!("a GPT-2 config") };
            assert_eq!((hf.n_layer, hf.n_embd, hf.n_head, hf.vocab_size, hf.tie_word_embeddings), (2, 16, 4, 50, tied));
        }
        let ckpt = Checkpoint::open_safetensors(&file, MODEL_PREFIX).unwrap();
        assert_eq!(ckpt.metadata().tensors.contains_key("model.head.weight"), !tied, "a head of its own only when untied");
        let act = if activation == "gelu_new" { Activation::GeluTanh } else { Activation::Gelu };
        assert_eq!(ckpt.metadata().sections["model"]["activation"], serde_json::to_value(act).unwrap());
        let cfg = GptConfig::new(50, 8, 16, 4, 2, 64).with_tie_embeddings(tied).with_activation(act);
        let reference = numpy_logits(&dir);
        for t in [1, 2] {
            let logits = world(t, |c| {
                let gpt = cfg.init::<B>(&c, &Default::default()).map_err(|e| e.to_string())?;
                let ctx = ShardContext { tp_rank: c.rank(), tp_size: t, dp_rank: 0 };
                let same = |p: &str| p.to_string();
                let gpt = load_module(&ckpt, gpt, MODEL_PREFIX, &same, ctx).map_err(|e| e.to_string())?;
                Ok(ours(&gpt, 50))
            });
            for l in &logits {
                assert_close(&format!("{activation} tp {t}"), l, &reference);
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn our_gpt_exported_for_huggingface_gives_numpy_our_logits() {
    if !python() {
        return;
    }
    for (tied, act, vocab) in [(true, Activation::GeluTanh, 64), (false, Activation::Gelu, 50)] {
        let cfg = GptConfig::new(vocab, 8, 16, 4, 2, 64).with_tie_embeddings(tied).with_activation(act).with_vocab_used((vocab > 50).then_some(50));
        let (dir, out) = (temp_dir(&format!("hf-export-{tied}")), temp_dir(&format!("hf-export-{tied}-out")));
        let noise = Perturb::default();
        let logits = world(1, |c| {
            // Noise on every parameter: logits of order 1, where a wrong layout shows.
            let gpt = noise.apply(cfg.init::<B>(&c, &Default::default()).map_err(|e| e.to_string())?, &c);
            let same = |p: &str| p.to_string();
            let snapshot = Snapshot {
                step: 1,
                layout: ParallelConfig::new(),
                train: TrainState::default(),
                tensors: module_tensors(&gpt, &same, ShardContext::single()),
                counters: BTreeMap::new(),
                sections: BTreeMap::from([("model".to_string(), serde_json::to_value(&cfg).unwrap())]),
            };
            let mut saver = Checkpointer::new(CheckpointOptions { dir: dir.clone(), keep: 0, async_save: false }, c);
            saver.save(snapshot).map_err(|e| e.to_string())?;
            saver.finish().map_err(|e| e.to_string())?;
            Ok(ours(&gpt, 50))
        })
        .remove(0);
        if tied {
            let o = Command::new(BIN).args(["checkpoint", "export-hf"]).arg(&dir).arg("--out").arg(&out).output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        } else {
            export_hf(&Checkpoint::open(&dir).unwrap(), &out).unwrap();
        }
        let hf: burn_parallel::checkpoint::hf::HfGpt2Config = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!((hf.vocab_size, hf.tie_word_embeddings, hf.activation_function.as_str()), (50, tied, act.hf_name()));
        assert_close(&format!("exported tied={tied} {act}"), &logits, &numpy_logits(&out));
        // And back: the export imports to the same tensors (padding rows aside).
        let back = out.join("back.safetensors");
        import_hf(&out, &back).unwrap();
        let (a, b) = (Checkpoint::open(&dir).unwrap(), Checkpoint::open_safetensors(&back, MODEL_PREFIX).unwrap());
        for (name, t) in full_tensors(&b, MODEL_PREFIX).unwrap() {
            let whole = a.read_full(&name).unwrap();
            let rows = t.shape[0];
            let kept: Vec<f32> = whole.to_vec::<f32>().unwrap()[..t.num_elements()].to_vec();
            assert_eq!(t.to_vec::<f32>().unwrap(), kept, "{name}: {rows} rows back");
        }
        for d in [dir, out] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}
