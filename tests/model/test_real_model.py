"""The acceptance of the aligned model on the real offline weights (DINOv2-S, MiniLM) and Tux Paint.

To stay under two minutes on two cores, it uses three of the Tux Paint categories (copied, pointed to by
FEATCACHE_TUXPAINT_DIR; the data set is built from them exactly as from the whole set).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_real
from typer.testing import CliRunner

from featcache.cli.main import app
from featcache.pipeline.evaluate.metrics import class_embeddings
from featcache.pipeline.evaluate.run_view import embed
from featcache.pipeline.extract.run import ExtractConfig, extract
from featcache.pipeline.model import AlignedModel
from featcache.pipeline.train.runs import load_heads

pytestmark = pytest.mark.real
runner = CliRunner()
CATEGORIES = ("animals", "food", "town")


def _invoke(*args):
    out = runner.invoke(app, [str(a) for a in args])
    assert out.exit_code == 0, out.output
    return out.output


def _file(stamps: Path, stamp_id: str) -> Path:
    """A stamp's image: its id is the path under the stamps folder, without .png or .svg."""
    return next(p for p in (stamps / f"{stamp_id}.png", stamps / f"{stamp_id}.svg") if p.exists())


@requires_real
def test_aligned_model_on_tux_paint(tmp_path, monkeypatch):
    stamps = tmp_path / "stamps"
    for c in CATEGORIES:
        shutil.copytree(Path("/usr/share/tuxpaint/stamps") / c, stamps / c)
    monkeypatch.setenv("FEATCACHE_TUXPAINT_DIR", str(stamps))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    for model in ("dinov2", "minilm"):
        for dataset in ("tuxpaint", "tuxpaint-categories"):
            extract(ExtractConfig(model=model, dataset=dataset, cache_dir=cache, layers="last", batch_size=32))
    _invoke("align", "--cache-dir", cache, "--runs-dir", runs, "--layers", "last", "--epochs", "20",
            "--batch-size", "64")
    run = next(p for p in runs.iterdir() if (p / "summary.json").exists())
    heads, cfg = load_heads(run)
    from featcache.cache.lookup import StoreQuery, open_store

    images = open_store(cache, StoreQuery("tuxpaint", "test", "dinov2-s"))
    texts = open_store(cache, StoreQuery("tuxpaint", "test", "minilm"))
    rows = list(range(20))
    files = [_file(stamps, images.ids[r]) for r in rows]
    model = AlignedModel.from_run(run)
    want = embed(heads.image_head, images.read(cfg["image_layer"])[rows])
    got = model.encode_image(files)
    np.testing.assert_allclose(got, want, atol=3e-3)  # float16 rounding of the stored layer, then the head
    captions = {g: t for g, t in zip(texts.groups, texts.texts)}
    caption_rows = [texts.groups.index(images.ids[r]) for r in rows]
    np.testing.assert_allclose(model.encode_text([captions[images.ids[r]] for r in rows]),
                               embed(heads.text_head, texts.read(cfg["text_layer"])[caption_rows]), atol=3e-3)

    # predict on a stamp agrees with eval classify's path on the cached tuxpaint-categories test split
    _invoke("eval", "classify", "--dataset", "tuxpaint-categories", "--run", run.name, "--runs-dir", runs,
            "--cache-dir", cache, "--no-baseline")
    cat_images = open_store(cache, StoreQuery("tuxpaint-categories", "test", "dinov2-s"))
    prompts = open_store(cache, StoreQuery("tuxpaint-categories", "test", "minilm"))
    classes, templates = cat_images.attrs["classes"]["classnames"], cat_images.attrs["classes"]["templates"]
    cached = embed(heads.image_head, cat_images.read(cfg["image_layer"])[:1]) @ class_embeddings(
        embed(heads.text_head, prompts.read(cfg["text_layer"])),
        np.asarray([classes.index(g) for g in prompts.groups]), len(classes)).T
    (tmp_path / "templates.json").write_text(json.dumps(templates))
    stamp = _file(stamps, cat_images.ids[0])
    out = json.loads(_invoke("predict", "--run", run, stamp, "--labels", ",".join(classes), "--templates",
                             tmp_path / "templates.json", "-k", len(classes), "--json"))
    scores = [next(h["score"] for h in out[0]["labels"] if h["label"] == c) for c in classes]
    np.testing.assert_allclose(scores, cached[0], atol=3e-3)

    # the exported folder, in a fresh process with the runs and the cache moved away
    folder = tmp_path / "model"
    _invoke("export-model", run, folder)
    shutil.move(str(runs), tmp_path / "runs-away")
    shutil.move(str(cache), tmp_path / "cache-away")
    script = ("import sys, numpy as np; from featcache import AlignedModel; "
              "np.save(sys.argv[2], AlignedModel.load(sys.argv[1]).encode_image(sys.argv[3:]))")
    proc = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "e.npy"), *map(str, files)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), got, atol=1e-6)
