//! Blended shards (`--shards W:DIR,W:DIR`): each global batch takes each dataset by its weight,
//! validation blends alike, a run trains from them, and bad specs are clear errors.

use burn::backend::Flex;
use burn_parallel::data::{prepare, GlobalSampler, Tokenizer};

use super::*;
use crate::corpus::Corpus;

/// Two byte-level datasets of one letter each (`a`: token 97, `b`: 98), prepared into
/// `dir/a` and `dir/b`.
fn two_datasets(dir: &Path) -> [String; 2] {
    ["a", "b"].map(|letter| {
        let docs = vec![letter.repeat(4000)];
        let out = dir.join(letter);
        prepare(&docs, Tokenizer::Byte, &out, 1000, 0.25).unwrap();
        out.display().to_string()
    })
}

#[test]
fn blended_shards_give_each_batch_its_share_of_each_dataset() {
    let dir = fresh("blend");
    let [a, b] = two_datasets(&dir);
    let corpus = Corpus::from_shards(&[(1.0, a.clone()), (3.0, b.clone())], Tokenizer::Byte, 16).unwrap();
    for (split, name) in [(&corpus.train, "train"), (&corpus.val, "val")] {
        let sampler = GlobalSampler::new(7, name);
        // Steps of 8 samples from counter 0 and from far on (a resumed run): 2 of `a` each, ±2.
        for first in [0u64, 8, 16, 1 << 30] {
            let (x, _) = Corpus::samples::<Flex>(split, first..first + 8, 16, &sampler, &Default::default()).unwrap();
            let rows = x.into_data().convert::<i64>().to_vec::<i64>().unwrap();
            let from_a = rows.chunks(16).filter(|r| r.iter().all(|&t| t == 97)).count();
            let from_b = rows.chunks(16).filter(|r| r.iter().all(|&t| t == 98)).count();
            assert_eq!(from_a + from_b, 8, "{name}: every sample from one dataset");
            assert!(from_a.abs_diff(2) <= 2, "{name} at {first}: {from_a} of 8 from a");
        }
        let (x, _) = Corpus::samples::<Flex>(split, 0..400, 16, &sampler, &Default::default()).unwrap();
        let from_a = x.into_data().convert::<i64>().to_vec::<i64>().unwrap().chunks(16).filter(|r| r[0] == 97).count();
        assert!(from_a.abs_diff(100) <= 2, "{name}: {from_a} of 400 from a");
    }
    let run = losses(&format!("{TINY} --steps 2 --shards 1:{a},3:{b}"));
    assert_eq!(run.len(), 2, "{run:?}");
    let e = error_of(&format!("{TINY} --steps 1 --shards 1:{a},{b}"));
    assert!(e.contains("has no WEIGHT:") && e.contains("WEIGHT:PATH,WEIGHT:PATH"), "{e}");
    let e = error_of(&format!("{TINY} --steps 1 --shards 1:{a},0:{b}"));
    assert!(e.contains("dataset 1: weight 0"), "{e}");
    let e = error_of(&format!("{TINY} --steps 1 --shards 1:{a},1:{}", dir.join("missing").display()));
    assert!(e.contains("--shards") && e.contains("missing"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}
