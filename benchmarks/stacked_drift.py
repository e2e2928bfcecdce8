#!/usr/bin/env python
"""Stacked against sequential sweep cells on one device: how far apart their curves drift per
epoch, next to two sequential runs of the same cells (the device's own run-to-run spread).

    python benchmarks/stacked_drift.py [cuda|cpu]      # from the repository root
"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, "tests")
from conftest import build_tiny_cache

from featcache.pipeline.train.config import AlignConfig
from featcache.pipeline.train.sweep import sweep

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
root = Path(tempfile.mkdtemp())
tc = build_tiny_cache(root / "c", n=72)
rows = lambda r: [json.loads(l) for l in (r / "metrics.jsonl").read_text().splitlines()]
grid = {"lam": [1.0, 10.0], "temperature": [0.05, 0.1]}
for lr in (3e-2, 1e-2):
    out = {}
    for mode in ("seqA", "seqB", "vec"):
        cfg = AlignConfig(image_model=tc["vit"], text_model=tc["bert"], dataset=str(tc["pairs"]), cache_dir=tc["cache"],
                          runs_dir=root / f"{lr}-{mode}", epochs=12, patience=3, batch_size=16, lam_warmup_steps=10,
                          lr=lr, layers="last", device=dev)
        out[mode] = sweep(cfg, ["last"], ["clip+structure"], [0, 1], [40, 44], grid=grid, vectorize=mode == "vec")
    for other in ("seqB", "vec"):
        per_epoch = {}
        for a, b in zip(out["seqA"], out[other]):
            for ra, rb in zip(rows(a), rows(b)):
                d = max(abs(ra[k] - rb[k]) for k in ra if isinstance(ra[k], float))
                per_epoch[ra["epoch"]] = max(per_epoch.get(ra["epoch"], 0.0), d)
        print(f"{dev} lr={lr} seqA vs {other}: max curve diff by epoch",
              " ".join(f"{e}:{d:.1e}" for e, d in sorted(per_epoch.items())), flush=True)
