"""benchmarks/gpu_stage_one.py, the GPU script of stage one: its parts here, and the whole script on
the CPU with --cpu --tiny (tiny models, 64 images, one repeat), so no device time goes on a typo."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_stage_one.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_stage_one", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_blocked_topk_is_the_exact_search():
    gs = load_script()
    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(1000, 16, generator=g), torch.randn(37, 16, generator=g)
    scores, idx = gs.topk_blocked(q, x, 7, block=128)
    want_s, want_i = (q @ x.T).topk(7, dim=1)
    assert torch.equal(idx, want_i)
    assert torch.allclose(scores, want_s)
    assert gs.knn_agreement(q, x, idx, 7, 20)["neighbour_agreement"] == 1.0


def test_vit_l_flops_are_the_notes():
    assert round(load_script().vit_flops("L") / 2e9, 1) == 81.0  # GMAC per 224 px image


def test_table_compares_before_and_after(capsys):
    gs = load_script()
    doc = {"runs": {label: {"summary": [["extract", "L steady", value, "img/s"]], "sections": {}}
                    for label, value in (("before", 100.0), ("after", 250.0))}}
    gs.print_table(doc)
    assert re.search(r"L steady +100\.0 +-> +250\.0 +img/s +x2\.50", capsys.readouterr().out)


@pytest.mark.slow
def test_the_whole_script_runs_tiny_on_the_cpu(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--tiny", "--label", "tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((tmp_path / "stage_one.json").read_text())["runs"]["tiny"]
    sections = run["sections"]
    assert set(sections) == {"env", "ceilings", "bare", "decode_proto", "gpu_decode", "knn", "encoder", "decode",
                             "writes", "extract", "decompose", "knn_featcache", "extract_gpu_decode", "extract_draft"}
    failed = {k: v.get("error") or v.get("skipped") for k, v in sections.items() if v.get("status") != "ok"}
    assert failed == {}
    assert run["meta"]["featcache_version"]
    for key in ("T_B16_w0", "T_B16_w1"):
        entry = sections["extract"][key]
        assert entry["images"] == 64 and entry["steady_per_s"] > 0 and entry["steady_over_bare"] > 0
    assert sections["decompose"]["decode_and_writes_removed"]["steady_per_s"] > 0
    gpu_decode = sections["extract_gpu_decode"]  # --decode gpu through featcache's CPU test hook
    assert gpu_decode["T_B16_w1_gpu"]["preprocessing_decode"] == "torchvision-cpu"
    assert gpu_decode["T_B16_w1_cpu"]["preprocessing_decode"] == "(none: PIL)"
    assert gpu_decode["T_B16_w1_agreement"]["min_cosine"] > 0.99
    draft = sections["extract_draft"]  # 1080p JPEGs, whole and drafted
    assert draft["T_B16_w1_draft"]["preprocessing_decode"] == "pil-draft" and draft["T_B16_w1_draft"]["images"] == 32
    assert draft["T_B16_w1_cpu"]["preprocessing_decode"] == "(none: PIL whole)" and draft["T_B16_w1_speedup"] > 0
    assert sections["knn"]["self_n2000_d64_k10"]["check"]["neighbour_agreement"] == 1.0
    assert len(sections["bare"]["T_rand"]["B8"]["ms"]) == 2  # each timed block is read twice
    assert run["summary"] and "tiny" in proc.stdout
