"""featcache benchmarks: every ratio is measured side by side in one run.

    .venv/bin/python benchmarks/run.py [--only NAME ...] [--quick] [--out bench-out/benchmarks.json]
    .venv/bin/python benchmarks/run.py --only scale [--scale-full]   # stage two against cache size
    .venv/bin/python benchmarks/run.py --only layer_target           # 13 x 7 layers at n = 50k

Each benchmark prints its figures and ratio; all results go to one JSON file. Beside it,
step_profile.py (where a training step's time goes), stacked_drift.py (stacked against
sequential sweep cells on one device) and inputs.py (reading users' inputs); research_loop.py
holds the whole-command figures of batch evaluation and threads, run from here.
Numbers belong in docs/benchmarks.md together with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from research_loop import bench_batch_eval, bench_threads

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
MODEL, DEVICE, SWEEP_EPOCHS = "dinov2", "cpu", None  # set from --model/--device/--sweep-epochs


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_extraction(quick: bool) -> dict:
    """Extraction (decode, forward, pool, float16 zarr writes) against the bare forward pass."""
    from featcache.cache.store import FeatureStore
    from featcache.pipeline.data.catalog import load_dataset
    from featcache.pipeline.extract.loading import load_encoder
    from featcache.pipeline.extract.run import ExtractConfig, extract
    from featcache.pipeline.extract.run import chunk_batches as _batches

    n = 64 if quick else 256
    batch = 32
    enc = load_encoder(MODEL, DEVICE)
    split = load_dataset("tuxpaint")["train"].limited(n)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExtractConfig(model=MODEL, dataset="tuxpaint", splits=["train"], limit=n, batch_size=batch,
                            cache_dir=Path(tmp), device=DEVICE)
        images = [split.images.load(i) for i in range(n)]  # warm the file cache for both sides
        enc.forward(enc.prepare_images(images[:batch]), ["block.11"], "cls")  # warm-up
        # The first extract in a process also pays one-time imports and initialisation (zarr,
        # cairosvg, the registry; 0.7 s here), as the bare forward's warm-up paid torch's: warmed
        # too, on two rows in another cache, and reported on its own.
        t_first = timed(lambda: extract(replace(cfg, limit=2, cache_dir=Path(tmp) / "warm-up")))
        t_extract = timed(lambda: (shutil.rmtree(Path(tmp) / "tuxpaint", ignore_errors=True), extract(cfg)))
        store = FeatureStore.open(next(Path(tmp).rglob("*.zarr")))
        batches = _batches(store, list(range(store.n_chunks)), batch)

        def forward(x):
            with torch.inference_mode(), enc._autocast():
                x = x.to(enc.device)
                enc.model(x) if enc.entry.backend == "timm" else enc.model(pixel_values=x)
            if enc.device.type == "cuda":
                torch.cuda.synchronize()

        def bare_with_decode():
            for rows in batches:
                forward(enc.prepare_images([split.images.load(r) for r in rows]))

        prepared = [enc.prepare_images([images[r] for r in rows]) for rows in batches]

        def bare_model_only():
            for x in prepared:
                forward(x)

        t_bare_decode = timed(bare_with_decode)
        t_bare = timed(bare_model_only)
        layers = len(store.layers)
        on_disk = store.nbytes_on_disk() / n
        fp32 = layers * store.width * 4
    out = {
        "rows": n, "batch": batch, "layers": layers, "extract_s": t_extract,
        "bare_forward_with_decode_s": t_bare_decode, "bare_forward_model_only_s": t_bare,
        "ratio_vs_forward_with_decode": t_extract / t_bare_decode, "ratio_vs_model_only": t_extract / t_bare,
        "rows_per_s": n / t_extract, "first_extract_in_process_2_rows_s": t_first, "bytes_per_row": on_disk, "fp32_bytes_per_row": fp32,
        "bytes_ratio_vs_fp32": on_disk / fp32,
    }
    print(f"extraction: {n} tuxpaint images, {MODEL} on {DEVICE}, 224px, all {layers} layers, batch {batch}")
    print(f"  extract {t_extract:.2f}s | bare forward incl. decode {t_bare_decode:.2f}s | model only {t_bare:.2f}s "
          f"| first extract in the process (2 rows, warm-up) {t_first:.2f}s")
    print(f"  ratio vs bare forward incl. decode {out['ratio_vs_forward_with_decode']:.3f}; "
          f"vs model only {out['ratio_vs_model_only']:.3f}; {out['rows_per_s']:.1f} rows/s")
    print(f"  on disk {on_disk:.0f} B/row vs fp32 {fp32} B/row: ratio {out['bytes_ratio_vs_fp32']:.3f}")
    return out


def bench_layer_table(quick: bool) -> dict:
    """All-pairs mutual-kNN table (one kNN search per layer) against per-pair recomputation."""
    from featcache.pipeline.select.table import mutual_knn, rice_k, score_table

    n = 1000 if quick else 5000
    rng = np.random.default_rng(0)
    base = rng.normal(size=(n, 64)).astype(np.float32)
    img = {f"block.{i:02d}": base @ rng.normal(size=(64, 384)).astype(np.float32) + rng.normal(size=(n, 384)).astype(np.float32)
           for i in range(13)}
    txt = {f"block.{i:02d}": base @ rng.normal(size=(64, 384)).astype(np.float32) + rng.normal(size=(n, 384)).astype(np.float32)
           for i in range(7)}
    k = rice_k(n)
    t_table = timed(lambda: score_table(img, txt, k=k))
    t_pairs = timed(lambda: [mutual_knn(a, b, k) for a in img.values() for b in txt.values()])
    out = {"rows": n, "k": k, "image_layers": 13, "text_layers": 7, "table_s": t_table, "per_pair_s": t_pairs,
           "speedup": t_pairs / t_table}
    print(f"layer table: 13 x 7 layers, {n} rows, k={k}: table {t_table:.2f}s, per pair {t_pairs:.2f}s, "
          f"speedup {out['speedup']:.1f}x")
    return out


def _loss_step(model, opt, xi, xt, rs) -> None:
    """One optimiser step of the CLIP loss, plus 10 x R_S through ``rs`` when given, on a fixed
    batch; it waits for the GPU, so a timer around it times the step."""
    from featcache.pipeline.common.losses import clip_loss

    zi, zt = model(xi, xt)
    loss = clip_loss(zi, zt, 0.05)
    if rs:
        loss = loss + 10 * (rs(xi, zi, 0.05) + rs(xt, zt, 0.05)) / 2
    opt.zero_grad()
    loss.backward()
    opt.step()
    if xi.is_cuda:
        torch.cuda.synchronize()


def _step_fixture(batch: int):
    """A fixed batch of ``batch`` pairs of width 384 on DEVICE, linear heads 384 -> 512 with
    AdamW, and ``step(rs)``: one timed optimiser step (see _loss_step)."""
    from featcache.pipeline.train.heads import AlignmentModel

    torch.manual_seed(0)
    xi, xt = torch.randn(batch, 384, device=DEVICE), torch.randn(batch, 384, device=DEVICE)
    model = AlignmentModel("linear", 384, 384, 512, 0.05, False).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return lambda rs: _loss_step(model, opt, xi, xt, rs)


def bench_train_step(quick: bool) -> dict:
    """One optimiser step with clip+structure against clip alone, at batch 4,096: R_S as trained
    (fused, closed-form gradient, elementwise core compiled: ``--compile auto``), the same eager
    (``--compile off``), and the earlier form (autograd through log space, still the path of
    levels > 1)."""
    from featcache.pipeline.common.losses import multilevel, structure_regularizer, walk_log_probs

    b = 1024 if quick else 4096
    step = _step_fixture(b)
    forms = {
        "fused_compiled": lambda x, z, tau: structure_regularizer(x, z, tau, compiled=True),
        "fused_eager": structure_regularizer,
        "autograd_log_space": lambda x, z, tau: multilevel(walk_log_probs(x.detach(), tau), walk_log_probs(z, tau), 1, "none",
                                                            "reference", 0.0),
    }
    t = time.perf_counter()
    step(forms["fused_compiled"])  # compiles the core (once per process)
    t_first = time.perf_counter() - t
    for rs in forms.values():
        step(rs)
    repeats = 25 if DEVICE.startswith("cuda") else 5  # a GPU step takes milliseconds: more samples
    times = [[timed(lambda: step(None))] + [timed(lambda: step(rs)) for rs in forms.values()]
             for _ in range(repeats)]
    t_clip, *t_forms = (float(np.median(t)) for t in zip(*times))  # alternating, median
    out = {"batch": b, "device": DEVICE, "repeats": repeats, "clip_step_s": t_clip, "first_compiled_step_s": t_first}
    for name, t_form in zip(forms, t_forms):
        out[f"{name}_step_s"], out[f"ratio_{name}"] = t_form, t_form / t_clip
    print(f"train step at batch {b} on {DEVICE}: clip {t_clip * 1000:.0f} ms; clip+structure "
          + ", ".join(f"{n.replace('_', ' ')} {out[f'{n}_step_s'] * 1000:.0f} ms ({out[f'ratio_{n}']:.2f}x)"
                      for n in forms) + f"; the first compiled step {t_first:.1f}s")
    return out


def bench_sweep(quick: bool) -> dict:
    """The 12-cell grid (layers x loss x 3 seeds) from the cache, against one run."""
    from featcache.pipeline.train.config import AlignConfig
    from featcache.pipeline.train.loop import train
    from featcache.pipeline.train.plan import load_cached
    from featcache.pipeline.train.sweep import sweep

    epochs = 30 if quick else 200
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AlignConfig(runs_dir=Path(tmp), epochs=epochs, patience=epochs)
        try:
            load_cached(cfg)
        except Exception as err:
            print(f"sweep: skipped ({err}); extract dinov2 and minilm on tuxpaint first")
            return {"skipped": str(err)}
        t_one = timed(lambda: train(cfg))
        t_grid = timed(lambda: sweep(cfg, ["last", "auto"], ["clip", "clip+structure"], [0, 1, 2], rerun=True))
    out = {"epochs": epochs, "one_run_s": t_one, "grid_12_s": t_grid, "ratio": t_grid / t_one}
    print(f"sweep: 12 cells x {epochs} epochs on tuxpaint: one run {t_one:.1f}s, grid {t_grid:.1f}s, "
          f"ratio {out['ratio']:.1f} (12 would be no sharing)")
    return out


def bench_retrieval(quick: bool) -> dict:
    """faiss retrieval recall at gallery 10k, 100k, 1M against a full-matrix sort."""
    from featcache.pipeline.evaluate.metrics import retrieval_recall, retrieval_recall_full

    sizes = [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]
    q_n = 500
    rng = np.random.default_rng(0)
    results = []
    for n in sizes:
        gallery = rng.normal(size=(n, 512)).astype(np.float32)
        gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
        src = rng.integers(0, n, size=q_n)
        query = gallery[src] + 0.05 * rng.normal(size=(q_n, 512)).astype(np.float32)
        positives = [{int(s)} for s in src]
        t_fast = timed(lambda: retrieval_recall(query, gallery, positives))
        t_full = timed(lambda: retrieval_recall_full(query, gallery, positives))
        results.append({"gallery": n, "queries": q_n, "faiss_s": t_fast, "full_sort_s": t_full,
                        "speedup": t_full / t_fast})
        print(f"retrieval: gallery {n:>9,}, {q_n} queries, d=512: faiss {t_fast:.2f}s, full sort {t_full:.2f}s, "
              f"speedup {t_full / t_fast:.1f}x")
    return {"results": results}


def bench_checksum_read(quick: bool) -> dict:
    """Reading a layer: featcache's checked read (crc32c per chunk, chunk presence, seals), whole
    and chunk by chunk (as training reads row subsets), against a bare zarr read of the same
    float16 data stored with zstd and no checksum."""
    import zarr
    from zarr.codecs import ZstdCodec

    from featcache.cache.store import FeatureStore

    rows, width, layers = (5_000 if quick else 50_000), 384, 13
    rng = np.random.default_rng(0)
    data = rng.standard_normal((rows, width)).astype(np.float16)
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore.create_or_open(Path(tmp) / "checked.zarr", identity={}, versions={},
                                            ids=[str(i) for i in range(rows)], groups=["g"] * rows, texts=None,
                                            width=width)
        names = [f"block.{i:02d}" for i in range(layers)]
        store.ensure_layers(names)
        for b in range(store.n_chunks):
            sl = store.chunk_slice(b)
            store.write_chunk(b, {n: data[sl] for n in names}, np.zeros(sl.stop - sl.start, dtype=bool))
        plain = zarr.open_group(f"{tmp}/plain.zarr", mode="w")
        for n in names:
            plain.create_array(n, shape=data.shape, dtype="float16", chunks=(store.chunk_rows, width),
                               compressors=[ZstdCodec(level=0)])[:] = data
        checked = lambda: [store.read(n) for n in names]  # codec + chunk presence + seals
        chunked = lambda: [np.concatenate([rows for _, rows in store.read_chunks(n, range(store.n_chunks), np.float32)])
                           for n in names]
        codec = lambda: [np.asarray(store.group[f"layers/{n}"][:], dtype=np.float32) for n in names]
        bare = lambda: [np.asarray(plain[n][:], dtype=np.float32) for n in names]
        checked(), chunked(), codec(), bare()  # warm the page cache for all four
        times = [(timed(checked), timed(chunked), timed(codec), timed(bare)) for _ in range(5)]  # alternating
        t_checked, t_chunked, t_codec, t_plain = (float(np.median(t)) for t in zip(*times))  # median of 5
    out = {"rows": rows, "width": width, "layers": layers, "checked_s": t_checked, "chunked_s": t_chunked,
           "crc32c_codec_s": t_codec, "plain_s": t_plain, "ratio": t_checked / t_plain,
           "chunked_ratio": t_chunked / t_plain, "codec_ratio": t_codec / t_plain}
    print(f"checksum read: {layers} layers x {rows:,} rows x {width}: featcache read {t_checked:.2f}s "
          f"({t_chunked:.2f}s chunk by chunk), zarr read with crc32c {t_codec:.2f}s, without {t_plain:.2f}s; "
          f"ratios {out['ratio']:.2f} (all checks), {out['chunked_ratio']:.2f} (chunk by chunk), "
          f"{out['codec_ratio']:.2f} (crc32c alone)")
    return out


def bench_scaling(quick: bool) -> dict:
    """Extraction throughput: 1 process against torchrun --nproc_per_node 2 (gloo) on the same rows."""
    import socket
    import subprocess
    import sys

    n = 64 if quick else 192
    out = {"rows": n}
    with tempfile.TemporaryDirectory() as tmp:
        base = ["-m", "featcache.cli.main", "extract", "--model", "dinov2", "--split", "train", "--limit", str(n),
                "--chunk-rows", "32", "--batch-size", "16"]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        runs = {
            "one_process": [sys.executable, *base, "--cache-dir", f"{tmp}/one"],
            "torchrun_2": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), *base, "--cache-dir", f"{tmp}/two"],
        }
        for name, cmd in runs.items():
            t = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            out[f"{name}_s"] = time.perf_counter() - t
    out["speedup"] = out["one_process_s"] / out["torchrun_2_s"]
    print(f"scaling: {n} tuxpaint images, whole command incl. start-up: 1 process {out['one_process_s']:.1f}s, "
          f"torchrun 2 processes {out['torchrun_2_s']:.1f}s, throughput ratio {out['speedup']:.2f}")
    return out


def bench_vectorized_sweep(quick: bool) -> dict:
    """Seeds x lambda grids on Tux Paint (12 and 96 cells, clip+structure, one layer pair) trained
    as stacked cells (vectorised sweep) and one by one, against one run of the same config."""
    from featcache.pipeline.train.config import AlignConfig
    from featcache.pipeline.train.loop import train
    from featcache.pipeline.train.plan import load_cached
    from featcache.pipeline.train.sweep import sweep

    epochs = SWEEP_EPOCHS or (2 if quick else 10)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AlignConfig(runs_dir=Path(tmp), epochs=epochs, patience=epochs, loss="clip+structure", layers="auto",
                          device=DEVICE)
        try:
            load_cached(cfg)
        except Exception as err:
            print(f"vectorized_sweep: skipped ({err}); extract dinov2 and minilm on tuxpaint first")
            return {"skipped": str(err)}
        grid12 = dict(seeds=[0, 1, 2], grid={"lam": [1.0, 3.0, 10.0, 30.0]})
        grid96 = dict(seeds=list(range(8)), grid={"lam": [1.0, 3.0, 10.0, 30.0], "temperature": [0.03, 0.05, 0.1]})
        run = lambda g, vec: sweep(cfg, ["auto"], ["clip+structure"], g["seeds"], grid=g["grid"], vectorize=vec,
                                rerun=True)  # timed: every cell trains, finished or not
        train(replace(cfg, epochs=1))  # device start-up (CUDA context, cuBLAS) is not one run's time
        t_one = timed(lambda: train(cfg))
        runs = {}
        t_vec12 = timed(lambda: runs.setdefault("vec", run(grid12, True)))
        t_seq12 = timed(lambda: runs.setdefault("seq", run(grid12, False)))
        t_vec96 = timed(lambda: run(grid96, True)) if SWEEP_96 else None
        best = {m: [json.loads((r / "summary.json").read_text())["best_val"] for r in runs[m]] for m in runs}
        best_diff = max(abs(a - b) for a, b in zip(best["vec"], best["seq"]))
    out = {"epochs": epochs, "one_run_s": t_one, "grid12_vectorized_s": t_vec12, "grid12_sequential_s": t_seq12,
           "grid12_max_best_val_diff": best_diff,
           "grid96_vectorized_s": t_vec96, "ratio12_vectorized": t_vec12 / t_one, "ratio12_sequential": t_seq12 / t_one,
           "ratio96_vectorized": t_vec96 / t_one if t_vec96 else None}
    print(f"vectorized sweep: {epochs} epochs, tuxpaint, clip+structure, auto layers: one run {t_one:.1f}s; "
          f"12 cells stacked {t_vec12:.1f}s ({out['ratio12_vectorized']:.1f}x), one by one {t_seq12:.1f}s "
          f"({out['ratio12_sequential']:.1f}x); 96 cells stacked "
          + (f"{t_vec96:.1f}s ({out['ratio96_vectorized']:.1f}x)" if t_vec96 else "not run")
          + f"; stacked and one-by-one best validation losses differ by at most {best_diff:.1e}")
    return out


def bench_structure_compile(quick: bool) -> dict:
    """A clip+structure step with R_S eager and through torch.compile, against a clip step
    (linear heads 384 -> 512; alternating, median of 3; compile time reported apart)."""
    from featcache.pipeline.common.losses import maybe_compile, structure_regularizer

    b = 1024 if quick else 4096
    step = _step_fixture(b)
    compiled = maybe_compile(structure_regularizer, True)

    t_compile = timed(lambda: step(compiled))  # the first call compiles (forward and backward)
    step(structure_regularizer)
    times = [(timed(lambda: step(None)), timed(lambda: step(structure_regularizer)), timed(lambda: step(compiled)))
             for _ in range(3)]
    t_clip, t_eager, t_comp = (float(np.median(t)) for t in zip(*times))
    out = {"batch": b, "device": DEVICE, "clip_step_s": t_clip, "eager_structure_step_s": t_eager,
           "compiled_structure_step_s": t_comp, "first_compiled_step_s": t_compile,
           "ratio_eager": t_eager / t_clip, "ratio_compiled": t_comp / t_clip}
    print(f"R_S compile at batch {b} on {DEVICE}: clip {t_clip * 1000:.0f} ms; clip+structure eager "
          f"{t_eager * 1000:.0f} ms ({out['ratio_eager']:.2f}x), compiled {t_comp * 1000:.0f} ms "
          f"({out['ratio_compiled']:.2f}x); first compiled step {t_compile:.1f}s")
    return out


def bench_s3(quick: bool) -> dict:
    """Extraction into s3:// (moto's S3 server on 127.0.0.1, through s3fs) against a local directory,
    same rows, alternating, best of 2; then reading every layer back from each."""
    import logging
    import uuid

    import s3fs
    from moto.server import ThreadedMotoServer

    from featcache.cache.store import FeatureStore, find_stores
    from featcache.pipeline.data.catalog import load_dataset
    from featcache.pipeline.extract.loading import load_encoder
    from featcache.pipeline.extract.run import ExtractConfig, extract

    n, batch = (32 if quick else 128), 32
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    fs = s3fs.S3FileSystem()
    try:
        enc = load_encoder(MODEL, DEVICE)
        split = load_dataset("tuxpaint")["train"].limited(n)
        images = [split.images.load(i) for i in range(n)]  # warm the file cache
        enc.forward(enc.prepare_images(images[:batch]), ["block.11"], "cls")  # warm-up
        times = {"local": [], "s3": []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(2):
                for kind in ("local", "s3"):
                    if kind == "s3":
                        bucket = f"bench-{uuid.uuid4().hex[:8]}"
                        fs.mkdir(bucket)
                        cache = f"s3://{bucket}/cache"
                    else:
                        cache = Path(tmp) / uuid.uuid4().hex[:8]
                    cfg = ExtractConfig(model=MODEL, dataset="tuxpaint", splits=["train"], limit=n, batch_size=batch,
                                        cache_dir=cache, device=DEVICE)
                    times[kind].append(timed(lambda: extract(cfg)))
                    store = FeatureStore.open(next(find_stores(cache)))
                    times[kind + "_read"] = timed(lambda: [store.read(name) for name in store.layers])
                    objects = len(fs.find(str(store.path))) if kind == "s3" else None
        layers = len(store.layers)
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    t_local, t_s3 = min(times["local"]), min(times["s3"])
    out = {"rows": n, "batch": batch, "layers": layers, "objects_per_store": objects,
           "local_extract_s": t_local, "s3_extract_s": t_s3, "ratio": t_s3 / t_local,
           "local_runs_s": times["local"], "s3_runs_s": times["s3"],
           "local_read_s": times["local_read"], "s3_read_s": times["s3_read"],
           "read_ratio": times["s3_read"] / times["local_read"]}
    print(f"s3: {n} tuxpaint images, {MODEL} on {DEVICE}, all {layers} layers, batch {batch}: extract into a local "
          f"directory {t_local:.2f}s, into s3:// (moto on 127.0.0.1) {t_s3:.2f}s, ratio {out['ratio']:.3f}; "
          f"reading every layer back {times['local_read']:.2f}s vs {times['s3_read']:.2f}s ({objects} objects)")
    return out




# -- stage two at scale (issue 12, parts 4 and 5) ------------------------------------------------
def _layered(n: int, width: int, layers: int, peak: int, seed: int) -> dict[str, np.ndarray]:
    """Synthetic layers of one modality: a shared 64-d signal whose weight rises to a peak layer
    and falls after it, plus isotropic noise, so the table has a best pair and near rivals."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(12345).normal(size=(n, 64)).astype(np.float32)  # shared by both sides
    out = {}
    for i in range(layers):
        signal = 1.0 - abs(i - peak) / layers
        out[f"block.{i:02d}"] = (signal * (base @ rng.normal(size=(64, width)).astype(np.float32) / 8)
                                 + rng.normal(size=(n, width)).astype(np.float32))
    return out


def bench_layer_target(quick: bool) -> dict:
    """The layer-table target: 13 x 7 layers, width 384, n = 50k, exact search against exact
    neighbours of QUERIES random rows (every pair's score and the best pair compared)."""
    from featcache.pipeline.select.metrics import prepare
    from featcache.pipeline.select.table import score_table

    n, queries = (10_000, 2_000) if quick else (LAYER_TARGET_N, LAYER_TARGET_QUERIES)
    img, txt = _layered(n, 384, 13, 9, 1), _layered(n, 384, 7, 4, 2)
    t = time.perf_counter()
    sub = score_table(img, txt, queries=queries)
    t_sub = time.perf_counter() - t
    if LAYER_QUERIES_ONLY:
        out = {"rows": n, "k": sub.k, "queries": queries, "queries_s": t_sub, "best_queries": sub.best(),
               "query_scores": sub.scores}
        print(f"layer target: 13 x 7 layers, n={n:,}, width 384, k={sub.k}: exact neighbours of {queries:,} query "
              f"rows {t_sub:.1f}s (exact table not run); best pair {sub.best()}")
        return out
    t = time.perf_counter()
    exact = score_table(img, txt)
    t_exact = time.perf_counter() - t
    diff = np.abs(np.asarray(sub.scores) - np.asarray(exact.scores))
    # one pair's overlap, the earlier k x k comparison against the sorted-key intersection
    a, b = prepare(img["block.09"], "mutual_knn", exact.k), prepare(txt["block.04"], "mutual_knn", exact.k)
    from featcache.pipeline.select.metrics import mutual_knn_score
    t_kk = timed(lambda: (a.nn[:, :, None] == b.nn[:, None, :]).any(-1).sum(-1).mean())
    t_keys = timed(lambda: mutual_knn_score(a, b))
    out = {"rows": n, "k": exact.k, "queries": queries, "exact_s": t_exact, "queries_s": t_sub,
           "speedup": t_exact / t_sub, "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
           "best_exact": exact.best(), "best_queries": sub.best(), "best_same": exact.best() == sub.best(),
           "best_score": exact.score(*exact.best()), "pair_overlap_kxk_s": t_kk, "pair_overlap_keys_s": t_keys,
           "exact_scores": exact.scores, "query_scores": sub.scores}
    print(f"layer target: 13 x 7 layers, n={n:,}, width 384, k={exact.k}: exact {t_exact:.1f}s; "
          f"exact neighbours of {queries:,} query rows {t_sub:.1f}s ({out['speedup']:.1f}x)")
    print(f"  max |score - exact| {out['max_abs_diff']:.4f} (mean {out['mean_abs_diff']:.4f}); best pair "
          f"{exact.best()} exact, {sub.best()} from query rows: {'same' if out['best_same'] else 'DIFFERENT'}")
    print(f"  one pair's overlap: k x k comparison {t_kk:.3f}s, sorted-key intersection {t_keys:.3f}s")
    return out


LAYER_TARGET_N, LAYER_TARGET_QUERIES = 50_000, 5_000


SCALE_ROWS, SCALE_ROWS_FULL, SCALE_WIDTHS, SCALE_LAYERS = (10_000, 100_000), (10_000, 100_000, 600_000), (384, 1024), 25
# Above this many rows a store holds one layer per side: the epoch and retrieval read only the
# last one, and 25 layers of 600k x 1,024 on both sides would be 61 GB of float16. The layer
# table reads a fixed number of rows, so it is measured on the smaller stores.
SCALE_ALL_LAYERS_UP_TO = 100_000


def _write_store(path: Path, rows: int, width: int, layers: int, seed: int, groups=None) -> None:
    """A synthetic store written through the real writer (FeatureStore.write_chunk), chunk by
    chunk: a random chunk per call, each layer a column rotation of it (distinct neighbours,
    no big arrays in memory)."""
    from featcache.cache.store import FeatureStore

    names = [f"block.{i:02d}" for i in range(layers)]
    identity = {"seed": seed, "encoder": {"name": f"synthetic-{seed}", "layers": names}}
    store = FeatureStore.create_or_open(path, identity=identity, versions={}, ids=[str(i) for i in range(rows)],
                                        groups=groups or [str(i) for i in range(rows)], texts=None, width=width)
    store.ensure_layers(names)
    rng = np.random.default_rng(seed)
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        chunk = rng.standard_normal((sl.stop - sl.start, width), dtype=np.float32)
        store.write_chunk(c, {n: np.roll(chunk, 7 * i, axis=1).astype(np.float16) for i, n in enumerate(names)},
                          np.zeros(sl.stop - sl.start, dtype=bool))


def _child(task: dict) -> dict:
    """One measured task in a fresh interpreter (peak RSS is its own): table, epoch or eval."""
    import resource

    from featcache.cache.store import FeatureStore

    t = time.perf_counter()
    kind = task["kind"]
    if kind == "table":
        from featcache.pipeline.select.table import LayerRows, score_table

        img, txt = FeatureStore.open(task["image"]), FeatureStore.open(task["text"])
        rows = np.sort(np.random.default_rng(0).permutation(img.rows)[:task["n"]])
        # as select_layers reads them: one layer at a time, read inside the table
        table = score_table(LayerRows(img, img.layers, rows), LayerRows(txt, txt.layers, rows),
                            queries=task.get("queries"))
        extra = {"k": table.k, "best": table.best()}
    elif kind == "epoch":  # one epoch of the real trainer (train.train) on every row of the store
        from featcache.pipeline.features import PairedFeatures
        from featcache.pipeline.train.config import AlignConfig
        from featcache.pipeline.train.loop import train
        from featcache.pipeline.train.plan import CachedData

        img, txt = FeatureStore.open(task["image"]), FeatureStore.open(task["text"])
        rows = np.arange(img.rows)
        val = rows[:min(5_000, img.rows // 10)]  # a fixed validation slice, scored once per epoch
        data = CachedData(PairedFeatures(img, txt, rows, rows), PairedFeatures(img, txt, val, val),
                          {"split": "synthetic"})
        with tempfile.TemporaryDirectory() as runs:
            cfg = AlignConfig(layers="last", loss=task["loss"], epochs=1, patience=1, batch_size=4096,
                              runs_dir=Path(runs), device=task.get("device", "cpu"))
            summary = json.loads((train(cfg, data) / "summary.json").read_text())
        extra = {"epoch_s": summary["seconds"], "steps": summary["steps"],
                 "features_bytes": 2 * img.rows * img.width * np.dtype(img.attrs["dtype"]).itemsize}
    elif kind == "eval":
        from featcache.pipeline.evaluate.metrics import retrieval_ranks

        img, txt = FeatureStore.open(task["image"]), FeatureStore.open(task["text"])
        xi, xt = img.read(img.layers[-1]), txt.read(txt.layers[-1])
        t_read = time.perf_counter() - t
        caption_of = np.arange(len(xt))  # caption j describes image j; the rest of the gallery is distractors
        t0 = time.perf_counter()
        r_t2i = retrieval_ranks(xt, xi, [{int(j)} for j in caption_of])
        i2t = [set() for _ in range(len(xi))]
        for j in caption_of:
            i2t[j].add(int(j))
        r_i2t = retrieval_ranks(xi, xt, i2t)
        extra = {"read_s": t_read, "retrieval_s": time.perf_counter() - t0, "queries": len(xt), "gallery": len(xi),
                 "t2i_r1": float((r_t2i < 1).mean()), "i2t_r1": float((r_i2t < 1).mean())}
    elif kind == "gallery":  # retrieval memory: 500 queries against a gallery made here
        from featcache.pipeline.evaluate.metrics import retrieval_ranks

        rng = np.random.default_rng(0)
        gallery = rng.standard_normal((task["n"], 512), dtype=np.float32)
        src = rng.integers(0, task["n"], size=500)
        query = gallery[src] + 0.05 * rng.standard_normal((500, 512), dtype=np.float32)
        t0 = time.perf_counter()
        ranks = retrieval_ranks(query, gallery, [{int(s)} for s in src], block=task.get("block") or 1 << 16)
        extra = {"retrieval_s": time.perf_counter() - t0, "gallery_bytes": gallery.nbytes,
                 "r1": float((ranks < 1).mean())}
    else:  # "imports": the interpreter with featcache, torch and faiss loaded, the floor of every peak
        import faiss  # noqa: F401

        import featcache.pipeline.layers  # noqa: F401
        extra = {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"s": time.perf_counter() - t, "peak_bytes": peak, **extra}


def _run_child(task: dict) -> dict:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(task)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"scale task {task} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _slope(xs, ys) -> float | None:
    """Log-log slope of ys against xs (least squares): 1 is linear growth."""
    pts = [(x, y) for x, y in zip(xs, ys) if y and y > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def bench_scale(quick: bool) -> dict:
    """Stage two against the cache size: stores of N rows (10k, 100k; 600k with --scale-full)
    at width 384 and 1,024, written through the real store API. Per store: the layer table
    (25 x 25 layers on 5k rows read from it; 50k rows too with --scale-full, as exact
    neighbours of 5k query rows), one epoch at batch 4,096 for clip and clip+structure, and
    per width retrieval at 5k captions x 25k images; each in a fresh process for its peak RSS."""
    sizes = (10_000,) if quick else (SCALE_ROWS_FULL if SCALE_FULL else SCALE_ROWS)
    widths = (384,) if quick else SCALE_WIDTHS
    layers = 4 if quick else SCALE_LAYERS
    table_n = [(2_000, None)] if quick else [(5_000, None)] + ([(50_000, 5_000)] if SCALE_FULL else [])
    floor = _run_child({"kind": "imports"})["peak_bytes"]
    out = {"sizes": list(sizes), "widths": list(widths), "layers": layers, "imports_peak_bytes": floor, "runs": []}
    print(f"scale: {layers} x {layers} layers; peak RSS of a process that only imports: {floor / 2**20:.0f} MiB")
    root = Path(tempfile.mkdtemp(prefix="featcache-scale-", dir=os.environ.get("FEATCACHE_SCALE_TMP")))
    try:
        for width in widths:
            for n in sizes:
                where = root / f"{n}x{width}"
                stored = layers if n <= SCALE_ALL_LAYERS_UP_TO else 1
                t = time.perf_counter()
                _write_store(where / "image.zarr", n, width, stored, 1)
                _write_store(where / "text.zarr", n, width, stored, 2)
                t_write = time.perf_counter() - t
                pair = {"image": str(where / "image.zarr"), "text": str(where / "text.zarr")}
                layer_bytes = n * width * 4
                row = {"rows": n, "width": width, "layers": stored, "write_s": t_write, "layer_fp32_bytes": layer_bytes}
                for rows, queries in table_n:
                    if rows <= n and stored == layers:
                        row[f"table_{rows}"] = _run_child({"kind": "table", "n": rows, "queries": queries, **pair})
                for loss in ("clip", "clip+structure"):
                    row[f"epoch_{loss}"] = e = _run_child({"kind": "epoch", "loss": loss, "device": DEVICE, **pair})
                    e["peak_above_imports_bytes"] = e["peak_bytes"] - floor
                    e["peak_above_imports_per_layer"] = e["peak_above_imports_bytes"] / layer_bytes
                out["runs"].append(row)
                tables = " ".join(f"table {r:,} rows {row[f'table_{r}']['s']:.1f}s "
                                  f"({row[f'table_{r}']['peak_bytes'] / 2**20:.0f} MiB)"
                                  for r, _ in table_n if f"table_{r}" in row)
                print(f"  N={n:>7,} w={width:>4}: written {t_write:.0f}s | {tables} | epoch clip "
                      f"{row['epoch_clip']['epoch_s']:.1f}s, clip+structure {row['epoch_clip+structure']['epoch_s']:.1f}s "
                      f"(peak {row['epoch_clip+structure']['peak_bytes'] / 2**20:.0f} MiB, above imports "
                      f"{row['epoch_clip+structure']['peak_above_imports_per_layer']:.2f}x one layer fp32 of "
                      f"{layer_bytes / 2**20:.0f} MiB)", flush=True)
                shutil.rmtree(where)
            where = root / f"eval{width}"
            _write_store(where / "image.zarr", 25_000 if not quick else 5_000, width, 1, 3)
            _write_store(where / "text.zarr", 5_000 if not quick else 1_000, width, 1, 4)
            out.setdefault("eval", {})[width] = ev = _run_child({"kind": "eval", "image": str(where / "image.zarr"),
                                                               "text": str(where / "text.zarr")})
            print(f"  retrieval w={width}: {ev['queries']:,} captions x {ev['gallery']:,} images, both ways "
                  f"{ev['retrieval_s']:.2f}s (read {ev['read_s']:.2f}s), peak {ev['peak_bytes'] / 2**20:.0f} MiB")
            shutil.rmtree(where)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    slopes = {}
    for width in widths:
        runs = [r for r in out["runs"] if r["width"] == width]
        xs = [r["rows"] for r in runs]
        for key, field in [(f"table_{r}", "s") for r, _ in table_n] + [
                ("epoch_clip", "epoch_s"), ("epoch_clip+structure", "epoch_s"), ("epoch_clip", "peak_bytes"),
                ("epoch_clip+structure", "peak_bytes")] + [(f"table_{r}", "peak_bytes") for r, _ in table_n]:
            have = [(x, r[key][field]) for x, r in zip(xs, runs) if key in r]
            slope = _slope(*zip(*have)) if len(have) > 1 else None
            if slope is not None:
                slopes[f"{key}.{field}@{width}"] = slope
    out["loglog_slopes"] = slopes
    print("  log-log slopes against N: " + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items()))
    return out


def bench_retrieval_memory(quick: bool) -> dict:
    """Peak RSS of retrieval (500 queries) at a 1M x 512 gallery (100k with --quick), above a
    process that only imports, against the gallery's own size."""
    n = 100_000 if quick else 1_000_000
    floor = _run_child({"kind": "imports"})["peak_bytes"]
    out = {"imports_peak_bytes": floor}
    for name, block in (("blocks", None), ("one_block", n)):  # one block: the earlier whole-gallery copies
        r = out[name] = _run_child({"kind": "gallery", "n": n, "block": block})
        r["above_imports_bytes"] = r["peak_bytes"] - floor
        r["ratio_to_gallery"] = r["above_imports_bytes"] / r["gallery_bytes"]
        print(f"retrieval memory ({name}): gallery {n:,} x 512 ({r['gallery_bytes'] / 2**30:.2f} GiB): peak above "
              f"imports {r['above_imports_bytes'] / 2**30:.2f} GiB = {r['ratio_to_gallery']:.2f}x the gallery; "
              f"search {r['retrieval_s']:.1f}s, R@1 {r['r1']:.3f}")
    return out


SCALE_FULL = False
SWEEP_96 = True
LAYER_QUERIES_ONLY = False


BENCHES = {"extraction": bench_extraction, "layer_table": bench_layer_table, "train_step": bench_train_step,
           "sweep": bench_sweep, "retrieval": bench_retrieval, "checksum_read": bench_checksum_read,
           "scaling": bench_scaling, "vectorized_sweep": bench_vectorized_sweep,
           "structure_compile": bench_structure_compile, "s3": bench_s3, "layer_target": bench_layer_target,
           "scale": bench_scale, "retrieval_memory": bench_retrieval_memory, "batch_eval": bench_batch_eval,
           "threads": bench_threads}
ON_REQUEST = ("layer_target", "scale", "retrieval_memory", "s3")  # minutes to tens of minutes: run with --only NAME


def main() -> None:
    global MODEL, DEVICE, SWEEP_EPOCHS, SWEEP_96, LAYER_QUERIES_ONLY, SCALE_FULL, LAYER_TARGET_N, LAYER_TARGET_QUERIES, SCALE_ROWS, SCALE_ROWS_FULL, SCALE_WIDTHS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(BENCHES))
    ap.add_argument("--quick", action="store_true", help="Smaller sizes, for a smoke run.")
    ap.add_argument("--out", type=Path, default=Path("bench-out/benchmarks.json"))
    ap.add_argument("--model", default="dinov2", help="Encoder of the extraction benchmark.")
    ap.add_argument("--device", default="cpu", help="Device of the extraction, step, sweep and scale benchmarks.")
    ap.add_argument("--sweep-epochs", type=int, default=None,
                    help="Epochs per cell of vectorized_sweep (default 10, 2 with --quick; the 8.8x of the "
                         "sequential sweep was measured at 200).")
    ap.add_argument("--no-sweep-96", action="store_true",
                    help="vectorized_sweep: leave out the 96-cell grid (about 8x the 12-cell one on a CPU).")
    ap.add_argument("--layer-queries-only", action="store_true",
                    help="layer_target: time the query-row table only, without the exact one to compare.")
    ap.add_argument("--scale-full", action="store_true",
                    help="scale: also 600k rows (one layer per side: ~5 GB of disk at width 1,024) and a 50k-row table.")
    ap.add_argument("--scale-rows", help="scale: comma-separated store sizes N, instead of the series' own.")
    ap.add_argument("--scale-widths", help="scale: comma-separated widths, instead of 384,1024.")
    ap.add_argument("--layer-rows", type=int, default=LAYER_TARGET_N, help="layer_target: rows n.")
    ap.add_argument("--layer-queries", type=int, default=LAYER_TARGET_QUERIES, help="layer_target: query rows.")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one scale task, in a fresh process
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    if args.scale_rows:
        SCALE_ROWS = SCALE_ROWS_FULL = tuple(int(v) for v in args.scale_rows.split(","))
    if args.scale_widths:
        SCALE_WIDTHS = tuple(int(v) for v in args.scale_widths.split(","))
    SCALE_FULL, LAYER_TARGET_N, LAYER_TARGET_QUERIES = args.scale_full, args.layer_rows, args.layer_queries
    MODEL, DEVICE, SWEEP_EPOCHS = args.model, args.device, args.sweep_epochs
    SWEEP_96, LAYER_QUERIES_ONLY = not args.no_sweep_96, args.layer_queries_only
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(f"machine: {machine}")
    results = {"machine": machine, "quick": args.quick, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for name in args.only or [b for b in BENCHES if b not in ON_REQUEST]:
        results[name] = BENCHES[name](args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
