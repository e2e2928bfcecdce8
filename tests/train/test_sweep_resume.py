"""Sweeps are idempotent and resumable: a cell is its resolved config plus the stores it reads,
a finished cell is never trained twice unless asked, and a report counts each cell once."""

import json
import shutil
import warnings

import pytest
from conftest import build_tiny_cache
from typer.testing import CliRunner

from featcache.cli.main import app
from featcache.pipeline.app.report import build_report, run_rows
from featcache.pipeline.train.runs import RepeatedCellWarning, list_runs

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.mktemp("resume"), n=48)


def sweep(tiny, runs, *extra):
    argv = ["sweep", "--image-model", tiny["vit"], "--text-model", tiny["bert"], "--dataset", str(tiny["pairs"]),
            "--cache-dir", str(tiny["cache"]), "--runs-dir", str(runs), "--layers", "last;auto", "--loss", "clip",
            "--epochs", "2", "--batch-size", "16", "--d-out", "16", *extra]
    out = runner.invoke(app, [str(a) for a in argv])
    assert out.exit_code == 0, out.output
    return out.output


def seeds_per_group(runs):
    return sorted(g["n"] for g in build_report(run_rows(runs)).groups)


def test_the_same_sweep_twice_trains_nothing_the_second_time(tiny, tmp_path):
    runs = tmp_path / "runs"
    first = sweep(tiny, runs, "--seeds", "0,1")
    assert "4 runs trained" in first
    before = sorted(p.name for p in list_runs(runs))
    second = sweep(tiny, runs, "--seeds", "0,1")
    assert "4 of 4 cells have a finished run" in second and "0 runs trained" in second
    assert sorted(p.name for p in list_runs(runs)) == before
    assert seeds_per_group(runs) == [2, 2]


def test_a_grown_or_interrupted_sweep_trains_only_the_missing_cells(tiny, tmp_path):
    runs = tmp_path / "runs"
    sweep(tiny, runs, "--seeds", "0,1")
    victim = list_runs(runs)[0]  # a kill leaves a .partial folder, never a finished run
    shutil.move(victim, runs / f".partial-{victim.name}")
    out = sweep(tiny, runs, "--seeds", "0,1,2")
    assert "3 of 6 cells have a finished run" in out and "3 runs trained" in out
    assert len(list_runs(runs)) == 6 and seeds_per_group(runs) == [3, 3]


def test_rerun_trains_again_and_the_report_keeps_one_run_per_cell(tiny, tmp_path):
    runs = tmp_path / "runs"
    sweep(tiny, runs, "--seeds", "0")
    out = sweep(tiny, runs, "--seeds", "0", "--rerun")
    assert "2 runs trained" in out and len(list_runs(runs)) == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert seeds_per_group(runs) == [1, 1]  # not n = 2 from one seed
    assert sum(issubclass(w.category, RepeatedCellWarning) for w in caught) == 2
    report = runner.invoke(app, ["report", "--runs-dir", str(runs)])
    assert report.exit_code == 0 and "runs of one cell" in report.output


def test_dry_run_lists_cells_with_resolved_layers_and_trains_nothing(tiny, tmp_path):
    runs = tmp_path / "runs"
    sweep(tiny, runs, "--seeds", "0")
    out = sweep(tiny, runs, "--seeds", "0,1", "--dry-run")
    assert "4 cells, 2 finished; nothing trained" in out
    assert "block.02 x block.01" in out  # last, resolved for the tiny ViT (3 blocks) and BERT (2)
    assert len(list_runs(runs)) == 2


def test_a_cell_is_its_config_and_stores_not_where_they_sit(tiny, tmp_path):
    runs = tmp_path / "runs"
    sweep(tiny, runs, "--seeds", "0")
    cells = {json.loads((r / "config.json").read_text())["cell"] for r in list_runs(runs)}
    copy = tmp_path / "cache-copy"
    shutil.copytree(tiny["cache"], copy)
    moved = dict(tiny, cache=copy)
    assert "2 of 2 cells have a finished run" in sweep(moved, runs, "--seeds", "0")  # a copied cache: same cells
    out = sweep(tiny, runs, "--seeds", "0", "--lam", "3")  # clip ignores lam, but the config differs
    assert "have a finished run" not in out and "2 runs trained" in out
    assert len(cells) == 2
