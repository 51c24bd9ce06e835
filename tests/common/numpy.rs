//! The numpy references' side of the HuggingFace tests (`tests/gpt2_numpy.py`,
//! `tests/llama_numpy.py`): whether python3 has numpy and safetensors, their logits of two fixed
//! sequences, ours of the same, and the comparison.

use std::path::Path;
use std::process::Command;

use burn::tensor::{Int, Tensor, TensorData};

use super::common::B;

/// Two sequences of 8 token ids below 50.
pub const IDS: [[i64; 8]; 2] = [[1, 7, 3, 49, 0, 12, 12, 5], [48, 2, 2, 9, 31, 40, 6, 17]];

/// Whether python3 can run the references (a skip is said on stderr).
pub fn python() -> bool {
    let ok = Command::new("python3").args(["-c", "import numpy, safetensors.numpy"]).status().is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: python3 with numpy and safetensors is not available (the numpy references)");
    }
    ok
}

/// The reference `script`'s logits of `IDS` for the HuggingFace model in `dir`, flattened
/// `[2, 8, V]`.
pub fn logits(script: &str, dir: &Path) -> Vec<f32> {
    let ids = serde_json::to_string(&IDS).unwrap();
    let o = Command::new("python3").arg(script).arg("logits").arg(dir).arg(ids).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Vec<Vec<Vec<f64>>> = serde_json::from_slice(&o.stdout).unwrap();
    v.into_iter().flatten().flatten().map(|x| x as f32).collect()
}

/// Our full logits `[2, 8, V]` of `IDS`, flattened, each row cut to its first `keep` entries.
pub fn ours(gpt: &burn_parallel_modules::Gpt<B>, keep: usize) -> Vec<f32> {
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(IDS.concat(), [2, 8]), &Default::default());
    let logits = gpt.logits(ids);
    let v = logits.dims()[2];
    let all: Vec<f32> = logits.into_data().to_vec().unwrap();
    all.chunks(v).flat_map(|row| row[..keep].to_vec()).collect()
}

/// `a` within 2e-5 (relative to the largest logit) of `b`, whose logits are of order 1.
pub fn assert_close(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let scale = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
    assert!(worst < 2e-5 * scale.max(1.0), "{what}: max |ours − numpy| = {worst} (logits up to {scale})");
    assert!(scale > 0.5, "{what}: logits this small would hide a wrong layout ({scale})");
}
