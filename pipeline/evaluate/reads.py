"""What evaluating many runs in one process reads once: stores, their layers, and the untrained
reference of a training set. A sweep's runs share the data set and mostly the layers, so the
second run's evaluation costs its heads and its metrics, not another read of the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featcache.cache import lookup
from featcache.cache.commands import run_decode
from featcache.cache.errors import FeatcacheError
from featcache.cache.lookup import StoreNotFound
from featcache.cache.naming import encoder_key
from featcache.cache.store import FeatureStore
from featcache.pipeline.evaluate.reference import fit_reference
from featcache.pipeline.features import Side, open_store

# What the reference map depends on (evaluate/reference.py:training_pairs and fit_reference).
REFERENCE_FIELDS = ("dataset", "train_split", "image_model", "image_pooling", "image_size", "text_model",
                    "text_pooling", "validation", "pairs", "image_layer", "text_layer", "cache")


def _trained_cache_holding(cache_dir: Path, run_cfg: dict | None, open_there) -> Path | None:
    """The cache the run was trained from, where it is not ``cache_dir`` and ``open_there(it)``
    finds the store there: a run trained with --cache-dir X, evaluated without it, is told to
    pass X rather than to extract again. None otherwise."""
    trained = Path(str((run_cfg or {}).get("cache_dir") or cache_dir))
    if trained == Path(cache_dir):
        return None
    try:
        open_there(trained)
    except (FeatcacheError, OSError):
        return None
    return trained


def _pass_cache(trained: Path) -> str:
    return f"the run was trained from the cache at {trained}, which holds it: pass --cache-dir {trained}"


def _with_decode(err: FeatcacheError, cache_dir: Path, run_cfg: dict | None) -> FeatcacheError:
    """A missing image store of a run trained on ``--decode draft`` (or gpu) stores: the extract
    command of the hint asks for that decode, or it would make a store the run then refuses."""
    decode = run_decode(run_cfg or {})
    query = getattr(err, "query", None)
    if decode == "cpu" or query is None or query.encoder != encoder_key(run_cfg.get("image_model", "")):
        return err
    return StoreNotFound(err.message, f"run: {query.extract_command(cache_dir)} --decode {decode}", query)


class Reads:
    """A memo of the cache reads of evaluations; one per batch, dropped with it."""

    def __init__(self):
        self._stores: dict[tuple, FeatureStore] = {}
        self._layers: dict[tuple, np.ndarray] = {}
        self._references: dict[str, tuple[np.ndarray, str]] = {}

    def store(self, cache_dir: Path, dataset: str, split: str, side: Side, run_cfg: dict | None = None) -> FeatureStore:
        """``run_cfg``: the run this store is read for; where the store is not under ``cache_dir``
        but is under the cache the run was trained from, the error says to pass that one (a run
        trained with --cache-dir X, evaluated without it, would otherwise be told to extract again)."""
        key = (str(cache_dir), dataset, split, side)
        if key not in self._stores:
            try:
                self._stores[key] = open_store(cache_dir, dataset, split, side)
            except FeatcacheError as err:
                trained = _trained_cache_holding(cache_dir, run_cfg, lambda there: open_store(there, dataset, split, side))
                if trained is None:
                    raise _with_decode(err, cache_dir, run_cfg) from None
                raise FeatcacheError(err.message, _pass_cache(trained)) from None
        return self._stores[key]

    def layer(self, store: FeatureStore, name: str) -> np.ndarray:
        """The whole layer, read (and checked) once; callers index it, never write to it."""
        key = (str(store.path), name)
        if key not in self._layers:
            values = store.read(name)
            values.flags.writeable = False
            self._layers[key] = values
        return self._layers[key]

    def reference(self, run_cfg: dict, cache_dir: Path) -> tuple[np.ndarray, str]:
        """``fit_reference`` once per training set: runs that differ only in seed, λ, τ or loss
        share it (the seed only draws a ``--pairs`` subset)."""
        fields = {k: run_cfg.get(k) for k in REFERENCE_FIELDS}
        if run_cfg.get("pairs") is not None:
            fields["seed"] = run_cfg.get("seed")
        key = json.dumps([str(cache_dir), fields], sort_keys=True, default=str)
        if key not in self._references:
            try:
                self._references[key] = fit_reference(run_cfg, cache_dir)
            except StoreNotFound as err:  # the untrained baseline reads the run's training split
                query = err.query
                trained = _trained_cache_holding(cache_dir, run_cfg, lambda there: lookup.open_store(there, query))
                hint = _pass_cache(trained) if trained else _with_decode(err, cache_dir, run_cfg).hint
                raise FeatcacheError(err.message, f"{hint}; or pass --no-baseline (the untrained baseline is fit "
                                                  "on the run's training split)") from None
        return self._references[key]
