//! The same GPT built only from burn-nn layers, on one device: the baseline that the parallel
//! model must equal (parity tests) and the throughput baseline of the benchmark.
//!
//! Weights come from the same `(seed, path)` streams as [`Gpt`](crate::Gpt), in full.

use burn::module::{Module, Param};
use burn::nn::attention::{generate_autoregressive_mask, MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::gpt::GptConfig;
use crate::init::{param, ParamInit};

/// A burn-nn transformer block (pre-LN, GeLU MLP).
#[derive(Module, Debug)]
pub struct NnBlock<B: Backend> {
    /// Layer norm before attention.
    pub ln1: LayerNorm<B>,
    /// burn-nn multi-head attention (causal mask).
    pub attn: MultiHeadAttention<B>,
    /// Layer norm before the MLP.
    pub ln2: LayerNorm<B>,
    /// `h → ffn`.
    pub fc1: Linear<B>,
    /// `ffn → h`.
    pub fc2: Linear<B>,
}

/// A GPT from burn-nn layers only.
#[derive(Module, Debug)]
pub struct NnGpt<B: Backend> {
    /// Token embedding `[V, h]`.
    pub wte: Embedding<B>,
    /// Position embedding `[max_seq_len, h]`.
    pub wpe: Param<Tensor<B, 2>>,
    /// Blocks.
    pub blocks: Vec<NnBlock<B>>,
    /// Final layer norm.
    pub ln_f: LayerNorm<B>,
    /// Untied head `h → V`, no bias; `None` with tied embeddings (logits `x · wteᵀ`).
    pub head: Option<Linear<B>>,
    /// The MLPs' activation.
    #[module(skip)]
    pub activation: burn_parallel::activation::Activation,
}

fn linear<B: Backend>(d_in: usize, d_out: usize, bias: bool, std: f64, init: &ParamInit, dev: &B::Device) -> Linear<B> {
    let mut lin = LinearConfig::new(d_in, d_out).with_bias(bias).init(dev);
    lin.weight = param(init.child("weight").normal(&[d_in, d_out], std), dev);
    lin.bias = bias.then(|| param(TensorData::zeros::<f32, _>([d_out]), dev));
    lin
}

impl GptConfig {
    /// The unsharded burn-nn model with the same weights as [`GptConfig::init`].
    pub fn init_reference<B: Backend>(&self, device: &B::Device) -> NnGpt<B> {
        let init = ParamInit::new(self.seed);
        let (h, std) = (self.d_model, 0.02);
        let proj_std = 0.02 / ((2 * self.n_layers.max(1)) as f64).sqrt();
        let ln = || LayerNormConfig::new(h).with_epsilon(self.layer_norm_eps).init(device);
        let blocks = (0..self.n_layers)
            .map(|i| {
                let bi = init.child("blocks").child(i);
                let (ai, mi) = (bi.child("attn"), bi.child("mlp"));
                let mut attn = MultiHeadAttentionConfig::new(h, self.n_heads).with_dropout(0.0).init(device);
                attn.query = linear(h, h, true, std, &ai.child("query"), device);
                attn.key = linear(h, h, true, std, &ai.child("key"), device);
                attn.value = linear(h, h, true, std, &ai.child("value"), device);
                attn.output = linear(h, h, true, proj_std, &ai.child("output"), device);
                NnBlock {
                    ln1: ln(),
                    attn,
                    ln2: ln(),
                    fc1: linear(h, self.d_ff, true, std, &mi.child("fc1"), device),
                    fc2: linear(self.d_ff, h, true, proj_std, &mi.child("fc2"), device),
                }
            })
            .collect();
        let mut wte = EmbeddingConfig::new(self.vocab_size, h).init(device);
        wte.weight = param(init.child("wte").child("weight").normal(&[self.vocab_size, h], std), device);
        NnGpt {
            wte,
            wpe: param(init.child("wpe").child("weight").normal(&[self.max_seq_len, h], std), device),
            blocks,
            ln_f: ln(),
            head: (!self.tie_embeddings).then(|| linear(h, self.vocab_size, false, std, &init.child("head"), device)),
            activation: self.activation,
        }
    }
}

impl<B: Backend> NnGpt<B> {
    /// Logits `[b, s, V]`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let device = ids.device();
        let mut x = self.wte.forward(ids) + self.wpe.val().slice(0..s).unsqueeze::<3>();
        for blk in &self.blocks {
            let mask = generate_autoregressive_mask::<B>(b, s, &device);
            let a = blk.attn.forward(MhaInput::self_attn(blk.ln1.forward(x.clone())).mask_attn(mask)).context;
            x = x + a;
            x = x.clone() + blk.fc2.forward(self.activation.forward(blk.fc1.forward(blk.ln2.forward(x))));
        }
        let x = self.ln_f.forward(x);
        match &self.head {
            Some(head) => head.forward(x),
            None => x.matmul(self.wte.weight.val().transpose().unsqueeze::<3>()),
        }
    }

    /// Mean next-token cross-entropy (burn-nn `CrossEntropyLoss`).
    pub fn loss(&self, ids: Tensor<B, 2, Int>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let logits = self.forward(ids);
        let [b, s, v] = logits.dims();
        let ce = CrossEntropyLossConfig::new().init(&logits.device());
        ce.forward(logits.reshape([b * s, v]), targets.reshape([b * s]))
    }
}
