"""An independent GPT-2 in numpy, on HuggingFace's layout: the reference of tests/hf_gpt2.rs.

    gpt2_numpy.py make DIR LAYERS WIDTH HEADS VOCAB CONTEXT SEED ACTIVATION TIED
        writes a random GPT2LMHeadModel-layout model: DIR/model.safetensors (names prefixed
        `transformer.`, Conv1D weights [in, out], the causal-mask buffers h.N.attn.bias) and
        DIR/config.json
    gpt2_numpy.py logits DIR IDS
        prints the logits [batch, seq, vocab] of the token ids IDS (JSON [[...], ...]) as JSON

The forward is written from the GPT-2 paper and HuggingFace's modeling_gpt2 (pre-LN blocks,
q/k/v as [q | k | v] columns of c_attn, causal softmax attention, gelu_new or gelu, final layer
norm, head = wte (tied) or lm_head [V, h]), in float64, sharing no code with the Rust model.
"""

import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file, save_file


def make(d, layers, width, heads, vocab, ctx, seed, activation, tied):
    rng = np.random.default_rng(seed)
    t = {}

    def p(name, *shape, scale=0.2):
        t[name] = (rng.standard_normal(shape) * scale).astype(np.float32)

    p("transformer.wte.weight", vocab, width)
    p("transformer.wpe.weight", ctx, width)
    for n in range(layers):
        pre = f"transformer.h.{n}."
        for ln in ("ln_1", "ln_2"):
            t[pre + ln + ".weight"] = (1.0 + rng.standard_normal(width) * 0.1).astype(np.float32)
            p(pre + ln + ".bias", width, scale=0.1)
        p(pre + "attn.c_attn.weight", width, 3 * width)
        p(pre + "attn.c_attn.bias", 3 * width)
        p(pre + "attn.c_proj.weight", width, width)
        p(pre + "attn.c_proj.bias", width)
        p(pre + "mlp.c_fc.weight", width, 4 * width)
        p(pre + "mlp.c_fc.bias", 4 * width)
        p(pre + "mlp.c_proj.weight", 4 * width, width)
        p(pre + "mlp.c_proj.bias", width)
        t[pre + "attn.bias"] = np.tril(np.ones((ctx, ctx), dtype=np.float32)).reshape(1, 1, ctx, ctx)
    t["transformer.ln_f.weight"] = (1.0 + rng.standard_normal(width) * 0.1).astype(np.float32)
    p("transformer.ln_f.bias", width, scale=0.1)
    if not tied:
        p("lm_head.weight", vocab, width)
    save_file(t, f"{d}/model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": width,
        "n_head": heads,
        "n_layer": layers,
        "n_positions": ctx,
        "n_ctx": ctx,
        "n_inner": None,
        "vocab_size": vocab,
        "activation_function": activation,
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": tied,
    }
    with open(f"{d}/config.json", "w") as f:
        json.dump(config, f)


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def activation(name, x):
    if name == "gelu_new":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "gelu":
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    raise ValueError(name)


def logits(d, ids):
    with open(f"{d}/config.json") as f:
        c = json.load(f)
    raw = load_file(f"{d}/model.safetensors")
    w = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in raw.items()}
    ids = np.array(ids)
    b, s = ids.shape
    h, a, eps = c["n_embd"], c["n_head"], c["layer_norm_epsilon"]
    dh = h // a
    x = w["wte.weight"][ids] + w["wpe.weight"][:s]
    mask = np.tril(np.ones((s, s), dtype=bool))
    for n in range(c["n_layer"]):
        g = lambda k: w[f"h.{n}.{k}"]
        y = layer_norm(x, g("ln_1.weight"), g("ln_1.bias"), eps) @ g("attn.c_attn.weight") + g("attn.c_attn.bias")
        q, k, v = (y[..., i * h:(i + 1) * h].reshape(b, s, a, dh).transpose(0, 2, 1, 3) for i in range(3))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
        scores = np.where(mask, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = (p @ v).transpose(0, 2, 1, 3).reshape(b, s, h)
        x = x + o @ g("attn.c_proj.weight") + g("attn.c_proj.bias")
        m = layer_norm(x, g("ln_2.weight"), g("ln_2.bias"), eps) @ g("mlp.c_fc.weight") + g("mlp.c_fc.bias")
        x = x + activation(c["activation_function"], m) @ g("mlp.c_proj.weight") + g("mlp.c_proj.bias")
    x = layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], eps)
    head = w["wte.weight"] if c.get("tie_word_embeddings", True) else w["lm_head.weight"]
    return x @ head.T


if __name__ == "__main__":
    cmd, d = sys.argv[1], sys.argv[2]
    if cmd == "make":
        layers, width, heads, vocab, ctx, seed = map(int, sys.argv[3:9])
        make(d, layers, width, heads, vocab, ctx, seed, sys.argv[9], sys.argv[10] == "tied")
    elif cmd == "logits":
        print(json.dumps(logits(d, json.loads(sys.argv[3])).tolist()))
    else:
        raise SystemExit(f"unknown command {cmd}")
