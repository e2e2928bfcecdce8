"""Retrieval of a run on cached pairs: R@K both ways, one JSON result per (run, data set, split,
positive rule)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.cache.paths import default_cache_dir, default_runs_dir
from featcache.cache.store import FeatureStore
from featcache.pipeline.common.arrays import normalise, require_finite
from featcache.pipeline.evaluate.metrics import retrieval_ranks
from featcache.pipeline.evaluate.reads import Reads
from featcache.pipeline.evaluate.results import store_record, write_result
from featcache.pipeline.evaluate.run_view import check_run_stores, embed, run_dataset, run_sides
from featcache.pipeline.train.runs import find_run, load_heads

POSITIVE_RULES = ("image", "caption")


@dataclass
class RetrievalConfig:
    run: str = "latest"
    dataset: str | None = None  # None: the run's data set
    split: str = "test"
    positives: str = "image"  # "image": a caption is correct for its own image; "caption": also identical captions
    ks: tuple[int, ...] = (1, 5, 10)
    baseline: bool = True  # also score the untrained Procrustes / least-squares reference
    cache_dir: Path = field(default_factory=default_cache_dir)
    runs_dir: Path = field(default_factory=default_runs_dir)


def retrieval_sets(images: FeatureStore, texts: FeatureStore, rule: str):
    """Image gallery rows (each image once), caption rows, and positives both ways."""
    if rule not in POSITIVE_RULES:
        raise FeatcacheError(f"unknown positive rule {rule!r}", f"choose one of: {', '.join(POSITIVE_RULES)}")
    missing = images.missing
    image_ids = [i for n, i in enumerate(images.ids) if not missing[n]]
    image_rows = np.asarray([n for n in range(images.rows) if not missing[n]], dtype=np.int64)
    col = {image_id: c for c, image_id in enumerate(image_ids)}
    text_missing = texts.missing  # captions recorded as missing with --skip-bad
    caption_rows = np.asarray([j for j, g in enumerate(texts.groups) if g in col and not text_missing[j]],
                              dtype=np.int64)
    if not len(caption_rows):
        raise FeatcacheError(f"{texts.path}: no caption belongs to an image of {images.path}")
    groups = [texts.groups[j] for j in caption_rows]
    words = texts.texts or [""] * texts.rows
    strings = [words[j].strip().lower() for j in caption_rows]
    i2t: list[set[int]] = [set() for _ in image_ids]
    t2i: list[set[int]] = [set() for _ in caption_rows]
    for c, g in enumerate(groups):
        i2t[col[g]].add(c)
        t2i[c].add(col[g])
    if rule == "caption":  # identical captions are interchangeable: "A flower." x 6
        by_text: dict[str, set[int]] = {}
        for c, s in enumerate(strings):
            by_text.setdefault(s, set()).add(col[groups[c]])
        for c, s in enumerate(strings):
            t2i[c] |= by_text[s]
            for img in by_text[s]:
                i2t[img].add(c)
    return image_rows, caption_rows, i2t, t2i


@dataclass
class RetrievalPairs:
    """A run's held-out pairs through its heads: what the metrics score and the gallery shows."""

    run_dir: Path
    run_cfg: dict
    dataset: str
    images: FeatureStore
    texts: FeatureStore
    image_rows: np.ndarray  # store rows of the gallery images (missing rows left out)
    caption_rows: np.ndarray  # store rows of the captions that belong to a gallery image
    i2t: list[set[int]]  # positives, as indices into caption_rows
    t2i: list[set[int]]  # positives, as indices into image_rows
    xi: np.ndarray  # the run's stored layers of those rows
    xt: np.ndarray
    ei: np.ndarray  # through the heads, L2-normalised
    et: np.ndarray


def retrieval_pairs(cfg: RetrievalConfig, reads: Reads | None = None, run_dir: Path | None = None) -> RetrievalPairs:
    """The run's stores (checked to be its encoders'), its retrieval sets and both sides embedded:
    read once for the scores and once more, from ``reads``' memo, for a gallery page."""
    reads = reads or Reads()
    run_dir = run_dir or find_run(cfg.runs_dir, cfg.run)
    model, run_cfg = load_heads(run_dir)
    dataset = cfg.dataset or run_dataset(run_cfg)
    image, text = run_sides(run_cfg)
    images = reads.store(cfg.cache_dir, dataset, cfg.split, image, run_cfg)
    texts = reads.store(cfg.cache_dir, dataset, cfg.split, text, run_cfg)
    check_run_stores(run_cfg, images, texts, f"{dataset}/{cfg.split}")
    image_rows, caption_rows, i2t, t2i = retrieval_sets(images, texts, cfg.positives)
    xi = require_finite(reads.layer(images, run_cfg["image_layer"])[image_rows], images, run_cfg["image_layer"])
    xt = require_finite(reads.layer(texts, run_cfg["text_layer"])[caption_rows], texts, run_cfg["text_layer"])
    return RetrievalPairs(run_dir, run_cfg, dataset, images, texts, image_rows, caption_rows, i2t, t2i, xi, xt,
                          embed(model.image_head, xi), embed(model.text_head, xt))


def eval_retrieval(cfg: RetrievalConfig, reads: Reads | None = None, run_dir: Path | None = None) -> dict:
    """Score one run (``cfg.run``, or ``run_dir`` when given); ``reads`` shares the cache reads
    between the runs of a batch (``evaluate.batch``)."""
    reads = reads or Reads()
    p = retrieval_pairs(cfg, reads, run_dir)
    run_dir, run_cfg, dataset, images, texts = p.run_dir, p.run_cfg, p.dataset, p.images, p.texts
    image_rows, caption_rows, i2t, t2i, xi, xt = p.image_rows, p.caption_rows, p.i2t, p.t2i, p.xi, p.xt

    ranks = {}

    def score(ei, et, keep_ranks=False) -> dict:
        r_i2t = retrieval_ranks(ei, et, i2t, max(cfg.ks))
        r_t2i = retrieval_ranks(et, ei, t2i, max(cfg.ks))
        if keep_ranks:  # per-query ranks, for paired bootstrap comparisons between runs
            ranks.update(image_to_text=r_i2t.tolist(), text_to_image=r_t2i.tolist())
        return {"image_to_text": {f"R@{k}": float((r_i2t < k).mean()) for k in cfg.ks},
                "text_to_image": {f"R@{k}": float((r_t2i < k).mean()) for k in cfg.ks}}

    result = {
        "task": "retrieval", "dataset": dataset, "split": cfg.split, "positive_rule": cfg.positives,
        "ks": list(cfg.ks), "run_id": run_dir.name, "layers": [run_cfg["image_layer"], run_cfg["text_layer"]],
        "images": len(image_rows), "captions": len(caption_rows),
        "metrics": score(p.ei, p.et, keep_ranks=True),
        "cache": {"image": store_record(images), "text": store_record(texts)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    result["first_correct_rank"] = ranks  # max(ks) where no correct item is in the top max(ks)
    result["image_ids"] = [images.ids[r] for r in image_rows]
    if cfg.baseline:
        w, method = reads.reference(run_cfg, cfg.cache_dir)
        result["baseline"] = {"method": method, "metrics": score(normalise(normalise(xi) @ w), normalise(xt))}
    result["path"] = str(write_result(run_dir, run_cfg, result))
    return result
