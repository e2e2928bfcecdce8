"""Fuzz the files users bring: JSONL, CSV, COCO and Karpathy files and image folders, corrupted
at random, through ``featcache extract`` with a tiny encoder.

Every example must end in exit 0 or a one-line error (exit 2), never a traceback; and exit 0
only when the file had at least one row that could be read.
"""

import io
import json
import shutil
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from featcache.cli.main import app

runner = CliRunner()
pytestmark = pytest.mark.slow

names = st.text(alphabet=string.ascii_letters + string.digits + "._-/ ", min_size=0, max_size=8)
good_captions = st.sampled_from(["a red circle.", "a blue square", "caf\u00e9 au lait"])
captions = st.one_of(good_captions, good_captions, good_captions, good_captions, st.none(),
                     st.just(""), st.just("   "), st.integers(), st.lists(st.integers(), max_size=2))
good_splits = st.sampled_from(["train", "val", "test"])
splits = st.one_of(good_splits, good_splits, good_splits, good_splits, st.none(), st.just(""), st.just(".."),
                   st.just("a/b"), st.integers(0, 3), st.just("test-sample3"), names)
image_kinds = st.sampled_from(["png", "png", "png", "png", "jpeg", "truncated", "missing", "directory", "empty", "16bit",
                               "palette", "cmyk", "la", "text"])


def write_image(path, kind: str, rng) -> None:
    if kind == "missing":
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "directory":
        path.mkdir(exist_ok=True)
        return
    if kind == "empty":
        path.write_bytes(b"")
        return
    if kind == "text":
        path.write_text("not an image")
        return
    size = (int(rng.integers(8, 40)), int(rng.integers(8, 40)))
    if kind == "16bit":
        img = Image.fromarray(rng.integers(0, 65535, size=size[::-1]).astype(np.uint16))
    elif kind == "palette":
        img = Image.new("RGB", size, (200, 30, 30)).convert("P")
    elif kind == "cmyk":
        img = Image.new("CMYK", size, (0, 200, 200, 0))
    elif kind == "la":
        img = Image.new("LA", size, (128, 100))
    else:
        img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if kind in ("jpeg", "cmyk") else "PNG")
    data = buf.getvalue()
    path.write_bytes(data[: max(1, len(data) // 3)] if kind == "truncated" else data)


rows = st.lists(st.tuples(st.integers(0, 5), image_kinds, captions, splits), min_size=0, max_size=6)
corruptions = st.one_of(st.just([]), st.just([]), st.lists(st.sampled_from(
    ["broken-line", "latin1", "drop-image", "drop-caption", "array-line", "blank-lines", "bom"]), max_size=2))


def build(root, kind, items, corrupt, rng):
    """A data set of ``kind`` from (image index, image kind, caption, split) items."""
    kinds = {}
    for index, image_kind, _, _ in items:
        kinds.setdefault(index, image_kind)
    for index, image_kind in kinds.items():
        write_image(root / "img" / f"{index}.png", image_kind, rng)
    if kind == "folder":
        for index, image_kind in kinds.items():
            cls = root / "classes" / ("cat" if index % 2 else "dog")
            cls.mkdir(parents=True, exist_ok=True)
            source = root / "img" / f"{index}.png"
            if source.is_file():
                shutil.copy(source, cls / f"{index}.png")
        (root / "classes").mkdir(exist_ok=True)
        return root / "classes"
    if kind == "coco":
        data = {"images": [{"id": i, "file_name": f"img/{i}.png"} for i in kinds],
                "annotations": [{"id": n, "image_id": i if "drop-image" not in corrupt else i + 100, "caption": c}
                                for n, (i, _, c, _) in enumerate(items)]}
        path = root / "captions_train.json"
        text = json.dumps(data)
        path.write_text(text[: len(text) // 2] if "broken-line" in corrupt else text)
        return path
    if kind == "karpathy":
        data = {"images": [{"filepath": "img", "filename": f"{i}.png", "split": s,
                            "sentences": [{"raw": c}] if "drop-caption" not in corrupt else []}
                           for i, _, c, s in items]}
        path = root / "dataset_coco.json"
        path.write_text(json.dumps(data))
        return path
    records = []
    for index, _, caption, split in items:
        rec = {"image": f"img/{index}.png", "caption": caption, "split": split}
        if "drop-image" in corrupt:
            rec.pop("image")
        if "drop-caption" in corrupt:
            rec.pop("caption")
        records.append(rec)
    if kind == "csv":
        import csv

        path = root / "pairs.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "caption", "split"], extrasaction="ignore")
            w.writeheader()
            for rec in records:
                w.writerow({k: ("" if v is None else v) for k, v in rec.items()})
        data = path.read_bytes()
    else:
        path = root / "pairs.jsonl"
        data = "\n".join(json.dumps(r) for r in records).encode()
    if "broken-line" in corrupt:
        data += b"\n{broken"
    if "latin1" in corrupt:
        data += b"\n" + ('{"image": "img/0.png", "caption": "caf\xe9"}'.encode("latin-1"))
    if "array-line" in corrupt and kind == "jsonl":
        data += b"\n[1, 2]"
    if "blank-lines" in corrupt:
        data = b"\n\n" + data + b"\n\n"
    if "bom" in corrupt:
        data = b"\xef\xbb\xbf" + data
    path.write_bytes(data)
    return path


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(kind=st.sampled_from(["jsonl", "jsonl", "csv", "coco", "karpathy", "folder"]), items=rows,
       corrupt=corruptions, skip_bad=st.booleans(), seed=st.integers(0, 2**16))
def test_users_files_never_trace(tiny_vit, tiny_bert, tmp_path_factory, kind, items, corrupt, skip_bad, seed):
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(seed)
    path = build(root, kind, items, corrupt, rng)
    model = tiny_vit if kind == "folder" or seed % 2 else tiny_bert
    argv = ["extract", "--model", f"hf:{model}", "--dataset", str(path), "--cache-dir", str(root / "cache"),
            "--batch-size", "4", *(["--skip-bad"] if skip_bad else [])]
    out = runner.invoke(app, argv)
    event(f"{kind}: exit {out.exit_code}")  # pytest --hypothesis-show-statistics shows the mix
    assert "Traceback" not in out.output
    assert out.exit_code in (0, 2), (out.exit_code, repr(out.exception), out.output)
    if out.exit_code == 2:
        assert isinstance(out.exception, SystemExit) and "error:" in out.output
        return
    # exit 0: something real was stored, and at least one row of each split could be read
    from featcache.cache.store import FeatureStore, find_stores

    stores = [FeatureStore.open(p) for p in find_stores(root / "cache")]
    assert stores and all(s.rows > 0 and not s.missing.all() for s in stores)
    shutil.rmtree(root, ignore_errors=True)
