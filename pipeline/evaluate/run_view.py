"""A trained run seen from evaluation: its stores (checked against the ones it trained on),
its data set, and its heads applied to cached features."""

from __future__ import annotations

import numpy as np
import torch

from featcache.cache.errors import FeatcacheError
from featcache.cache.lookup import check_same_encoder
from featcache.pipeline.common.arrays import normalise
from featcache.pipeline.common.names import dataset_key
from featcache.pipeline.features import Side


def run_sides(cfg: dict) -> tuple[Side, Side]:
    return (Side(cfg["image_model"], cfg.get("image_pooling"), cfg.get("image_size")),
            Side(cfg["text_model"], cfg.get("text_pooling")))


@torch.no_grad()
def embed(head: torch.nn.Module, x: np.ndarray) -> np.ndarray:
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
