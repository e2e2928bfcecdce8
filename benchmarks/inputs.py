"""Stage one's inputs: what a rerun costs, what the data set's digest costs, and webdataset shards
against the same images as loose files. Every ratio is measured side by side in one run.

    .venv/bin/python benchmarks/inputs.py [--rows 20000] [--wds-rows 559] [--model dinov2] [--cold]
    .venv/bin/python benchmarks/inputs.py --only draft [--draft-rows 200]

1. A no-op rerun of extract on a finished store of ``--rows`` images: its wall time and the image
   files it opens (Python's audit hook counts every open()), against the first extraction.
2. The data set's digest: the listing (one stat per file) against hashing every image's bytes,
   which is what featcache did on every rerun before per-row sources.
3. Extraction from wds shards against the same images as loose files, with a real encoder
   (``--model``) on Tux Paint's training images: throughput ratio, wds over files.
4. ``--decode draft`` against the whole decode: Tux Paint's training images re-encoded as JPEGs at
   photo sizes (640 x 480 and 1920 x 1080, quality 90), decoded and preprocessed for a 224 px
   model as one decoding worker does it (read, hash, decode, resize, crop), then the extraction
   with ``--model`` both ways. The worker's rate is what bounds a GPU extraction.

The images of 1 and 2 are generated PNGs (64 x 64, noise), encoded by a tiny random ViT: the
subject is the input path, not the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

OPENED: list[str] | None = None


def _audit(event, args):
    if OPENED is not None and event == "open" and isinstance(args[0], (str, os.PathLike)):
        if str(args[0]).endswith((".png", ".svg", ".tar")):
            OPENED.append(os.fspath(args[0]))


def _write_images(root: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"{i:06d}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / name)
        rows.append({"image": name, "caption": f"image {i}", "split": "train"})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root / "pairs.jsonl"


def _drop_caches() -> bool:
    """Empty the OS page cache (root on Linux), so reads come from the disk as on a first pass."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench_rerun(rows: int, tmp: Path, cold: bool = False) -> dict:
    global OPENED
    from conftest import save_tiny_vit

    from featcache.pipeline.data.catalog import load_dataset
    from featcache.pipeline.extract.provenance import dataset_identity
    from featcache.pipeline.extract.run import ExtractConfig, extract

    t = time.perf_counter()
    pairs = _write_images(tmp / "data", rows)
    print(f"wrote {rows} PNGs in {time.perf_counter() - t:.1f}s")
    vit = save_tiny_vit(tmp / "vit")
    cfg = ExtractConfig(model=f"hf:{vit}", dataset=str(pairs), cache_dir=tmp / "cache", batch_size=256)
    t = time.perf_counter()
    extract(cfg)
    first = time.perf_counter() - t
    OPENED = []
    cold = cold and _drop_caches()
    t = time.perf_counter()
    [again] = extract(cfg)
    rerun, opened = time.perf_counter() - t, len(OPENED)
    OPENED = None
    split = load_dataset(str(pairs))["train"]
    cold and _drop_caches()
    t = time.perf_counter()
    split.images.stamps()
    listing = time.perf_counter() - t
    t = time.perf_counter()
    dataset_identity(split, "image", None)
    identity = time.perf_counter() - t
    cold and _drop_caches()
    t = time.perf_counter()
    split.digest("image")  # the content digest: every image's bytes hashed
    content = time.perf_counter() - t
    out = {"rows": rows, "cold_page_cache": cold, "first_extract_s": first, "noop_rerun_s": rerun, "rerun_computed_rows": again.computed_rows,
           "rerun_images_opened": opened, "listing_s": listing, "listing_identity_s": listing + identity,
           "content_digest_s": content, "content_over_listing": content / (listing + identity)}
    print(f"{'cold' if cold else 'warm'} page cache")
    print(f"no-op rerun on {rows} finished images: {rerun:.2f}s (first extraction {first:.1f}s), "
          f"{again.computed_rows} rows computed, {opened} image files opened")
    print(f"digest: listing + identity {listing + identity:.3f}s (stat {listing:.3f}s) | content hash of every "
          f"image {content:.3f}s | ratio {out['content_over_listing']:.1f}x")
    return out


def bench_wds(model: str, rows: int | None, tmp: Path, shard_rows: int = 100) -> dict:
    """Tux Paint's training images as loose files (a JSONL) and as wds shards of the same bytes."""
    from featcache.pipeline.data.catalog import load_dataset
    from featcache.pipeline.extract.run import ExtractConfig, extract

    split = load_dataset("tuxpaint")["train"]
    n = min(rows or len(split.images), len(split.images))
    images, texts = split.images, split.texts
    caption = {g: t for g, t in zip(texts.groups, texts.texts)}
    loose, shards = tmp / "loose", tmp / "shards"
    loose.mkdir(parents=True)
    shards.mkdir()
    records = []
    for i in range(n):
        suffix = Path(images.sources[i]).suffix
        key = f"{i:06d}"
        (loose / f"{key}{suffix}").write_bytes(images.raw(i))
        records.append({"image": f"{key}{suffix}", "caption": caption[images.ids[i]], "split": "train"})
    (loose / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    n_shards = -(-n // shard_rows)
    for s in range(n_shards):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for r in records[s * shard_rows:(s + 1) * shard_rows]:
                key, suffix = r["image"].split(".")
                for name, data in ((r["image"], (loose / r["image"]).read_bytes()),
                                   (f"{key}.txt", r["caption"].encode()),
                                   (f"{key}.json", json.dumps({"split": "train"}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, __import__("io").BytesIO(data))
    pattern = f"wds:{shards}/{{00000..{n_shards - 1:05d}}}.tar"
    times = {}
    for label, dataset in (("files", str(loose / "pairs.jsonl")), ("wds", pattern)) * 2:  # twice, interleaved
        cfg = ExtractConfig(model=model, dataset=dataset, cache_dir=tmp / f"cache-{label}-{len(times)}",
                            splits=["train"], layers="all")
        t = time.perf_counter()
        extract(cfg)
        times.setdefault(label, []).append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    out = {"rows": n, "shards": n_shards, "model": model, "files_s": best["files"], "wds_s": best["wds"],
           "wds_throughput_over_files": best["files"] / best["wds"], "all_s": times}
    print(f"extraction of {n} Tux Paint images with {model}: files {best['files']:.2f}s | wds ({n_shards} shards) "
          f"{best['wds']:.2f}s | throughput wds/files {out['wds_throughput_over_files']:.3f}")
    return out


def bench_draft(model: str, rows: int, tmp: Path) -> dict:
    """Decoding workers' images per second, whole against draft, and the extraction both ways."""
    import io

    from PIL import Image

    from featcache.pipeline.data.catalog import load_dataset
    from featcache.pipeline.data.decode import jpeg_draft
    from featcache.pipeline.extract.encoders import pixels_of
    from featcache.pipeline.extract.run import ExtractConfig, extract

    split = load_dataset("tuxpaint")["train"]
    n = min(rows, len(split.images))
    out: dict = {"rows": n, "model": model}
    for w, h in ((640, 480), (1920, 1080)):
        root = tmp / f"jpeg-{w}"
        root.mkdir(parents=True)
        records = []
        for i in range(n):
            buf = io.BytesIO()
            split.images.load(i).resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90)
            (root / f"{i:05d}.jpg").write_bytes(buf.getvalue())
            records.append({"image": f"{i:05d}.jpg", "caption": f"picture {i}.", "split": "train"})
        (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
        side = load_dataset(str(root / "pairs.jsonl"))["train"].images
        pixels = lambda images: pixels_of(images, 224)  # noqa: E731 - featcache's own preprocessing, 224 px
        rates: dict = {}
        for label, draft in (("whole", None), ("draft", 224)) * 2:  # interleaved: the page cache is warm for both
            t = time.perf_counter()
            for r in range(n):  # a decoding worker's work on a row (extract/run.py: _ImageRows)
                with jpeg_draft(draft):
                    image, _ = side.load_hashed(r)
                pixels([image])
            rates.setdefault(label, []).append(n / (time.perf_counter() - t))
        best = {k: max(v) for k, v in rates.items()}
        key = f"{w}x{h}"
        out[key] = {"worker_whole_img_s": best["whole"], "worker_draft_img_s": best["draft"],
                    "worker_draft_over_whole": best["draft"] / best["whole"]}
        print(f"one decoding worker, {n} JPEGs {key} -> 224 px: whole {best['whole']:.1f} img/s | draft "
              f"{best['draft']:.1f} img/s | draft/whole {best['draft'] / best['whole']:.2f}x")
        if w == 640:
            times = {}
            for decode in ("cpu", "draft") * 2:
                cfg = ExtractConfig(model=model, dataset=str(root / "pairs.jsonl"), splits=["train"],
                                    cache_dir=tmp / f"cache-{decode}-{len(times)}-{len(times.get(decode, []))}",
                                    decode=decode)
                t = time.perf_counter()
                extract(cfg)
                times.setdefault(decode, []).append(time.perf_counter() - t)
            e = {k: min(v) for k, v in times.items()}
            out[key].update({"extract_whole_s": e["cpu"], "extract_draft_s": e["draft"],
                             "extract_draft_speedup": e["cpu"] / e["draft"]})
            print(f"  extraction with {model} on this machine: whole {e['cpu']:.2f}s | draft {e['draft']:.2f}s | "
                  f"{e['cpu'] / e['draft']:.2f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000, help="images of the no-op rerun and digest benchmarks")
    ap.add_argument("--wds-rows", type=int, default=None, help="Tux Paint training images for wds (default all)")
    ap.add_argument("--model", default="dinov2", help="encoder of the wds benchmark")
    ap.add_argument("--cold", action="store_true", help="drop the OS page cache before each timed read (root)")
    ap.add_argument("--draft-rows", type=int, default=200, help="Tux Paint images of the draft benchmark")
    ap.add_argument("--only", nargs="*", choices=["rerun", "wds", "draft"], default=["rerun", "wds", "draft"])
    ap.add_argument("--out", type=Path, default=Path("bench-out/inputs.json"))
    args = ap.parse_args()
    sys.addaudithook(_audit)
    import torch

    results = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
               "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with tempfile.TemporaryDirectory() as tmp:
        if "rerun" in args.only:
            results["rerun"] = bench_rerun(args.rows, Path(tmp) / "rerun", args.cold)
        if "wds" in args.only:
            results["wds"] = bench_wds(args.model, args.wds_rows, Path(tmp) / "wds")
        if "draft" in args.only:
            results["draft"] = bench_draft(args.model, args.draft_rows, Path(tmp) / "draft")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
