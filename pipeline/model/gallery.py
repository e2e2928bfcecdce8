"""A data set's cached rows through a model's heads: the gallery ``search`` ranks and what
``embed --dataset`` writes. The cache already holds the model's layer of every row, so no
encoder runs; the store is checked to hold features of the model's own encoder (weights,
preprocessing, pooling), as evaluation checks a run's stores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.cache.lookup import StoreNotFound, check_same_encoder
from featcache.pipeline.common.arrays import normalise, require_finite
from featcache.pipeline.common.device import flat_ip
from featcache.pipeline.features import Side, open_store
from featcache.pipeline.model.aligned import AlignedModel


@dataclass
class Gallery:
    ids: list[str]
    embeddings: np.ndarray  # L2-normalised rows, missing rows left out
    paths: list[str | None]  # where each row's image is, where the data set says (None: unknown)
    texts: list[str] | None = None


def cached_gallery(model: AlignedModel, dataset: str, split: str, modality: str, cache_dir,
                   extract_missing: bool = False, progress=None) -> Gallery:
    """The ``modality`` rows of a cached split embedded by ``model``; with ``extract_missing`` a
    missing store is extracted first (with the model's encoder and options)."""
    side = model.spec.side(modality)
    query = Side(side.model, side.pooling, side.image_size if modality == "image" else None)
    try:
        store = open_store(cache_dir, dataset, split, query)
    except StoreNotFound as err:
        if not extract_missing:
            raise FeatcacheError(err.message, f"{err.hint}, or pass --extract") from None
        _extract(side, dataset, split, cache_dir, progress)
        store = open_store(cache_dir, dataset, split, query)
    check_same_encoder(side.identity, store, f"{dataset}/{split}")
    keep = ~np.asarray(store.missing, dtype=bool)
    x = require_finite(store.read(side.layer)[keep], store, side.layer)
    ids = [i for i, k in zip(store.ids, keep) if k]
    texts = [t for t, k in zip(store.texts, keep) if k] if getattr(store, "texts", None) is not None else None
    paths = _paths(dataset, split, ids) if modality == "image" else [None] * len(ids)
    return Gallery(ids, model.embed_features(modality, x), paths, texts)


def search(gallery: Gallery, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Each query's ``k`` nearest gallery rows by cosine, best first: (row, score)."""
    if k < 1:
        raise FeatcacheError(f"-k must be at least 1, got {k}")
    if not len(gallery.ids):
        raise FeatcacheError("the gallery is empty (every row is missing)")
    k = min(k, len(gallery.ids))
    scores, rows = flat_ip(np.ascontiguousarray(gallery.embeddings), k=k).search(normalise(queries), k)
    return [[(int(r), float(s)) for r, s in zip(rr, ss)] for rr, ss in zip(rows, scores)]


def _extract(side, dataset: str, split: str, cache_dir, progress) -> None:
    from featcache.cache.commands import decode_of
    from featcache.pipeline.extract.run import ExtractConfig, extract

    # decoded as the model's stores were (--decode draft): a whole-decoded store would be refused below
    extract(ExtractConfig(model=side.model, pooling=side.pooling, image_size=side.image_size, dataset=dataset,
                          splits=[split], layers="all", cache_dir=cache_dir, dtype=side.dtype,
                          decode=decode_of(side.identity)), progress)


def _paths(dataset: str, split: str, ids: list[str]) -> list[str | None]:
    """Each image row's file, from the data set's own listing (no image opened); ids alone where
    the data set cannot be listed here (moved, or held in memory)."""
    from featcache.pipeline.data.catalog import load_dataset

    try:
        images = load_dataset(dataset)[split].images
    except (FeatcacheError, KeyError, OSError):
        return [None] * len(ids)
    if images is None or not images.sources:
        return [None] * len(ids)
    where = dict(zip(images.ids, images.sources))
    return [where.get(i) for i in ids]
