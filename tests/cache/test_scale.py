"""Shards, torchrun ranks and concurrent writers produce the same store as one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_pairs, store_arrays
from typer.testing import CliRunner

from featcache.cache.errors import FeatcacheError
from featcache.cache.locks import file_lock
from featcache.cache.store import FeatureStore, find_stores
from featcache.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return make_pairs(root / "data", n=60)


def _argv(model, pairs, cache, *extra):
    return ["extract", "--model", f"hf:{model}", "--dataset", str(pairs), "--split", "train",
            "--cache-dir", str(cache), "--chunk-rows", "4", "--batch-size", "2", *extra]


def _single(tiny_vit, data, tmp_path):
    out = runner.invoke(app, _argv(tiny_vit, data, tmp_path / "single"))
    assert out.exit_code == 0, out.output
    return store_arrays(next(find_stores(tmp_path / "single")))


def test_shards_complete_one_store_bitwise(tiny_vit, data, tmp_path):
    reference = _single(tiny_vit, data, tmp_path)
    cache = tmp_path / "sharded"
    out = runner.invoke(app, _argv(tiny_vit, data, cache, "--shard", "0/2", "--no-steal"))
    assert out.exit_code == 0, out.output
    store = FeatureStore.open(next(find_stores(cache)))
    done = store.done_chunks("block.02")
    assert done[::2].all() and not done[1::2].any()  # shard 0 did exactly its chunks
    out = runner.invoke(app, _argv(tiny_vit, data, cache, "--shard", "1/2"))
    assert out.exit_code == 0, out.output
    assert store_arrays(store.path) == reference


def test_a_shard_that_finishes_early_takes_the_rest(tiny_vit, data, tmp_path):
    reference = _single(tiny_vit, data, tmp_path)
    cache = tmp_path / "steal"
    assert runner.invoke(app, _argv(tiny_vit, data, cache, "--shard", "1/3")).exit_code == 0
    assert store_arrays(next(find_stores(cache))) == reference


@pytest.mark.parametrize("spec", ["2/2", "x", "1/0", "-1/3"])
def test_bad_shard_spec(tiny_vit, data, tmp_path, spec):
    out = runner.invoke(app, _argv(tiny_vit, data, tmp_path / "c", "--shard", spec))
    assert out.exit_code == 2 and "bad --shard" in out.output


def test_second_writer_of_the_same_shard_is_refused(tiny_vit, data, tmp_path):
    cache = tmp_path / "locked"
    assert runner.invoke(app, _argv(tiny_vit, data, cache, "--layers", "last")).exit_code == 0
    path = next(find_stores(cache))
    before = store_arrays(path)
    with file_lock(path.parent / f".{path.name}.shard-0-of-1.lock", blocking=False, what="test"):
        out = runner.invoke(app, _argv(tiny_vit, data, cache, "--layers", "all"))
    assert out.exit_code == 2 and "already being written" in out.output and "Traceback" not in out.output
    assert store_arrays(path)["block.02"] == before["block.02"]  # nothing of the finished layer changed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_gloo_bitwise_equal(tiny_vit, data, tmp_path):
    reference = _single(tiny_vit, data, tmp_path)
    cache = tmp_path / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "featcache.cli.main", *_argv(tiny_vit, data, cache)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert store_arrays(next(find_stores(cache))) == reference


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_sigkill_under_torchrun_then_rerun_is_bitwise_equal(tiny_vit, tmp_path):
    import signal
    import time

    pairs = make_pairs(tmp_path / "many", n=120)
    reference = _single(tiny_vit, pairs, tmp_path)
    cache = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", FEATCACHE_SLOW_BATCH_S="0.05")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "featcache.cli.main", *_argv(tiny_vit, pairs, cache)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline, finished = time.time() + 180, 0
    while time.time() < deadline:
        stores = list(find_stores(cache))
        if stores:
            try:
                done = FeatureStore.open(stores[0]).done_chunks("block.02")
                finished = int(done.sum())
                if 4 <= finished < len(done) - 4:
                    break
            except (FeatcacheError, KeyError):  # the store or its layer arrays are still being created
                pass
        time.sleep(0.02)
    # torchrun starts each rank in a session of its own, so killing the launcher's group alone left
    # both ranks running: they finished the store (20 of 20 chunks 3 s later) beside the rerun
    ranks = _children(proc.pid)
    assert len(ranks) == 2, ranks
    for pid in [proc.pid, *ranks]:
        os.killpg(pid, signal.SIGKILL)  # every rank and the launcher, mid-run
    proc.wait()
    deadline = time.time() + 60
    while not all(_dead(pid) for pid in ranks):  # not our children: reaped by init, not by wait()
        assert time.time() < deadline, ranks
        time.sleep(0.02)
    partial = FeatureStore.open(next(find_stores(cache)))
    assert 0 < int(partial.done_chunks("block.02").sum()) < partial.n_chunks
    out = runner.invoke(app, _argv(tiny_vit, pairs, cache))  # the locks died with the ranks
    assert out.exit_code == 0, out.output
    assert store_arrays(partial.path) == reference


def test_disk_full_stops_cleanly_and_resumes(tiny_vit, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:  # needs root (CI and the dev machines run as root)
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        pairs = make_pairs(tmp_path / "many", n=150)
        filler = mount / "filler"
        filler.write_bytes(b"\0" * 900_000)
        argv = _argv(tiny_vit, pairs, mount / "cache", "--dtype", "float32")
        out = runner.invoke(app, argv)
        assert out.exit_code == 2, out.output
        assert "no space left" in out.output and "Traceback" not in out.output
        store = FeatureStore.open(next(find_stores(mount / "cache")))
        assert not store.is_complete()
        filler.unlink()  # space is freed
        out = runner.invoke(app, argv)
        assert out.exit_code == 0, out.output
        reference32 = _single_dtype(tiny_vit, pairs, tmp_path)
        assert store_arrays(store.path) == reference32
    finally:
        subprocess.run(["umount", str(mount)])


def _single_dtype(tiny_vit, data, tmp_path):
    out = runner.invoke(app, _argv(tiny_vit, data, tmp_path / "single32", "--dtype", "float32"))
    assert out.exit_code == 0, out.output
    return store_arrays(next(find_stores(tmp_path / "single32")))
