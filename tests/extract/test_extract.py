"""Stage one on tiny random encoders and a real-format pair set."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import make_pairs, save_tiny_vit, store_arrays
from typer.testing import CliRunner

from featcache.cache.errors import FeatcacheError
from featcache.cache.store import FeatureStore, find_stores
from featcache.cli.main import app
from featcache.pipeline.data.catalog import load_dataset
from featcache.pipeline.extract.loading import load_encoder
from featcache.pipeline.extract.provenance import dataset_identity
from featcache.pipeline.extract.run import ExtractConfig, extract

runner = CliRunner()


def _cfg(model, pairs, cache_dir, **kw):
    return ExtractConfig(model=f"hf:{model}", dataset=str(pairs), cache_dir=cache_dir, batch_size=4, **kw)


def test_stored_values_equal_direct_forward(tiny_vit, pairs, cache_dir):
    results = extract(_cfg(tiny_vit, pairs, cache_dir, chunk_rows=8))
    assert {r.split for r in results} == {"train", "val", "test"}
    enc = load_encoder(f"hf:{tiny_vit}", "cpu")
    split = load_dataset(str(pairs))["train"]
    store = FeatureStore.open(next(r.path for r in results if r.split == "train"))
    assert store.ids == split.images.ids
    assert store.layers == ["embed", "block.00", "block.01", "block.02"]
    x = enc.prepare_images([split.images.load(i) for i in range(len(split.images))])
    with torch.no_grad():
        hidden = enc.model(pixel_values=x, output_hidden_states=True).hidden_states
    for i, name in enumerate(store.layers):
        ref = hidden[i][:, 0].numpy()
        np.testing.assert_allclose(store.read(name), ref, rtol=2e-3, atol=2e-3)
    assert store.identity["encoder"]["pooling"] == "cls"
    assert store.identity["dataset"] == dataset_identity(split, "image", None)
    # each finished row records the sha256 of the very bytes it was computed from
    _, hashes = store.sources()
    assert [h.tobytes() for h in hashes] == [hashlib.sha256(split.images.raw(i)).digest()
                                              for i in range(len(split.images))]


def test_text_side_mean_pooling(tiny_bert, pairs, cache_dir):
    results = extract(_cfg(tiny_bert, pairs, cache_dir, splits=["test"]))
    store = FeatureStore.open(results[0].path)
    enc = load_encoder(f"hf:{tiny_bert}", "cpu")
    texts = store.texts
    tok = enc.prepare_texts(texts)
    with torch.no_grad():
        hidden = enc.model(**tok, output_hidden_states=True).hidden_states
    mask = tok["attention_mask"].unsqueeze(-1).float()
    ref = ((hidden[-1] * mask).sum(1) / mask.sum(1)).numpy()
    np.testing.assert_allclose(store.read("block.01"), ref, rtol=2e-3, atol=2e-3)
    # captions are linked to their image through the group
    assert all(g.startswith("img") for g in store.groups)


def test_rerun_reuses_finished_chunks(tiny_vit, pairs, cache_dir):
    extract(_cfg(tiny_vit, pairs, cache_dir))
    again = extract(_cfg(tiny_vit, pairs, cache_dir))
    assert all(r.computed_rows == 0 for r in again)


def test_new_layers_extend_a_store(tiny_vit, pairs, cache_dir):
    extract(_cfg(tiny_vit, pairs, cache_dir, layers="last"))
    res = extract(_cfg(tiny_vit, pairs, cache_dir, layers="all"))
    store = FeatureStore.open(res[0].path)
    assert set(store.layers) == {"embed", "block.00", "block.01", "block.02"} and store.is_complete()


def test_other_weights_are_refused_and_store_kept(tmp_path, pairs, cache_dir):
    model = save_tiny_vit(tmp_path / "vit", seed=0)
    res = extract(_cfg(model, pairs, cache_dir))
    before = {r.path: store_arrays(Path(r.path)) for r in res}
    save_tiny_vit(model, seed=1)  # same name, other weights
    out = runner.invoke(app, ["extract", "--model", f"hf:{model}", "--dataset", str(pairs),
                              "--cache-dir", str(cache_dir)])
    assert out.exit_code == 2
    assert "different identity" in out.output and "weights_sha256" in out.output
    assert "Traceback" not in out.output
    assert {p: store_arrays(Path(p)) for p in before} == before


def test_corrupt_image_stops_with_file_named_and_keeps_finished_chunks(tiny_vit, tmp_path, cache_dir):
    pairs = make_pairs(tmp_path / "bad", n=24, bad=12)  # img012 is in the train split's 3rd chunk
    out = runner.invoke(app, ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs), "--split", "train",
                              "--cache-dir", str(cache_dir), "--chunk-rows", "4", "--batch-size", "2"])
    assert out.exit_code == 2
    assert "img012.png" in out.output and "--skip-bad" in out.output and "Traceback" not in out.output
    store = FeatureStore.open(next(find_stores(cache_dir)))
    done = store.done_chunks("block.02")
    assert done[:2].all() and not done.all()
    rows, values = store.read_finished("block.02")  # a reader racing a writer sees finished blocks only
    assert rows.tolist() == list(range(4 * int(done.sum()))) and np.isfinite(values).all()
    with pytest.raises(FeatcacheError, match="incomplete"):
        store.read("block.02")
    # --skip-bad records the row as missing, not zero-filled
    ok = runner.invoke(app, ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs), "--split", "train",
                             "--cache-dir", str(cache_dir), "--chunk-rows", "4", "--batch-size", "2", "--skip-bad"])
    assert ok.exit_code == 0, ok.output
    store = FeatureStore.open(store.path)
    row = store.ids.index("img012.png")
    assert store.missing[row] and store.missing.sum() == 1
    assert np.isnan(store.read("block.02")[row]).all()
    assert np.isfinite(np.delete(store.read("block.02"), row, axis=0)).all()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "nosuchmodel"], "unknown model"),
        (["--layers", "7"], "out of range"),
        (["--layers", "last:x"], "bad layer spec"),
        (["--dataset", "nosuchdata"], "unknown data set"),
        (["--pooling", "max"], "pooling"),
        (["--split", "nosplit"], "no split"),
        (["--image-size", "30"], "multiple of the patch size"),
    ],
)
def test_bad_input_gives_one_line_error(args, needle, tiny_vit, pairs, cache_dir):
    base = {"--model": f"hf:{tiny_vit}", "--dataset": str(pairs)}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = ["extract", "--cache-dir", str(cache_dir)] + [x for kv in base.items() for x in kv]
    out = runner.invoke(app, argv)
    assert out.exit_code == 2, out.output
    assert needle in out.output and "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) <= 3  # one logical line, maybe soft-wrapped


def test_missing_system_dataset_gives_install_command(tmp_path, cache_dir):
    env = dict(os.environ, FEATCACHE_TUXPAINT_DIR=str(tmp_path / "absent"))
    out = subprocess.run([sys.executable, "-m", "featcache.cli.main", "extract", "--model", "minilm",
                          "--cache-dir", str(cache_dir)], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert "apt-get install -y --no-install-recommends tuxpaint-stamps-default" in out.stderr
    assert "Traceback" not in out.stderr


def test_hdf5_export(tiny_vit, pairs, cache_dir, tmp_path):
    res = extract(_cfg(tiny_vit, pairs, cache_dir, splits=["test"]))
    out = runner.invoke(app, ["export", res[0].path, str(tmp_path / "f.h5")])
    assert out.exit_code == 0, out.output
    store = FeatureStore.open(res[0].path)
    with h5py.File(tmp_path / "f.h5") as f:
        np.testing.assert_array_equal(f["layers/block.01"][:], store.read("block.01", dtype=np.float16))
        assert [s.decode() for s in f["ids"][:]] == store.ids


def test_sigkill_then_resume_is_bitwise_equal(tiny_vit, tmp_path):
    pairs = make_pairs(tmp_path / "many", n=96)
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    base = [sys.executable, "-m", "featcache.cli.main", "extract", "--model", f"hf:{tiny_vit}",
            "--dataset", str(pairs), "--split", "train", "--chunk-rows", "4", "--batch-size", "2"]
    env = dict(os.environ, FEATCACHE_SLOW_BATCH_S="0.05")  # widen the window to kill in
    subprocess.run(base + ["--cache-dir", str(ref_dir)], check=True, capture_output=True, env=env)
    proc = subprocess.Popen(base + ["--cache-dir", str(kill_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    store_dir = None
    while time.time() < deadline and proc.poll() is None:  # a child that finished first fails below, at once
        stores = list(find_stores(kill_dir))
        if stores:
            store_dir = stores[0]
            try:
                done = FeatureStore.open(store_dir).done_chunks("block.02")
                if 3 <= done.sum() < len(done) - 3:
                    break
            except (FeatcacheError, KeyError):  # the store or its layer arrays are still being created
                pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = FeatureStore.open(store_dir)
    finished = int(partial.done_chunks("block.02").sum())
    assert 0 < finished < partial.n_chunks
    done_rows = sum(partial.chunk_slice(b).stop - partial.chunk_slice(b).start
                    for b in np.flatnonzero(partial.done_chunks("block.02")))
    resumed = extract(ExtractConfig(model=f"hf:{tiny_vit}", dataset=str(pairs), splits=["train"],
                                    cache_dir=kill_dir, chunk_rows=4, batch_size=2))[0]
    assert resumed.computed_rows == partial.rows - done_rows  # finished chunks are not recomputed
    ref_store = next(find_stores(ref_dir))
    assert store_arrays(store_dir) == store_arrays(ref_store)


def test_decoding_workers_give_the_same_store(tiny_vit, pairs, tmp_path):
    a = extract(_cfg(tiny_vit, pairs, tmp_path / "w0", splits=["train"], num_workers=0))[0]
    b = extract(_cfg(tiny_vit, pairs, tmp_path / "w2", splits=["train"], num_workers=2))[0]
    assert store_arrays(Path(a.path)) == store_arrays(Path(b.path))
