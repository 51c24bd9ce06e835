"""PyTorch reference for benches/layer_norm.rs: F.layer_norm forward and forward+backward (µs)."""
import torch
import torch.nn.functional as F

def t(fn, iters=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e3 / iters

print("| shape | dtype | torch fwd µs | torch fwd+bwd µs |")
print("|---|---|---|---|")
for n, h in [(8192, 768), (8192, 1024), (16384, 4096), (4096, 8192)]:
    for dt in [torch.float32, torch.bfloat16]:
        x = torch.randn(n, h, device="cuda", dtype=dt, requires_grad=True)
        w = torch.ones(h, device="cuda", dtype=dt, requires_grad=True)
        b = torch.zeros(h, device="cuda", dtype=dt, requires_grad=True)
        fwd = t(lambda: F.layer_norm(x, (h,), w, b))
        fb = t(lambda: F.layer_norm(x, (h,), w, b).sum().backward())
        print(f"| [{n}, {h}] | {dt} | {fwd:.1f} | {fb:.1f} |")
