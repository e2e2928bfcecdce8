"""Caches on s3:// through the real S3 protocol: moto's S3 server on 127.0.0.1, reached by s3fs.

Nothing here mocks a library call: featcache, zarr and s3fs talk HTTP to an S3 endpoint, found
the usual boto way (AWS_ENDPOINT_URL) or from ``featcache --storage-option endpoint_url=...``.
Each test gets its own bucket. No network beyond 127.0.0.1 is used.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from conftest import make_pairs, requires_real, store_arrays
from typer.testing import CliRunner

from featcache.cache import leases
from featcache.cache.errors import FeatcacheError
from featcache.cache.store import FeatureStore, find_stores
from featcache.cli.main import app
from featcache.pipeline.train.runs import find_run, read_json

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
runner = CliRunner()
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "featcache-test", "AWS_SECRET_ACCESS_KEY": "featcache-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


pytestmark = pytest.mark.slow  # a real S3 server (moto): CI runs it with -m 'real or slow'

@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's threaded S3 server on a free port of 127.0.0.1; boto finds it by AWS_ENDPOINT_URL."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    # moto checks If-None-Match / If-Match and then stores, with no lock between: two racing
    # conditional puts can both pass (1 round in 150 of 8 racing writers here; 45 in 60 with a
    # 2 ms pause before the store). S3 itself makes them atomic, and the lease tests rely on it,
    # so this server does too: one PutObject at a time.
    from moto.s3.responses import S3Response

    put_lock, real_put = threading.Lock(), S3Response.put_object

    def atomic_put(self):
        with put_lock:
            return real_put(self)

    patch = pytest.MonkeyPatch()
    patch.setattr(S3Response, "put_object", atomic_put)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        server.stop()
        patch.undo()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_cache(s3_endpoint) -> str:
    """A fresh bucket; the cache URL inside it."""
    import s3fs

    bucket = f"featcache-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(bucket)
    return f"s3://{bucket}/cache"


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "featcache.cli.main", *args]


# Two layers keep the number of S3 requests (one object per layer chunk and done flag) small.
TUX = ["--model", "dinov2", "--layers", "last:2", "--split", "train", "--limit", "16", "--chunk-rows", "4",
       "--batch-size", "4"]


@pytest.fixture(scope="module")
def tux_local(tmp_path_factory):
    """DINOv2-S/14 over 16 Tux Paint train images in a local directory: the bitwise reference."""
    if not os.path.isdir("/usr/share/tuxpaint/stamps"):
        pytest.skip("Tux Paint stamps not installed")
    cache = tmp_path_factory.mktemp("tux-local")
    out = runner.invoke(app, ["extract", *TUX, "--cache-dir", str(cache)])
    assert out.exit_code == 0, out.output
    return store_arrays(next(find_stores(cache)))


# -- the whole path ------------------------------------------------------------------------------

@pytest.mark.real
@requires_real
def test_extract_ls_verify_align_eval_on_s3(s3_cache, tmp_path):
    for model in ("dinov2", "minilm"):  # every layer of 8 Tux Paint test images (and their captions)
        out = runner.invoke(app, ["extract", "--model", model, "--split", "test", "--limit", "8",
                                  "--cache-dir", s3_cache])
        assert out.exit_code == 0, out.output
    stores = list(find_stores(s3_cache))
    assert len(stores) == 2 and all(str(s).startswith("s3://") for s in stores)
    assert all(FeatureStore.open(s).is_complete() for s in stores)
    out = runner.invoke(app, ["ls", "--cache-dir", s3_cache])
    assert out.exit_code == 0 and out.output.count("yes") == 2, out.output
    out = runner.invoke(app, ["verify", "--cache-dir", s3_cache])
    assert out.exit_code == 0 and "2 store(s) verified" in out.output, out.output

    # align has no --limit: it trains on a small pair set extracted by the same real encoders into the same bucket
    pairs = make_pairs(tmp_path / "data", n=24)
    for model in ("dinov2", "minilm"):
        out = runner.invoke(app, ["extract", "--model", model, "--dataset", str(pairs), "--cache-dir", s3_cache])
        assert out.exit_code == 0, out.output
    runs = str(tmp_path / "runs")
    out = runner.invoke(app, ["align", "--dataset", str(pairs), "--epochs", "2", "--cache-dir", s3_cache,
                              "--runs-dir", runs])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["eval", "retrieval", "--cache-dir", s3_cache, "--runs-dir", runs])
    assert out.exit_code == 0, out.output
    result = read_json(next((find_run(tmp_path / "runs") / "eval").glob("retrieval-*.json")))
    assert result["cache"]["image"]["path"].startswith(s3_cache)


def test_verify_finds_a_damaged_chunk_object_on_s3(tiny_vit, s3_cache, tmp_path):
    """The crc32c of a chunk is checked on what comes back over HTTP; --repair, then extract, heals it."""
    import s3fs

    pairs = make_pairs(tmp_path / "data", n=24)
    argv = ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs), "--split", "train",
            "--chunk-rows", "4", "--cache-dir", s3_cache]
    assert runner.invoke(app, argv).exit_code == 0
    store = next(find_stores(s3_cache))
    before = store_arrays(store)
    fs = s3fs.S3FileSystem()
    key = f"{store}/layers/block.01/c/1/0".removeprefix("s3://")
    data = bytearray(fs.cat_file(key))
    data[3] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    out = runner.invoke(app, ["verify", "--repair", str(store)])
    assert out.exit_code == 1 and "checksum" in out.output, out.output
    assert runner.invoke(app, argv).exit_code == 0
    assert store_arrays(store) == before


# -- kill -9, resume, shards -----------------------------------------------------------------------

def _wait_done(cache: str, at_least: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            stores = list(find_stores(cache))
            if stores and int(FeatureStore.open(stores[0]).done_chunks("block.11").sum()) >= at_least:
                return
        except (FeatcacheError, KeyError, OSError):  # the store is still being created
            pass
        time.sleep(0.1)
    raise AssertionError(f"the writer did not finish {at_least} chunk(s) (exit {proc.poll()})")


@pytest.mark.real
@requires_real
def test_sigkill_during_extract_then_resume_is_bitwise_equal_to_local(tux_local, s3_cache):
    proc = subprocess.Popen(_cli("extract", *TUX, "--cache-dir", s3_cache), env=_env(FEATCACHE_SLOW_BATCH_S="0.5"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_done(s3_cache, 1, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = FeatureStore.open(next(find_stores(s3_cache)))
    assert 0 < int(store.done_chunks("block.11").sum()) < store.n_chunks  # killed mid-run
    assert leases.shard_lease_urls(str(store.path))  # the dead writer's lease is left behind ...
    # ... and the resume takes it over at once: its holder was a dead pid on this host
    out = subprocess.run(_cli("extract", *TUX, "--cache-dir", s3_cache), env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert store_arrays(store.path) == tux_local
    assert not leases.shard_lease_urls(str(store.path))  # released


@pytest.mark.real
@requires_real
def test_two_shard_writers_at_once_complete_one_store(tux_local, s3_cache):
    procs = [subprocess.Popen(_cli("extract", *TUX, "--shard", f"{i}/2", "--cache-dir", s3_cache), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        output = p.communicate(timeout=300)[0]
        assert p.returncode == 0, output
    assert store_arrays(next(find_stores(s3_cache))) == tux_local


# -- the writer policy: leases with a heartbeat ------------------------------------------------------

def _tiny_argv(tiny_vit, pairs, cache, *extra):
    return ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs), "--split", "train",
            "--chunk-rows", "4", "--cache-dir", cache, *extra]


def test_lease_is_taken_by_exactly_one_of_many_racing_writers(s3_cache):
    url = leases.lease_url(f"{s3_cache}/x.zarr", "shard-0-of-1")
    won, refused = [], []
    start = threading.Barrier(8)

    def take():
        start.wait()
        try:
            lease = leases.Lease(url, "x")
            lease.acquire(blocking=False, hint="")
            won.append(lease)
        except FeatcacheError as err:
            refused.append(err)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert all("already being written by pid" in e.message for e in refused)
    won[0].release()
    assert leases.read_holder(url) is None


def test_overwrite_is_refused_while_a_writer_heartbeat_is_fresh(tiny_vit, s3_cache, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=24)
    assert runner.invoke(app, _tiny_argv(tiny_vit, pairs, s3_cache)).exit_code == 0
    store = str(next(find_stores(s3_cache)))
    before = store_arrays(store)
    with leases.held_lease(leases.lease_url(store, "shard-1-of-2"), False, "test writer", ""):
        out = runner.invoke(app, _tiny_argv(tiny_vit, pairs, s3_cache, "--overwrite"))
        assert out.exit_code == 2, out.output
        assert "(shard 1/2) is already being written by pid" in out.output and "nothing was removed" in out.output
        assert store_arrays(store) == before  # untouched
        out = runner.invoke(app, _tiny_argv(tiny_vit, pairs, s3_cache, "--shard", "1/2"))
        assert out.exit_code == 2 and "already being written" in out.output  # the same shard twice: refused
    out = runner.invoke(app, _tiny_argv(tiny_vit, pairs, s3_cache, "--overwrite"))  # the writer is gone
    assert out.exit_code == 0, out.output
    assert store_arrays(store) == before


def _foreign_lease(url: str, ttl_s: float) -> None:
    """A lease as a writer on another machine leaves it."""
    import s3fs

    body = {"host": "other-machine", "pid": 4242, "what": "x", "ttl_s": ttl_s, "written": time.time(), "nonce": "n"}
    s3fs.S3FileSystem().pipe_file(url.removeprefix("s3://"), json.dumps(body).encode())


def test_a_foreign_writer_is_waited_out_for_its_time_to_live(tiny_vit, s3_cache, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=12)
    assert runner.invoke(app, _tiny_argv(tiny_vit, pairs, s3_cache)).exit_code == 0
    store = str(next(find_stores(s3_cache)))
    url = leases.lease_url(store, "shard-0-of-1")
    # A time to live no stall can outlast: a lease's age is read from S3's Last-Modified, in whole
    # seconds, so it reads up to 1 s older than it is. With ttl_s=2 an overwrite that took over
    # 1 s to reach the check (a loaded machine) found the lease stale and went ahead.
    _foreign_lease(url, ttl_s=600)
    out = runner.invoke(app, _tiny_argv(tiny_vit, pairs, s3_cache, "--overwrite"))
    assert out.exit_code == 2 and "pid 4242 on other-machine" in out.output, out.output
    _foreign_lease(url, ttl_s=1)  # its last heartbeat, with a short time to live
    time.sleep(1.2)  # now older than its time to live (a read age is never less): a dead writer
    out = runner.invoke(app, _tiny_argv(tiny_vit, pairs, s3_cache, "--overwrite"))
    assert out.exit_code == 0, out.output
    assert not leases.shard_lease_urls(store)


def test_a_writer_whose_lease_was_taken_over_writes_nothing_more(tiny_vit, s3_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(leases.TTL_ENV, "0.4")  # a heartbeat every 0.1 s
    url = leases.lease_url(f"{s3_cache}/x.zarr", "shard-0-of-1")
    with leases.held_lease(url, False, "x", "") as lease:
        lease.check()
        _foreign_lease(url, ttl_s=60)  # someone else's write: the next conditional renewal fails
        time.sleep(0.5)
        with pytest.raises(FeatcacheError, match="lost its lease"):
            lease.check()
    assert leases.read_holder(url).host == "other-machine"  # the new holder's lease is not removed


def test_a_stalled_heartbeat_stops_the_writer_before_its_next_chunk(tiny_vit, s3_cache, tmp_path, monkeypatch):
    """A writer cut off from the store for over half the time to live marks nothing more done."""
    # 4 s: a heartbeat every 1 s, and a check that allows 2 s since the last one. With 1 s, a renewal
    # (to moto, in this process) that took over 0.25 s on a loaded machine stopped the writer before
    # its first chunk. The cut-off is then held open by a pause, not by slow batches.
    ttl = 4.0
    monkeypatch.setenv(leases.TTL_ENV, str(ttl))
    pairs = make_pairs(tmp_path / "data", n=24)
    real_put, real_write = leases._S3.put, FeatureStore.write_chunk
    cut_off = threading.Event()  # set once the first chunk is written

    def put(self, body, match):
        if cut_off.is_set() and match is not None and "shard" in self.key:
            raise OSError("connection reset")  # every renewal of the shard lease fails from now on
        return real_put(self, body, match)

    def write_chunk(self, *args, **kwargs):
        real_write(self, *args, **kwargs)
        if not cut_off.is_set():
            cut_off.set()
            # no renewal succeeds from now on, so at the next chunk's check the last one is older
            # than this pause, which is over half the time to live
            time.sleep(ttl / 2 + 0.3)

    monkeypatch.setattr(leases._S3, "put", put)
    monkeypatch.setattr(FeatureStore, "write_chunk", write_chunk)
    out = runner.invoke(app, _tiny_argv(tiny_vit, pairs, s3_cache, "--batch-size", "4"))
    assert out.exit_code == 2 and "lost its lease" in out.output, out.output
    store = FeatureStore.open(next(find_stores(s3_cache)))
    assert 0 < int(store.done_chunks("block.02").sum()) < store.n_chunks


# -- configuration and hostile input --------------------------------------------------------------

def test_endpoint_from_the_command_line(tiny_vit, s3_cache, s3_endpoint, tmp_path, monkeypatch):
    """Without AWS_ENDPOINT_URL, --storage-option endpoint_url=... reaches the same server."""
    pairs = make_pairs(tmp_path / "data", n=12)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    out = runner.invoke(app, ["--storage-option", f"endpoint_url={s3_endpoint}", *_tiny_argv(tiny_vit, pairs, s3_cache)])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["--storage-option", f"endpoint_url={s3_endpoint}", "ls", "--cache-dir", s3_cache])
    assert out.exit_code == 0 and "yes" in out.output, out.output
    out = runner.invoke(app, ["--storage-option", "endpoint_url", "ls", "--cache-dir", s3_cache])
    assert out.exit_code == 2 and "bad --storage-option" in out.output


def test_a_bucket_that_does_not_exist_is_one_line(tiny_vit, s3_endpoint, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=12)
    out = runner.invoke(app, _tiny_argv(tiny_vit, pairs, "s3://no-such-bucket-here/cache"))
    assert out.exit_code == 2 and "Traceback" not in out.output, out.output
    assert "no-such-bucket-here" in out.output
