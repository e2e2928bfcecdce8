"""Tux Paint written as webdataset shards and as a Hugging Face data set: the whole loop (extract,
align, eval retrieval) runs on ``wds:`` and ``hfds:`` with the real encoders, and every image's
features equal those of the same image read from loose files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_real

pytestmark = pytest.mark.real
PER_SPLIT = {"train": 60, "val": 12, "test": 24}


def featcache(*args, env):
    out = subprocess.run([sys.executable, "-m", "featcache.cli.main", *args], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def tuxpaint_rows() -> list[dict]:
    """A fixed part of each Tux Paint split, PNG and SVG stamps alike, with their captions."""
    from featcache.pipeline.data.catalog import load_dataset

    rows = []
    for name, split in load_dataset("tuxpaint").items():
        images, texts = split.images, split.texts
        caption = dict(zip(texts.groups, texts.texts))
        for i in range(min(PER_SPLIT[name], len(images))):
            suffix = Path(images.sources[i]).suffix
            rows.append({"key": f"{name}-{i:04d}", "suffix": suffix, "bytes": images.raw(i),
                         "caption": caption[images.ids[i]], "split": name})
    return rows


def write_files(rows, root: Path) -> str:
    root.mkdir(parents=True)
    for r in rows:
        (root / f"{r['key']}{r['suffix']}").write_bytes(r["bytes"])
    (root / "pairs.jsonl").write_text("\n".join(json.dumps({"image": f"{r['key']}{r['suffix']}",
                                                            "caption": r["caption"], "split": r["split"]})
                                                for r in rows) + "\n")
    return str(root / "pairs.jsonl")


def write_shards(rows, root: Path, per_shard: int = 25) -> str:
    root.mkdir(parents=True)
    n = -(-len(rows) // per_shard)
    for s in range(n):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for r in rows[s * per_shard:(s + 1) * per_shard]:
                for name, data in ((f"{r['key']}{r['suffix']}", r["bytes"]), (f"{r['key']}.txt", r["caption"].encode()),
                                   (f"{r['key']}.json", json.dumps({"split": r["split"]}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"wds:{root}/{{00000..{n - 1:05d}}}.tar"


def write_hf(rows, root: Path) -> str:
    import datasets

    parts = {}
    for split in PER_SPLIT:
        mine = [r for r in rows if r["split"] == split]
        parts[split if split != "val" else "validation"] = datasets.Dataset.from_dict(
            {"key": [r["key"] for r in mine], "caption": [r["caption"] for r in mine],
             "image": [{"bytes": r["bytes"], "path": f"{r['key']}{r['suffix']}"} for r in mine]},
            features=datasets.Features({"key": datasets.Value("string"), "caption": datasets.Value("string"),
                                        "image": datasets.Image()}))
    datasets.DatasetDict(parts).save_to_disk(str(root))
    return f"hfds:{root}"


def stored(cache: Path, dataset_name: str, split: str, model: str) -> dict[str, np.ndarray]:
    """id -> the last block's stored features, for one split's store of one encoder."""
    from featcache.cache.store import FeatureStore

    [path] = [p for p in (cache / dataset_name / split).glob("*/*.zarr") if model in str(p)]
    store = FeatureStore.open(path)
    values = store.read(store.layers[-1])
    return dict(zip(store.ids, values))


@requires_real
def test_tuxpaint_as_wds_and_hfds_runs_the_loop_with_the_features_of_loose_files(tmp_path):
    from featcache.pipeline.common.names import canonical_name

    rows = tuxpaint_rows()
    assert any(r["suffix"] == ".svg" for r in rows) and any(r["suffix"] == ".png" for r in rows)
    specs = {"files": write_files(rows, tmp_path / "files"), "wds": write_shards(rows, tmp_path / "shards"),
             "hfds": write_hf(rows, tmp_path / "hf")}
    env = dict(os.environ, FEATCACHE_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    for kind, spec in specs.items():
        for model in ("dinov2", "minilm"):
            featcache("extract", "--model", model, "--layers", "last", "--dataset", spec, env=env)
    for kind in ("wds", "hfds"):
        runs = tmp_path / f"runs-{kind}"
        featcache("align", "--dataset", specs[kind], "--epochs", "20", "--patience", "20", "--batch-size", "64",
                  "--runs-dir", str(runs), env=env)
        out = featcache("eval", "retrieval", "--runs-dir", str(runs), env=env)
        [run] = runs.iterdir()
        [result] = (run / "eval").glob("retrieval-*-test.json")
        metrics = json.loads(result.read_text())["metrics"]
        assert metrics["image_to_text"]["R@10"] > 0.3, out  # chance is 10/24
    files = canonical_name(specs["files"])
    for kind in ("wds", "hfds"):
        name = canonical_name(specs[kind])
        for split in PER_SPLIT:
            for model in ("dinov2", "minilm"):
                ours, theirs = stored(tmp_path / "cache", name, split, model), stored(tmp_path / "cache", files, split,
                                                                                     model)
                if model == "dinov2":  # image ids: the sample key here, the file name there
                    theirs = {k.rsplit(".", 1)[0]: v for k, v in theirs.items()}
                else:  # caption ids: key#n here, file#n there
                    theirs = {k.split(".", 1)[0] + "#" + k.rsplit("#", 1)[1]: v for k, v in theirs.items()}
                    ours = {k.rsplit("#", 1)[0] + "#" + k.rsplit("#", 1)[1]: v for k, v in ours.items()}
                assert ours.keys() == theirs.keys(), (kind, split, model)
                for key, value in ours.items():
                    np.testing.assert_array_equal(value, theirs[key], err_msg=f"{kind} {split} {model} {key}")
