"""The model commands on a tiny run: predict agrees with eval classify, embed and search read
what the library computes, export-model's folder loads in a fresh process without runs or cache."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_model import class_folder, train_tiny_run
from typer.testing import CliRunner

from featcache.cache.lookup import StoreQuery, open_store
from featcache.cache.naming import encoder_key
from featcache.cli.main import app
from featcache.pipeline.common.names import canonical_name
from featcache.pipeline.evaluate.metrics import class_embeddings
from featcache.pipeline.evaluate.run_view import embed
from featcache.pipeline.extract.run import ExtractConfig, extract
from featcache.pipeline.model import AlignedModel
from featcache.pipeline.train.runs import load_heads

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("commands"))


def _invoke(*args):
    out = runner.invoke(app, [str(a) for a in args])
    assert out.exit_code == 0, out.output
    return out.output


def test_predict_agrees_with_eval_classify(tiny_run, tmp_path):
    cache, run = tiny_run
    root = class_folder(tmp_path)
    for model in (cache["vit"], cache["bert"]):
        extract(ExtractConfig(model=model, dataset=str(root), cache_dir=cache["cache"], batch_size=16))
    _invoke("eval", "classify", "--dataset", root, "--run", run.name, "--runs-dir", run.parent, "--cache-dir", cache["cache"],
            "--no-baseline")
    result = json.loads(next((run / "eval").glob("classify-*.json")).read_text())

    query = lambda m: StoreQuery(canonical_name(str(root)), "test", encoder_key(m))
    images, prompts = open_store(cache["cache"], query(cache["vit"])), open_store(cache["cache"], query(cache["bert"]))
    classes, templates = images.attrs["classes"]["classnames"], images.attrs["classes"]["templates"]
    heads, cfg = load_heads(run)
    prompt_class = np.asarray([classes.index(g) for g in prompts.groups])
    cached = embed(heads.image_head, images.read(cfg["image_layer"])) @ class_embeddings(
        embed(heads.text_head, prompts.read(cfg["text_layer"])), prompt_class, len(classes)).T

    (tmp_path / "templates.json").write_text(json.dumps(templates))
    files = [root / i for i in images.ids]
    out = json.loads(_invoke("predict", "--run", run, *files, "--labels", ",".join(classes), "--templates",
                             tmp_path / "templates.json", "-k", len(classes), "--json"))
    scores = np.array([[next(h["score"] for h in r["labels"] if h["label"] == c) for c in classes] for r in out])
    np.testing.assert_allclose(scores, cached, atol=2e-3)
    top1 = np.mean([r["labels"][0]["label"] == g for r, g in zip(out, images.groups)])
    assert top1 == pytest.approx(result["metrics"]["top1"])

    text = _invoke("predict", "--run", run, files[0], "--labels", ",".join(classes), "-k", "2")
    assert str(files[0]) in text and len(text.strip().splitlines()) == 3  # the image, then two labels


def test_embed_writes_ids_with_the_libraries_embeddings(tiny_run, tmp_path):
    cache, run = tiny_run
    folder = cache["pairs"].parent
    _invoke("embed", "--run", run, "--images", folder, "--out", tmp_path / "e.parquet")
    table = pq.read_table(tmp_path / "e.parquet")
    files = sorted(folder.glob("*.png"))
    assert table.column("id").to_pylist() == [str(f) for f in files]
    model = AlignedModel.from_run(run, device="cpu")
    np.testing.assert_allclose(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                               model.encode_image(files), atol=1e-6)

    (tmp_path / "texts.txt").write_text("a red circle.\na blue square.\n")
    _invoke("embed", "--run", run, "--texts", tmp_path / "texts.txt", "--out", tmp_path / "t.npy")
    np.testing.assert_allclose(np.load(tmp_path / "t.npy"), model.encode_text(["a red circle.", "a blue square."]),
                               atol=1e-6)
    assert json.loads((tmp_path / "t.ids.json").read_text()) == ["0", "1"]

    _invoke("embed", "--run", run, "--dataset", cache["pairs"], "--cache-dir", cache["cache"], "--out",
            tmp_path / "d.npy")
    ids = json.loads((tmp_path / "d.ids.json").read_text())
    np.testing.assert_allclose(np.load(tmp_path / "d.npy"), model.encode_image([folder / i for i in ids]), atol=2e-3)


def test_search_ranks_the_cached_gallery(tiny_run):
    cache, run = tiny_run
    model = AlignedModel.from_run(run, device="cpu")
    out = json.loads(_invoke("search", "--run", run, "--dataset", cache["pairs"], "--cache-dir", cache["cache"],
                             "a red circle.", "-k", 3, "--json"))
    hits = out[0]["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3] and all(h["path"].endswith(h["id"]) for h in hits)
    scores = model.encode_image([h["path"] for h in hits]) @ model.encode_text(["a red circle."])[0]
    np.testing.assert_allclose([h["score"] for h in hits], scores, atol=2e-3)
    assert scores[0] >= scores[1] - 2e-3 >= scores[2] - 4e-3
    text = _invoke("search", "--run", run, "--dataset", cache["pairs"], "--cache-dir", cache["cache"], "a dog.")
    assert text.splitlines()[0] == "a dog." and len(text.strip().splitlines()) == 6


SCRIPT = """
import sys, numpy as np
from featcache import AlignedModel
m = AlignedModel.load(sys.argv[1], device="cpu")
np.save(sys.argv[2], m.encode_image(sys.argv[3:]))
np.save(sys.argv[2] + ".text.npy", m.encode_text(["a red circle.", "a green square."]))
"""


def test_export_model_loads_in_a_fresh_process_without_runs_or_cache(tiny_run, tmp_path):
    cache, run = tiny_run
    files = [str(p) for p in sorted(cache["pairs"].parent.glob("*.png"))[:5]]
    model = AlignedModel.from_run(run, device="cpu")
    want_image, want_text = model.encode_image(files), model.encode_text(["a red circle.", "a green square."])
    folder = tmp_path / "model"
    _invoke("export-model", run, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "heads.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["image"]["identity"]["weights_sha256"] and config["image"]["layer"] == model.spec.image.layer
    assert run.name in (folder / "README.md").read_text()
    assert not any(p.suffix in (".pkl", ".pt", ".bin") for p in folder.iterdir())

    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(run.parent), moved / "runs")  # the runs and the cache are gone from where they were
    shutil.move(str(cache["cache"]), moved / "cache")
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(tmp_path / "e.npy"), *files],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env=dict(os.environ, FEATCACHE_CACHE_DIR=str(tmp_path / "none"),
                                      FEATCACHE_RUNS_DIR=str(tmp_path / "none")))
        assert out.returncode == 0, out.stderr
        np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), want_image)
        np.testing.assert_array_equal(np.load(tmp_path / "e.npy.text.npy"), want_text)
    finally:
        shutil.move(str(moved / "runs"), run.parent)
        shutil.move(str(moved / "cache"), cache["cache"])
