"""Stage two's view of the cache: the image and text stores of one split, linked as pairs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.cache.store import FeatureStore, StoreSpec, store_path
from featcache.pipeline.datasets import canonical_name
from featcache.pipeline.encoders import resolve_entry


@dataclass(frozen=True)
class Side:
    """Which cached features of one modality: the encoder, its pooling and input size."""

    model: str
    pooling: str | None = None
    image_size: int | None = None

    def spec(self, dataset: str, split: str) -> StoreSpec:
        entry = resolve_entry(self.model)
        size = (self.image_size or entry.default_image_size) if entry.modality == "image" else None
        return StoreSpec(canonical_name(dataset), split, entry.name, self.pooling or entry.default_pooling, size)


def open_store(cache_dir: Path, dataset: str, split: str, side: Side) -> FeatureStore:
    path = store_path(cache_dir, side.spec(dataset, split))
    if not (path / "zarr.json").exists():
        raise FeatcacheError(
            f"no cached features of {side.model} for {dataset}/{split} under {cache_dir}",
            f"run: featcache extract --model {side.model} --layers all --dataset {dataset}"
            + (f" --cache-dir {cache_dir}" if cache_dir else ""),
        )
    return FeatureStore.open(path)


@dataclass
class PairedFeatures:
    """Pairs (image row, text row) of one split, excluding images recorded as missing."""

    images: FeatureStore
    texts: FeatureStore
    image_rows: np.ndarray
    text_rows: np.ndarray

    def __len__(self) -> int:
        return len(self.image_rows)

    def image(self, layer: str) -> np.ndarray:
        return self.images.read(layer)[self.image_rows]

    def text(self, layer: str) -> np.ndarray:
        return self.texts.read(layer)[self.text_rows]

    def identities(self) -> dict:
        return {"image": {"path": str(self.images.path), **self.images.identity},
                "text": {"path": str(self.texts.path), **self.texts.identity}}


def open_pairs(cache_dir: Path, dataset: str, split: str, image: Side, text: Side) -> PairedFeatures:
    images = open_store(cache_dir, dataset, split, image)
    texts = open_store(cache_dir, dataset, split, text)
    row_of = {image_id: i for i, image_id in enumerate(images.ids)}
    missing = images.missing
    pairs = [(row_of[g], j) for j, g in enumerate(texts.groups) if g in row_of and not missing[row_of[g]]]
    if not pairs:
        raise FeatcacheError(f"{dataset}/{split}: no caption is linked to a cached image",
                             "is this a pair data set? classification sets are evaluated with featcache eval classify")
    img_rows, txt_rows = (np.asarray(x, dtype=np.int64) for x in zip(*pairs))
    return PairedFeatures(images, texts, img_rows, txt_rows)


def subsample(n: int, size: int | None, seed: int) -> np.ndarray:
    """A reproducible random subset of ``size`` of ``n`` rows (all rows, in order, if None)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
