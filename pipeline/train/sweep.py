"""A grid of runs over one cache: the cells, their shard, which of them are finished already,
and stacked or one-by-one training of the rest."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.workers import grid_worker
from featcache.pipeline.train.cells import cell_id, finished_cells
from featcache.pipeline.train.config import AlignConfig
from featcache.pipeline.train.loop import train
from featcache.pipeline.train.plan import CachedData, load_cached, resolve_pair


@dataclass
class Cell:
    """One configuration of a sweep, its identity, and its finished run if it has one."""

    cfg: AlignConfig
    id: str
    run: Path | None = None


@dataclass
class SweepPlan:
    """This worker's cells of a sweep, in the grid's fixed order, and the cache they read."""

    cells: list[Cell]
    data: CachedData

    @property
    def finished(self) -> list[Cell]:
        return [c for c in self.cells if c.run is not None]

    def resolved_layers(self, cell: Cell) -> tuple[str, str]:
        """The (image, text) layers the cell would train on (``auto`` scores the table, once)."""
        image, text, _ = resolve_pair(cell.cfg.layers, self.data, cell.cfg.select)
        return image, text


def plan_sweep(base: AlignConfig, layers: list[str], losses: list[str], seeds: list[int],
               pairs: list[int | None] | None = None, grid: dict[str, list] | None = None,
               shard: str | None = None) -> SweepPlan:
    """The cells of a grid that this worker trains, each with its identity and finished run.

    ``grid`` varies any other AlignConfig fields as well (``{"centering": ["none", "mean"]}``),
    so an ablation table is one call. ``shard`` "I/N" (or torchrun / a Slurm array, detected)
    takes only cells c with c mod N == I, in the grid's fixed order, into the shared runs dir.
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
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    configs: dict[str, AlignConfig] = {}
    for n in pairs or [base.pairs]:
        for layer in layers:
            for loss in losses:
                for combo in combos:
                    for seed in seeds:
                        cfg = dedupe_training_free(replace(base, layers=layer, loss=loss, seed=seed, pairs=n, **combo),
                                                   seeds)
                        configs.setdefault(repr(cfg), cfg)
    done = finished_cells(base.runs_dir)
    stores = data.stores()
    cells = []
    for cfg in worker.share(list(configs.values())):
        cfg.validate()
        key = cell_id(cfg, stores)
        cells.append(Cell(cfg, key, done.get(key)))
    return SweepPlan(cells, data)


def train_plan(plan: SweepPlan, progress=None, vectorize: bool = True, rerun: bool = False) -> list[Path]:
    """Train the plan's cells that have no finished run (all of them with ``rerun``); returns
    every cell's run, in plan order. A killed sweep resumes here: its finished cells are kept.

    ``vectorize`` trains cells that differ only in seed, lambda, tau or pair count as one batched
    model (``stacked``); each still writes its own run, equal to its sequential one."""
    todo = [c for c in plan.cells if rerun or c.run is None]
    configs = [c.cfg for c in todo]
    if vectorize:
        from featcache.pipeline.train.stacked import train_cells

        trained = train_cells(configs, plan.data, progress)
    else:
        trained = [train(cfg, plan.data, progress) for cfg in configs]
    new = {id(c): run for c, run in zip(todo, trained)}
    return [new.get(id(c), c.run) for c in plan.cells]


def sweep(base: AlignConfig, layers: list[str], losses: list[str], seeds: list[int],
          pairs: list[int | None] | None = None, progress=None, grid: dict[str, list] | None = None,
          shard: str | None = None, vectorize: bool = True, rerun: bool = False) -> list[Path]:
    """Train one run per grid cell that has none yet under ``base.runs_dir`` (``plan_sweep``,
    ``train_plan``); the cache is read once and shared by every cell."""
    return train_plan(plan_sweep(base, layers, losses, seeds, pairs, grid, shard), progress, vectorize, rerun)


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
