"""PyTorch reference for the GPT-2 124M training throughput of `gpt_pretrain --model gpt2-124m`
(device-check step torch-gpt2): the same shapes (d 768, 12 layers, 12 heads, context 1024,
vocabulary 50304 padded, untied head, pre-LN, GeLU MLP 4d, biases), AdamW (beta2 0.95, weight
decay 0.1, lr 3e-4), batch 8 x 1024 random tokens; eager, bf16 autocast (and fp32), attention
through F.scaled_dot_product_attention. Prints tokens/s and peak memory per precision."""
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

V, T, D, L, H, B = 50304, 1024, 768, 12, 12, 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (z.view(b, t, H, D // H).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Gpt(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, V, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, V), targets.view(-1))


def run(dtype, steps=20, warmup=5):
    torch.manual_seed(0)
    model = Gpt().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randint(0, 50257, (B, T), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.time()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    dt = (time.time() - t0) / steps
    n = sum(p.numel() for p in model.parameters())
    print(f"torch gpt2-124m {dtype}: {B * T / dt:.0f} tokens/s, {dt * 1e3:.1f} ms/step, {n / 1e6:.1f}M parameters, "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, loss {loss.item():.3f}")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for d in sys.argv[1:] or ["bf16", "fp32"]:
        run(d)
