"""Stores behind fsspec URLs: memory:// (an fsspec filesystem) and file:// (read as a local path)."""

import numpy as np
from conftest import make_pairs
from typer.testing import CliRunner

from featcache.cache.store import FeatureStore, find_stores
from featcache.cli.main import app
from featcache.pipeline.train.runs import find_run, read_json

runner = CliRunner()


def test_memory_store_end_to_end(tiny_vit, tiny_bert, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=48)
    cache = "memory://featcache-test/cache"
    for model in (tiny_vit, tiny_bert):
        out = runner.invoke(app, ["extract", "--model", f"hf:{model}", "--dataset", str(pairs), "--cache-dir", cache])
        assert out.exit_code == 0, out.output
    stores = list(find_stores(cache))
    assert len(stores) == 6 and all(str(s).startswith("memory://") for s in stores)
    assert all(FeatureStore.open(s).is_complete() for s in stores)
    out = runner.invoke(app, ["ls", "--cache-dir", cache])
    assert out.exit_code == 0 and "yes" in out.output
    common = ["--image-model", f"hf:{tiny_vit}", "--text-model", f"hf:{tiny_bert}", "--dataset", str(pairs),
              "--cache-dir", cache, "--runs-dir", str(tmp_path / "runs")]
    assert runner.invoke(app, ["align", *common, "--epochs", "2"]).exit_code == 0
    out = runner.invoke(app, ["eval", "retrieval", "--cache-dir", cache, "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    res = read_json(next((find_run(tmp_path / "runs") / "eval").glob("retrieval-*.json")))
    assert res["cache"]["image"]["path"].startswith("memory://")
    out = runner.invoke(app, ["export", str(stores[0]), str(tmp_path / "x.h5")])
    assert out.exit_code == 0, out.output


def test_file_url_equals_local_path(tiny_vit, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=24)
    local, url = tmp_path / "local", f"file://{tmp_path}/viaurl"
    for cache in (str(local), url):
        out = runner.invoke(app, ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs), "--split", "test",
                                  "--cache-dir", cache])
        assert out.exit_code == 0, out.output
    a, b = FeatureStore.open(next(find_stores(local))), FeatureStore.open(next(find_stores(url)))
    for layer in a.layers:
        np.testing.assert_array_equal(a.read(layer), b.read(layer))
