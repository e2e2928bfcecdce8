#!/usr/bin/env bash
# GPU smoke test: extraction on CUDA (autocast, pinned memory, DataLoader workers) and the
# extraction benchmark. Run from the repository root on a machine with a GPU after .ci/setup.sh.
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
