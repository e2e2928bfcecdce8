"""No untrusted pickle anywhere: weights through safetensors, stores and records without pickles."""

import re
from pathlib import Path

from conftest import make_pairs
from typer.testing import CliRunner

from featcache.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("cache", "pipeline", "cli", "benchmarks") for p in (ROOT / d).rglob("*.py")]


def test_sources_never_unpickle():
    assert SOURCES
    for path in SOURCES:
        code = path.read_text()
        assert not re.search(r"^\s*import pickle|^\s*from pickle|cPickle|dill", code, re.M), path
        assert "allow_pickle=True" not in code, path
        for call in re.findall(r"torch\.load\([^)]*\)", code):
            assert "weights_only=True" in call, (path, call)


def test_stores_and_runs_hold_no_pickles(tiny_vit, tiny_bert, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=30)
    common = ["--cache-dir", str(tmp_path / "cache")]
    runner = CliRunner()
    for model in (tiny_vit, tiny_bert):
        assert runner.invoke(app, ["extract", "--model", f"hf:{model}", "--dataset", str(pairs), *common]).exit_code == 0
    out = runner.invoke(app, ["align", "--image-model", f"hf:{tiny_vit}", "--text-model", f"hf:{tiny_bert}",
                              "--dataset", str(pairs), "--epochs", "2", "--runs-dir", str(tmp_path / "runs"), *common])
    assert out.exit_code == 0, out.output
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "data" not in p.parts]
    assert any(p.name == "heads.safetensors" for p in files)
    for p in files:
        assert p.suffix not in (".pt", ".pth", ".pkl", ".pickle", ".npy", ".bin"), p
        if p.name == "zarr.json":
            assert "pickle" not in p.read_text().lower(), p
