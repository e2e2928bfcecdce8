"""A data set's digest costs a listing: reruns open no image, resumes read only unfinished chunks,
and a changed image is still refused by name."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_pairs, store_arrays
from typer.testing import CliRunner

from featcache.cache.errors import FeatcacheError
from featcache.cache.store import FeatureStore
from featcache.cli.main import app
from featcache.pipeline.extract import provenance
from featcache.pipeline.extract.run import ExtractConfig, extract

runner = CliRunner()
_OPENED: list[str] | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        if str(args[0]).endswith(".png"):
            _OPENED.append(os.fspath(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only while a test asks


class opened_images:
    """The PNG files opened inside the block, as Python's audit hook sees every open()."""

    def __enter__(self):
        global _OPENED
        _OPENED = []
        return _OPENED

    def __exit__(self, *exc):
        global _OPENED
        _OPENED = None


def _cfg(model, pairs, cache, **kw):
    return ExtractConfig(model=f"hf:{model}", dataset=str(pairs), cache_dir=cache, batch_size=4, **kw)


def test_a_no_op_rerun_opens_no_image(tiny_vit, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=24)
    first = extract(_cfg(tiny_vit, pairs, tmp_path / "cache", chunk_rows=4))
    with opened_images() as seen:
        again = extract(_cfg(tiny_vit, pairs, tmp_path / "cache", chunk_rows=4))
    assert seen == [] and sum(r.computed_rows for r in again) == 0
    assert [r.path for r in first] == [r.path for r in again]
    # the same through the command line, as the acceptance reads
    with opened_images() as seen:
        out = runner.invoke(app, ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs),
                                  "--cache-dir", str(tmp_path / "cache"), "--chunk-rows", "4"])
    assert out.exit_code == 0 and seen == [], out.output


def test_a_resume_reads_only_the_images_of_unfinished_chunks(tiny_vit, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=24)
    [train] = extract(_cfg(tiny_vit, pairs, tmp_path / "cache", chunk_rows=4, splits=["train"]))
    store = FeatureStore.open(train.path)
    before = store_arrays(train.path)
    for layer in store.layers:  # as a kill before chunk 1 was finished leaves it
        store.clear_done(layer, [1])
    with opened_images() as seen:
        [again] = extract(_cfg(tiny_vit, pairs, tmp_path / "cache", chunk_rows=4, splits=["train"]))
    assert again.computed_rows == 4
    assert sorted(Path(p).name for p in seen) == sorted(store.ids[4:8])
    assert store_arrays(train.path) == before


def test_a_touched_image_is_read_once_and_a_changed_one_refused_by_name(tiny_vit, tmp_path):
    from PIL import Image

    pairs = make_pairs(tmp_path / "data", n=24)
    [train] = extract(_cfg(tiny_vit, pairs, tmp_path / "cache", splits=["train"]))
    name = FeatureStore.open(train.path).ids[2]
    image = tmp_path / "data" / name
    os.utime(image, ns=(10**18, 10**18))  # touched, same bytes: accepted, and its new stamp recorded
    with opened_images() as seen:
        extract(_cfg(tiny_vit, pairs, tmp_path / "cache", splits=["train"]))
    assert [Path(p).name for p in seen] == [name]
    with opened_images() as seen:
        extract(_cfg(tiny_vit, pairs, tmp_path / "cache", splits=["train"]))
    assert seen == []
    before = store_arrays(train.path)
    Image.new("RGB", (40, 40), (9, 9, 9)).save(image)  # new bytes
    out = runner.invoke(app, ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs), "--split", "train",
                              "--cache-dir", str(tmp_path / "cache")])
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    assert f"the image {image}" in text and "changed after its features were stored" in text and "--overwrite" in text
    assert store_arrays(train.path) == before  # nothing written
    deep = runner.invoke(app, ["verify", "--deep", "--cache-dir", str(tmp_path / "cache")])
    assert deep.exit_code == 1 and name in deep.output, deep.output
    out = runner.invoke(app, ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs), "--split", "train",
                              "--cache-dir", str(tmp_path / "cache"), "--overwrite"])
    assert out.exit_code == 0, out.output
    assert runner.invoke(app, ["verify", "--deep", "--cache-dir", str(tmp_path / "cache")]).exit_code == 0


def test_verify_deep_rehashes_every_image(tiny_vit, tmp_path, monkeypatch):
    make_pairs(tmp_path / "data", n=12)
    monkeypatch.chdir(tmp_path)
    extract(ExtractConfig(model=f"hf:{tiny_vit}", dataset="data/pairs.jsonl", cache_dir=tmp_path / "cache"))
    with opened_images() as seen:
        ok = runner.invoke(app, ["verify", "--deep", "--cache-dir", str(tmp_path / "cache")])
    assert ok.exit_code == 0, ok.output
    assert len(seen) == 12  # each image read once


def test_a_store_of_the_old_content_digest_is_checked_once_then_kept(tiny_vit, tmp_path, monkeypatch):
    """Stores written before per-row sources hashed every image into their identity: they are
    reused after one full check, and from then on a rerun is a listing."""
    pairs = make_pairs(tmp_path / "data", n=12)
    with monkeypatch.context() as m:  # the old writer: content digest in the identity, no sources
        m.setattr(provenance, "tracked", lambda side: False)
        [old] = extract(_cfg(tiny_vit, pairs, tmp_path / "cache", splits=["train"]))
    store = FeatureStore.open(old.path)
    assert "digest" not in store.identity["dataset"] and not store.has_sources
    before = store_arrays(old.path)
    with opened_images() as seen:
        [again] = extract(_cfg(tiny_vit, pairs, tmp_path / "cache", splits=["train"]))
    assert again.computed_rows == 0 and len(seen) == len(store.ids)  # the one full check
    assert FeatureStore.open(old.path).identity == store.identity and store_arrays(old.path) == before
    with opened_images() as seen:
        [third] = extract(_cfg(tiny_vit, pairs, tmp_path / "cache", splits=["train"]))
    assert third.computed_rows == 0 and seen == []
    # an old store of other images is still another identity
    (tmp_path / "data" / store.ids[0]).write_bytes((tmp_path / "data" / store.ids[1]).read_bytes())
    with monkeypatch.context() as m:
        m.setattr(provenance, "tracked", lambda side: False)
        with pytest.raises(FeatcacheError, match="different identity"):
            extract(_cfg(tiny_vit, pairs, tmp_path / "cache", splits=["train"]))


def test_an_unreadable_image_recorded_missing_and_then_changed_is_refused(tiny_vit, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=12, bad=0)
    extract(_cfg(tiny_vit, pairs, tmp_path / "cache", skip_bad=True))
    bad = tmp_path / "data" / "img000.png"
    good = make_pairs(tmp_path / "other", n=1)
    bad.write_bytes((good.parent / "img000.png").read_bytes())
    with pytest.raises(FeatcacheError, match="img000.png"):
        extract(_cfg(tiny_vit, pairs, tmp_path / "cache", skip_bad=True))


def test_sources_are_written_with_their_chunk(tiny_vit, tmp_path):
    import hashlib

    pairs = make_pairs(tmp_path / "data", n=24)
    [train] = extract(_cfg(tiny_vit, pairs, tmp_path / "cache", chunk_rows=4, splits=["train"]))
    store = FeatureStore.open(train.path)
    stamps, hashes = store.sources()
    files = [tmp_path / "data" / i for i in store.ids]
    assert stamps.tolist() == [[f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    assert [h.tobytes() for h in hashes] == [hashlib.sha256(f.read_bytes()).digest() for f in files]
    assert np.array_equal(provenance.finished_rows(store), np.ones(store.rows, bool))


def test_a_deleted_image_of_a_finished_chunk_is_named_as_missing(tiny_vit, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=12)
    [train] = extract(_cfg(tiny_vit, pairs, tmp_path / "cache", splits=["train"]))
    gone = tmp_path / "data" / FeatureStore.open(train.path).ids[0]
    gone.unlink()
    with pytest.raises(FeatcacheError, match="is missing or unreadable") as err:
        extract(_cfg(tiny_vit, pairs, tmp_path / "cache", splits=["train"], skip_bad=True))
    assert str(gone) in err.value.message
