"""An independent Llama in numpy, on HuggingFace's layout: the reference of tests/hf_llama.rs.

    llama_numpy.py make DIR LAYERS WIDTH HEADS KV_HEADS FFN VOCAB SEED THETA TIED [SCALING]
        writes a random LlamaForCausalLM-layout model: DIR/model.safetensors (names prefixed
        `model.` but lm_head, nn.Linear weights [out, in]) and DIR/config.json; SCALING
        `FACTOR,LOW,HIGH,ORIGINAL` writes Llama 3.1's RoPE scaling in transformers 5's form
        (`rope_parameters` with `rope_type: "llama3"` and θ)
    llama_numpy.py logits DIR IDS
        prints the logits [batch, seq, vocab] of the token ids IDS (JSON [[...], ...]) as JSON

The forward is written from HuggingFace's modeling_llama (RMS norms, rotary embedding with
rotate_half on q and k, Llama 3.1's frequencies from modeling_rope_utils' llama3 rule, repeat_kv for grouped-query attention, causal softmax attention,
down(silu(gate(x)) * up(x)), final norm, lm_head or the tied embedding), in float64, sharing no
code with the Rust model.
"""

import json
import os
import math
import sys

import numpy as np
from safetensors.numpy import load_file, save_file


def make(d, layers, width, heads, kv, ffn, vocab, seed, theta, tied, scaling=None):
    rng = np.random.default_rng(seed)
    t = {}
    dh = width // heads

    def p(name, *shape, scale=0.2):
        t[name] = (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(name):
        t[name] = (1.0 + rng.standard_normal(width) * 0.1).astype(np.float32)

    p("model.embed_tokens.weight", vocab, width)
    for n in range(layers):
        pre = f"model.layers.{n}."
        norm(pre + "input_layernorm.weight")
        norm(pre + "post_attention_layernorm.weight")
        p(pre + "self_attn.q_proj.weight", heads * dh, width)
        p(pre + "self_attn.k_proj.weight", kv * dh, width)
        p(pre + "self_attn.v_proj.weight", kv * dh, width)
        p(pre + "self_attn.o_proj.weight", width, heads * dh)
        p(pre + "mlp.gate_proj.weight", ffn, width)
        p(pre + "mlp.up_proj.weight", ffn, width)
        p(pre + "mlp.down_proj.weight", width, ffn)
    norm("model.norm.weight")
    if not tied:
        p("lm_head.weight", vocab, width)
    save_file(t, f"{d}/model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": width,
        "intermediate_size": ffn,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_hidden_layers": layers,
        "max_position_embeddings": 64,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "rope_theta": theta,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": None,
        "torch_dtype": "float32",
    }
    if scaling is not None:
        factor, low, high, original = scaling
        original = int(original)
        config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
                                     "high_freq_factor": high, "original_max_position_embeddings": original}
    with open(f"{d}/config.json", "w") as f:
        json.dump(config, f)


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def llama3(inv_freq, c):
    """HuggingFace's _compute_llama3_parameters on the settings dict c."""
    factor, low, high = c["factor"], c["low_freq_factor"], c["high_freq_factor"]
    old = c["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled)


def rope_settings(c):
    """The RoPE scaling dict of a config, as transformers reads it: rope_scaling or rope_parameters."""
    s = c.get("rope_scaling") or c.get("rope_parameters")
    return s if s and s.get("rope_type", s.get("type")) == "llama3" else None


def rope(x, theta, scaling):
    """x: [b, heads, s, d], rotated by position (HuggingFace's LlamaRotaryEmbedding)."""
    s, d = x.shape[2], x.shape[3]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
    if scaling is not None:
        inv_freq = llama3(inv_freq, scaling)
    angles = np.outer(np.arange(s), inv_freq)
    emb = np.concatenate([angles, angles], axis=-1)
    return x * np.cos(emb) + rotate_half(x) * np.sin(emb)


def load_weights(d):
    """model.safetensors, or where there is none the shards its index names (as from_pretrained)."""
    if os.path.exists(f"{d}/model.safetensors"):
        return load_file(f"{d}/model.safetensors")
    with open(f"{d}/model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    w = {}
    for shard in sorted(set(weight_map.values())):
        w.update({k: v for k, v in load_file(f"{d}/{shard}").items() if weight_map.get(k) == shard})
    assert set(w) == set(weight_map), "every tensor of the index, from its shard"
    return w


def logits(d, ids):
    with open(f"{d}/config.json") as f:
        c = json.load(f)
    w = {k: v.astype(np.float64) for k, v in load_weights(d).items()}
    ids = np.array(ids)
    b, s = ids.shape
    h, a, kv, eps = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    dh = h // a
    theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta"))
    scaling = rope_settings(c)
    x = w["model.embed_tokens.weight"][ids]
    mask = np.tril(np.ones((s, s), dtype=bool))
    for n in range(c["num_hidden_layers"]):
        g = lambda k: w[f"model.layers.{n}.{k}"]
        y = rms_norm(x, g("input_layernorm.weight"), eps)
        heads = lambda m, count: (y @ m.T).reshape(b, s, count, dh).transpose(0, 2, 1, 3)
        q = rope(heads(g("self_attn.q_proj.weight"), a), theta, scaling)
        k = rope(heads(g("self_attn.k_proj.weight"), kv), theta, scaling)
        v = heads(g("self_attn.v_proj.weight"), kv)
        k, v = np.repeat(k, a // kv, axis=1), np.repeat(v, a // kv, axis=1)  # repeat_kv
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
        scores = np.where(mask, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = (p @ v).transpose(0, 2, 1, 3).reshape(b, s, h)
        x = x + o @ g("self_attn.o_proj.weight").T
        y = rms_norm(x, g("post_attention_layernorm.weight"), eps)
        gate = y @ g("mlp.gate_proj.weight").T
        up = y @ g("mlp.up_proj.weight").T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ g("mlp.down_proj.weight").T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if c.get("tie_word_embeddings", False) else w["lm_head.weight"]
    return x @ head.T


if __name__ == "__main__":
    cmd, d = sys.argv[1], sys.argv[2]
    if cmd == "make":
        layers, width, heads, kv, ffn, vocab, seed = map(int, sys.argv[3:10])
        scaling = [float(v) for v in sys.argv[12].split(",")] if len(sys.argv) > 12 else None
        make(d, layers, width, heads, kv, ffn, vocab, seed, float(sys.argv[10]), sys.argv[11] == "tied", scaling)
    elif cmd == "logits":
        print(json.dumps(logits(d, json.loads(sys.argv[3])).tolist()))
    else:
        raise SystemExit(f"unknown command {cmd}")
