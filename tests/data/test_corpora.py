"""Corpus formats: ``wds:`` webdataset tar shards and ``hfds:`` Hugging Face data sets on disk."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_pairs

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common import listing
from featcache.pipeline.common.names import canonical_name, hash_split, is_combined
from featcache.pipeline.data.catalog import load_dataset
from featcache.pipeline.data.rows import BadImage


# -- fixtures ---------------------------------------------------------------------------------
def pair_rows(root: Path, n: int = 8) -> list[dict]:
    """make_pairs' rows with the PNG bytes: image (file name), stem, caption, split, bytes."""
    table = make_pairs(root, n=n)
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    for r in rows:
        r["stem"] = Path(r["image"]).stem
        r["bytes"] = (root / r["image"]).read_bytes()
    return rows


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[dict]) -> Path:
    """img2dataset's layout: {key}.png, {key}.txt, {key}.json per sample, in that order.
    A sample dict: key, and any of png (bytes), txt (str), json (dict), extra {ext: bytes}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            if "png" in s:
                add(tar, f"{s['key']}.png", s["png"])
            if "txt" in s:
                add(tar, f"{s['key']}.txt", s["txt"].encode())
            if "json" in s:
                add(tar, f"{s['key']}.json", json.dumps(s["json"]).encode())
            for ext, data in s.get("extra", {}).items():
                add(tar, f"{s['key']}.{ext}", data)
    return path


def shards_of(rows: list[dict], folder: Path, per_shard: int = 3, split_in_json: bool = False) -> str:
    """Shards shard-00000.tar ... of the rows, keys = file stems; returns the brace pattern."""
    n = 0
    for n, start in enumerate(range(0, len(rows), per_shard)):
        write_shard(folder / f"shard-{n:05d}.tar",
                    [{"key": r["stem"], "png": r["bytes"], "txt": r["caption"],
                      "json": {"key": r["stem"], "status": "success",
                               **({"split": r["split"]} if split_in_json else {})}}
                     for r in rows[start:start + per_shard]])
    return f"{folder}/shard-{{00000..{n:05d}}}.tar"


@pytest.fixture()
def rows(tmp_path) -> list[dict]:
    return pair_rows(tmp_path / "imgs")


def hf_dataset(rows: list[dict], **extra):
    import datasets

    data = {"image": [{"bytes": r["bytes"], "path": r["image"]} for r in rows],
            "text": [r["caption"] for r in rows], **extra}
    return datasets.Dataset.from_dict(data).cast_column("image", datasets.Image())


def all_rows(splits) -> dict[str, tuple[str, int]]:
    return {i: (name, n) for name, s in splits.items() for n, i in enumerate(s.images.ids)}


# -- spec grammar -----------------------------------------------------------------------------
def test_spec_grammar():
    assert listing.split_spec("s3://bucket/x.tar") is None
    assert listing.split_spec("wds:s3://bucket/x-{0..9}.tar") == ("wds", "s3://bucket/x-{0..9}.tar", {})
    assert listing.split_spec("hfds:/data/coco:image_column=img,text_column=caption") == \
        ("hfds", "/data/coco", {"image_column": "img", "text_column": "caption"})
    assert listing.split_spec("wds:/d/{0..3}.tar:salt=1") == ("wds", "/d/{0..3}.tar", {"salt": "1"})
    assert listing.split_spec("wds:/d/{0..3}.tar:salt=1:salt=2")[2] == {"salt": "2"}  # appended options win
    assert listing.split_spec("wds:/d/a=b/{0..3}.tar")[1] == "/d/a=b/{0..3}.tar"
    assert not is_combined("wds:/d/a+b-{0..3}.tar") and not is_combined("hfds:/d/x+y")
    assert is_combined("tuxpaint+openmoji")
    with pytest.raises(FeatcacheError, match="names no data"):
        listing.split_spec("wds::salt=1")


# -- wds --------------------------------------------------------------------------------------
def test_wds_lists_pairs_with_hash_splits_and_reads_bytes_by_offset(tmp_path, rows):
    pattern = shards_of(rows, tmp_path / "shards")
    splits = load_dataset(f"wds:{pattern}")
    got = all_rows(splits)
    assert set(got) == {r["stem"] for r in rows}
    for r in rows:
        name, n = got[r["stem"]]
        assert name == hash_split(r["stem"])
        side = splits[name].images
        assert side.raw(n) == r["bytes"]  # the original PNG file, byte for byte
        assert side.groups[n] == r["stem"]
        assert side.sources[n].endswith(f"shard-{rows.index(r) // 3:05d}.tar:{r['stem']}")
        texts = splits[name].texts
        t = texts.groups.index(r["stem"])
        assert texts.texts[t] == r["caption"] and texts.ids[t] == f"{r['stem']}#{t}"
    first = splits[got[rows[0]["stem"]][0]]
    assert first.images.load(first.images.ids.index(rows[0]["stem"])).mode == "RGB"
    # rows in shard order, then tar order
    for s in splits.values():
        assert s.images.ids == sorted(s.images.ids)
    salted = load_dataset(f"wds:{pattern}:salt=7")
    assert {i: v[0] for i, v in all_rows(salted).items()} == {r["stem"]: hash_split(r["stem"], "7") for r in rows}


def test_wds_json_split_overrides_and_other_members_are_ignored(tmp_path, rows):
    samples = [{"key": r["stem"], "png": r["bytes"], "txt": r["caption"], "json": {"split": r["split"]},
                "extra": {"cls": b"3", "seg.png": r["bytes"]}} for r in rows]
    samples[0]["json"] = {"split": "validation"}  # read as val
    samples[1]["json"] = {"caption": "ignored"}  # no split field: the hash rule
    shard = write_shard(tmp_path / "s" / "only.tar", samples)
    (tmp_path / "s" / "only.parquet").write_bytes(b"beside the shard")
    splits = load_dataset(f"wds:{shard}")
    got = all_rows(splits)
    assert got[rows[0]["stem"]][0] == "val"
    assert got[rows[1]["stem"]][0] == hash_split(rows[1]["stem"])
    for r in rows[2:]:
        assert got[r["stem"]][0] == r["split"]
    assert sum(len(s.images) for s in splits.values()) == len(rows)


def test_wds_brace_pattern_and_glob(tmp_path, rows):
    pattern = shards_of(rows, tmp_path / "many", per_shard=2)  # 4 shards
    assert pattern.endswith("shard-{00000..00003}.tar")
    a, b = load_dataset(f"wds:{pattern}"), load_dataset(f"wds:{tmp_path}/many/shard-*.tar")
    assert all_rows(a) == all_rows(b) and len(all_rows(a)) == len(rows)
    part = load_dataset(f"wds:{tmp_path}/many/shard-{{00000,00002}}.tar")
    assert set(all_rows(part)) == {r["stem"] for r in rows[0:2] + rows[4:6]}


def test_wds_missing_caption_is_a_problem_row(tmp_path, rows):
    samples = [{"key": r["stem"], "png": r["bytes"], "txt": r["caption"], "json": {"split": "train"}} for r in rows[:3]]
    del samples[1]["txt"]
    samples[2]["txt"] = "   "
    shard = write_shard(tmp_path / "s.tar", samples)
    texts = load_dataset(f"wds:{shard}")["train"].texts
    assert len(texts) == 3 and texts.groups == [r["stem"] for r in rows[:3]]
    assert set(texts.problems) == {1, 2}
    assert f"{shard}:{rows[1]['stem']}" in texts.problems[1] and "no caption" in texts.problems[1]
    assert "empty" in texts.problems[2]


def test_wds_sample_without_image_is_an_error(tmp_path, rows):
    samples = [{"key": r["stem"], "png": r["bytes"], "txt": r["caption"]} for r in rows[:3]]
    del samples[1]["png"]
    shard = write_shard(tmp_path / "s.tar", samples)
    with pytest.raises(FeatcacheError, match=rf"{shard}:{rows[1]['stem']}: the sample has no image") as err:
        load_dataset(f"wds:{shard}")
    assert "\n" not in str(err.value) and ".txt" in err.value.message


@pytest.mark.parametrize("damage", ["truncated", "cut", "header", "garbage"])
def test_wds_corrupt_tar(tmp_path, rows, damage):
    shard = write_shard(tmp_path / "s.tar", [{"key": r["stem"], "png": r["bytes"], "txt": r["caption"]}
                                             for r in rows[:4]])
    data = shard.read_bytes()
    if damage == "truncated":  # inside a member's data
        shard.write_bytes(data[: len(data) // 2 - 300])
    elif damage == "cut":  # at a member boundary: no end-of-archive block
        shard.write_bytes(data[: len(data) // 2 // 512 * 512])
    elif damage == "header":  # the third member's header overwritten: tarfile would stop there quietly
        with tarfile.open(shard) as tar:
            third = tar.getmembers()[2].offset
        shard.write_bytes(data[:third] + b"\x17" * 512 + data[third + 512:])
    else:
        shard.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(FeatcacheError, match=rf"{shard}: not a readable tar shard") as err:
        load_dataset(f"wds:{shard}")
    assert "\n" not in str(err.value) and err.value.hint
    if damage != "garbage":
        assert re.search(r"after the sample 'img00\d'", err.value.message)


def test_wds_duplicate_keys(tmp_path, rows):
    one = [{"key": r["stem"], "png": r["bytes"], "txt": r["caption"]} for r in rows[:3]]
    a = write_shard(tmp_path / "d" / "a.tar", one)
    b = write_shard(tmp_path / "d" / "b.tar", one[2:] + [{"key": "other", "png": rows[3]["bytes"], "txt": "x"}])
    with pytest.raises(FeatcacheError, match=rf"'{rows[2]['stem']}' appears .*{a}:{rows[2]['stem']} and "
                                             rf"{b}:{rows[2]['stem']}"):
        load_dataset(f"wds:{tmp_path}/d/{{a,b}}.tar")
    twice = write_shard(tmp_path / "t.tar", one + one[:1])  # not consecutive: webdataset reads two samples
    with pytest.raises(FeatcacheError, match=rf"{twice}:{rows[0]['stem']}: the key appears twice"):
        load_dataset(f"wds:{twice}")


def test_wds_undecodable_image_fails_at_load_naming_shard_and_key(tmp_path, rows):
    shard = write_shard(tmp_path / "s.tar", [{"key": r["stem"], "png": r["bytes"][:40] if i == 1 else r["bytes"],
                                              "txt": r["caption"], "json": {"split": "train"}}
                                             for i, r in enumerate(rows[:3])])
    side = load_dataset(f"wds:{shard}")["train"].images  # listing reads no image
    side.load(0)
    with pytest.raises(BadImage, match=rf"{shard}:{rows[1]['stem']}\.png"):
        side.load(1)


def test_wds_missing_and_empty_shard_sets(tmp_path, rows):
    write_shard(tmp_path / "d" / "a-0.tar", [{"key": "k", "png": rows[0]["bytes"], "txt": "x"}])
    with pytest.raises(FeatcacheError, match=r"shard .*a-1\.tar does not exist"):
        load_dataset(f"wds:{tmp_path}/d/a-{{0..1}}.tar")
    with pytest.raises(FeatcacheError, match="matches no file"):
        load_dataset(f"wds:{tmp_path}/d/zzz-*.tar")
    with pytest.raises(FeatcacheError, match="matches no file"):
        canonical_name(f"wds:{tmp_path}/d/zzz-*.tar")
    empty = write_shard(tmp_path / "e.tar", [{"key": "k", "extra": {"cls": b"1"}}])
    with pytest.raises(FeatcacheError, match="hold no image samples"):
        load_dataset(f"wds:{empty}")
    with pytest.raises(FeatcacheError, match="unknown option 'sault'"):
        load_dataset(f"wds:{empty}:sault=1")


def test_wds_stamps_open_nothing_and_the_side_pickles(tmp_path, rows, monkeypatch):
    pattern = shards_of(rows, tmp_path / "shards")
    splits = load_dataset(f"wds:{pattern}")
    side = splits["train"].images
    side.raw(0)  # a shard is open in this process now
    clone = pickle.loads(pickle.dumps(side))
    assert clone.raw(0) == side.raw(0)

    def refuse(*args, **kwargs):
        raise AssertionError("stamps() opened a file")

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", refuse)
        m.setattr(os, "open", refuse)
        m.setattr(os, "pread", refuse)
        stamps = side.stamps()
    assert stamps.shape == (len(side), 2) and stamps.dtype == np.int64
    shard0 = Path(side.sources[0].rsplit(":", 1)[0])
    assert tuple(stamps[0]) == (shard0.stat().st_size, shard0.stat().st_mtime_ns)
    limited = splits["train"].limited(2)
    assert limited.images.stamps().shape == (2, 2)


def test_wds_canonical_name_is_stable_and_tracks_the_shards(tmp_path, rows):
    pattern = shards_of(rows, tmp_path / "cc3m")
    name = canonical_name(f"wds:{pattern}")
    assert name.startswith("cc3m-shard.") and len(name) == len("cc3m-shard.") + 8
    assert canonical_name(f"wds:{pattern}") == name
    assert canonical_name(f"wds:{pattern}:salt=1") == f"{name}-salt1"
    assert load_dataset(f"wds:{pattern}")["train"].dataset == name
    first = Path(pattern.replace("{00000..00002}", "00000"))
    # touched (a copy without -t): the same data set, so a trained run still finds its stores
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    assert canonical_name(f"wds:{pattern}") == name
    # another shard set, or a shard of other bytes and size: another data set
    assert canonical_name(f"wds:{pattern.replace('{00000..00002}', '{00000..00001}')}") != name
    first.write_bytes(first.read_bytes() + bytes(512))
    assert canonical_name(f"wds:{pattern}") != name


def test_wds_fsspec_url(tmp_path, rows):
    import fsspec

    pattern = shards_of(rows, tmp_path / "local")
    fs = fsspec.filesystem("memory")
    base = f"/{tmp_path.name}/corpus"
    for n in range(3):
        fs.pipe(f"{base}/shard-{n:05d}.tar", Path(pattern.replace("{00000..00002}", f"{n:05d}")).read_bytes())
    url = f"memory://{base}/shard-{{00000..00002}}.tar"
    splits = load_dataset(f"wds:{url}")
    assert all_rows(splits) == all_rows(load_dataset(f"wds:{pattern}"))
    assert all_rows(load_dataset(f"wds:memory://{base}/shard-*.tar")) == all_rows(splits)
    side = splits["train"].images
    assert side.raw(0) == next(r["bytes"] for r in rows if r["stem"] == side.ids[0])
    assert side.sources[0].startswith(f"memory://{base}/shard-")
    stamps = side.stamps()
    assert stamps.shape == (len(side), 2) and (stamps[:, 0] > 0).all() and (stamps[:, 1] > 0).all()
    name = canonical_name(f"wds:{url}")
    assert name.startswith("corpus-shard.") and canonical_name(f"wds:{url}") == name
    with pytest.raises(FeatcacheError, match="does not exist"):
        load_dataset(f"wds:memory://{base}/shard-{{00000..00003}}.tar")


# -- hfds -------------------------------------------------------------------------------------
def test_hfds_save_to_disk_dataset(tmp_path, rows):
    folder = tmp_path / "coco"
    hf_dataset(rows).save_to_disk(str(folder))
    splits = load_dataset(f"hfds:{folder}")
    got = all_rows(splits)
    assert set(got) == {str(i) for i in range(len(rows))}  # no id column: the row number
    for i, r in enumerate(rows):
        name, n = got[str(i)]
        assert name == hash_split(str(i))
        assert splits[name].images.raw(n) == r["bytes"]
        texts = splits[name].texts
        assert texts.texts[texts.groups.index(str(i))] == r["caption"]
    assert splits[name].images.sources[0].startswith(str(folder))
    name = canonical_name(f"hfds:{folder}")
    assert name.startswith("coco.") and canonical_name(f"hfds:{folder}") == name


def test_hfds_split_and_id_columns_and_caption_lists(tmp_path, rows):
    caps = [[r["caption"], f"another {r['caption']}"] for r in rows]
    caps[2] = []  # no caption: a flagged text row
    caps[3] = ["ok", ""]
    folder = tmp_path / "set"
    hf_dataset(rows, id=[r["stem"] for r in rows], split=[r["split"] for r in rows],
               captions=caps).save_to_disk(str(folder))
    splits = load_dataset(f"hfds:{folder}:text_column=captions")
    assert {i: v[0] for i, v in all_rows(splits).items()} == {r["stem"]: r["split"] for r in rows}
    train = splits["train"]
    assert train.images.ids == [r["stem"] for r in rows if r["split"] == "train"]
    texts = train.texts
    assert texts.groups[:2] == [rows[0]["stem"]] * 2 and texts.texts[1] == f"another {rows[0]['caption']}"
    problems = list(texts.problems.values())
    assert len(problems) == 2 and any("row 2" in p and "empty" in p for p in problems)
    assert any("row 3" in p and "caption 1" in p for p in problems)


def test_hfds_dataset_dict(tmp_path, rows):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": hf_dataset(rows[:5]), "validation": hf_dataset(rows[5:7]),
                          "test": hf_dataset(rows[7:])}).save_to_disk(str(folder))
    splits = load_dataset(f"hfds:{folder}")
    assert set(splits) == {"train", "val", "test"}
    assert splits["val"].images.ids == ["val/0", "val/1"]
    assert splits["val"].images.raw(1) == rows[6]["bytes"]
    assert splits["train"].texts.texts == [r["caption"] for r in rows[:5]]


def test_hfds_parquet_layouts(tmp_path, rows):
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    hf_dataset(rows[:6]).to_parquet(str(hub / "train-00000-of-00001.parquet"))
    hf_dataset(rows[6:]).to_parquet(str(hub / "test-00000-of-00001.parquet"))
    splits = load_dataset(f"hfds:{tmp_path / 'hub'}")
    assert set(splits) == {"train", "test"}
    assert splits["test"].images.ids == ["test/0", "test/1"]
    assert splits["test"].images.raw(0) == rows[6]["bytes"]
    assert splits["train"].images.load(3).mode == "RGB"
    one = tmp_path / "pairs.parquet"
    hf_dataset(rows, key=[r["stem"] for r in rows]).to_parquet(str(one))
    single = load_dataset(f"hfds:{one}")
    assert {i: v[0] for i, v in all_rows(single).items()} == {r["stem"]: hash_split(r["stem"]) for r in rows}
    assert canonical_name(f"hfds:{one}").startswith("pairs.")


def test_hfds_plain_binary_column_and_named_columns(tmp_path, rows):
    import datasets

    one = tmp_path / "bin.parquet"
    datasets.Dataset.from_dict({"img": [r["bytes"] for r in rows], "caption": [r["caption"] for r in rows]}
                               ).to_parquet(str(one))
    splits = load_dataset(f"hfds:{one}:image_column=img")
    got = all_rows(splits)
    name, n = got["0"]
    assert splits[name].images.raw(n) == rows[0]["bytes"]
    assert splits[name].texts.texts[splits[name].texts.groups.index("0")] == rows[0]["caption"]


def test_hfds_bad_input(tmp_path, rows):
    import datasets

    one = tmp_path / "pairs.parquet"
    hf_dataset(rows).to_parquet(str(one))
    with pytest.raises(FeatcacheError,
                       match=r"pairs.parquet has no column 'picture' \(its columns: image, text\)") as err:
        load_dataset(f"hfds:{one}:image_column=picture")
    assert "\n" not in str(err.value) and "image_column=" in err.value.hint
    with pytest.raises(FeatcacheError, match=r"has no column 'words'"):
        load_dataset(f"hfds:{one}:text_column=words")
    with pytest.raises(FeatcacheError, match="unknown option"):
        load_dataset(f"hfds:{one}:image_colum=x")

    # stored by path only (to_parquet of a data set cast from file names): no bytes
    paths = tmp_path / "paths.parquet"
    datasets.Dataset.from_dict({"image": [str(tmp_path / "imgs" / r["image"]) for r in rows[:3]],
                                "text": ["a", "b", "c"]}).cast_column("image", datasets.Image()).to_parquet(str(paths))
    with pytest.raises(FeatcacheError, match=r"paths.parquet row 0: the image in column 'image' has no bytes"):
        load_dataset(f"hfds:{paths}")
    folder = tmp_path / "nulls"
    images = [{"bytes": r["bytes"], "path": r["image"]} for r in rows[:3]]
    images[2] = None
    datasets.Dataset.from_dict({"image": images, "text": ["a", "b", "c"]}).cast_column(
        "image", datasets.Image()).save_to_disk(str(folder))
    with pytest.raises(FeatcacheError,
                       match=r"data-00000-of-00001.arrow row 2: the image in column 'image' has no bytes"):
        load_dataset(f"hfds:{folder}")

    broken = tmp_path / "broken"
    bad = [dict(r) for r in rows[:3]]
    bad[1]["bytes"] = bad[1]["bytes"][:40]
    hf_dataset(bad, id=["a", "b", "c"], split=["train"] * 3).save_to_disk(str(broken))
    side = load_dataset(f"hfds:{broken}")["train"].images
    side.load(0)
    with pytest.raises(BadImage, match=r"data-00000-of-00001.arrow row 1 \(id 'b'\)"):
        side.load(1)
    with pytest.raises(FeatcacheError, match="does not exist"):
        load_dataset(f"hfds:{tmp_path / 'nothing'}")


def test_hfds_stamps_open_nothing_and_the_side_pickles(tmp_path, rows, monkeypatch):
    import pyarrow
    import pyarrow.parquet

    folder = tmp_path / "set"
    hf_dataset(rows, split=["train"] * len(rows)).save_to_disk(str(folder))
    side = load_dataset(f"hfds:{folder}")["train"].images
    side.raw(0)
    clone = pickle.loads(pickle.dumps(side))
    assert clone.raw(3) == rows[3]["bytes"]

    def refuse(*args, **kwargs):
        raise AssertionError("stamps() opened a file")

    with monkeypatch.context() as m:
        for mod, attr in ((builtins, "open"), (os, "open"), (pyarrow, "memory_map"), (pyarrow, "OSFile"),
                          (pyarrow.parquet, "ParquetFile")):
            m.setattr(mod, attr, refuse)
        stamps = side.stamps()
    arrow = folder / "data-00000-of-00001.arrow"
    assert stamps.shape == (len(rows), 2) and stamps.dtype == np.int64
    assert (stamps == [arrow.stat().st_size, arrow.stat().st_mtime_ns]).all()


SVG = (b'<?xml version="1.0"?>\n<!-- drawn by hand -->\n<svg xmlns="http://www.w3.org/2000/svg" width="10" '
       b'height="10"><rect width="10" height="10" fill="red"/></svg>')


def test_svg_members_and_cells_decode_and_hash_on_one_read(tmp_path, rows):
    import hashlib

    shard = write_shard(tmp_path / "s.tar", [{"key": "icon", "extra": {"svg": SVG, "txt": b"a red square",
                                                                       "json": b'{"split": "train"}'}}])
    folder = tmp_path / "hf"
    hf_dataset([{"bytes": SVG, "image": "icon", "caption": "a red square"}, rows[0]],
               split=["train", "train"]).save_to_disk(str(folder))
    for spec in (f"wds:{shard}", f"hfds:{folder}"):
        side = load_dataset(spec)["train"].images
        r, g, b = side.load(0).getpixel((5, 5))
        assert r > 200 and g < 50 and b < 50, spec
        image, digest = side.load_hashed(0)  # the content hash of the bytes decoded, from one read
        assert digest == hashlib.sha256(SVG).digest() and image.size == side.load(0).size


# -- end to end: the same features as the same images read from a JSONL pair file -------------
def _features(results) -> dict[str, dict[str, bytes]]:
    from featcache.cache.store import FeatureStore

    out = {}
    for r in results:
        store = FeatureStore.open(r.path)
        layers = {name: store.read(name) for name in store.layers}
        for n, row_id in enumerate(store.ids):
            out[row_id] = {name: values[n].tobytes() for name, values in layers.items()}
    return out


def _assert_same_features(jsonl_results, corpus_results, id_of: dict[str, str]) -> None:
    reference, got = _features(jsonl_results), _features(corpus_results)
    assert len(got) == len(reference)
    assert len({tuple(sorted(v.items())) for v in got.values()}) == len(got)  # rows differ: not a vacuous match
    for image, row_id in id_of.items():
        assert got[row_id] == reference[image], image


def _extract_matches_jsonl(tmp_path, tiny_vit, rows, spec: str) -> None:
    """Extract ``spec`` and the same images as a JSONL; every row's features must be equal."""
    from featcache.pipeline.extract.run import ExtractConfig, extract

    common = dict(model=f"hf:{tiny_vit}", cache_dir=tmp_path / "cache", batch_size=4)
    reference = extract(ExtractConfig(dataset=str(tmp_path / "imgs" / "pairs.jsonl"), **common))
    # two DataLoader workers: forked after this process has opened the corpus files (for the digest)
    results = extract(ExtractConfig(dataset=spec, num_workers=2, **common))
    assert {r.split for r in results} == {r.split for r in reference}
    assert all(r.missing_rows == 0 for r in results)
    _assert_same_features(reference, results, {r["image"]: r["stem"] for r in rows})


def test_extract_wds_matches_jsonl(tmp_path, tiny_vit):
    rows = pair_rows(tmp_path / "imgs")
    pattern = shards_of(rows, tmp_path / "shards", split_in_json=True)
    _extract_matches_jsonl(tmp_path, tiny_vit, rows, f"wds:{pattern}")
    # stage two finds the stores by the same spec
    from featcache.pipeline.features import Side, open_store

    store = open_store(tmp_path / "cache", f"wds:{pattern}", "train", Side(f"hf:{tiny_vit}"))
    assert store.ids == [r["stem"] for r in rows if r["split"] == "train"]


def test_extract_hfds_matches_jsonl(tmp_path, tiny_vit):
    rows = pair_rows(tmp_path / "imgs")
    folder = tmp_path / "hf"
    hf_dataset(rows, id=[r["stem"] for r in rows], split=[r["split"] for r in rows]).save_to_disk(str(folder))
    _extract_matches_jsonl(tmp_path, tiny_vit, rows, f"hfds:{folder}")
