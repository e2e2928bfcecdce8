"""The study's statistics on hand-made ranks."""

import numpy as np
import pytest

from featcache.pipeline.app.study import CONFIGS, StudyConfig, summarise, to_markdown


def _ranks(p_hit: float, rng, n=40):
    return {d: np.where(rng.random(n) < p_hit, 0, 10) for d in ("image_to_text", "text_to_image")}


def test_paired_bootstrap_intervals():
    rng = np.random.default_rng(0)
    cfg = StudyConfig(salts=("", "1", "2"), seeds=(0, 1, 2), ks=(1,), n_boot=300)
    p = {("last", "clip"): 0.2, ("last", "clip+structure"): 0.2, ("auto", "clip"): 0.6, ("auto", "clip+structure"): 0.6}
    ranks = {key: {s: {r: _ranks(p[key], rng) for r in cfg.seeds} for s in cfg.salts} for key in CONFIGS}
    summary = summarise(ranks, cfg)
    by = {c["comparison"]: c for c in summary["comparisons"]}
    structure = by["STRUCTURE vs without (auto layers)"]
    assert structure["ci95"][0] < 0 < structure["ci95"][1]  # no real difference: the interval covers 0
    layers = by["selected vs last layers (clip+structure)"]
    assert layers["difference_points"] == pytest.approx(40, abs=8) and layers["ci95"][0] > 20
    row = next(r for r in summary["table"] if r["layers"] == "auto" and r["loss"] == "clip")
    assert row["i2t R@1"][0] == pytest.approx(60, abs=8) and row["i2t R@1"][1] > 0
    assert "| auto | clip |" in to_markdown(summary)
