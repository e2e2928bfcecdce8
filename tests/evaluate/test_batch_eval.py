"""Many runs evaluated in one process: one result per run, equal to evaluating each alone, with
every store layer read once; and a sweep that evaluates its cells."""

import pytest
from conftest import build_tiny_cache
from typer.testing import CliRunner

from featcache.cache.errors import FeatcacheError
from featcache.cache.store import FeatureStore
from featcache.cli.main import app
from featcache.pipeline.evaluate.batch import evaluate_runs, select_runs
from featcache.pipeline.evaluate.retrieval import RetrievalConfig, eval_retrieval
from featcache.pipeline.train.runs import list_runs

runner = CliRunner()


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    tiny = build_tiny_cache(root, n=48)
    runs = root / "runs"
    argv = ["sweep", "--image-model", tiny["vit"], "--text-model", tiny["bert"], "--dataset", str(tiny["pairs"]),
            "--cache-dir", str(tiny["cache"]), "--runs-dir", str(runs), "--layers", "last;0,0", "--loss", "clip",
            "--seeds", "0,1,2", "--epochs", "2", "--batch-size", "16", "--d-out", "16", "--eval", "retrieval"]
    out = runner.invoke(app, argv)
    assert out.exit_code == 0, out.output
    return tiny, runs


def test_a_sweep_evaluates_every_cell(swept):
    _, runs = swept
    assert len(list_runs(runs)) == 6
    for run in list_runs(runs):
        assert len(list((run / "eval").glob("retrieval-*.json"))) == 1


def test_run_all_equals_each_run_alone_and_reads_each_layer_once(swept, monkeypatch):
    tiny, runs = swept
    cfg = RetrievalConfig(cache_dir=tiny["cache"], runs_dir=runs)
    alone = {r.name: eval_retrieval(cfg, run_dir=r)["metrics"] for r in list_runs(runs)}
    reads = []
    original = FeatureStore.read

    def counted(self, name, *a, **k):
        reads.append((str(self.path), name))
        return original(self, name, *a, **k)

    monkeypatch.setattr(FeatureStore, "read", counted)
    together = evaluate_runs(eval_retrieval, cfg, select_runs(runs, "all"))
    assert {r["run_id"]: r["metrics"] for r in together} == alone
    assert len(reads) == len(set(reads))  # every (store, layer) once, the reference's training reads included
    out = runner.invoke(app, ["eval", "retrieval", "--run", "all", "--cache-dir", str(tiny["cache"]),
                              "--runs-dir", str(runs)])
    assert out.exit_code == 0 and "6 results, one per run" in out.output


def test_run_selection_by_ids_and_prefixes(swept):
    _, runs = swept
    names = [r.name for r in list_runs(runs)]
    assert [r.name for r in select_runs(runs, f"{names[0]},{names[2]}")] == [names[0], names[2]]
    prefix = names[0][:9]  # the date part: every run of today
    assert len(select_runs(runs, prefix)) == len([n for n in names if n.startswith(prefix)])
    assert select_runs(runs, "latest")[0].name in names
    for bad in ("nope", f"{names[0]},", "all,"):
        with pytest.raises(FeatcacheError):
            select_runs(runs, bad)


def test_a_bad_evaluation_name_is_refused_before_training(swept, tmp_path):
    tiny, _ = swept
    out = runner.invoke(app, ["sweep", "--image-model", tiny["vit"], "--text-model", tiny["bert"], "--dataset",
                              str(tiny["pairs"]), "--cache-dir", str(tiny["cache"]), "--runs-dir", str(tmp_path / "r"),
                              "--eval", "retrival"])
    assert out.exit_code != 0 and "classify:DATASET" in out.output and not (tmp_path / "r").exists()
