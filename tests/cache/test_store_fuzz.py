"""Fuzz a sealed store: random edits of its metadata (dtypes, shapes, chunk shapes, codecs,
attributes, layer lists) and of its chunk files (flipped bytes, truncation, swaps, deletions).

Every read must give back the original values or stop with a FeatcacheError: never other
values, never another exception.
"""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
from conftest import make_pairs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featcache.cache.errors import FeatcacheError
from featcache.cache.store import FeatureStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sealed(tiny_vit, tmp_path_factory):
    from featcache.pipeline.extract.run import ExtractConfig, extract

    root = tmp_path_factory.mktemp("fuzz")
    pairs = make_pairs(root / "data", n=24)
    [result] = extract(ExtractConfig(model=f"hf:{tiny_vit}", dataset=str(pairs), cache_dir=root / "cache",
                                     splits=["train"], chunk_rows=4))
    store = FeatureStore.open(result.path)
    original = {name: store.read(name, dtype=np.dtype(store.attrs["dtype"])) for name in store.layers}
    return result.path, original, store.ids


def _json(path):
    return json.loads(path.read_text())


def edit_array_meta(store, rng, layer):
    path = store / "layers" / layer / "zarr.json"
    meta = _json(path)
    what = rng.choice(["data_type", "shape0", "shape1", "chunks", "codecs", "fill"])
    if what == "data_type":
        meta["data_type"] = rng.choice(["int16", "uint16", "float32", "float64", "int8", "bool"])
    elif what in ("shape0", "shape1"):
        meta["shape"][int(what[-1])] = max(0, meta["shape"][int(what[-1])] + rng.choice([-3, -1, 1, 5, 50]))
    elif what == "chunks":
        grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
        grid[rng.randrange(2)] = max(1, grid[0] + rng.choice([-1, 1, 3]))
    elif what == "codecs":
        codecs = meta["codecs"]
        if len(codecs) > 1:
            codecs.pop(rng.randrange(len(codecs)))
    else:
        meta["fill_value"] = rng.choice([0, 1.5, "NaN"])
    path.write_text(json.dumps(meta))


def edit_group_meta(store, rng, layer):
    path = store / "zarr.json"
    meta = _json(path)
    attrs = meta["attributes"]
    what = rng.choice(["rows", "width", "dtype", "chunk_rows", "layers", "identity", "format"])
    if what in ("rows", "width", "chunk_rows"):
        attrs[what] = max(1, attrs[what] + rng.choice([-2, -1, 1, 7]))
    elif what == "dtype":
        attrs["dtype"] = rng.choice(["int16", "float32", "float64"])
    elif what == "layers":
        attrs["layers"] = rng.choice([attrs["layers"][::-1], attrs["layers"][1:], attrs["layers"] + ["block.09"]])
    elif what == "identity":
        attrs["identity"]["dataset"]["rows"] += 1
    else:
        attrs["format"] = rng.choice([2, 4, None])
    path.write_text(json.dumps(meta))


def edit_chunks(store, rng, layer):
    chunks = sorted(p for p in (store / "layers" / layer / "c").rglob("*") if p.is_file())
    target = rng.choice(chunks)
    what = rng.choice(["flip", "truncate", "swap", "delete"])
    data = bytearray(target.read_bytes())
    if what == "flip" and data:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
    elif what == "truncate":
        target.write_bytes(bytes(data[: rng.randrange(len(data) or 1)]))
    elif what == "swap" and len(chunks) > 1:
        other = rng.choice([c for c in chunks if c != target])
        a, b = target.read_bytes(), other.read_bytes()
        target.write_bytes(b)
        other.write_bytes(a)
    else:
        target.unlink()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), edits=st.lists(st.sampled_from(["array", "group", "chunks"]), min_size=1,
                                                       max_size=2))
def test_every_read_is_the_original_or_a_featcache_error(sealed, tmp_path_factory, seed, edits):
    path, original, ids = sealed
    rng = random.Random(seed)
    store = tmp_path_factory.mktemp("edit") / "store.zarr"
    shutil.copytree(path, store)
    layer = rng.choice(sorted(original))
    for edit in edits:
        {"array": edit_array_meta, "group": edit_group_meta, "chunks": edit_chunks}[edit](store, rng, layer)
    try:
        opened = FeatureStore.open(store)
        assert opened.ids == ids
        for name, values in original.items():
            got = opened.read(name, dtype=values.dtype)
            np.testing.assert_array_equal(got, values, err_msg=f"{edits} of {layer}: other values in {name}")
            rows = np.arange(0, len(values), 3)
            np.testing.assert_array_equal(opened.read_rows(name, rows, values.dtype), values[rows])
    except FeatcacheError:
        pass
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)
