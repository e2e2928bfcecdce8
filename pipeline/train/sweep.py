"""A grid of runs over one cache: the cells, their shard, and stacked or one-by-one training."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.workers import grid_worker
from featcache.pipeline.train.config import AlignConfig
from featcache.pipeline.train.loop import train
from featcache.pipeline.train.plan import load_cached


def sweep(base: AlignConfig, layers: list[str], losses: list[str], seeds: list[int],
          pairs: list[int | None] | None = None, progress=None, grid: dict[str, list] | None = None,
          shard: str | None = None, vectorize: bool = True) -> list[Path]:
    """Train one run per grid cell; the cache is read once and shared by every cell.

    ``grid`` varies any other AlignConfig fields as well (``{"centering": ["none", "mean"]}``),
    so an ablation table is one call. ``shard`` "I/N" (or torchrun / a Slurm array, detected)
    trains only cells c with c mod N == I, in the grid's fixed order, into the shared runs dir.
    ``vectorize`` trains cells that differ only in seed, lambda, tau or pair count as one batched
    model (featcache.pipeline.vectorized); each still writes its own run, equal to its sequential one.
    """
    worker = grid_worker(shard)
    grid = dict(grid or {})
    unknown = [k for k in grid if k not in AlignConfig.__dataclass_fields__]
    if unknown:
        raise FeatcacheError(f"cannot sweep over {', '.join(unknown)}", "name AlignConfig fields")
    reads_cache = [k for k in grid if k in DATA_FIELDS]
    if reads_cache:  # the cache is read once, from base: these would be recorded but not used
        raise FeatcacheError(f"a sweep reads one cache; it cannot vary {', '.join(reads_cache)}",
                             "run one sweep per data set, model or split")
    data = load_cached(base)
    cells = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    configs: dict[str, AlignConfig] = {}
    for n in pairs or [base.pairs]:
        for layer in layers:
            for loss in losses:
                for cell in cells:
                    for seed in seeds:
                        cfg = dedupe_training_free(replace(base, layers=layer, loss=loss, seed=seed, pairs=n, **cell), seeds)
                        configs.setdefault(repr(cfg), cfg)
    mine = worker.share(list(configs.values()))
    if vectorize:
        from featcache.pipeline.train.stacked import train_cells

        return train_cells(mine, data, progress)
    return [train(cfg, data, progress) for cfg in mine]


# What selects the cached features themselves: fixed for a whole sweep.
DATA_FIELDS = ("image_model", "text_model", "image_pooling", "text_pooling", "image_size", "dataset",
               "train_split", "val_split", "cache_dir", "runs_dir")


def dedupe_training_free(cfg: AlignConfig, seeds: list[int]) -> AlignConfig:
    """A training-free method ignores the loss, and a deterministic one the seed: one run, not
    copies. Not with ``pairs``: the seed draws the training subset, so each seed fits its own."""
    if cfg.method == "heads":
        return cfg
    cfg = replace(cfg, loss="clip")
    seeded = cfg.method == "csa+structure" or cfg.pairs is not None
    return cfg if seeded else replace(cfg, seed=seeds[0])
