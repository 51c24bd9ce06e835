//! Token-shard preparation speed: `prepare_files` with 1, 2, … tokenizer threads (`workers`) on
//! the same text, GPT-2's BPE, in one run; tokens/s and the ratio to one worker, and each run's
//! shards checked equal to the first. The text: `BENCH_PREPARE_TEXT` (default
//! `../shared/data/tinyshakespeare.txt`, else a generated one), repeated to about
//! `BENCH_PREPARE_MB` MB (default 8). `cargo bench --bench prepare`.

use std::time::Instant;

use burn_parallel::data::{prepare_files, InputFormat, PrepareOptions, TokenShards, Tokenizer};

fn main() {
    let mb: usize = std::env::var("BENCH_PREPARE_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let source = std::env::var("BENCH_PREPARE_TEXT").unwrap_or_else(|_| "../shared/data/tinyshakespeare.txt".into());
    let base = std::fs::read(&source).unwrap_or_else(|_| "The quick brown fox jumps over the lazy dog.\nAnd again, slowly.\n".repeat(4096).into_bytes());
    let dir = std::env::temp_dir().join(format!("bp-bench-prepare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("corpus.txt");
    std::fs::write(&file, base.repeat((mb << 20).div_ceil(base.len()))).unwrap();
    let bytes = std::fs::metadata(&file).unwrap().len();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("prepare: {:.1} MB of text ({source} repeated), GPT-2 BPE, {cores} cores", bytes as f64 / 1e6);
    println!("| workers | seconds | tokens/s | vs 1 worker |\n|---|---|---|---|");
    let (mut first, mut base_secs) = (None::<Vec<u32>>, 0.0);
    for workers in (1..=cores.max(2)).filter(|w| *w == 1 || w.is_power_of_two() || *w == cores.max(2)) {
        let out = dir.join(format!("shards-{workers}"));
        let o = PrepareOptions { workers, ..PrepareOptions::new(Tokenizer::Gpt2) };
        let start = Instant::now();
        let r = prepare_files(std::slice::from_ref(&file), &InputFormat::Text, &out, &o).unwrap();
        let secs = start.elapsed().as_secs_f64();
        let tokens = r.train_tokens + r.val_tokens;
        let all: Vec<u32> = ["train", "val"]
            .iter()
            .flat_map(|s| {
                let t = TokenShards::open_dir(&out, s, 50257).unwrap();
                t.window(0, t.len()).unwrap()
            })
            .collect();
        match &first {
            None => (first, base_secs) = (Some(all), secs),
            Some(f) => assert!(f == &all, "{workers} workers wrote other shards"),
        }
        println!("| {workers} | {secs:.2} | {:.0} | {:.2}x |", tokens as f64 / secs, base_secs / secs);
    }
    std::fs::remove_dir_all(dir).unwrap();
}
