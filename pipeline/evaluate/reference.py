"""The untrained reference every evaluation prints beside a run: Procrustes (or least squares)
fitted on the run's own training pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.pipeline.common.arrays import subsample
from featcache.pipeline.evaluate.run_view import check_run_stores, run_dataset, run_sides
from featcache.pipeline.features import open_pairs
from featcache.pipeline.train.training_free import procrustes


def training_pairs(run_cfg: dict, cache_dir: Path):
    """Exactly the pairs a run trained on: its split, less a carved validation part, its --pairs subset."""
    image, text = run_sides(run_cfg)
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
