"""Evaluate a run on cached features: retrieval and zero-shot classification.

Each evaluation writes one JSON result into the run directory (``eval/<task>-<dataset>-<split>.json``)
recording the data set, split, task, metrics, positive rule, k values and cache identities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from featcache.cache.errors import FeatcacheError
from featcache.cache.lookup import check_same_encoder
from featcache.cache.naming import split_label
from featcache.cache.paths import default_cache_dir, default_runs_dir
from featcache.cache.store import FeatureStore
from featcache.pipeline.cached import Side, dataset_key, open_pairs, open_store, require_finite, subsample
from featcache.pipeline.results import result_rows
from featcache.pipeline.trackers import make_tracker
from featcache.pipeline.training_free import procrustes
from featcache.pipeline.metrics import class_embeddings, normalise, retrieval_ranks, zero_shot
from featcache.pipeline.runs import find_run, load_heads, write_json

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


def _sides(cfg: dict) -> tuple[Side, Side]:
    return (Side(cfg["image_model"], cfg.get("image_pooling"), cfg.get("image_size")),
            Side(cfg["text_model"], cfg.get("text_pooling")))


@torch.no_grad()
def _embed(head: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    return normalise(head(torch.from_numpy(np.ascontiguousarray(x))).numpy())


def check_run_stores(run_cfg: dict, images, texts, what: str) -> None:
    """Every store read for a run must hold features of the run's encoders (weights, preprocessing,
    pooling): a store rebuilt since training, or made with other options, is refused."""
    trained = run_cfg.get("cache", {}).get("train", {})
    for side, store in (("image", images), ("text", texts)):
        if side in trained:
            check_same_encoder(trained[side]["encoder"], store, f"{what} {side} features")


def run_dataset(run_cfg: dict) -> str:
    """The run's data set spec, refused if it now names other data than the run trained on
    (a relative path read from another folder, an edited file)."""
    spec = run_cfg["dataset"]
    trained = run_cfg.get("cache", {}).get("train", {}).get("image", {}).get("dataset", {}).get("name")
    if trained and dataset_key(spec) != trained:
        raise FeatcacheError(f"the run's data set {spec!r} now resolves to {dataset_key(spec)!r}, but the run "
                             f"trained on {trained!r}", "pass --dataset with the path of the data it was trained on")
    return spec


def training_pairs(run_cfg: dict, cache_dir: Path):
    """Exactly the pairs a run trained on: its split, less a carved validation part, its --pairs subset."""
    image, text = _sides(run_cfg)
    train = open_pairs(cache_dir, run_dataset(run_cfg), run_cfg["train_split"], image, text)
    check_run_stores(run_cfg, train.images, train.texts, f"{run_cfg['dataset']}/{run_cfg['train_split']}")
    validation = run_cfg.get("validation", {})
    if validation.get("carved"):
        train, _ = train.carve(validation["fraction"], validation["salt"])
    return train.subset(subsample(len(train), run_cfg.get("pairs"), run_cfg["seed"]))


def fit_reference(run_cfg: dict, cache_dir: Path) -> tuple[np.ndarray, str]:
    """An untrained reference map from image to text features, fit on the run's training pairs.

    Orthogonal Procrustes when the widths match, least squares otherwise.
    """
    train = training_pairs(run_cfg, cache_dir)
    w, kind = procrustes(train.image(run_cfg["image_layer"]), train.text(run_cfg["text_layer"]))
    return w.astype(np.float32), kind


def _identity(store: FeatureStore) -> dict:
    ident = store.identity
    return {"path": str(store.path), "encoder": ident["encoder"]["name"],
            "weights_sha256": ident["encoder"]["weights_sha256"], "pooling": ident["encoder"]["pooling"],
            "dataset_sha256": ident["dataset"]["sha256"], "rows": store.rows}


def _write_result(run_dir: Path, run_cfg: dict, result: dict) -> Path:
    """One JSON per (run, task, data set, split, positive rule), with its typed rows."""
    key = (result["run_id"], result["task"], dataset_key(result["dataset"]), result["split"], result["positive_rule"])
    rows = result_rows(*key, result["metrics"])
    tracker = make_tracker(run_cfg.get("log", "none"), run_dir)
    tracker.log(0, {f"eval/{r.column.label}": r.value for r in rows})  # the final recalls beside the curves
    tracker.close()
    if "baseline" in result:
        rows += result_rows(*key, result["baseline"]["metrics"], model=result["baseline"]["method"])
    result["rows"] = [r.to_dict() for r in rows]
    rule = "-caption-positives" if result.get("positive_rule") == "caption" else ""
    name = f"{result['task']}-{dataset_key(result['dataset'])}-{result['split']}{rule}.json"
    path = run_dir / "eval" / name.replace("/", "_")
    path.parent.mkdir(exist_ok=True)
    write_json(path, result)
    return path


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


def eval_retrieval(cfg: RetrievalConfig) -> dict:
    run_dir = find_run(cfg.runs_dir, cfg.run)
    model, run_cfg = load_heads(run_dir)
    dataset = cfg.dataset or run_dataset(run_cfg)
    image, text = _sides(run_cfg)
    images = open_store(cfg.cache_dir, dataset, cfg.split, image)
    texts = open_store(cfg.cache_dir, dataset, cfg.split, text)
    check_run_stores(run_cfg, images, texts, f"{dataset}/{cfg.split}")
    image_rows, caption_rows, i2t, t2i = retrieval_sets(images, texts, cfg.positives)
    xi = require_finite(images.read(run_cfg["image_layer"])[image_rows], images, run_cfg["image_layer"])
    xt = require_finite(texts.read(run_cfg["text_layer"])[caption_rows], texts, run_cfg["text_layer"])

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
        "metrics": score(_embed(model.image_head, xi), _embed(model.text_head, xt), keep_ranks=True),
        "cache": {"image": _identity(images), "text": _identity(texts)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    result["first_correct_rank"] = ranks  # max(ks) where no correct item is in the top max(ks)
    result["image_ids"] = [images.ids[r] for r in image_rows]
    if cfg.baseline:
        w, method = fit_reference(run_cfg, cfg.cache_dir)
        result["baseline"] = {"method": method, "metrics": score(normalise(normalise(xi) @ w), normalise(xt))}
    result["path"] = str(_write_result(run_dir, run_cfg, result))
    return result


def _classification_stores(cfg: ClassifyConfig, run_cfg: dict, dataset: str):
    image, text = _sides(run_cfg)
    label = split_label(cfg.split, cfg.limit)
    images, prompts = open_store(cfg.cache_dir, dataset, label, image), open_store(cfg.cache_dir, dataset, label, text)
    check_run_stores(run_cfg, images, prompts, f"{dataset}/{label}")
    return images, prompts


def classify_spec(cfg: ClassifyConfig) -> str:
    """The data set spec with user templates / class names as options (they change the prompts)."""
    options = [f"{k}={v}" for k, v in (("templates", cfg.templates), ("classnames", cfg.classnames)) if v]
    return cfg.dataset + (":" + ",".join(options) if options else "")


def eval_classify(cfg: ClassifyConfig) -> dict:
    run_dir = find_run(cfg.runs_dir, cfg.run)
    model, run_cfg = load_heads(run_dir)
    dataset = classify_spec(cfg)
    layers = (run_cfg["image_layer"], run_cfg["text_layer"])
    images, prompts = _classification_stores(cfg, run_cfg, dataset)
    classes = images.attrs.get("classes", {}).get("classnames") or sorted(set(prompts.groups))
    index = {c: i for i, c in enumerate(classes)}
    keep = ~images.missing
    labels = np.asarray([index[g] for g in images.groups])[keep]
    prompt_class = np.asarray([index[g] for g in prompts.groups])
    xi = require_finite(images.read(layers[0])[keep], images, layers[0])
    xt = require_finite(prompts.read(layers[1])[~prompts.missing], prompts, layers[1])
    prompt_class = prompt_class[~prompts.missing]
    result = {
        "task": "classify", "dataset": dataset, "split": split_label(cfg.split, cfg.limit), "classes": len(classes),
        "images": int(keep.sum()), "templates": len(prompts.ids) // max(1, len(classes)), "run_id": run_dir.name,
        "layers": list(layers), "positive_rule": "class", "ks": [1, 5] if len(classes) >= 5 else [1],
        "metrics": zero_shot(_embed(model.image_head, xi), labels,
                             class_embeddings(_embed(model.text_head, xt), prompt_class, len(classes))),
        "cache": {"image": _identity(images), "text": _identity(prompts)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if cfg.baseline:
        w, method = fit_reference(run_cfg, cfg.cache_dir)
        ref = zero_shot(normalise(normalise(xi) @ w), labels, class_embeddings(normalise(xt), prompt_class, len(classes)))
        result["baseline"] = {"method": method, "metrics": ref}
    result["path"] = str(_write_result(run_dir, run_cfg, result))
    return result
