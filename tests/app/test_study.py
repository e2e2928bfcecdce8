"""The study's statistics on hand-made ranks."""

from dataclasses import replace

import numpy as np
import pytest

from featcache.pipeline.app.study import CONFIGS, StudyConfig, recipe, summarise, to_markdown


def _ranks(p_hit: float, rng, n=40):
    return {d: np.where(rng.random(n) < p_hit, 0, 10) for d in ("image_to_text", "text_to_image")}


def test_paired_bootstrap_intervals():
    rng = np.random.default_rng(0)
    cfg = StudyConfig(salts=("", "1", "2"), seeds=(0, 1, 2), ks=(1,), n_boot=300)
    p = {"last/clip": 0.2, "last/clip+structure": 0.2, "auto/clip": 0.6, "auto/clip+structure": 0.6}
    ranks = {v.name: {s: {r: _ranks(p[v.name], rng) for r in cfg.seeds} for s in cfg.salts} for v in CONFIGS}
    summary = summarise(ranks, cfg)
    by = {c["comparison"]: c for c in summary["comparisons"]}
    structure = by["STRUCTURE vs without (auto layers)"]
    assert structure["ci95"][0] < 0 < structure["ci95"][1]  # no real difference: the interval covers 0
    layers = by["selected vs last layers (clip+structure)"]
    assert layers["difference_points"] == pytest.approx(40, abs=8) and layers["ci95"][0] > 20
    row = next(r for r in summary["table"] if r["layers"] == "auto" and r["loss"] == "clip")
    assert row["i2t R@1"][0] == pytest.approx(60, abs=8) and row["i2t R@1"][1] > 0
    assert "| auto/clip |" in to_markdown(summary)


def test_subsets_are_nested_across_sizes():
    from featcache.pipeline.common.arrays import subsample

    for seed in (0, 1, 7):
        small, large = set(subsample(500, 50, seed)), set(subsample(500, 100, seed))
        assert len(small) == 50 and small <= large
    assert set(subsample(500, 50, 0)) != set(subsample(500, 50, 1))


def test_scaling_summary_gain_shrinks_and_intervals_cover_the_truth():
    from featcache.pipeline.app.study import scaling_markdown, summarise_scaling

    rng = np.random.default_rng(1)
    cfg = StudyConfig(salts=("", "1"), seeds=(0, 1), ks=(1,), n_boot=300, pairs=(50, None),
                      configs=(recipe("auto", "clip"), recipe("auto", "clip+structure")))
    p = {(50, "auto/clip"): 0.2, (50, "auto/clip+structure"): 0.5,
         (None, "auto/clip"): 0.6, (None, "auto/clip+structure"): 0.6}
    ranks = {key: {s: {r: _ranks(p[key], rng, n=200) for r in cfg.seeds} for s in cfg.salts} for key in p}
    scaling = summarise_scaling(ranks, cfg)
    small, full = scaling["sizes"]
    assert small["pairs"] == 50 and full["pairs"] == "all"
    gain = lambda size: next(c for c in size["comparisons"] if c["comparison"].startswith("STRUCTURE"))
    assert gain(small)["ci95"][0] > 15 and gain(small)["relative_gain_percent"] == pytest.approx(150, abs=40)
    assert gain(full)["ci95"][0] < 0 < gain(full)["ci95"][1]
    point, lo, hi = small["bands"]["auto/clip+structure R@1"]
    assert lo < 50 < hi and point == pytest.approx(50, abs=6)
    assert "### 50 training pairs" in scaling_markdown(scaling)


def test_scaling_study_end_to_end_on_a_tiny_cache(tmp_path):
    from conftest import build_tiny_cache

    from featcache.pipeline.app.study import run_study

    tiny = build_tiny_cache(tmp_path, n=72)
    cfg = StudyConfig(out=tmp_path / "study", dataset=str(tiny["pairs"]), salts=("",), seeds=(0, 1), ks=(1, 10),
                      epochs=3, patience=3, batch_size=16, n_boot=100, cache_dir=tiny["cache"], pairs=(10, 20, None),
                      configs=(recipe("auto", "clip"), recipe("auto", "clip+structure")), image_model=tiny["vit"],
                      text_model=tiny["bert"])
    scaling = run_study(cfg)
    assert [s["pairs"] for s in scaling["sizes"]] == [10, 20, "all"]
    assert (tmp_path / "study" / "scaling.png").stat().st_size > 1000
    assert "Relative gain of STRUCTURE" in (tmp_path / "study" / "scaling.md").read_text()


def test_ablation_rows_compare_against_the_full_recipe():
    from featcache.pipeline.app.study import FULL, METHODS, SWITCHES, comparisons_for, variant_set

    rows = variant_set(["methods", "switches"])
    names = [v.name for v in rows]
    assert len(names) == len(set(names)) == len(METHODS) + len(SWITCHES) - 1  # the full recipe once
    pairs = comparisons_for(names)
    assert {b for _, a, b in pairs if a == FULL} == set(names) - {FULL}
    assert ("STRUCTURE vs without (auto layers)", FULL, "auto/clip") in pairs
    with pytest.raises(Exception, match="unknown variant set"):
        variant_set(["method"])


def test_method_and_switch_study_end_to_end_on_a_tiny_cache(tmp_path, monkeypatch):
    """Training-free rows stand for every seed; a switch row trains with its switch recorded;
    a complete cache is read without loading an encoder (extract is never called)."""
    from conftest import build_tiny_cache

    from featcache.pipeline.app import study
    from featcache.pipeline.app.study import Variant, run_study
    from featcache.pipeline.train.runs import list_runs, read_json

    tiny = build_tiny_cache(tmp_path, n=72)

    def no_extract(*args, **kwargs):
        raise AssertionError("the cache is complete: nothing to extract")

    monkeypatch.setattr(study, "extract", no_extract)
    # inside a Slurm array task the study still trains every seed (sweep would take a share)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    rows = (recipe("auto", "clip"), recipe("auto", "clip+structure"),
            Variant.of("csa", layers="auto", loss="clip", method="csa"),
            Variant.of("R_S centering=none", layers="auto", loss="clip+structure", centering="none"))
    cfg = StudyConfig(out=tmp_path / "study", dataset=str(tiny["pairs"]), salts=("",), seeds=(0, 1), ks=(1,),
                      epochs=3, patience=3, batch_size=16, n_boot=100, cache_dir=tiny["cache"], configs=rows,
                      image_model=tiny["vit"], text_model=tiny["bert"])
    summary = run_study(cfg)
    assert [r["variant"] for r in summary["table"]] == [v.name for v in rows]
    assert {c["b"] for c in summary["comparisons"]} == {"auto/clip", "csa", "R_S centering=none"}
    configs = [read_json(r / "config.json") for r in list_runs(tmp_path / "study" / "runs" / "default")]
    assert sum(c["method"] == "csa" for c in configs) == 1  # deterministic: fitted once, stands for both seeds
    assert sum(c["centering"] == "none" for c in configs) == 2
    csa = next(r for r in summary["table"] if r["variant"] == "csa")
    assert csa["i2t R@1"][1] == 0.0  # the same run for both seeds
    assert "| R_S centering=none |" in (tmp_path / "study" / "study.md").read_text()


def test_a_salt_redraws_every_part_of_a_combined_data_set():
    from featcache.pipeline.app.study import salted_spec

    assert salted_spec("tuxpaint+openmoji", "1") == "tuxpaint:salt=1+openmoji:salt=1"
    assert salted_spec("tuxpaint", "2") == "tuxpaint:salt=2" and salted_spec("tuxpaint+openmoji", "") == "tuxpaint+openmoji"


def test_studies_run_apart_merge_into_the_same_summary(tmp_path):
    from featcache.pipeline.app.study import merge_ranks, run_study, save_ranks

    rng = np.random.default_rng(2)
    cfg = StudyConfig(salts=("", "1"), seeds=(0, 1), ks=(1,), n_boot=200)
    ranks = {(None, v.name): {s: {r: _ranks(0.3, rng) for r in cfg.seeds} for s in cfg.salts} for v in CONFIGS}
    for salt in cfg.salts:  # one study per salt, as on two machines
        (tmp_path / f"s{salt}").mkdir()
        save_ranks({k: {salt: v[salt]} for k, v in ranks.items()}, replace(cfg, salts=(salt,)),
                   tmp_path / f"s{salt}" / "ranks.json")
    # the merge takes the studies' own settings, not its command line's defaults
    merged = run_study(replace(cfg, salts=("",), ks=(1, 10), out=tmp_path / "all"),
                       merge=[tmp_path / "s", tmp_path / "s1"])
    assert merged == summarise({k[1]: v for k, v in ranks.items()}, cfg)
    other = tmp_path / "other"
    other.mkdir()
    save_ranks({k: {"2": v["1"]} for k, v in ranks.items()}, replace(cfg, epochs=100, salts=("2",)),
               other / "ranks.json")
    with pytest.raises(Exception, match="differ in epochs"):
        merge_ranks([tmp_path / "s", other], cfg)
    with pytest.raises(Exception, match="is one of the merged"):
        merge_ranks([tmp_path / "s"], replace(cfg, out=tmp_path / "s"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ranks.json").write_text('{"rows": [')  # a study killed while writing
    with pytest.raises(Exception, match="cannot read study ranks"):
        merge_ranks([tmp_path / "s", broken], cfg)
    with pytest.raises(Exception, match="more than one"):
        merge_ranks([tmp_path / "s", tmp_path / "s"], cfg)
    with pytest.raises(Exception, match="lack"):
        merge_ranks([tmp_path / "s"], replace(cfg, seeds=(0, 1, 2)))


def test_a_training_free_method_on_a_pair_subset_fits_each_seed():
    """With --pairs the seed draws the training subset, so a deterministic method is not one fit."""
    from featcache.pipeline.train.config import AlignConfig
    from featcache.pipeline.train.sweep import dedupe_training_free as _effective

    csa = AlignConfig(method="csa", seed=2)
    assert _effective(csa, [0, 1, 2]).seed == 0
    assert _effective(replace(csa, pairs=50), [0, 1, 2]).seed == 2
