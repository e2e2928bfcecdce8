"""The cache is trusted on read: stores are found by identity, checksummed, verified, never mixed.

Every test builds real stores with the tiny random encoders and attacks them as a user (or a
disk) would: same file names, flipped bytes, deleted chunks, hostile names, live writers.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_pairs, store_arrays
from typer.testing import CliRunner

from featcache.cache.errors import FeatcacheError
from featcache.cache.naming import safe_component
from featcache.cache.store import CorruptChunk, FeatureStore, find_stores
from featcache.cli.main import app
from featcache.pipeline.train.runs import find_run, read_json

runner = CliRunner()


def invoke(*argv):
    return runner.invoke(app, [str(a) for a in argv])


def extract(model, dataset, cache, *extra):
    out = invoke("extract", "--model", f"hf:{model}", "--dataset", dataset, "--cache-dir", cache,
                 "--batch-size", 4, *extra)
    assert out.exit_code == 0, out.output
    return out


def align(vit, bert, dataset, cache, runs, *extra):
    return invoke("align", "--image-model", f"hf:{vit}", "--text-model", f"hf:{bert}", "--dataset", dataset,
                  "--cache-dir", cache, "--runs-dir", runs, "--epochs", 2, "--batch-size", 8, *extra)


def chunk_files(store: Path, layer: str) -> list[Path]:
    """The zarr chunk file of each row chunk, in order."""
    files = [p for p in (store / "layers" / layer / "c").rglob("*") if p.is_file()]
    return sorted(files, key=lambda p: int(p.parent.name))


@pytest.fixture(scope="module")
def trained_base(tiny_vit, tiny_bert, tmp_path_factory):
    """A pair set with both tiny encoders extracted and one run on the last layers, built once."""
    root = tmp_path_factory.mktemp("trained")
    pairs = make_pairs(root / "data", n=36)
    for model in (tiny_vit, tiny_bert):
        extract(model, pairs, root / "cache")
    assert align(tiny_vit, tiny_bert, pairs, root / "cache", root / "runs", "--layers", "last").exit_code == 0
    return root, pairs


@pytest.fixture()
def trained(trained_base, tmp_path):
    """A private copy of ``trained_base`` for a test that damages it: (pairs, cache, runs)."""
    import shutil

    root, pairs = trained_base
    for name in ("cache", "runs"):
        shutil.copytree(root / name, tmp_path / name)
    return pairs, tmp_path / "cache", tmp_path / "runs"


@pytest.fixture()
def two_files(tmp_path):
    """Two different data sets that are both called pairs.jsonl."""
    return make_pairs(tmp_path / "a", n=36, seed=1), make_pairs(tmp_path / "b", n=36, seed=2)


def test_same_file_name_two_data_sets_never_mixed(tiny_vit, tiny_bert, two_files, tmp_path):
    a, b = two_files
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    for model in (tiny_vit, tiny_bert):
        extract(model, a, cache)
    # b was never extracted: stage two stops with the command, and does not read a's stores
    out = align(tiny_vit, tiny_bert, b, cache, runs)
    assert out.exit_code == 2 and f"featcache extract --model hf:{tiny_vit}" in out.output
    assert f"--dataset {b}" in out.output and not runs.exists()
    assert align(tiny_vit, tiny_bert, a, cache, runs).exit_code == 0
    run_a = find_run(runs)
    out = invoke("eval", "retrieval", "--dataset", b, "--cache-dir", cache, "--runs-dir", runs)
    assert out.exit_code == 2 and "featcache extract" in out.output
    assert not (run_a / "eval").exists()  # nothing was written under b's name or over a's result
    # once b is extracted both coexist, each under its own folder, and each run reads its own
    for model in (tiny_vit, tiny_bert):
        extract(model, b, cache)
    assert len([p for p in cache.iterdir() if p.name.startswith("pairs.")]) == 2
    assert align(tiny_vit, tiny_bert, b, cache, runs).exit_code == 0
    (run_b,) = [p for p in runs.iterdir() if p != run_a]
    paths = lambda run: {read_json(run / "config.json")["cache"]["train"][s]["path"] for s in ("image", "text")}
    assert paths(run_a).isdisjoint(paths(run_b))
    # same file names, other images: the runs record different image content
    sha = lambda run: read_json(run / "config.json")["cache"]["train"]["image"]["content_sha256"]
    assert sha(run_a) != sha(run_b)
    for run in (run_a, run_b):
        out = invoke("eval", "retrieval", "--run", run.name, "--cache-dir", cache, "--runs-dir", runs)
        assert out.exit_code == 0, out.output
    assert [p.name for p in (run_a / "eval").iterdir()] != [p.name for p in (run_b / "eval").iterdir()]


def test_flipped_byte_and_deleted_chunk_are_caught_and_repaired_bitwise(tiny_vit, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=40)
    cache = tmp_path / "cache"
    argv = ("--split", "train", "--chunk-rows", 8)
    extract(tiny_vit, pairs, cache, *argv)
    path = next(find_stores(cache))
    reference = store_arrays(path)
    originals = {f: f.read_bytes() for layer in ("block.01", "block.02") for f in chunk_files(path, layer)}

    # a flipped byte in the middle of one chunk of block.02
    victim = chunk_files(path, "block.02")[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    # a deleted chunk of block.01
    lost = chunk_files(path, "block.01")[2]
    lost.unlink()

    store = FeatureStore.open(path)
    with pytest.raises(CorruptChunk, match=r"chunk 1 of block.02 fails its checksum") as err:
        store.read("block.02")
    assert "featcache verify --repair" in err.value.hint
    with pytest.raises(CorruptChunk, match=r"chunk 2 of block.01 is marked done but its data is missing"):
        store.read("block.01")
    ls = invoke("ls", "--cache-dir", cache)
    assert "lost" in ls.output and "yes" not in ls.output

    out = invoke("verify", "--cache-dir", cache)
    assert out.exit_code == 1 and "block.02" in out.output and "checksum" in out.output
    assert "block.01" in out.output and "missing" in out.output

    out = invoke("verify", "--repair", "--cache-dir", cache)
    assert out.exit_code == 1 and "repaired: 2 chunk(s)" in out.output
    assert FeatureStore.open(path).pending_chunks(["block.01", "block.02"]) == [1, 2]
    out = extract(tiny_vit, pairs, cache, *argv)
    assert invoke("verify", "--cache-dir", cache).exit_code == 0
    assert store_arrays(path) == reference
    assert {f: f.read_bytes() for f in originals} == originals  # the very chunk files, bitwise


def test_chunks_moved_or_copied_in_are_caught_by_their_seals(tiny_vit, tmp_path):
    """Intact chunk objects in the wrong place pass their crc32c: two chunks swapped, another
    layer's chunk at the same position, and another store's chunk copied in with its done flag
    (a merge of two caches). Each read names the chunk; verify --repair and the same extract
    give the store back bitwise."""
    import shutil

    a, b = make_pairs(tmp_path / "a", n=40, seed=1), make_pairs(tmp_path / "b", n=40, seed=2)
    argv = ("--split", "train", "--chunk-rows", 8)
    extract(tiny_vit, a, tmp_path / "cache", *argv)
    extract(tiny_vit, b, tmp_path / "other", *argv)
    path, other = next(find_stores(tmp_path / "cache")), next(find_stores(tmp_path / "other"))
    reference = store_arrays(path)

    first, second = chunk_files(path, "block.02")[:2]  # 1. two chunks of one layer swapped
    data = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(data)
    shutil.copyfile(chunk_files(path, "block.00")[3], chunk_files(path, "block.01")[3])  # 2. another layer's
    for part in ("layers", "done"):  # 3. another store's chunk 2 with its done flag, as a merge would copy it
        for src in (other / part / "block.00" / "c").rglob("*"):
            if src.is_file() and src.relative_to(other / part / "block.00" / "c").parts[0] == "2":
                shutil.copyfile(src, path / part / "block.00" / "c" / src.relative_to(other / part / "block.00" / "c"))

    store = FeatureStore.open(path)
    for layer, chunk in (("block.02", 0), ("block.01", 3), ("block.00", 2)):
        with pytest.raises(CorruptChunk, match=rf"chunk {chunk} of {layer} does not match its seal") as err:
            store.read(layer)
        assert "featcache verify --repair" in err.value.hint
        with pytest.raises(CorruptChunk, match=rf"chunk {chunk} of {layer}"):
            store.read_finished(layer)
    out = invoke("verify", "--cache-dir", tmp_path / "cache")
    assert out.exit_code == 1 and out.output.count("seal") >= 4, out.output  # chunks 0 and 1 of block.02
    out = invoke("verify", "--repair", "--cache-dir", tmp_path / "cache")
    assert "repaired: 4 chunk(s)" in out.output, out.output
    extract(tiny_vit, a, tmp_path / "cache", *argv)
    assert invoke("verify", "--cache-dir", tmp_path / "cache").exit_code == 0
    assert store_arrays(path) == reference


def _as_format_2(path):
    """Rewrite a store as featcache wrote format 2: done flags are booleans, no seals."""
    import zarr

    from featcache.cache.store import ARRAY_OPTIONS

    store = FeatureStore.open(path)
    for layer in store.layers:
        flags = store.done_chunks(layer)
        done = store.group.create_array(f"done/{layer}", shape=(store.n_chunks,), dtype=bool, chunks=(1,),
                                        fill_value=False, overwrite=True, **ARRAY_OPTIONS)
        with zarr.config.set({"array.write_empty_chunks": True}):
            done[:] = flags
    store.group.attrs["format"] = 2


def test_a_format_2_store_is_sealed_in_place_after_its_checksums(tiny_vit, tmp_path):
    """An older featcache's store is refused with both ways out; verify --reseal checks every
    chunk, seals the good ones, leaves a bad one unfinished, and extract recomputes only that."""
    pairs, cache = make_pairs(tmp_path / "data", n=40), tmp_path / "cache"
    argv = ("--split", "train", "--chunk-rows", 8)
    extract(tiny_vit, pairs, cache, *argv)
    path = next(find_stores(cache))
    reference = store_arrays(path)
    _as_format_2(path)
    victim = chunk_files(path, "block.02")[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))

    with pytest.raises(FeatcacheError, match="format 2, written without chunk seals") as err:
        FeatureStore.open(path)
    assert f"featcache verify --reseal {path}" in err.value.hint and "--overwrite" in err.value.hint
    out = invoke("verify", "--reseal", "--cache-dir", cache)
    assert out.exit_code == 1 and "block.02" in out.output and "left unfinished" in out.output, out.output
    store = FeatureStore.open(path)
    assert store.attrs["format"] == 3 and store.pending_chunks(store.layers) == [1]
    for layer in store.layers:
        store.read_finished(layer)  # every sealed chunk reads back through its seal
    extract(tiny_vit, pairs, cache, *argv)
    assert invoke("verify", "--reseal", "--cache-dir", cache).exit_code == 0  # a format-3 store: only verified
    assert store_arrays(path) == reference


def test_a_killed_reseal_is_finished_by_the_next_with_no_flag_lost(tiny_vit, tmp_path, monkeypatch):
    """A reseal killed while computing seals, or while replacing the done flags, loses nothing:
    the journal carries the seals over, and the next reseal seals every finished chunk."""
    import shutil

    from featcache.cache import verify as verify_module

    pairs, cache = make_pairs(tmp_path / "data", n=40), tmp_path / "cache"
    extract(tiny_vit, pairs, cache, "--split", "train", "--chunk-rows", 8)
    path = next(find_stores(cache))
    reference = store_arrays(path)
    _as_format_2(path)
    victim = chunk_files(path, "block.00")[2]  # found by the first run, reported by the last
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    layers, calls = FeatureStore.open(path, formats=(2,)).layers, []
    real_seals, real_write = verify_module._layer_seals, FeatureStore.write_seals

    def killed_seals(store, layer, *a):  # killed after the journal holds two layers
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(layer)
        return real_seals(store, layer, *a)

    def killed_write(store, layer, seals):  # killed midway through replacing a layer's flags
        real_write(store, layer, np.where(np.arange(len(seals)) < len(seals) // 2, seals, 0))
        raise KeyboardInterrupt

    for fake in ((verify_module, "_layer_seals", killed_seals), (FeatureStore, "write_seals", killed_write)):
        monkeypatch.setattr(*fake)
        with pytest.raises(KeyboardInterrupt):
            verify_module.reseal_store(path)
        monkeypatch.undo()
    assert FeatureStore.open(path, formats=(2,)).attrs["resealed"] == layers  # still format 2, journal whole
    kept = tmp_path / "kept.zarr"
    shutil.copytree(path, kept)
    assert [(b.layer, b.chunk) for b in verify_module.reseal_store(path)] == [("block.00", 2)]
    store = FeatureStore.open(path)
    assert store.pending_chunks(layers) == [2] and "resealed" not in store.attrs and "reseal" not in store.group
    extract(tiny_vit, pairs, cache, "--split", "train", "--chunk-rows", 8)
    assert store_arrays(path) == reference and invoke("verify", "--cache-dir", cache).exit_code == 0

    shutil.rmtree(kept / "reseal" / "block.01" / "c")  # a lost journal after flags were replaced: named
    with pytest.raises(FeatcacheError, match="the reseal journal of layer 'block.01' is missing") as err:
        verify_module.reseal_store(kept)
    assert "--overwrite" in err.value.hint
    out = invoke("verify", "--reseal", kept)
    assert out.exit_code == 1 and "reseal journal" in out.output and "Traceback" not in out.output


def test_a_reseal_on_a_read_only_cache_is_refused_and_changes_nothing(tiny_vit, tmp_path):
    """A format-2 cache on a read-only mount: --reseal names what it could not write and leaves
    the store as it was, to be sealed once it is writable."""
    import subprocess

    pairs, cache, ro = make_pairs(tmp_path / "data", n=12), tmp_path / "cache", tmp_path / "ro"
    extract(tiny_vit, pairs, cache, "--split", "train")
    path = next(find_stores(cache))
    _as_format_2(path)
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    ro.mkdir()
    bound = subprocess.run(["mount", "--bind", str(cache), str(ro)], capture_output=True, text=True)
    if bound.returncode != 0:  # needs root (CI and the dev machines run as root)
        pytest.skip(f"cannot bind-mount here: {bound.stderr.strip()}")
    try:
        assert subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)]).returncode == 0
        out = invoke("verify", "--reseal", "--cache-dir", ro)
        assert out.exit_code == 1 and "Read-only file system" in out.output and "Traceback" not in out.output
    finally:
        subprocess.run(["umount", str(ro)])
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert invoke("verify", "--reseal", "--cache-dir", cache).exit_code == 0


def test_a_format_3_store_without_row_seals_is_sealed_by_reseal(tiny_vit, tmp_path):
    """Stores of the development build of format 3 had layer seals but none for ids, groups
    and texts: refused with the reseal hint (not called another store's), then sealed in place."""
    pairs, cache = make_pairs(tmp_path / "data", n=12), tmp_path / "cache"
    extract(tiny_vit, pairs, cache, "--split", "train")
    path = next(find_stores(cache))
    ids = FeatureStore.open(path).ids
    meta = json.loads((path / "zarr.json").read_text())
    del meta["attributes"]["row_seals"]
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(FeatcacheError, match="written without seals of its row arrays") as err:
        FeatureStore.open(path)
    assert "featcache verify --reseal" in err.value.hint
    assert invoke("verify", "--reseal", "--cache-dir", cache).exit_code == 0
    assert FeatureStore.open(path).ids == ids and "row_seals" in FeatureStore.open(path).attrs


def test_foreign_objects_of_another_shape_or_store_are_named_and_repaired(tiny_vit, tmp_path):
    """Intact objects from elsewhere that do not even decode here (a float32 store's chunk, a
    format-2 done flag), a damaged flag in a format-2 store, and another store's ids: each is
    named, never a traceback or a silent read, and the chunks are repaired bitwise."""
    import shutil

    a, b = make_pairs(tmp_path / "a", n=40, seed=1), make_pairs(tmp_path / "b", n=40, seed=2)
    argv = ("--split", "train", "--chunk-rows", 8)
    extract(tiny_vit, a, tmp_path / "cache", *argv)
    extract(tiny_vit, a, tmp_path / "wide", *argv, "--dtype", "float32")
    extract(tiny_vit, b, tmp_path / "other", *argv)
    path, wide, other = (next(find_stores(tmp_path / d)) for d in ("cache", "wide", "other"))
    reference = store_arrays(path)
    shutil.copyfile(chunk_files(wide, "block.02")[1], chunk_files(path, "block.02")[1])
    (path / "done" / "block.01" / "c" / "2").write_bytes((path / "done" / "block.01" / "c" / "2").read_bytes()[:-5])
    store = FeatureStore.open(path)
    with pytest.raises(CorruptChunk, match="chunk 1 of block.02 cannot be decoded as a chunk of this array"):
        store.read("block.02")
    out = invoke("verify", "--cache-dir", tmp_path / "cache")
    assert out.exit_code == 1 and "Traceback" not in out.output and "cannot be decoded" in out.output, out.output
    assert "done flag" in out.output
    assert "repaired: 2 chunk(s)" in invoke("verify", "--repair", "--cache-dir", tmp_path / "cache").output
    extract(tiny_vit, a, tmp_path / "cache", *argv)
    assert store_arrays(path) == reference

    _as_format_2(path)  # a damaged flag in a format-2 store: resealed around, left for extract
    flag = path / "done" / "block.00" / "c" / "3"
    data = bytearray(flag.read_bytes())
    data[0] ^= 0xFF
    flag.write_bytes(bytes(data))
    out = invoke("verify", "--reseal", "--cache-dir", tmp_path / "cache")
    assert out.exit_code == 1 and "its done flag fails its checksum (left unfinished)" in out.output, out.output
    assert FeatureStore.open(path).pending_chunks(["block.00"]) == [3]
    extract(tiny_vit, a, tmp_path / "cache", *argv)
    assert store_arrays(path) == reference

    import zarr  # another store's ids, intact, of the same length, in another order: misaligned pairs

    ids = FeatureStore.open(path).ids
    zarr.open_group(str(other), mode="r+")["ids"][:] = np.asarray(ids[::-1], dtype=str)
    shutil.copyfile(other / "ids" / "c" / "0", path / "ids" / "c" / "0")
    with pytest.raises(FeatcacheError, match="the array 'ids' does not match its seal"):
        FeatureStore.open(path).ids
    out = invoke("verify", "--cache-dir", tmp_path / "cache")
    assert out.exit_code == 1 and "ids" in out.output and "seal" in out.output, out.output


def test_corrupt_chunk_stops_eval_with_the_chunk_named(trained):
    pairs, cache, runs = trained
    test_store = next(p for p in find_stores(cache) if p.parts[-3] == "test" and "vit" in p.parts[-2])
    victim = chunk_files(test_store, "block.02")[0]
    data = bytearray(victim.read_bytes())
    data[7] ^= 0x01
    victim.write_bytes(bytes(data))
    out = invoke("eval", "retrieval", "--cache-dir", cache, "--runs-dir", runs)
    assert out.exit_code == 2 and "chunk 0 of block.02 fails its checksum" in out.output
    assert str(test_store) in out.output.replace("\n", "") and "Traceback" not in out.output


@pytest.mark.parametrize("layers", ["auto", "last"])
def test_corrupt_training_chunk_stops_align_with_nothing_written(tiny_vit, tiny_bert, trained, layers):
    """Training reads its rows chunk by chunk (the layer table one layer at a time): a flipped
    byte there is still one line naming the chunk, and no run is left behind."""
    pairs, cache, runs = trained
    train_store = next(p for p in find_stores(cache) if p.parts[-3] == "train" and "vit" in p.parts[-2])
    last = FeatureStore.open(train_store).layers[-1]
    victim = chunk_files(train_store, last)[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    before = sorted(p.name for p in runs.iterdir())
    out = align(tiny_vit, tiny_bert, pairs, cache, runs, "--layers", layers)
    assert out.exit_code == 2 and f"chunk 0 of {last} fails its checksum" in out.output, out.output
    assert "Traceback" not in out.output
    assert sorted(p.name for p in runs.iterdir()) == before


@pytest.mark.parametrize("split", ["..", "../../escape", "/abs", ".", "", "a\x01b"])
def test_hostile_split_and_file_names_stay_inside_the_cache(tiny_bert, tmp_path, split):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.png").write_bytes(b"")  # never read: this is a text-side extraction
    hostile = data / "...jsonl"  # its stem is ".."
    rows = [{"image": "x.png", "caption": f"a red circle {i}.", "split": split} for i in range(3)]
    hostile.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cache = tmp_path / "deep" / "cache"
    out = invoke("extract", "--model", f"hf:{tiny_bert}", "--dataset", hostile, "--cache-dir", cache)
    assert "Traceback" not in out.output
    if out.exit_code == 0:
        stores = list(find_stores(tmp_path))
        assert stores and all(Path(p).resolve().is_relative_to(cache.resolve()) for p in stores)
    else:
        assert out.exit_code == 2 and "error:" in out.output
    written = [p for p in tmp_path.rglob("*") if not p.resolve().is_relative_to(cache.resolve())]
    assert all(p.resolve().is_relative_to(data.resolve()) or p == cache.parent for p in written)


def test_safe_component_is_plain_and_distinct():
    names = ["..", ".", "", "a/b", "a_b", "..\\x", "tuxpaint", "hf:/tmp/m", ".hidden", "x\x00y"]
    safe = [safe_component(n) for n in names]
    assert len(set(safe)) == len(safe)
    assert safe_component("tuxpaint") == "tuxpaint" and safe_component("train-sample50") == "train-sample50"
    for s in safe:
        assert s and s not in (".", "..") and "/" not in s and "\\" not in s and not s.startswith(".")
        assert all(c.isprintable() for c in s)


def test_overwrite_is_refused_while_a_shard_writer_is_alive(tiny_vit, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=24)
    cache = tmp_path / "cache"
    extract(tiny_vit, pairs, cache, "--split", "train", "--layers", "last")
    path = next(find_stores(cache))
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    lock = path.parent / f".{path.name}.shard-1-of-2.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path;"
         "from featcache.cache.locks import file_lock\n"
         f"with file_lock(Path({str(lock)!r}), False, 'w'):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = invoke("extract", "--model", f"hf:{tiny_vit}", "--dataset", pairs, "--cache-dir", cache,
                     "--split", "train", "--layers", "last", "--overwrite")
        assert out.exit_code == 2 and f"pid {holder.pid}" in out.output and "shard 1/2" in out.output
    finally:
        holder.kill()
        holder.wait()
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before  # untouched
    out = invoke("extract", "--model", f"hf:{tiny_vit}", "--dataset", pairs, "--cache-dir", cache,
                 "--split", "train", "--layers", "last", "--overwrite")
    assert out.exit_code == 0, out.output  # the writer is gone: overwrite goes ahead


def test_last_means_the_models_last_block(tiny_vit, tiny_bert, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=36)
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    extract(tiny_vit, pairs, cache, "--layers", "0,1")  # the tiny ViT has blocks 0..2
    extract(tiny_bert, pairs, cache)
    out = align(tiny_vit, tiny_bert, pairs, cache, runs, "--layers", "last")
    assert out.exit_code == 2 and "block.02" in out.output and "not cached" in out.output
    assert "cached: block.00, block.01" in out.output and "--layers block.02" in out.output
    out = align(tiny_vit, tiny_bert, pairs, cache, runs, "--layers", "-1,-1")
    assert out.exit_code == 2 and "block.02" in out.output
    assert not runs.exists() or not list(runs.iterdir())
    out = align(tiny_vit, tiny_bert, pairs, cache, runs, "--layers", "auto")
    assert out.exit_code == 0, out.output
    config = read_json(find_run(runs) / "config.json")
    assert config["layers_considered"]["image"] == ["block.00", "block.01"]
    assert "among the complete layers" in out.output


def test_data_set_without_val_split_carves_one_and_records_it(tiny_vit, tiny_bert, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=60)
    rows = [json.loads(l) for l in pairs.read_text().splitlines()]
    for r in rows:
        r["split"] = "test" if r["split"] == "test" else "train"
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    for model in (tiny_vit, tiny_bert):
        extract(model, pairs, cache)
    out = align(tiny_vit, tiny_bert, pairs, cache, runs)
    assert out.exit_code == 0, out.output
    assert "no val split" in out.output
    config = read_json(find_run(runs) / "config.json")
    val = config["validation"]
    assert val["carved"] and val["split"] == "train" and val["fraction"] == 0.1
    n_train = sum(r["split"] == "train" for r in rows)
    assert config["train_pairs"] + config["val_pairs"] == n_train and config["val_pairs"] == val["pairs"] >= 2
    out = align(tiny_vit, tiny_bert, pairs, cache, runs, "--val-split", "dev")
    assert out.exit_code == 2 and "--split dev" in out.output


def test_junk_runs_are_refused_and_leave_nothing(tiny_vit, tiny_bert, trained_base, tmp_path):
    root, pairs = trained_base
    cache, runs = root / "cache", tmp_path / "runs"
    for lam in ("-1", "nan", "inf"):
        out = align(tiny_vit, tiny_bert, pairs, cache, runs, "--lam", lam)
        assert out.exit_code == 2 and "--lam" in out.output
    out = align(tiny_vit, tiny_bert, pairs, cache, runs, "--lr", "1e30", "--loss", "clip", "--epochs", 20)
    assert out.exit_code == 2 and "non-finite" in out.output, out.output
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".partial")]
    assert not runs.exists() or not list(runs.iterdir())


def test_eval_refuses_stores_made_by_other_weights(trained):
    pairs, cache, runs = trained
    # the image test store now records other weights: as if rebuilt with --overwrite after training
    store = next(p for p in find_stores(cache) if p.parts[-3] == "test" and "model" in p.parts[-2]
                 and FeatureStore.open(p).identity["encoder"]["modality"] == "image")
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["identity"]["encoder"]["weights_sha256"] = "0" * 64
    (store / "zarr.json").write_text(json.dumps(meta))
    out = invoke("eval", "retrieval", "--cache-dir", cache, "--runs-dir", runs)
    assert out.exit_code == 2 and "weights sha256" in out.output and "Traceback" not in out.output


@pytest.mark.parametrize("old, without", [(1, "without chunk checksums"), (2, "without chunk seals")])
def test_old_format_store_is_refused_with_the_rebuild_command(tiny_vit, tmp_path, old, without):
    pairs = make_pairs(tmp_path / "data", n=12)
    cache = tmp_path / "cache"
    extract(tiny_vit, pairs, cache, "--split", "train", "--layers", "last")
    path = next(find_stores(cache))
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["format"] = old
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(FeatcacheError, match=f"format {old}, written {without}") as err:
        FeatureStore.open(path)
    assert "featcache extract --model hf:" in err.value.hint and "--overwrite" in err.value.hint
    out = invoke("extract", "--model", f"hf:{tiny_vit}", "--dataset", pairs, "--cache-dir", cache,
                 "--split", "train", "--layers", "last")
    assert out.exit_code == 2 and f"format {old}" in out.output


def test_a_chunk_of_only_bad_images_is_stored_not_lost(tiny_vit, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=12, bad=0)
    cache = tmp_path / "cache"
    extract(tiny_vit, pairs, cache, "--split", "train", "--chunk-rows", 1, "--skip-bad")
    path = next(p for p in find_stores(cache))
    store = FeatureStore.open(path)
    assert store.missing[0] and np.isnan(store.read("block.02")[0]).all()  # an all-NaN chunk, written
    assert invoke("verify", "--cache-dir", cache).exit_code == 0


@pytest.mark.parametrize("array", ["ids", "groups", "texts", "missing"])
def test_lost_shared_arrays_are_caught_not_read_as_blanks(tiny_bert, tmp_path, array):
    pairs = make_pairs(tmp_path / "data", n=24)
    cache = tmp_path / "cache"
    extract(tiny_bert, pairs, cache, "--split", "train", "--chunk-rows", 4)
    path = next(find_stores(cache))
    (path / array / "c" / "0").unlink()
    store = FeatureStore.open(path)
    with pytest.raises(FeatcacheError, match=f"chunk 0 of the array '{array}' is missing"):
        getattr(store, array)
    out = invoke("verify", "--cache-dir", cache)
    assert out.exit_code == 1 and array in out.output
    if array == "missing":  # shared by every layer, recomputed with them
        assert invoke("verify", "--repair", "--cache-dir", cache).exit_code == 1
        extract(tiny_bert, pairs, cache, "--split", "train", "--chunk-rows", 4)
        assert invoke("verify", "--cache-dir", cache).exit_code == 0


@pytest.mark.parametrize("damage", ["truncate-layer-meta", "remove-done-array"])
def test_damaged_array_metadata_is_one_line_everywhere(tiny_vit, tmp_path, damage):
    pairs = make_pairs(tmp_path / "data", n=12)
    cache = tmp_path / "cache"
    extract(tiny_vit, pairs, cache, "--split", "train")
    path = next(find_stores(cache))
    if damage == "truncate-layer-meta":
        meta = path / "layers" / "block.01" / "zarr.json"
        meta.write_text(meta.read_text()[:40])
    else:
        import shutil

        shutil.rmtree(path / "done" / "block.01")
    with pytest.raises(FeatcacheError, match="block.01"):
        FeatureStore.open(path).read("block.01")
    out = invoke("verify", "--cache-dir", cache)
    assert out.exit_code == 1 and "not repairable" in " ".join(out.output.split()) and "Traceback" not in out.output


def test_run_data_set_and_relative_model_paths_mean_what_they_meant(tiny_vit, tiny_bert, tmp_path, monkeypatch):
    import shutil

    here, there = tmp_path / "here", tmp_path / "there"
    make_pairs(here / "a", n=36, seed=1)
    make_pairs(there / "a", n=36, seed=2)  # the same relative path, other data
    shutil.copytree(tiny_vit, here / "vit")
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    monkeypatch.chdir(here)
    extract("vit", "a/pairs.jsonl", cache)  # hf:vit, relative
    extract(tiny_bert, "a/pairs.jsonl", cache)
    assert align("vit", tiny_bert, "a/pairs.jsonl", cache, runs, "--layers", "last").exit_code == 0
    monkeypatch.chdir(there)
    out = invoke("eval", "retrieval", "--cache-dir", cache, "--runs-dir", runs)
    assert out.exit_code == 2 and "trained on" in out.output, out.output
    from conftest import save_tiny_vit

    save_tiny_vit(there / "vit", seed=7)  # another model under the same relative name
    make_pairs(there / "a", n=36, seed=1)
    out = align("vit", tiny_bert, "a/pairs.jsonl", cache, runs)
    assert out.exit_code == 2 and "featcache extract" in out.output  # never the first model's features


def test_reference_baseline_fits_the_runs_own_training_pairs(tiny_vit, tiny_bert, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=60)
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    for model in (tiny_vit, tiny_bert):
        extract(model, pairs, cache)
    from featcache.pipeline.evaluate.reference import training_pairs

    for n in ("4", None):
        extra = ("--pairs", n) if n else ()
        assert align(tiny_vit, tiny_bert, pairs, cache, runs, "--layers", "last", *extra).exit_code == 0
    small, full = sorted(runs.iterdir(), key=lambda r: read_json(r / "config.json")["pairs"] is None)
    assert len(training_pairs(read_json(small / "config.json"), cache)) == 4
    assert len(training_pairs(read_json(full / "config.json"), cache)) == read_json(full / "summary.json")["train_pairs"]


def test_more_option_and_name_checks(tiny_vit, tiny_bert, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=24)
    out = align(tiny_vit, tiny_bert, pairs, tmp_path / "cache", tmp_path / "runs", "--temperature", "inf")
    assert out.exit_code == 2 and "--temperature" in out.output
    out = invoke("verify", "--cache-dir", tmp_path / "nonexistent")
    assert out.exit_code == 2 and "does not exist" in out.output
    rows = [json.loads(l) for l in pairs.read_text().splitlines()]
    rows[0]["split"] = "test-sample3"
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = extract_raw(tiny_bert, pairs, tmp_path / "cache")
    assert out.exit_code == 2 and "reserved for --limit" in out.output
    folder = tmp_path / "classes"
    for name in ("red_x", "red x"):
        (folder / name).mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (20, 20)).save(folder / name / "a.png")
    out = extract_raw(tiny_vit, folder, tmp_path / "cache")
    assert out.exit_code == 2 and "both read as" in out.output


def extract_raw(model, dataset, cache, *extra):
    return invoke("extract", "--model", f"hf:{model}", "--dataset", dataset, "--cache-dir", cache, *extra)


def test_a_user_data_set_name_follows_its_content(tmp_path):
    import os

    from featcache.pipeline.common.names import canonical_name

    path = make_pairs(tmp_path / "d", n=6)
    first = canonical_name(str(path))
    assert canonical_name(str(path)) == first and first.startswith("pairs.")
    path.write_text(path.read_text().replace("circle", "CIRCLE"))  # same size, new content
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a distinct mtime even on coarse clocks
    assert canonical_name(str(path)) != first


def test_a_lock_file_replaced_by_a_link_is_never_written_through(tiny_vit, tmp_path):
    """A planted link at a store's lock file: extract and extract --overwrite stop, naming it, and
    the link's target outside the cache is unchanged."""
    from conftest import make_pairs

    pairs = make_pairs(tmp_path / "data", n=8)
    cache = tmp_path / "cache"
    argv = ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs), "--split", "train",
            "--cache-dir", str(cache)]
    assert runner.invoke(app, argv).exit_code == 0
    [lock] = [p for p in cache.rglob(".*.shard-0-of-1.lock")]
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious")
    lock.unlink()
    lock.symlink_to(target)
    for extra in ([], ["--overwrite"]):
        out = runner.invoke(app, argv + extra)
        assert out.exit_code == 2 and "is a symbolic link" in out.output, out.output
        assert target.read_text() == "precious"


@pytest.mark.parametrize("edit", ["int16", "longer", "width"])
def test_metadata_that_reinterprets_sealed_bytes_is_refused(tiny_vit, tmp_path, edit):
    """float16 bytes read as int16, a layer's shape extended, the store's width changed: every
    check of the bytes holds, so the metadata itself is checked against what the store wrote."""
    import json as _json

    from conftest import make_pairs

    pairs = make_pairs(tmp_path / "data", n=8)
    cache = tmp_path / "cache"
    argv = ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs), "--split", "train",
            "--cache-dir", str(cache)]
    assert runner.invoke(app, argv).exit_code == 0
    [store] = list(cache.rglob("*.zarr"))
    meta_path = store / ("zarr.json" if edit == "width" else "layers/block.02/zarr.json")
    meta = _json.loads(meta_path.read_text())
    if edit == "int16":
        meta["data_type"] = "int16"
    elif edit == "longer":
        meta["shape"][0] += 50
    else:
        meta["attributes"]["width"] += 1
    meta_path.write_text(_json.dumps(meta))
    out = runner.invoke(app, ["verify", str(store)])
    assert out.exit_code == 1 and ("block.02" in out.output or "layers" in out.output), out.output
    out = runner.invoke(app, ["export", str(store), str(tmp_path / "out.h5")])
    assert out.exit_code == 2 and "Traceback" not in out.output, out.output


def test_links_planted_where_featcache_writes_are_never_written_through(tmp_path):
    """An export's temporary file, a heatmap and a run's eval/ folder, each a planted link: the
    command stops naming it, and the link's target is unchanged."""
    from conftest import align_then_eval_with_tracker, build_tiny_cache

    tiny = build_tiny_cache(tmp_path / "tiny", n=24)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("precious")
    store = next(tiny["cache"].rglob("*.zarr"))
    out_h5 = tmp_path / "out.h5"
    (tmp_path / ".out.h5.tmp").symlink_to(target / "precious.txt")
    out = runner.invoke(app, ["export", str(store), str(out_h5)])
    assert out.exit_code == 2 and "symbolic link" in out.output, out.output
    png = tmp_path / "heat.png"
    png.symlink_to(target / "precious.txt")
    common = ["--image-model", tiny["vit"], "--text-model", tiny["bert"], "--dataset", str(tiny["pairs"]),
              "--cache-dir", str(tiny["cache"])]
    out = runner.invoke(app, ["layers", *common, "--out", str(png)])
    assert out.exit_code == 2 and "symbolic link" in out.output, out.output
    run = align_then_eval_with_tracker(tiny, tmp_path, "none")
    import shutil

    shutil.rmtree(run / "eval")
    (run / "eval").symlink_to(target, target_is_directory=True)
    out = runner.invoke(app, ["eval", "retrieval", "--runs-dir", str(tmp_path / "runs"), "--cache-dir",
                              str(tiny["cache"])])
    assert out.exit_code == 2 and "symbolic link" in out.output, out.output
    assert sorted(p.name for p in target.iterdir()) == ["precious.txt"]
    assert (target / "precious.txt").read_text() == "precious"


def test_a_copied_cache_is_rebuilt_where_it_lies_not_where_it_came_from(tiny_vit, tmp_path):
    import json as _json
    import shutil

    from conftest import make_pairs

    pairs = make_pairs(tmp_path / "data", n=8)
    assert runner.invoke(app, ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs), "--split", "train",
                               "--cache-dir", str(tmp_path / "original")]).exit_code == 0
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    [store] = list((tmp_path / "copy").rglob("*.zarr"))
    meta = store / "layers" / "block.02" / "zarr.json"
    data = _json.loads(meta.read_text())
    data["data_type"] = "int16"
    meta.write_text(_json.dumps(data))
    out = runner.invoke(app, ["export", str(store), str(tmp_path / "x.h5")])
    text = " ".join(out.output.split())
    assert out.exit_code == 2 and f"--cache-dir {tmp_path / 'copy'}" in text and "original" not in text, text


def test_editing_a_stores_identity_in_python_does_not_break_its_reads(tmp_path):
    """The identity is handed out as a copy: the row seals are checked against the store's own,
    so an edited dict used to make every later read fail as 'written for another store'."""
    store = FeatureStore.create_or_open(tmp_path / "s.zarr", identity={"encoder": {"preprocessing": {"decode": "x"}}},
                                        versions={}, ids=["a", "b"], groups=["g", "h"], texts=None, width=2)
    store.identity["encoder"]["preprocessing"].pop("decode")
    store.identity.clear()
    assert store.ids == ["a", "b"] and store.identity["encoder"]["preprocessing"] == {"decode": "x"}
