//! The same GPT built only from burn-nn layers, on one device: the baseline that the parallel
//! model must equal (parity tests) and the throughput baseline of the benchmark.
//!
//! Weights come from the same `(seed, path)` streams as [`Gpt`](crate::Gpt), in full. The
//! Llama-style options use burn-nn's own layers too: `RmsNorm`, `SwiGlu` (its inner linear is
//! the gate, its outer one `fc1`) and `RotaryEncoding` (burn-nn rotates interleaved pairs
//! `(x_{2i}, x_{2i+1})`; the head dims are reordered around it so that it rotates our pairs
//! `(x_i, x_{i+d/2})`), with the attention written out (burn-nn's has no rotary hook).

use burn::module::{Module, Param};
use burn::nn::attention::{generate_autoregressive_mask, MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{
    Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig, RotaryEncoding, RotaryEncodingConfig, SwiGlu,
    SwiGluConfig,
};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_parallel::arch::{Norm, Position};

use crate::gpt::GptConfig;
use crate::init::{param, ParamInit};

/// burn-nn's layer norm or RMS norm.
#[derive(Module, Debug)]
pub enum NnNorm<B: Backend> {
    /// `LayerNorm`.
    Layer(LayerNorm<B>),
    /// `RmsNorm`.
    Rms(RmsNorm<B>),
}

impl<B: Backend> NnNorm<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Self::Layer(n) => n.forward(x),
            Self::Rms(n) => n.forward(x),
        }
    }
}

/// A burn-nn transformer block (pre-norm, GeLU or SwiGLU MLP).
#[derive(Module, Debug)]
pub struct NnBlock<B: Backend> {
    /// Norm before attention.
    pub ln1: NnNorm<B>,
    /// burn-nn multi-head attention (causal mask; its linears only, with RoPE).
    pub attn: MultiHeadAttention<B>,
    /// Norm before the MLP.
    pub ln2: NnNorm<B>,
    /// `h → ffn`.
    pub fc1: Linear<B>,
    /// `ffn → h`.
    pub fc2: Linear<B>,
    /// SwiGLU: `silu(x·gate) ⊙ x·fc1` (`linear_outer` is `fc1`).
    pub swiglu: Option<SwiGlu<B>>,
}

/// A GPT from burn-nn layers only.
#[derive(Module, Debug)]
pub struct NnGpt<B: Backend> {
    /// Token embedding `[V, h]`.
    pub wte: Embedding<B>,
    /// Position embedding `[max_seq_len, h]` (`None` with RoPE).
    pub wpe: Option<Param<Tensor<B, 2>>>,
    /// burn-nn's rotary encoding of one head's width (with RoPE).
    pub rope: Option<RotaryEncoding<B>>,
    /// Blocks.
    pub blocks: Vec<NnBlock<B>>,
    /// Final norm.
    pub ln_f: NnNorm<B>,
    /// Untied head `h → V`, no bias; `None` with tied embeddings (logits `x · wteᵀ`).
    pub head: Option<Linear<B>>,
    /// The MLPs' activation.
    #[module(skip)]
    pub activation: burn_parallel::activation::Activation,
    /// Key/value heads (grouped-query attention when fewer than the heads).
    #[module(skip)]
    pub kv_heads: usize,
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
        let blocks = (0..self.n_layers).map(|i| self.reference_block(&init.child("blocks").child(i), device)).collect();
        let mut wte = EmbeddingConfig::new(self.vocab_size, h).init(device);
        wte.weight = param(init.child("wte").child("weight").normal(&[self.vocab_size, h], std), device);
        let rope = self.rope().map(|rope| {
            let config = RotaryEncodingConfig::new(self.max_seq_len, h / self.n_heads).with_theta(rope.theta as f32);
            match rope.scaling {
                Some(scaling) => config.init_with_frequency_scaling(|f| llama3_scaled(f, &scaling), device),
                None => config.init(device),
            }
        });
        NnGpt {
            wte,
            wpe: (self.position == Position::Learned).then(|| param(init.child("wpe").child("weight").normal(&[self.max_seq_len, h], std), device)),
            rope,
            blocks,
            ln_f: self.reference_norm(device),
            head: (!self.tie_embeddings).then(|| linear(h, self.vocab_size, false, std, &init.child("head"), device)),
            activation: self.activation,
            kv_heads: self.kv_heads.unwrap_or(self.n_heads),
        }
    }

    fn reference_norm<B: Backend>(&self, device: &B::Device) -> NnNorm<B> {
        match self.norm {
            Norm::LayerNorm => NnNorm::Layer(LayerNormConfig::new(self.d_model).with_epsilon(self.layer_norm_eps).init(device)),
            Norm::RmsNorm => NnNorm::Rms(RmsNormConfig::new(self.d_model).with_epsilon(self.layer_norm_eps).init(device)),
        }
    }

    fn reference_block<B: Backend>(&self, bi: &ParamInit, device: &B::Device) -> NnBlock<B> {
        let (h, std, bias) = (self.d_model, 0.02, self.bias);
        let proj_std = 0.02 / ((2 * self.n_layers.max(1)) as f64).sqrt();
        let (ai, mi) = (bi.child("attn"), bi.child("mlp"));
        let mut attn = MultiHeadAttentionConfig::new(h, self.n_heads).with_dropout(0.0).init(device);
        attn.query = linear(h, h, bias, std, &ai.child("query"), device);
        let kv = self.kv_heads.unwrap_or(self.n_heads) * (h / self.n_heads);
        attn.key = linear(h, kv, bias, std, &ai.child("key"), device);
        attn.value = linear(h, kv, bias, std, &ai.child("value"), device);
        attn.output = linear(h, h, bias, proj_std, &ai.child("output"), device);
        let fc1 = linear(h, self.d_ff, bias, std, &mi.child("fc1"), device);
        let swiglu = self.activation.gated().then(|| {
            let mut g = SwiGluConfig::new(h, self.d_ff).with_bias(bias).init(device);
            g.linear_inner = linear(h, self.d_ff, bias, std, &mi.child("gate"), device);
            g.linear_outer = fc1.clone();
            g
        });
        NnBlock {
            ln1: self.reference_norm(device),
            attn,
            ln2: self.reference_norm(device),
            fc1,
            fc2: linear(self.d_ff, h, bias, proj_std, &mi.child("fc2"), device),
            swiglu,
        }
    }
}

impl<B: Backend> NnGpt<B> {
    /// Logits `[b, s, V]`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let device = ids.device();
        let mut x = self.wte.forward(ids);
        if let Some(wpe) = &self.wpe {
            x = x + wpe.val().slice(0..s).unsqueeze::<3>();
        }
        for blk in &self.blocks {
            let written_out = self.rope.is_some() || self.kv_heads != blk.attn.n_heads;
            let a = match written_out {
                true => manual_attention(&blk.attn, self.rope.as_ref(), self.kv_heads, blk.ln1.forward(x.clone())),
                false => {
                    let mask = generate_autoregressive_mask::<B>(b, s, &device);
                    blk.attn.forward(MhaInput::self_attn(blk.ln1.forward(x.clone())).mask_attn(mask)).context
                }
            };
            x = x + a;
            let y = blk.ln2.forward(x.clone());
            let inner = match &blk.swiglu {
                Some(swiglu) => swiglu.forward(y),
                None => self.activation.forward(blk.fc1.forward(y)),
            };
            x = x.clone() + blk.fc2.forward(inner);
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

/// Causal attention through `attn`'s linears, with burn-nn's rotary encoding of queries and keys
/// (if any) and `groups` key/value heads (query head `j` reads group `j·groups/heads`):
/// `[b, s, h]` → `[b, s, h]`.
/// Llama 3.1's frequency scaling written with tensor ops (masks), independently of
/// [`RopeScaling::scale`](burn_parallel::arch::RopeScaling::scale).
fn llama3_scaled<B: Backend>(f: Tensor<B, 1>, s: &burn_parallel::arch::RopeScaling) -> Tensor<B, 1> {
    let context = s.original_max_position_embeddings as f32;
    let (factor, low, high) = (s.factor as f32, s.low_freq_factor as f32, s.high_freq_factor as f32);
    let wavelen = f.clone().recip().mul_scalar(2.0 * std::f32::consts::PI);
    let alpha = wavelen.clone().recip().mul_scalar(context).sub_scalar(low).div_scalar(high - low);
    let blended = alpha.clone().neg().add_scalar(1.0) * f.clone().div_scalar(factor) + alpha * f.clone();
    let slow = blended.mask_where(wavelen.clone().greater_elem(context / low), f.clone().div_scalar(factor));
    slow.mask_where(wavelen.lower_elem(context / high), f)
}

fn manual_attention<B: Backend>(attn: &MultiHeadAttention<B>, rope: Option<&RotaryEncoding<B>>, groups: usize, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, s, h] = x.dims();
    let (heads, d) = (attn.n_heads, attn.d_k);
    let split = |t: Tensor<B, 3>, n: usize| t.reshape([b, s, n, d]).swap_dims(1, 2); // [b, n, s, d]
                                                                                     // Our pairs (i, i + d/2) become burn-nn's adjacent pairs (2i, 2i + 1), and back.
    let rotate = |t: Tensor<B, 4>| {
        let Some(rope) = rope else { return t };
        let n = t.dims()[1];
        let paired = t.reshape([b, n, s, 2, d / 2]).swap_dims(3, 4).reshape([b, n, s, d]);
        rope.forward(paired).reshape([b, n, s, d / 2, 2]).swap_dims(3, 4).reshape([b, n, s, d])
    };
    // Each query head's key/value head, picked one by one.
    let per_head = |t: Tensor<B, 4>| Tensor::cat((0..heads).map(|j| t.clone().slice([0..b, j * groups / heads..j * groups / heads + 1])).collect(), 1);
    let q = rotate(split(attn.query.forward(x.clone()), heads));
    let k = per_head(rotate(split(attn.key.forward(x.clone()), groups)));
    let v = per_head(split(attn.value.forward(x), groups));
    let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((d as f32).sqrt());
    let mask = generate_autoregressive_mask::<B>(b, s, &scores.device()).unsqueeze_dim::<4>(1).expand([b, heads, s, s]);
    let probs = burn::tensor::activation::softmax(scores.mask_fill(mask, -1.0e4), 3);
    attn.output.forward(probs.matmul(v).swap_dims(1, 2).reshape([b, s, h]))
}
