"""PyTorch/NCCL reference for `device_check nccl-bench`: world size 1 collectives (overhead only)."""
import os
import tempfile
import torch
import torch.distributed as dist

def t(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e3 / iters

store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda:0"))
print(f"torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}")
print("| op | MB | torch µs |")
print("|---|---|---|")
for mb in [1, 4, 16, 64, 256, 1024]:
    x = torch.rand(mb * 2**20 // 4, device="cuda")
    out = torch.empty_like(x)
    iters = 5 if mb >= 256 else 20
    print(f"| all_reduce | {mb} | {t(lambda: dist.all_reduce(x), iters):.1f} |")
    print(f"| all_gather | {mb} | {t(lambda: dist.all_gather_into_tensor(out, x), iters):.1f} |")
    print(f"| reduce_scatter | {mb} | {t(lambda: dist.reduce_scatter_tensor(out, x), iters):.1f} |")
dist.destroy_process_group()
