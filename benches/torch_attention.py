"""PyTorch reference for `device_check attention`: causal F.scaled_dot_product_attention at GPT-2's
shape (b 8, 12 heads, d 64), T 1024 and 2048, forward and forward+backward (ms), bf16 and f32;
and the same math composed (matmul, mask, softmax, matmul) as the eager baseline."""
import torch
import torch.nn.functional as F


def ms(fn, iters=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


def composed(q, k, v):
    t = q.shape[2]
    scores = (q @ k.transpose(2, 3)) * q.shape[-1] ** -0.5
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")).float(), -1).to(q.dtype) @ v


print("| torch attention (b 8, H 12, d 64, causal) | T | dtype | sdpa fwd ms | sdpa fwd+bwd ms | composed fwd+bwd ms | sdpa backend |")
print("|---|---|---|---|---|---|---|")
for t in [1024, 2048]:
    for dt in [torch.bfloat16, torch.float32]:
        q, k, v, g = (torch.randn(8, 12, t, 64, device="cuda", dtype=dt) for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        with torch.no_grad():
            fwd = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        step = lambda f: ms(lambda: torch.autograd.grad(f(q, k, v), [q, k, v], grad_outputs=g), 5)
        fb = step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        comp = step(composed)
        backend = "flash" if dt != torch.float32 else "efficient/math"
        print(f"| | {t} | {dt} | {fwd:.3f} | {fb:.3f} | {comp:.3f} | {backend} |")
