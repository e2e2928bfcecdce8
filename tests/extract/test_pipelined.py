"""Stage one's pipelined hot path (writer thread, checks and cast on the device, uint8 pixels,
hooks registered once) against the serial, per-layer numpy path it replaced, on the CPU."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_pairs, store_arrays
from PIL import Image
from typer.testing import CliRunner

from featcache.cache.errors import FeatcacheError
from featcache.cache.store import FeatureStore
from featcache.cli.main import app
from featcache.pipeline.data.catalog import load_dataset
from featcache.pipeline.extract.loading import load_encoder
from featcache.pipeline.extract.run import ExtractConfig, chunk_batches, default_batch_size, default_workers, extract
from featcache.pipeline.extract.transfer import FP16_MAX, first_problem, to_host
from featcache.pipeline.extract.writer import ChunkBatch, ChunkWriter

runner = CliRunner()


def _cfg(model, pairs, cache_dir, **kw):
    kw = {"batch_size": 3, "chunk_rows": 4, "splits": ["train"], **kw}
    return ExtractConfig(model=f"hf:{model}", dataset=str(pairs), cache_dir=cache_dir, **kw)


def _everything(path) -> dict:
    """Every layer's bytes, the missing flags, the sources and the identity of a store."""
    store = FeatureStore.open(path)
    stamps, hashes = store.sources()
    return {**store_arrays(path), "stamps": stamps.tobytes(), "sha256": hashes.tobytes(), "identity": store.identity}


def test_the_overlapped_writer_writes_the_serial_paths_stores_bitwise(tiny_vit, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=48)
    serial = extract(_cfg(tiny_vit, pairs, tmp_path / "serial", write_queue=0))[0]
    stores = {depth: extract(_cfg(tiny_vit, pairs, tmp_path / f"q{depth}", write_queue=depth, num_workers=workers))[0]
              for depth, workers in ((1, 0), (2, 2), (4, 0))}
    want = _everything(serial.path)
    assert FeatureStore.open(serial.path).is_complete()
    for depth, result in stores.items():
        assert _everything(result.path) == want, depth
        assert result.computed_rows == serial.computed_rows


def _numpy_pixels(enc, images) -> torch.Tensor:
    """Transcription of the preprocessing before pixels travelled as uint8: all in numpy float32."""
    size = enc.preprocessing["image_size"]
    mean = np.asarray(enc.preprocessing["mean"], dtype=np.float32)
    std = np.asarray(enc.preprocessing["std"], dtype=np.float32)
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, img in enumerate(images):
        w, h = img.size
        scale = size / min(w, h)
        rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (rw - size) // 2, (rh - size) // 2
        if max(rw, rh) > 8 * size:
            img = img.resize((size, size), Image.BICUBIC, box=(left / scale, top / scale, (left + size) / scale,
                                                               (top + size) / scale))
        else:
            img = img.resize((rw, rh), Image.BICUBIC).crop((left, top, left + size, top + size))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        out[i] = ((arr - mean) / std).transpose(2, 0, 1)
    return torch.from_numpy(out)


def _numpy_store_values(enc, split, store, layer_index: int, pooling: str, dtype: str, batch: int) -> np.ndarray:
    """Transcription of the serial path: the same batches, every layer's tokens to float32, pooled,
    copied to numpy and cast there."""
    images = split.images
    out = []
    for rows in chunk_batches(store, range(store.n_chunks), batch):
        x = _numpy_pixels(enc, [images.load(r) for r in rows])
        with torch.inference_mode():
            tokens = enc.model(pixel_values=x, output_hidden_states=True).hidden_states[layer_index].float()
        cls, patches = tokens[:, 0], tokens[:, enc.num_prefix_tokens:].mean(1)
        pooled = {"cls": cls, "mean": patches, "cls+mean": torch.cat([cls, patches], -1)}[pooling]
        out.append(pooled.cpu().numpy().astype(dtype))
    return np.concatenate(out)


@pytest.mark.parametrize("pooling, dtype", [("cls", "float16"), ("mean", "float32"), ("cls+mean", "float16")])
def test_stores_equal_the_per_layer_numpy_path_bitwise(tiny_vit, pairs, tmp_path, pooling, dtype):
    result = extract(_cfg(tiny_vit, pairs, tmp_path / "c", pooling=pooling, dtype=dtype))[0]
    store = FeatureStore.open(result.path)
    enc = load_encoder(f"hf:{tiny_vit}", "cpu")
    split = load_dataset(str(pairs))["train"]
    for i, layer in enumerate(store.layers):
        want = _numpy_store_values(enc, split, store, i, pooling, dtype, batch=3)
        got = store.read(layer, dtype=np.dtype(dtype))
        assert got.dtype == want.dtype and np.array_equal(got, want), layer


def test_uint8_pixels_normalised_in_torch_equal_the_numpy_preprocessing(tiny_vit):
    enc = load_encoder(f"hf:{tiny_vit}", "cpu")
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
              for h, w in ((40, 57), (28, 28), (300, 19), (3, 400), (64, 64))]  # two strips take the box path
    pixels = enc.prepare_pixels(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (5, 3, 28, 28)
    want = _numpy_pixels(enc, images)
    assert torch.equal(enc.normalise(pixels), want)
    assert torch.equal(enc.prepare_images(images), want)
    assert torch.equal(enc.normalise(want), want)  # normalised pixels (an image processor's) pass through


def test_the_cast_and_checks_on_the_device_equal_numpys():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=2_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = bits[np.isfinite(bits) & (np.abs(bits) <= FP16_MAX)]
    values = np.concatenate([values, rng.normal(size=200_000).astype(np.float32) * 1e-6])  # float16 subnormals
    stacked = torch.from_numpy(values[: 3 * 1000 * (len(values) // 3000)].reshape(3, 1000, -1))
    host, checks = to_host(stacked, "float16").numpy()
    assert np.array_equal(host.view(np.uint16), stacked.numpy().astype(np.float16).view(np.uint16))
    assert np.array_equal(checks[:, 0], np.abs(stacked.numpy()).max(axis=(1, 2))) and (checks[:, 1:] == 1).all()
    assert first_problem(checks, "float16") is None
    x = torch.zeros(3, 4, 2)
    x[1, 2, 0], x[2, 0, 1] = 7e4, float("nan")  # layer 1 overflows float16; layer 2 has a NaN in row 0
    assert first_problem(to_host(x, "float16").numpy()[1], "float16") == (1, None)
    assert first_problem(to_host(x, "float32").numpy()[1], "float32") == (2, 0)
    x[1, 3, 1] = float("inf")  # within one layer, a non-finite row is named before the range
    assert first_problem(to_host(x, "float16").numpy()[1], "float16") == (1, 3)


@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("failure, needle", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device of .* while writing chunk 2"),
    (FeatcacheError("x.zarr: this writer lost its lease (gone) and stopped before writing another chunk"),
     "chunk 2 of .* was not written: .*lost its lease"),
])
def test_a_writer_error_stops_the_run_naming_the_chunk(tiny_vit, tmp_path, monkeypatch, depth, failure, needle):
    pairs = make_pairs(tmp_path / "data", n=48)  # 32 train rows: 8 chunks of 4
    real = FeatureStore.write_chunk

    def write_chunk(self, chunk, *args, **kwargs):
        if chunk == 2:
            raise failure
        return real(self, chunk, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_chunk", write_chunk)
    with pytest.raises(FeatcacheError, match=needle) as caught:
        extract(_cfg(tiny_vit, pairs, tmp_path / "c", write_queue=depth))
    assert "\n" not in str(caught.value)
    store = FeatureStore.open(next((tmp_path / "c").rglob("*.zarr")))
    assert store.done_chunks("block.02").tolist() == [True, True] + [False] * 6  # nothing after the failure
    monkeypatch.setattr(FeatureStore, "write_chunk", real)
    out = runner.invoke(app, ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs), "--split", "train",
                              "--cache-dir", str(tmp_path / "c"), "--chunk-rows", "4", "--batch-size", "3",
                              "--write-queue", str(depth)])
    assert out.exit_code == 0, out.output  # the rerun finishes the store
    assert FeatureStore.open(store.path).is_complete()


def test_a_writer_error_on_the_cli_is_one_line(tiny_vit, tmp_path, monkeypatch):
    pairs = make_pairs(tmp_path / "data", n=24)

    def full(self, chunk, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FeatureStore, "write_chunk", full)
    out = runner.invoke(app, ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs), "--split", "train",
                              "--cache-dir", str(tmp_path / "c"), "--chunk-rows", "4"])
    assert out.exit_code == 2 and "while writing chunk 0" in out.output and "Traceback" not in out.output


def test_stolen_chunks_through_one_loader_with_workers_give_the_same_store(tiny_vit, tmp_path):
    pairs = make_pairs(tmp_path / "data", n=48)
    single = extract(_cfg(tiny_vit, pairs, tmp_path / "one"))[0]
    shard = extract(_cfg(tiny_vit, pairs, tmp_path / "shard", shard="0/2", num_workers=2))[0]
    assert shard.computed_rows == single.computed_rows  # its own chunks, then every other one stolen
    assert store_arrays(Path(shard.path)) == store_arrays(Path(single.path))


def test_hooks_are_registered_once_and_silent_outside_a_forward(tiny_vit, pairs):
    enc = load_encoder(f"hf:{tiny_vit}", "cpu")
    split = load_dataset(str(pairs))["train"]
    x = enc.prepare_pixels([split.images.load(i) for i in range(4)])
    modules = list({id(tap.module): tap.module for tap in enc.taps.values()}.values())

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)

    before = hooks()  # the loader's own, if any
    first = enc.forward_stacked(x, ["embed", "block.01"], "cls")
    registered = hooks()
    assert registered == before + 2 and torch.equal(enc.forward_stacked(x, ["embed", "block.01"], "cls"), first)
    assert hooks() == registered  # not one more per batch
    with torch.inference_mode():  # a direct call of the model runs to its end: the hooks do nothing
        hidden = enc.model(pixel_values=enc.normalise(x), output_hidden_states=True).hidden_states
    assert torch.equal(hidden[2][:, 0], first[1])
    before = hooks()  # transformers may keep hooks of its own from output_hidden_states
    enc.forward_stacked(x, ["block.02"], "mean")  # another layer list: its one hook replaces the two
    assert hooks() == before - 1


def test_cuda_defaults_for_batch_and_workers():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_batch_size(SimpleNamespace(device=cpu, width=1024), 512) == 32
    assert default_batch_size(SimpleNamespace(device=cuda, width=1024), 512) == 256  # ViT-L
    assert default_batch_size(SimpleNamespace(device=cuda, width=768), 704) == 352  # ViT-B: 704 = 11 x 64
    assert default_batch_size(SimpleNamespace(device=cuda, width=384), 1408) == 704  # ViT-S: 1408 = 11 x 128
    assert default_batch_size(SimpleNamespace(device=cuda, width=384), 4) == 4
    assert default_workers(cpu) == 0
    assert 1 <= default_workers(cuda) <= 14


def test_no_chunk_queued_after_a_writer_failure_is_written_once_the_failure_was_raised(tmp_path, monkeypatch):
    """The race CI hit: the forward thread raised the writer's failure (and, before the fix,
    cleared it), then the writer thread took a chunk queued after the failure and wrote it."""
    rows = 16
    store = FeatureStore.create_or_open(tmp_path / "s.zarr", identity={}, versions={}, ids=[str(i) for i in range(rows)],
                                        groups=["g"] * rows, texts=None, width=3, chunk_rows=4)
    store.ensure_layers(["a"])
    real = FeatureStore.write_chunk

    def write_chunk(self, chunk, *args, **kwargs):
        if chunk == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, chunk, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_chunk", write_chunk)
    writer = ChunkWriter(store, ["a"], "float16", "enc", [str(i) for i in range(rows)], None, depth=2)
    raised = threading.Event()
    get = writer._queue.get

    def held_get(*args, **kwargs):  # chunk 2 reaches the writer only after the forward thread raised
        item = get(*args, **kwargs)
        if item is not None and item[0] == 2:
            raised.wait(10)
        return item

    writer._queue.get = held_get

    def chunk(c):
        r = list(range(4 * c, 4 * c + 4))
        return [ChunkBatch(rows=r, good=r, errors={}, hashes=None, out=to_host(torch.ones(1, 4, 3), "float16"))]

    writer.put(0, chunk(0))
    writer.put(1, chunk(1))
    writer.put(2, chunk(2))
    for _ in range(1000):  # until the writer has failed on chunk 1
        if writer._failure is not None:
            break
        threading.Event().wait(0.01)
    with pytest.raises(FeatcacheError, match="no space left .* chunk 1"):
        writer.put(3, chunk(3))
    raised.set()
    writer._stop()
    assert store.done_chunks("a").tolist() == [True, False, False, False]
