#!/usr/bin/env bash
# GPU smoke test: extraction on CUDA (autocast, pinned memory, DataLoader workers), the
# extraction benchmark, and faiss kNN / retrieval on the GPU (needs the gpu extra: pip uninstall -y
# faiss-cpu && pip install ".[gpu]"). Run from the repository root on a GPU machine after .ci/setup.sh.
set -euo pipefail
export HF_HUB_OFFLINE=1
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("device:", torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
PY
CACHE="$(mktemp -d)"
featcache extract --model dinov2 --layers all --device cuda --cache-dir "$CACHE" --batch-size 64
featcache extract --model dinov2 --layers all --device cuda --cache-dir "$CACHE" --image-size 518 --split test
featcache extract --model minilm --layers all --device cuda --cache-dir "$CACHE"
featcache ls --cache-dir "$CACHE"
python benchmarks/run.py --only extraction --device cuda --out bench-out/gpu.json
# a larger model needs the hub: python benchmarks/run.py --only extraction --device cuda --model dinov2-l
# faiss on the GPU (the gpu extra): kNN and retrieval through faiss_device's GPU index, checked
# against the CPU index on the same data, then the layer-table target with GPU search.
python - <<'PY'
import os
import faiss, numpy as np
from featcache.pipeline import faiss_device
from featcache.pipeline.alignment import knn
from featcache.pipeline.layers import score_table
from featcache.pipeline.metrics import retrieval_ranks
assert faiss_device.gpu_count() > 0, "faiss sees no GPU: pip uninstall -y faiss-cpu && pip install '.[gpu]'"
assert faiss_device.use_gpu(), "auto does not choose the GPU"
rng = np.random.default_rng(0)
x = rng.normal(size=(20_000, 384)).astype(np.float32)
gpu, cpu = knn(x, 30, device="gpu"), knn(x, 30, device="cpu")
same = np.mean([len(set(a) & set(b)) / 30 for a, b in zip(gpu, cpu)])
print(f"kNN GPU vs CPU neighbour agreement {same:.5f} (ties and float sums may differ in the last bits)")
assert same > 0.999
g = rng.normal(size=(200_000, 512)).astype(np.float32); q = g[:5_000] + 0.05 * rng.normal(size=(5_000, 512)).astype(np.float32)
pos = [{i} for i in range(5_000)]
os.environ["FEATCACHE_FAISS_DEVICE"] = "gpu"; r_gpu = retrieval_ranks(q, g, pos)
os.environ["FEATCACHE_FAISS_DEVICE"] = "cpu"; r_cpu = retrieval_ranks(q, g, pos)
print("retrieval ranks GPU == CPU:", np.array_equal(r_gpu, r_cpu)); assert (r_gpu == r_cpu).mean() > 0.999
PY
FEATCACHE_FAISS_DEVICE=gpu python benchmarks/run.py --only layer_target --out bench-out/gpu-layer-target.json
FEATCACHE_FAISS_DEVICE=gpu python benchmarks/run.py --only scale --device cuda --out bench-out/gpu-scale.json
# stage two on CUDA: stacked sweep cells equal their sequential runs (the test), the vectorised
# sweep against one run at the sequential sweep's 200 epochs, the fused R_S step (eager and
# with its core compiled) and the whole-R_S compile.
python -m pytest -q tests/train/test_train.py tests/train/test_losses.py -k "cuda and (vectorized_cells or host_reads or closed_form)"
FEATCACHE_CACHE_DIR="$CACHE" python benchmarks/run.py --only train_step vectorized_sweep structure_compile --device cuda --sweep-epochs 200 \
    --out bench-out/gpu-stage-two.json
python benchmarks/step_profile.py      # where the step's CUDA time goes
python benchmarks/stacked_drift.py cuda  # how far stacked cells drift from sequential ones there
