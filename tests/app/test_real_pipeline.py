"""The three documented commands, exactly as written, on the real offline weights and data.

This is the slowest test (about two minutes on two CPU cores): it extracts DINOv2-S/14 and
MiniLM over every Tux Paint split, then runs layer selection, alignment and retrieval.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import requires_real

pytestmark = pytest.mark.real  # deselect with -m 'not real'


def featcache(*args, env):
    out = subprocess.run([sys.executable, "-m", "featcache.cli.main", *args], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@requires_real
def test_extract_layers_align_eval_as_written(tmp_path):
    env = dict(os.environ, FEATCACHE_CACHE_DIR=str(tmp_path / "cache"), FEATCACHE_RUNS_DIR=str(tmp_path / "runs"),
               HF_HUB_OFFLINE="1")
    featcache("extract", "--model", "dinov2", "--layers", "all", env=env)
    featcache("extract", "--model", "minilm", "--layers", "all", env=env)
    from featcache.cache.store import FeatureStore, find_stores

    stores = [FeatureStore.open(p) for p in find_stores(tmp_path / "cache")]
    assert len(stores) == 6  # train, val, test x two encoders
    for s in stores:
        assert s.is_complete() and s.width == 384
        assert len(s.layers) == (13 if s.identity["encoder"]["name"] == "dinov2-s" else 7)

    out = featcache("layers", env=env)
    assert "best pair" in out and list((tmp_path / "runs" / "layer-scores").glob("*.png"))  # beside the runs
    assert not (tmp_path / "cache" / "layer-scores").exists()  # never in the (perhaps shared) cache

    out = featcache("align", env=env)
    run = next(p for p in (tmp_path / "runs").iterdir() if (p / "summary.json").exists())
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["image_model"], cfg["text_model"], cfg["dataset"], cfg["loss"], cfg["head"]) == (
        "dinov2", "minilm", "tuxpaint", "clip+structure", "linear")
    from featcache.pipeline.select.table import ScoreTable

    table = ScoreTable(**json.loads((run / "layer_scores.json").read_text()))
    assert (cfg["image_layer"], cfg["text_layer"]) == table.best()
    assert (run / "heads.safetensors").exists() and (run / "metrics.jsonl").read_text()

    out = featcache("eval", "retrieval", env=env)
    res = json.loads((run / "eval" / "retrieval-tuxpaint-test.json").read_text())
    r = res["metrics"]["image_to_text"]
    # far above chance (10/|test| is about 7% at R@10) on real features
    assert r["R@10"] > 0.25 and res["metrics"]["text_to_image"]["R@10"] > 0.25

    # zero-shot on real caches of both classification sets (fixed subsets, extracted on demand)
    for dataset in ("fashion-mnist", "mnist"):
        featcache("eval", "classify", "--dataset", dataset, "--limit", "40", "--extract", env=env)
        res = json.loads((run / "eval" / f"classify-{dataset}-test-sample40.json").read_text())
        assert res["classes"] == 10 and res["images"] == 40 and res["templates"] >= 5
        assert 0 <= res["metrics"]["top1"] <= res["metrics"]["top5"] <= 1

