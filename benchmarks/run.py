"""featcache benchmarks: every ratio is measured side by side in one run.

    .venv/bin/python benchmarks/run.py [--only NAME ...] [--quick] [--out bench-out/benchmarks.json]

Each benchmark prints its figures and ratio; all results go to one JSON file.
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
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
MODEL, DEVICE = "dinov2", "cpu"  # set from --model/--device


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
    from featcache.pipeline.catalog import load_dataset
    from featcache.pipeline.encoders import load_encoder
    from featcache.pipeline.extract import ExtractConfig, _batches, extract

    n = 64 if quick else 256
    batch = 32
    enc = load_encoder(MODEL, DEVICE)
    split = load_dataset("tuxpaint")["train"].limited(n)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExtractConfig(model=MODEL, dataset="tuxpaint", splits=["train"], limit=n, batch_size=batch,
                            cache_dir=Path(tmp), device=DEVICE)
        images = [split.images.load(i) for i in range(n)]  # warm the file cache for both sides
        enc.forward(enc.prepare_images(images[:batch]), ["block.11"], "cls")  # warm-up
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
        "rows_per_s": n / t_extract, "bytes_per_row": on_disk, "fp32_bytes_per_row": fp32,
        "bytes_ratio_vs_fp32": on_disk / fp32,
    }
    print(f"extraction: {n} tuxpaint images, {MODEL} on {DEVICE}, 224px, all {layers} layers, batch {batch}")
    print(f"  extract {t_extract:.2f}s | bare forward incl. decode {t_bare_decode:.2f}s | model only {t_bare:.2f}s")
    print(f"  ratio vs bare forward incl. decode {out['ratio_vs_forward_with_decode']:.3f}; "
          f"vs model only {out['ratio_vs_model_only']:.3f}; {out['rows_per_s']:.1f} rows/s")
    print(f"  on disk {on_disk:.0f} B/row vs fp32 {fp32} B/row: ratio {out['bytes_ratio_vs_fp32']:.3f}")
    return out


def bench_layer_table(quick: bool) -> dict:
    """All-pairs mutual-kNN table (one kNN search per layer) against per-pair recomputation."""
    from featcache.pipeline.layers import mutual_knn, rice_k, score_table

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


def bench_train_step(quick: bool) -> dict:
    """One optimiser step with clip+structure against clip alone, at batch 4,096."""
    from featcache.pipeline.heads import AlignmentModel
    from featcache.pipeline.losses import clip_loss, structure_regularizer

    b = 1024 if quick else 4096
    torch.manual_seed(0)
    xi, xt = torch.randn(b, 384), torch.randn(b, 384)
    model = AlignmentModel("linear", 384, 384, 512, 0.05, False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def prob_space_rs(x, z, tau=0.05, eps=1e-12):
        """The earlier formulation, for comparison: softmax, then log(p + eps) (level 1)."""
        def walk(a):
            a = torch.nn.functional.normalize(a.float(), dim=-1)
            a = a - a.mean(0, keepdim=True)
            return torch.softmax(a @ a.T / tau, dim=-1)

        kl = lambda a, c: (a * (torch.log(a + eps) - torch.log(c + eps))).sum(-1).mean()
        p, q = walk(x.detach()), walk(z)
        m = (p + q) / 2
        return (kl(m, q) + kl(m, p)) / 2

    def step(structure):
        zi, zt = model(xi, xt)
        loss = clip_loss(zi, zt, 0.05)
        if structure:
            loss = loss + 10 * (structure(xi, zi, 0.05) + structure(xt, zt, 0.05)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(structure_regularizer)
    times = [(timed(lambda: step(None)), timed(lambda: step(structure_regularizer)), timed(lambda: step(prob_space_rs)))
             for _ in range(3)]  # alternating, median of 3
    t_clip, t_struct, t_prob = (float(np.median(t)) for t in zip(*times))
    out = {"batch": b, "clip_step_s": t_clip, "clip_structure_step_s": t_struct, "ratio": t_struct / t_clip,
           "prob_space_structure_step_s": t_prob, "log_vs_prob_space": t_struct / t_prob}
    print(f"train step at batch {b}: clip {t_clip * 1000:.0f} ms, clip+structure {t_struct * 1000:.0f} ms "
          f"(log space; probability space {t_prob * 1000:.0f} ms), ratio to clip {out['ratio']:.2f}, "
          f"log/probability space {out['log_vs_prob_space']:.2f}")
    return out


def bench_sweep(quick: bool) -> dict:
    """The 12-cell grid (layers x loss x 3 seeds) from the cache, against one run."""
    from featcache.pipeline.train import AlignConfig, load_cached, sweep, train

    epochs = 30 if quick else 200
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AlignConfig(runs_dir=Path(tmp), epochs=epochs, patience=epochs)
        try:
            load_cached(cfg)
        except Exception as err:
            print(f"sweep: skipped ({err}); extract dinov2 and minilm on tuxpaint first")
            return {"skipped": str(err)}
        t_one = timed(lambda: train(cfg))
        t_grid = timed(lambda: sweep(cfg, ["last", "auto"], ["clip", "clip+structure"], [0, 1, 2]))
    out = {"epochs": epochs, "one_run_s": t_one, "grid_12_s": t_grid, "ratio": t_grid / t_one}
    print(f"sweep: 12 cells x {epochs} epochs on tuxpaint: one run {t_one:.1f}s, grid {t_grid:.1f}s, "
          f"ratio {out['ratio']:.1f} (12 would be no sharing)")
    return out


def bench_retrieval(quick: bool) -> dict:
    """faiss retrieval recall at gallery 10k, 100k, 1M against a full-matrix sort."""
    from featcache.pipeline.metrics import retrieval_recall, retrieval_recall_full

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
    """Reading a layer: featcache's checked read (crc32c per chunk, chunk presence, done flags)
    against a bare zarr read of the same float16 data stored with zstd and no checksum."""
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
        checked = lambda: [store.read(n) for n in names]  # codec + chunk presence + done flags
        codec = lambda: [np.asarray(store.group[f"layers/{n}"][:], dtype=np.float32) for n in names]
        bare = lambda: [np.asarray(plain[n][:], dtype=np.float32) for n in names]
        checked(), codec(), bare()  # warm the page cache for all three
        times = [(timed(checked), timed(codec), timed(bare)) for _ in range(5)]  # alternating, median of 5
        t_checked, t_codec, t_plain = (float(np.median(t)) for t in zip(*times))
    out = {"rows": rows, "width": width, "layers": layers, "checked_s": t_checked, "crc32c_codec_s": t_codec,
           "plain_s": t_plain, "ratio": t_checked / t_plain, "codec_ratio": t_codec / t_plain}
    print(f"checksum read: {layers} layers x {rows:,} rows x {width}: featcache read {t_checked:.2f}s, "
          f"zarr read with crc32c {t_codec:.2f}s, without {t_plain:.2f}s; ratios {out['ratio']:.2f} (all checks), "
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
    from featcache.pipeline.train import AlignConfig, load_cached, sweep, train

    epochs = 2 if quick else 10
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AlignConfig(runs_dir=Path(tmp), epochs=epochs, patience=epochs, loss="clip+structure", layers="auto")
        try:
            load_cached(cfg)
        except Exception as err:
            print(f"vectorized_sweep: skipped ({err}); extract dinov2 and minilm on tuxpaint first")
            return {"skipped": str(err)}
        grid12 = dict(seeds=[0, 1, 2], grid={"lam": [1.0, 3.0, 10.0, 30.0]})
        grid96 = dict(seeds=list(range(8)), grid={"lam": [1.0, 3.0, 10.0, 30.0], "temperature": [0.03, 0.05, 0.1]})
        run = lambda g, vec: sweep(cfg, ["auto"], ["clip+structure"], g["seeds"], grid=g["grid"], vectorize=vec)
        t_one = timed(lambda: train(cfg))
        t_vec12 = timed(lambda: run(grid12, True))
        t_seq12 = timed(lambda: run(grid12, False))
        t_vec96 = timed(lambda: run(grid96, True))
    out = {"epochs": epochs, "one_run_s": t_one, "grid12_vectorized_s": t_vec12, "grid12_sequential_s": t_seq12,
           "grid96_vectorized_s": t_vec96, "ratio12_vectorized": t_vec12 / t_one, "ratio12_sequential": t_seq12 / t_one,
           "ratio96_vectorized": t_vec96 / t_one}
    print(f"vectorized sweep: {epochs} epochs, tuxpaint, clip+structure, auto layers: one run {t_one:.1f}s; "
          f"12 cells stacked {t_vec12:.1f}s ({out['ratio12_vectorized']:.1f}x), one by one {t_seq12:.1f}s "
          f"({out['ratio12_sequential']:.1f}x); 96 cells stacked {t_vec96:.1f}s ({out['ratio96_vectorized']:.1f}x)")
    return out


def bench_structure_compile(quick: bool) -> dict:
    """A clip+structure step with R_S eager and through torch.compile, against a clip step
    (linear heads 384 -> 512; alternating, median of 3; compile time reported apart)."""
    from featcache.pipeline.heads import AlignmentModel
    from featcache.pipeline.losses import clip_loss, maybe_compile, structure_regularizer

    b = 1024 if quick else 4096
    torch.manual_seed(0)
    xi, xt = torch.randn(b, 384, device=DEVICE), torch.randn(b, 384, device=DEVICE)
    model = AlignmentModel("linear", 384, 384, 512, 0.05, False).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiled = maybe_compile(structure_regularizer, True)

    def step(rs):
        zi, zt = model(xi, xt)
        loss = clip_loss(zi, zt, 0.05)
        if rs:
            loss = loss + 10 * (rs(xi, zi, 0.05) + rs(xt, zt, 0.05)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()

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
    from featcache.pipeline.catalog import load_dataset
    from featcache.pipeline.encoders import load_encoder
    from featcache.pipeline.extract import ExtractConfig, extract

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


BENCHES = {"extraction": bench_extraction, "layer_table": bench_layer_table, "train_step": bench_train_step,
           "sweep": bench_sweep, "retrieval": bench_retrieval, "checksum_read": bench_checksum_read,
           "scaling": bench_scaling, "vectorized_sweep": bench_vectorized_sweep,
           "structure_compile": bench_structure_compile, "s3": bench_s3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(BENCHES))
    ap.add_argument("--quick", action="store_true", help="Smaller sizes, for a smoke run.")
    ap.add_argument("--out", type=Path, default=Path("bench-out/benchmarks.json"))
    ap.add_argument("--model", default="dinov2", help="Encoder of the extraction benchmark.")
    ap.add_argument("--device", default="cpu", help="Device of the extraction benchmark.")
    args = ap.parse_args()
    global MODEL, DEVICE
    MODEL, DEVICE = args.model, args.device
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(f"machine: {machine}")
    results = {"machine": machine, "quick": args.quick, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for name in args.only or BENCHES:
        results[name] = BENCHES[name](args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
