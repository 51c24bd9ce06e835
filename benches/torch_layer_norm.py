"""PyTorch reference for `device_check ln-bench`: F.layer_norm forward, backward, forward+backward of sum() and of a dense dy (µs)."""
import torch
import torch.nn.functional as F

def t(fn, iters=50, queue_ahead=False):
    """µs per call by CUDA events. With `queue_ahead` (GPU-side, as device_check's): the calls
    are queued behind a ≈ 8 ms sleep kernel, so the host's launch path overlaps it and the events
    time the kernels back to back."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if queue_ahead:
        torch.cuda._sleep(16_000_000)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e3 / iters

def t_gpu(fn):
    return t(fn, iters=30, queue_ahead=True)

gpu_side = []
print("| shape | dtype | torch fwd µs | torch bwd µs | torch fwd+bwd(sum) µs | torch fwd+bwd(dy) µs | torch sum+bwd alone µs |")
print("|---|---|---|---|---|---|---|")
for n, h in [(8192, 768), (8192, 1024), (16384, 4096), (4096, 8192)]:
    for dt in [torch.float32, torch.bfloat16]:
        x = torch.randn(n, h, device="cuda", dtype=dt, requires_grad=True)
        w = torch.ones(h, device="cuda", dtype=dt, requires_grad=True)
        b = torch.zeros(h, device="cuda", dtype=dt, requires_grad=True)
        fwd = t(lambda: F.layer_norm(x, (h,), w, b))
        # Backward alone on a dense dy (as `device_check ln-bench` times our backward op).
        dy = torch.randn(n, h, device="cuda", dtype=dt)
        with torch.no_grad():
            _, mean, rstd = torch.ops.aten.native_layer_norm(x, (h,), w, b, 1e-5)
            bwd = t(lambda: torch.ops.aten.native_layer_norm_backward(dy, x, (h,), mean, rstd, w, b, [True, True, True]))
        # Forward + backward of sum() through autograd, grads returned (not accumulated into
        # .grad, as Burn returns them). The gradient of sum is a stride-0 expand in torch (read
        # for free), a materialised tensor in Burn.
        fb = t(lambda: torch.autograd.grad(F.layer_norm(x, (h,), w, b).sum(), [x, w, b]))
        # Forward + backward of a dense upstream gradient (as in a network; ours: backward_with).
        fbd = t(lambda: torch.autograd.grad(F.layer_norm(x, (h,), w, b), [x, w, b], grad_outputs=dy))
        # What sum().backward() itself costs (no layer norm).
        sb = t(lambda: torch.autograd.grad(x.sum(), [x]))
        with torch.no_grad():
            gf = t_gpu(lambda: F.layer_norm(x, (h,), w, b))
            gb = t_gpu(lambda: torch.ops.aten.native_layer_norm_backward(dy, x, (h,), mean, rstd, w, b, [True, True, True]))
            # A copy of the same bytes (what the forward reads and writes), the roofline at this size.
            dst = torch.empty_like(x)
            gc = t_gpu(lambda: dst.copy_(x))
        gpu_side.append((n, h, dt, gf, gb, gc))
        print(f"| [{n}, {h}] | {dt} | {fwd:.1f} | {bwd:.1f} | {fb:.1f} | {fbd:.1f} | {sb:.1f} |")

print("\ntorch GPU-side µs per call (queue-ahead): forward, backward, copy_ of the same tensor")
print("| shape | dtype | torch fwd µs | torch bwd µs | torch copy µs | copy GB/s |")
print("|---|---|---|---|---|---|")
for n, h, dt, gf, gb, gc in gpu_side:
    nbytes = n * h * (4 if dt == torch.float32 else 2)
    print(f"| [{n}, {h}] | {dt} | {gf:.1f} | {gb:.1f} | {gc:.1f} | {2 * nbytes / gc / 1e3:.0f} |")

# The per-call floor (launch path; negligible GPU work), as device_check prints it.
x = torch.ones(8, 1024, device="cuda", requires_grad=True)
w = torch.ones(1024, device="cuda", requires_grad=True)
b = torch.zeros(1024, device="cuda", requires_grad=True)
dy = torch.ones(8, 1024, device="cuda")
fwd = t(lambda: F.layer_norm(x, (1024,), w, b))
fbd = t(lambda: torch.autograd.grad(F.layer_norm(x, (1024,), w, b), [x, w, b], grad_outputs=dy))
with torch.no_grad():
    add = t(lambda: x + 1.0)
print(f"torch per-call floor at [8, 1024] f32: forward {fwd:.1f} µs, fwd+bwd(dy) {fbd:.1f} µs; one element-wise op {add:.1f} µs")

# The roofline for the GB/s columns: a device-to-device copy of 1 GiB (bytes read + written).
src = torch.empty(2**28, device="cuda")
dst = torch.empty_like(src)
us = t(lambda: dst.copy_(src))
print(f"torch copy of 1 GiB f32: {2 * 2**30 / us / 1e3:.0f} GB/s (read + write)")
