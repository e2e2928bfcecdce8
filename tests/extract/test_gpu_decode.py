"""``--decode gpu`` (pipeline/extract/gpu_decode.py) run on the CPU through its test hook
(FEATCACHE_ALLOW_CPU_NVJPEG=1: torchvision's decode_jpeg on CPU tensors, the same batched code):
complete stores with their own identity, features close to the PIL path's, the CPU path for
every file the GPU decoder would not show as PIL does, broken files as the CPU path reports them,
and CPU- and GPU-decoded stores never mixed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from featcache.cache.errors import FeatcacheError
from featcache.cache.store import FeatureStore
from featcache.cli.main import app
from featcache.pipeline.data.decode import decode_image
from featcache.pipeline.extract import gpu_decode
from featcache.pipeline.extract.encoders import pixels_of
from featcache.pipeline.extract.run import ExtractConfig, extract

CPU = torch.device("cpu")


def synth(i: int, w: int, h: int) -> Image.Image:
    """A smooth random field plus noise, as the benchmark's JPEGs (small)."""
    rng = np.random.default_rng(i)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    a = np.asarray(low, dtype=np.float32) + rng.standard_normal((h, w, 3), dtype=np.float32) * 12
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, **kw)
    return out.getvalue()


def rotated_jpeg(i: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    return jpeg_bytes(synth(i, 90, 60), exif=exif.tobytes())


ODD = {  # file name -> bytes that the GPU decoder leaves to the CPU path
    "odd_png.png": lambda: (lambda b: (synth(50, 70, 50).save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
    "odd_gray.jpg": lambda: jpeg_bytes(synth(51, 70, 50).convert("L")),
    "odd_cmyk.jpg": lambda: jpeg_bytes(synth(52, 70, 50).convert("CMYK")),
    "odd_exif.jpg": lambda: rotated_jpeg(53),
    "odd_strip.jpg": lambda: jpeg_bytes(synth(54, 400, 20)),  # 20 x 400 -> 28 x 560 > 8 x 28: PIL's box resize
}


def make_jpeg_pairs(root: Path, n: int = 10, odd: bool = False, broken: bool = False) -> Path:
    """A JSONL pair set of n JPEGs of a few sizes (two share one, so a resize batch has two), plus
    the odd files above and a truncated JPEG."""
    root.mkdir(parents=True, exist_ok=True)
    files = {f"img{i:03d}.jpg": jpeg_bytes(synth(i, 60 + 9 * (i % 3), 45 + 5 * i)) for i in range(n)}
    files["twin.jpg"] = jpeg_bytes(synth(99, 60, 45))
    if odd:
        files.update({name: make() for name, make in ODD.items()})
    if broken:
        files["broken.jpg"] = jpeg_bytes(synth(98, 80, 60))[:300]  # no end marker: the CPU path names it
    rows = []
    for name, data in files.items():
        (root / name).write_bytes(data)
        rows.append({"image": name, "caption": f"a picture {name}.", "split": "train"})
    out = root / "pairs.jsonl"
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


@pytest.fixture()
def hook(monkeypatch):
    monkeypatch.setenv(gpu_decode.CPU_HOOK_ENV, "1")


def _cfg(model, pairs, cache_dir, **kw):
    kw = {"batch_size": 4, "chunk_rows": 8, "splits": ["train"], "device": "cpu", **kw}
    return ExtractConfig(model=f"hf:{model}", dataset=str(pairs), cache_dir=cache_dir, **kw)


def _rows(path) -> dict[str, np.ndarray]:
    store = FeatureStore.open(path)
    return {layer: store.read(layer, np.float32) for layer in store.layers}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


# -- the identity ------------------------------------------------------------------------------
def test_the_cpu_path_keeps_mains_identity_and_command(tiny_vit, tmp_path):
    pairs = make_jpeg_pairs(tmp_path / "data", n=4)
    store = FeatureStore.open(extract(_cfg(tiny_vit, pairs, tmp_path / "cache"))[0].path)
    prep = store.identity["encoder"]["preprocessing"]
    assert prep == {"image_size": 28, "resize": "shorter-side bicubic", "crop": "center",
                    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "background": "white"}
    assert "--decode" not in store.attrs["command"]


def test_gpu_decoding_on_the_cpu_hook_makes_a_complete_store_close_to_pil(tiny_vit, tmp_path, hook):
    pairs = make_jpeg_pairs(tmp_path / "data", n=10)
    cpu = extract(_cfg(tiny_vit, pairs, tmp_path / "cpu"))[0]
    gpu = extract(_cfg(tiny_vit, pairs, tmp_path / "gpu", decode="gpu", num_workers=2))[0]
    store = FeatureStore.open(gpu.path)
    assert store.is_complete() and gpu.missing_rows == 0 and gpu.computed_rows == cpu.computed_rows == 11
    assert store.identity["encoder"]["preprocessing"]["decode"] == "torchvision-cpu"
    assert {k: v for k, v in store.identity["encoder"]["preprocessing"].items() if k != "decode"} == \
        FeatureStore.open(cpu.path).identity["encoder"]["preprocessing"]
    assert store.attrs["command"].endswith("--decode gpu")
    want, got = _rows(cpu.path), _rows(gpu.path)
    for layer in want:
        assert _cosines(want[layer], got[layer]).min() > 0.99, layer
    assert any(not np.array_equal(want[n], got[n]) for n in want)  # really another decoder's pixels


def test_pixels_are_within_a_fraction_of_a_level_of_pils():
    """Measured: 0.10 / 0.16 / 0.20 mean |diff| (0..255) at 28 / 56 / 224 px with libjpeg-turbo,
    whose decode equals PIL's, so all of it is resampling. nvJPEG adds its own IDCT and chroma
    upsampling: 1.3 on the H200 for 500 x 375 JPEGs (docs/benchmarks.md)."""
    for size in (28, 224):
        blobs = [jpeg_bytes(synth(i, 100 + 13 * i, 80 + 7 * i)) for i in range(6)]
        got = gpu_decode.decode_squares([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs], size, CPU)
        want = pixels_of([decode_image(b, "x.jpg") for b in blobs], size)
        diff = (torch.stack(got).int() - want.int()).abs().float()
        assert got[0].shape == (3, size, size) and got[0].dtype == torch.uint8
        assert diff.mean() < 0.5 and diff.max() <= 16, (size, diff.mean(), diff.max())


# -- what the CPU path keeps ------------------------------------------------------------------
def test_odd_files_are_left_to_the_cpu_path_in_the_worker(tmp_path):
    for name, make in ODD.items():
        assert not gpu_decode.nvjpeg_ready(make(), 28), name
    assert gpu_decode.nvjpeg_ready(jpeg_bytes(synth(0, 60, 45)), 28)
    assert gpu_decode.nvjpeg_ready(jpeg_bytes(synth(0, 60, 45), progressive=True), 28)
    assert not gpu_decode.nvjpeg_ready(jpeg_bytes(synth(0, 60, 45))[:200], 28)


def test_odd_files_give_the_cpu_paths_features_bitwise(tiny_vit, tmp_path, hook):
    pairs = make_jpeg_pairs(tmp_path / "data", n=3, odd=True)
    cpu, gpu = (extract(_cfg(tiny_vit, pairs, tmp_path / d, decode=d))[0] for d in ("cpu", "gpu"))
    ids = FeatureStore.open(cpu.path).ids
    assert FeatureStore.open(gpu.path).ids == ids
    odd = [i for i, name in enumerate(ids) if "odd_" in name]
    assert len(odd) == len(ODD)
    want, got = _rows(cpu.path), _rows(gpu.path)
    for layer in want:
        assert np.array_equal(want[layer][odd], got[layer][odd]), layer


def test_a_broken_file_fails_or_is_skipped_as_on_the_cpu_path(tiny_vit, tmp_path, hook):
    pairs = make_jpeg_pairs(tmp_path / "data", n=3, broken=True)
    messages = []
    for decode in ("cpu", "gpu"):
        with pytest.raises(FeatcacheError) as err:
            extract(_cfg(tiny_vit, pairs, tmp_path / f"stop-{decode}", decode=decode))
        messages.append(str(err.value.message))
    assert messages[0] == messages[1] and "broken.jpg" in messages[0]
    cpu, gpu = (extract(_cfg(tiny_vit, pairs, tmp_path / f"skip-{d}", decode=d, skip_bad=True))[0]
                for d in ("cpu", "gpu"))
    assert gpu.missing_rows == cpu.missing_rows == 1
    assert np.array_equal(FeatureStore.open(gpu.path).missing, FeatureStore.open(cpu.path).missing)


def test_a_jpeg_the_decoder_rejects_goes_through_pil_on_the_main_thread(tmp_path):
    """A file that passes the header check but not the decoder: decoded by PIL, or reported as
    PIL reports it, with the other rows of its batch kept."""
    good, other = jpeg_bytes(synth(1, 70, 50)), jpeg_bytes(synth(2, 50, 70))
    garbage = b"\xff\xd8\xff" + bytes(200) + b"\xff\xd9"
    paths = {0: "good.jpg", 1: "garbage.jpg", 2: "other.jpg"}
    side = type("Side", (), {"decode": staticmethod(lambda row, data: decode_image(data, paths[row]))})()
    blobs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (good, garbage, other)]
    errors: dict = {}
    pix = gpu_decode.finish([0, 1, 2], gpu_decode.JpegBatch(None, [], blobs, [0, 1, 2]), errors, side,
                            lambda images: pixels_of(images, 28), 28, CPU)
    assert list(errors) == [1] and "garbage.jpg" in errors[1] and pix.shape == (2, 3, 28, 28)
    assert torch.equal(pix[1], gpu_decode.decode_squares([blobs[2]], 28, CPU)[0])


# -- never mixed --------------------------------------------------------------------------------
def test_a_cpu_decoded_store_is_not_reused_by_a_gpu_decoded_extraction(tiny_vit, tmp_path, hook):
    pairs = make_jpeg_pairs(tmp_path / "data", n=4)
    extract(_cfg(tiny_vit, pairs, tmp_path / "cache"))
    with pytest.raises(FeatcacheError) as err:
        extract(_cfg(tiny_vit, pairs, tmp_path / "cache", decode="gpu"))
    assert "preprocessing" in str(err.value)
    result = extract(_cfg(tiny_vit, pairs, tmp_path / "cache", decode="gpu", overwrite=True))[0]
    assert FeatureStore.open(result.path).identity["encoder"]["preprocessing"]["decode"] == "torchvision-cpu"
    with pytest.raises(FeatcacheError):  # and back: a GPU-decoded store is not taken for a CPU one
        extract(_cfg(tiny_vit, pairs, tmp_path / "cache"))


# -- the option --------------------------------------------------------------------------------
def test_decode_gpu_without_cuda_is_one_line_naming_both_options(tiny_vit, tmp_path, monkeypatch):
    monkeypatch.delenv(gpu_decode.CPU_HOOK_ENV, raising=False)
    pairs = make_jpeg_pairs(tmp_path / "data", n=2)
    with pytest.raises(FeatcacheError) as err:
        extract(_cfg(tiny_vit, pairs, tmp_path / "cache", decode="gpu"))
    assert "--decode gpu" in err.value.message and "--device cpu" in err.value.message
    with pytest.raises(FeatcacheError, match="--decode 'fast'"):
        extract(_cfg(tiny_vit, pairs, tmp_path / "cache", decode="fast"))
    out = CliRunner().invoke(app, ["extract", "--model", f"hf:{tiny_vit}", "--dataset", str(pairs), "--device", "cpu",
                                   "--decode", "gpu", "--cache-dir", str(tmp_path / "cache")])
    assert out.exit_code != 0 and "--decode gpu" in out.output and "Traceback" not in out.output
    assert not (tmp_path / "cache").exists()


def test_a_model_with_its_own_image_processor_is_refused(tmp_path, hook):
    from test_own_encoders import save_vision_model

    processor = {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2, "do_normalize": True,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "ViTImageProcessor"}
    model = save_vision_model(tmp_path / "vit", "vit", processor)
    pairs = make_jpeg_pairs(tmp_path / "data", n=2)
    with pytest.raises(FeatcacheError, match="own ViTImageProcessor") as err:
        extract(_cfg(model, pairs, tmp_path / "cache", decode="gpu"))
    assert "drop --decode gpu" in err.value.hint
