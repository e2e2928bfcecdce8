"""The wandb tracker, offline: what it writes is read back from wandb's own run file.

(The TensorBoard tracker's test sits beside the other CLI training tests in test_train.py.)

wandb 0.31 no longer ships a Python reader of its ``.wandb`` run file (the old
``wandb.sdk.internal.datastore`` moved into the Go core), so ``read_wandb_records`` reads the
container here: wandb's LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks of
records, each with a CRC-32 of its type and data) whose payloads are wandb's own protobuf
``Record`` messages, parsed with ``wandb.proto.wandb_internal_pb2``. Every checksum is checked,
so a misread file fails loudly instead of yielding no keys.
"""

import json
import socket
import struct
import threading
import zlib
from pathlib import Path

import pytest
import wandb
from conftest import align_then_eval_with_tracker, build_tiny_cache
from typer.testing import CliRunner

runner = CliRunner()
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    """Every Record in a ``run-<id>.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, "not a wandb run file"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block or the file
            pos += left
            continue
        payload = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + payload) == crc, f"checksum mismatch at byte {pos}"
        pos += 7 + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history(run_file: Path) -> dict[str, list[tuple[int, float]]]:
    """Logged key -> [(step, value)], from the file's history records."""
    out: dict[str, list] = {}
    for record in read_wandb_records(run_file):
        if record.WhichOneof("record_type") != "history":
            continue
        step = record.history.step.num
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                out.setdefault(key, []).append((step, json.loads(item.value_json)))
    return out


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.mktemp("tiny-cache"), n=72)


@pytest.fixture()
def no_network(monkeypatch):
    """Every HTTP(S) route wandb could take points at a local listener that counts connections.

    wandb's server (WANDB_BASE_URL) and any other host through the proxy variables, which both
    the Python side and the Go core honour. The wandb service is restarted so that it inherits them.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    for var in ("WANDB_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, url)
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the tracker's own default must be offline
    monkeypatch.delenv("WANDB_ERROR_REPORTING", raising=False)  # and it must switch crash reports off
    connections, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            connections.append(conn.recv(200))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    wandb.teardown()
    yield connections
    wandb.teardown()  # the service ends before the listener does: a late connection still counts
    stop.set()
    thread.join()
    server.close()


def _wandb_files(run: Path, wait_s: float = 60.0) -> tuple[Path, Path]:
    """The training and evaluation run files of ``run``'s wandb id, told apart by what they hold
    (not by folder names, which can share a second), once both are written: on a loaded machine
    the offline writer may still be flushing when the command returns."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        files = sorted((run / "wandb").glob(f"offline-run-*-{run.name}*/run-{run.name}.wandb"))
        kinds = {}
        for f in files:
            try:
                keys = set(history(f))
            except (AssertionError, ValueError, struct.error):  # still being written
                continue
            if "train/clip" in keys:
                kinds["train"] = f
            elif any(k.startswith("eval/") for k in keys):
                kinds["eval"] = f
        if len(files) == 2 and len(kinds) == 2 or time.monotonic() > deadline:
            assert len(files) == 2 and len(kinds) == 2, (files, kinds)
            return kinds["train"], kinds["eval"]
        time.sleep(0.5)


def test_wandb_offline_run_holds_the_curves_and_the_final_recalls(tiny_cache, tmp_path, no_network):
    run = align_then_eval_with_tracker(tiny_cache, tmp_path, "wandb")

    train_file, eval_file = _wandb_files(run)  # training, then evaluation resuming the same id
    assert train_file.name == f"run-{run.name}.wandb"
    curves = history(train_file)
    assert {"train/clip", "train/structure", "val/clip", "val/total", "lambda", "lr"} <= set(curves)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in curves["val/clip"]] == [0, 1, 2, 3]
    assert [v for _, v in curves["val/clip"]] == pytest.approx([line["val_clip"] for line in lines])
    (started,) = [r.run for r in read_wandb_records(train_file) if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in started.config.update}
    assert started.run_id == run.name and config["loss"] == "clip+structure" and config["log"] == "wandb"

    evals = history(eval_file)
    assert any(k.startswith("eval/retrieval/") and k.endswith("R@1") for k in evals), sorted(evals)
    assert not no_network, f"wandb tried the network: {no_network}"
