"""--json: one JSON document on stdout and nothing else there; runs never cut an id; ls rows
stay one line with long hf: paths."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from featcache.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A tiny cache, two finished runs (one evaluated) and the common options."""
    from conftest import build_tiny_cache

    root = tmp_path_factory.mktemp("json")
    tiny = build_tiny_cache(root / "tiny", n=24)
    models = ["--image-model", tiny["vit"], "--text-model", tiny["bert"], "--dataset", str(tiny["pairs"]),
              "--cache-dir", str(tiny["cache"])]
    runs = ["--runs-dir", str(root / "runs")]
    for seed in ("0", "1"):
        out = runner.invoke(app, ["align", *models, *runs, "--epochs", "2", "--d-out", "8", "--seed", seed])
        assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["eval", "retrieval", "--cache-dir", str(tiny["cache"]), *runs])
    assert out.exit_code == 0, out.output
    return {**tiny, "root": root, "models": models, "runs": runs}


def document(argv: list[str], code: int = 0) -> dict:
    """stdout parsed as one JSON document: json.loads fails on anything printed beside it."""
    out = runner.invoke(app, argv)
    assert out.exit_code == code, out.output
    return json.loads(out.stdout)


def test_runs_json_ids_are_the_folders(done):
    doc = document(["runs", *done["runs"], "--json"])
    folders = sorted(p.name for p in (done["root"] / "runs").iterdir() if not p.name.startswith("."))
    assert [r["run_id"] for r in doc["runs"]] == folders and len(folders) == 2
    assert sorted(r["seed"] for r in doc["runs"]) == [0, 1] and all(isinstance(r["best_val"], float) for r in doc["runs"])
    assert sum(bool(r["evals"]) for r in doc["runs"]) == 1  # the latest was evaluated


@pytest.mark.parametrize("width", [140, 30])
def test_runs_never_cuts_an_id_piped_or_narrow(done, monkeypatch, width):
    from featcache.cli.app import console

    monkeypatch.setattr(console, "width", width)
    out = runner.invoke(app, ["runs", *done["runs"]])
    assert out.exit_code == 0, out.output
    ids = [p.name for p in (done["root"] / "runs").iterdir() if not p.name.startswith(".")]
    assert all(any(run in line for line in out.stdout.splitlines()) for run in ids), out.stdout  # whole, one line


def test_ls_json_and_one_line_rows_with_long_hf_paths(done):
    doc = document(["ls", "--cache-dir", str(done["cache"]), "--json"])
    stores = doc["stores"]
    assert len(stores) == 6 and all(s["complete"] and s["broken"] is None for s in stores)
    assert {s["encoder"] for s in stores} == {done["vit"], done["bert"]}  # whole, as written
    out = runner.invoke(app, ["ls", "--cache-dir", str(done["cache"])])
    rows = [line for line in out.stdout.splitlines() if "yes" in line]
    assert out.exit_code == 0 and len(rows) == 6, out.stdout  # each store one line, nothing folded
    assert "hf:…/" in out.stdout and "ls --json" in out.stdout


def test_layers_json(done):
    doc = document(["layers", *done["models"], "--n", "16", "--out", str(done["root"] / "h.png"), "--json"])
    assert doc["metric"] == "mutual_knn" and doc["n"] == 16
    assert len(doc["scores"]) == len(doc["image_layers"]) and doc["best"]["image_layer"] in doc["image_layers"]
    assert doc["heatmap"].endswith("h.png") and json.loads(open(doc["table_json"]).read())["n"] == 16
    assert all(v is None or isinstance(v, float) for row in doc["scores"] for v in row)  # NaN -> null


def test_eval_json_is_the_result_record(done):
    doc = document(["eval", "retrieval", "--cache-dir", str(done["cache"]), *done["runs"], "--json"])
    assert doc["task"] == "retrieval" and "R@1" in doc["metrics"]["image_to_text"]
    assert json.loads(open(doc["path"]).read())["metrics"] == doc["metrics"]


def test_report_json(done, tmp_path):
    doc = document(["report", *done["runs"], "--json", "--out", str(tmp_path / "rep")])
    group = doc["groups"][0]
    assert group["n"] == 2 and len(group["runs"]) == 2 and doc["written"]
    stats = next(iter(group["metrics"].values()))
    assert len(stats["values"]) == 1 and stats["std"] is None  # one evaluated run: no spread


def test_verify_json_ok_and_bad(done, tmp_path):
    import shutil

    doc = document(["verify", "--cache-dir", str(done["cache"]), "--json"])
    assert doc["ok"] and len(doc["stores"]) == 6 and doc["bad"] == []
    copy = tmp_path / "cache"
    shutil.copytree(done["cache"], copy)
    chunk = next(p for p in copy.rglob("layers/*/c/0/0") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 1]))
    doc = document(["verify", "--cache-dir", str(copy), "--json"], code=1)
    assert not doc["ok"] and len(doc["bad"]) == 1 and doc["bad"][0]["repairable"] and doc["repaired_chunks"] == 0


def test_json_errors_stay_one_line_on_stderr(done, tmp_path):
    out = runner.invoke(app, ["layers", "--cache-dir", str(tmp_path / "none"), "--json"])
    assert out.exit_code == 2 and out.stdout == "" and out.stderr.count("error:") == 1
