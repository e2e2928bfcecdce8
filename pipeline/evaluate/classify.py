"""Zero-shot classification of a run on a cached class set: prompts of class names and
templates, top-1, top-5 and mean per-class recall."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.cache.naming import split_label
from featcache.cache.paths import default_cache_dir, default_runs_dir
from featcache.pipeline.common.arrays import normalise, require_finite
from featcache.pipeline.evaluate.metrics import class_embeddings, zero_shot
from featcache.pipeline.evaluate.reads import Reads
from featcache.pipeline.evaluate.results import store_record, write_result
from featcache.pipeline.evaluate.run_view import check_run_stores, embed, run_sides
from featcache.pipeline.train.runs import find_run, load_heads


@dataclass
class ClassifyConfig:
    dataset: str = "fashion-mnist"
    run: str = "latest"
    split: str = "test"
    limit: int | None = None  # read the store extracted with this --limit
    templates: Path | None = None
    classnames: Path | None = None
    baseline: bool = True
    cache_dir: Path = field(default_factory=default_cache_dir)
    runs_dir: Path = field(default_factory=default_runs_dir)


def classification_stores(cfg: ClassifyConfig, run_cfg: dict, dataset: str, reads: Reads | None = None):
    reads = reads or Reads()
    image, text = run_sides(run_cfg)
    label = split_label(cfg.split, cfg.limit)
    images = reads.store(cfg.cache_dir, dataset, label, image, run_cfg)
    prompts = reads.store(cfg.cache_dir, dataset, label, text, run_cfg)
    check_run_stores(run_cfg, images, prompts, f"{dataset}/{label}")
    return images, prompts


def classify_spec(cfg: ClassifyConfig) -> str:
    """The data set spec with user templates / class names as options (they change the prompts)."""
    options = [f"{k}={v}" for k, v in (("templates", cfg.templates), ("classnames", cfg.classnames)) if v]
    return cfg.dataset + (":" + ",".join(options) if options else "")


def eval_classify(cfg: ClassifyConfig, reads: Reads | None = None, run_dir: Path | None = None) -> dict:
    """Score one run (``cfg.run``, or ``run_dir`` when given); ``reads`` shares the cache reads
    between the runs of a batch (``evaluate.batch``)."""
    reads = reads or Reads()
    run_dir = run_dir or find_run(cfg.runs_dir, cfg.run)
    model, run_cfg = load_heads(run_dir)
    dataset = classify_spec(cfg)
    layers = (run_cfg["image_layer"], run_cfg["text_layer"])
    images, prompts = classification_stores(cfg, run_cfg, dataset, reads)
    classes = images.attrs.get("classes", {}).get("classnames") or sorted(set(prompts.groups))
    index = {c: i for i, c in enumerate(classes)}
    keep = ~images.missing
    labels = np.asarray([index[g] for g in images.groups])[keep]
    prompt_class = np.asarray([index[g] for g in prompts.groups])
    xi = require_finite(reads.layer(images, layers[0])[keep], images, layers[0])
    xt = require_finite(reads.layer(prompts, layers[1])[~prompts.missing], prompts, layers[1])
    prompt_class = prompt_class[~prompts.missing]
    result = {
        "task": "classify", "dataset": dataset, "split": split_label(cfg.split, cfg.limit), "classes": len(classes),
        "images": int(keep.sum()), "templates": len(prompts.ids) // max(1, len(classes)), "run_id": run_dir.name,
        "layers": list(layers), "positive_rule": "class", "ks": [1, 5] if len(classes) >= 5 else [1],
        "metrics": zero_shot(embed(model.image_head, xi), labels,
                             class_embeddings(embed(model.text_head, xt), prompt_class, len(classes))),
        "cache": {"image": store_record(images), "text": store_record(prompts)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if cfg.baseline:
        w, method = reads.reference(run_cfg, cfg.cache_dir)
        ref = zero_shot(normalise(normalise(xi) @ w), labels, class_embeddings(normalise(xt), prompt_class, len(classes)))
        result["baseline"] = {"method": method, "metrics": ref}
    result["path"] = str(write_result(run_dir, run_cfg, result))
    return result
