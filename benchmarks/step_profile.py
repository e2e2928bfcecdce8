#!/usr/bin/env python
"""Where the clip+structure step's time goes on the GPU at B = 4,096 (kernels by CUDA time), and
two variants, timed beside the current form: (H + H^T) y as two products instead of a
transposed add and one, and TF32 matrix products (CUDA only).

    python benchmarks/step_profile.py [DEVICE BATCH]    # default: cuda 4096
"""
import sys
import time
import warnings

sys.path.insert(0, "benchmarks")
warnings.filterwarnings("ignore")
import numpy as np
import run as bench
import torch

from featcache.pipeline.common import losses
from featcache.pipeline.common.losses import structure_regularizer

dev, b = (sys.argv[1], int(sys.argv[2])) if len(sys.argv) > 2 else ("cuda", 4096)
bench.DEVICE = dev
step = bench._step_fixture(b)  # the train_step benchmark's batch, heads and optimiser
rs = lambda x, z, tau: structure_regularizer(x, z, tau, compiled=True)
for _ in range(3):
    step(None); step(rs)
from torch.profiler import ProfilerActivity, profile

for name, f in (("clip", None), ("clip+structure", rs)):
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step(f)
    print(f"== {name}: 5 steps")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))

orig = losses._CosineStructure.backward
def two_products(ctx, grad_value, _g):
    y, h = ctx.saved_tensors
    return torch.addmm(h @ y, h.mT, y) * grad_value, None, None
def timeit(f, n=25):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); step(f); ts.append(time.perf_counter() - t)
    return float(np.median(ts))
res = {"clip": [], "current": [], "two_products": []}
for _ in range(3):
    res["clip"].append(timeit(None))
    losses._CosineStructure.backward = staticmethod(orig); res["current"].append(timeit(rs))
    losses._CosineStructure.backward = staticmethod(two_products); step(rs); res["two_products"].append(timeit(rs))
losses._CosineStructure.backward = staticmethod(orig)
c = np.median(res["clip"])
print({k: f"{np.median(v)*1e3:.3f} ms ({np.median(v)/c:.2f}x)" for k, v in res.items()})
if dev == "cuda":  # for the record: both steps with TF32 matrix products (not featcache's default)
    torch.backends.cuda.matmul.allow_tf32 = True
    step(None); step(rs)
    t = {"clip": [], "current": []}
    for _ in range(3):
        t["clip"].append(timeit(None)); t["current"].append(timeit(rs))
    c = np.median(t["clip"])
    print("tf32:", {k: f"{np.median(v)*1e3:.3f} ms ({np.median(v)/c:.2f}x)" for k, v in t.items()})
