"""Reads an exported model.safetensors with Python's safetensors (numpy) and prints, as JSON,
its __metadata__ and each tensor's dtype, shape and sum: what tests/checkpoint.rs compares."""
import json
import sys

from safetensors import safe_open

with safe_open(sys.argv[1], "np") as f:
    tensors = {}
    for name in f.keys():
        t = f.get_tensor(name)
        tensors[name] = {"dtype": str(t.dtype), "shape": list(t.shape), "sum": float(t.astype("float64").sum())}
    print(json.dumps({"metadata": f.metadata(), "tensors": tensors}))
