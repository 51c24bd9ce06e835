//! A padded vocabulary (Megatron's make-vocab-size-divisible-by): the padded entries' logits
//! never win, never count in the loss and get no gradient, also when TP puts them on one rank.

mod common;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::params::named_grads;
use burn_parallel_modules::GptConfig;
use common::*;

const USED: usize = 40;

fn config(padded: bool) -> GptConfig {
    GptConfig::new(if padded { 64 } else { USED }, 8, 16, 4, 2, 32).with_vocab_used(padded.then_some(USED))
}

/// Head weights of the padded columns set to 50: unmasked, they would win every softmax.
struct Loud(usize, usize);
impl ModuleMapper<B> for Loud {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (start, local) = (self.0, self.1);
        p.map(|t| {
            let dims = t.dims();
            if D != 2 || dims[1] != local || dims[0] != 16 {
                return t;
            }
            let mut v = t.clone().into_data().to_vec::<f32>().unwrap();
            for r in 0..16 {
                for c in 0..local {
                    if start + c >= USED {
                        v[r * local + c] = 50.0;
                    }
                }
            }
            Tensor::from_data(TensorData::new(v, dims.to_vec()), &t.device()).require_grad()
        })
    }
}

#[test]
fn padded_logits_never_win_never_count_and_get_no_gradient() {
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new((0..16).map(|i| (i * 7 % USED) as i64).collect::<Vec<_>>(), [2, 8]), &Default::default());
    for tp in [1, 2] {
        let (mut losses, mut heads) = (Vec::new(), Vec::new());
        // The whole loss through autodiff; with a chunked loss (5 rows: chunks straddle the two
        // sequences), its evaluation value (`valid()`: no autodiff) and its training path.
        for (chunk, train) in [(None, false), (Some(5), false), (Some(5), true)] {
            let out = world(tp, |c| {
                let m = config(true).with_loss_chunk(chunk).init::<B>(&c, &Default::default()).unwrap();
                let local = 64 / c.size();
                let m = m.map(&mut Loud(c.rank() * local, local));
                let (value, grads) = if train {
                    let (v, g) = m.forward_backward(ids.clone(), ids.clone()).map_err(|e| e.to_string())?;
                    (v, burn_parallel::params::named_param_grads(&m, &g))
                } else {
                    let loss = m.loss(ids.clone(), ids.clone());
                    let value = m.valid().loss(ids.clone().inner(), ids.clone().inner()).into_scalar();
                    (value, named_grads(&m, &loss.backward()))
                };
                let head = grads.iter().find(|p| p.path == "head.weight").unwrap().grad.clone().unwrap().to_vec::<f32>().unwrap();
                let first = c.rank() * local;
                let mut pad_grad = 0f32;
                for r in 0..16 {
                    for cc in (0..local).filter(|&cc| first + cc >= USED) {
                        pad_grad = pad_grad.max(head[r * local + cc].abs());
                    }
                }
                let sampled = m.generate(&[1, 2, 3], 20, 1.0, 7).map_err(|e| e.to_string())?;
                let padded = m.generate(&[1, USED], 1, 1.0, 7).unwrap_err().to_string();
                assert!(padded.contains(&format!("prompt token {USED} is outside the vocabulary of {USED}")), "{padded}");
                Ok((value, pad_grad, sampled, head))
            });
            for (r, (loss, pad_grad, sampled, head)) in out.into_iter().enumerate() {
                // The loss of a 40-way softmax at init, not of one dominated by the padded columns.
                assert!(loss < 4.5, "tp {tp} chunk {chunk:?}: loss {loss} (ln 40 = 3.69; the padded logits would make it ~800)");
                assert_eq!(pad_grad, 0.0, "tp {tp} chunk {chunk:?}: padded head columns get no gradient");
                assert!(sampled.iter().all(|&t| t < USED), "tp {tp}: sampled a padded id: {sampled:?}");
                losses.push(loss);
                heads.push((r, head));
            }
        }
        // Every rank's head gradient is the same with the whole and with the chunked loss.
        for (r, h) in &heads {
            let reference = &heads.iter().find(|(q, _)| q == r).unwrap().1;
            let d = h.iter().zip(reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d < 1e-6, "tp {tp} rank {r}: head gradient differs by {d} between the whole and the chunked loss");
        }
        assert!(losses.iter().all(|l| (l - losses[0]).abs() < 1e-5), "tp {tp}: chunked and whole losses differ: {losses:?}");
    }
}
