//! `prepare_files` streams: preparing a text file holds one piece of it and its tokens, not the
//! corpus (heap peaks, tracking allocator, at two file sizes in one run, against preparing it in
//! memory); and `burn-parallel prepare` takes text files and JSON Lines.

use std::path::Path;

use burn_parallel::data::{prepare, prepare_files, InputFormat, PrepareOptions, TokenShards, Tokenizer, PIECE_BYTES};
use burn_parallel::memory::{self, TrackingAllocator};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator;

/// A text of about `bytes` bytes in lines (a place to cut after each).
fn write_text(path: &Path, bytes: usize) {
    let line = "The quick brown fox jumps over the lazy dog, again and again.\n";
    std::fs::write(path, line.repeat(bytes / line.len())).unwrap();
}

/// The heap peak of preparing a `mb`-MB text with the byte tokenizer (one token a byte: its
/// tokens as u32 would be 4 times the file), and the tokens written; the peak of preparing it
/// as one document in memory (`prepare`: the text read, then tokenized whole) beside it.
fn measure(dir: &Path, mb: usize) -> (i64, usize, i64) {
    let (file, out) = (dir.join(format!("corpus-{mb}.txt")), dir.join(format!("shards-{mb}")));
    write_text(&file, mb << 20);
    let (r, peak) = memory::peak_of(0, || {
        prepare_files(std::slice::from_ref(&file), &InputFormat::Text, &out, &PrepareOptions { shard_tokens: 1 << 20, ..PrepareOptions::new(Tokenizer::Byte) })
            .unwrap()
    });
    let tokens = r.train_tokens + r.val_tokens;
    let (_, whole) = memory::peak_of(0, || prepare(&[std::fs::read(&file).unwrap()], Tokenizer::Byte, &dir.join(format!("whole-{mb}")), 1 << 20, 0.1).unwrap());
    eprintln!("{mb} MB of text, one document in memory: prepare's heap peak {:.2} MB", whole as f64 / 1e6);
    assert_eq!(tokens as u64, std::fs::metadata(&file).unwrap().len(), "a token a byte");
    assert_eq!(TokenShards::open_dir(&out, "train", 256).unwrap().len() + TokenShards::open_dir(&out, "val", 256).unwrap().len(), tokens);
    eprintln!("{mb} MB of text ({tokens} tokens, {} MB as u32): prepare's heap peak {:.2} MB", (4 * tokens) >> 20, peak as f64 / 1e6);
    (peak, tokens, whole)
}

/// Four times the text: the streamed peak stays (one piece of [`PIECE_BYTES`], its tokens,
/// buffers), under the text itself at 16 MB; in memory it grows by 5 bytes a byte.
#[test]
fn preparing_a_corpus_holds_a_piece_not_the_corpus() {
    let dir = std::env::temp_dir().join(format!("bp-prepare-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ((small, _, whole_small), (large, tokens, whole_large)) = (measure(&dir, 4), measure(&dir, 16));
    assert!(whole_large - whole_small > 4 * (12 << 20), "in memory: the text and its u32 tokens ({whole_small} -> {whole_large} B)");
    assert!((large - small).abs() < (PIECE_BYTES / 4) as i64, "the peak moved from {small} to {large} B");
    assert!((large as usize) < 8 * PIECE_BYTES && (large as usize) < tokens / 2, "a peak of {large} B for {tokens} tokens");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The command: text files (one document each) and JSON Lines (`--json-key`; `auto` by the
/// extension) prepare the same shards; mixed formats under `auto` and a bad line are errors.
#[test]
fn the_prepare_command_takes_text_files_and_json_lines() {
    let dir = std::env::temp_dir().join(format!("bp-prepare-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let docs = ["First document.\nTwo lines.", "Second one, a little longer than the first.", "Third: the end.\n"];
    let texts: Vec<String> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let p = dir.join(format!("d{i}.txt"));
            std::fs::write(&p, d).unwrap();
            p.display().to_string()
        })
        .collect();
    let jsonl = dir.join("docs.jsonl");
    std::fs::write(&jsonl, docs.iter().map(|d| serde_json::json!({"content": d}).to_string() + "\n").collect::<String>()).unwrap();
    let run = |args: Vec<String>| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_burn-parallel")).arg("prepare").args(args).output().unwrap();
        (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    };
    let out = |name: &str| dir.join(name).display().to_string();
    let common = |name: &str| vec!["--tokenizer".into(), "gpt2".into(), "--val-fraction".into(), "0.2".into(), "--out".into(), out(name)];
    let (ok, t) = run([common("text"), texts.clone()].concat());
    assert!(ok && t.contains("train tokens"), "{t}");
    let (ok, t) = run([common("json"), vec!["--json-key".into(), "content".into(), jsonl.display().to_string()]].concat());
    assert!(ok, "{t}");
    let all = |name: &str| {
        let d = dir.join(name);
        let (t, v) = (TokenShards::open_dir(&d, "train", 50257).unwrap(), TokenShards::open_dir(&d, "val", 50257).unwrap());
        [t.window(0, t.len()).unwrap(), v.window(0, v.len()).unwrap()].concat()
    };
    assert_eq!(all("text"), all("json"));
    let (ok, t) = run([common("mixed"), vec![texts[0].clone(), jsonl.display().to_string()]].concat());
    assert!(!ok && t.contains("some files are .jsonl and some are not"), "{t}");
    let (ok, t) = run([common("key"), vec![jsonl.display().to_string()]].concat());
    assert!(!ok && t.contains("docs.jsonl line 1: no string field \"text\""), "{t}");
    std::fs::remove_dir_all(dir).unwrap();
}
