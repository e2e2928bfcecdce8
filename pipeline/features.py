"""Stage two's view of the cache: the image and text stores of one split, linked as pairs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from featcache.cache import lookup
from featcache.cache.errors import FeatcacheError
from featcache.cache.naming import encoder_key
from featcache.cache.store import FeatureStore, cache_root, extract_command, row_positions
from featcache.pipeline.common.names import canonical_name, combined_parts, hash_unit, is_combined


@dataclass(frozen=True)
class Side:
    """Which cached features of one modality: the encoder, its pooling and input size."""

    model: str
    pooling: str | None = None
    image_size: int | None = None

    def query(self, dataset: str, split: str) -> lookup.StoreQuery:
        return lookup.StoreQuery(canonical_name(dataset), split, encoder_key(self.model), self.pooling,
                                 self.image_size, source=dataset)


class FeatureSource(Protocol):
    """What stage two reads of one side of a split: a :class:`FeatureStore`, or a
    :class:`ConcatStore` of the stores of ``a+b``. Stage two asks only for these, so it never
    needs to know which of the two it holds."""

    path: object
    attrs: dict

    @property
    def rows(self) -> int: ...
    @property
    def width(self) -> int: ...
    @property
    def ids(self) -> list[str]: ...
    @property
    def groups(self) -> list[str]: ...
    @property
    def texts(self) -> list[str] | None: ...
    @property
    def missing(self) -> np.ndarray: ...
    @property
    def layers(self) -> list[str]: ...
    @property
    def identity(self) -> dict: ...
    @property
    def encoder_identity(self) -> dict: ...
    @property
    def split_names(self) -> list[str]: ...
    @property
    def parts(self) -> list[FeatureStore]: ...
    def is_complete(self, layer: str | None = None) -> bool: ...
    def read(self, layer: str, dtype=np.float32) -> np.ndarray: ...
    def read_rows(self, layer: str, rows: np.ndarray, dtype=np.float32) -> np.ndarray: ...
    def content_sha256(self) -> str | None: ...


class ConcatStore:
    """Several stores of one encoder read as one: the cache of a combined data set ``a+b``
    (a :class:`FeatureSource`).

    Row ids and groups are prefixed with each part's name, so equal ids never collide.
    """

    def __init__(self, parts: list[FeatureStore], names: list[str]):
        self.parts, self.names = parts, names
        self.offsets = np.cumsum([0] + [p.rows for p in parts])  # part k holds rows offsets[k]:offsets[k+1]
        self.path = "+".join(str(p.path) for p in parts)
        self.attrs = {"parts": [str(p.path) for p in parts]}
        self.rows = sum(p.rows for p in parts)
        self.width = parts[0].width
        if any(p.width != self.width for p in parts):
            raise FeatcacheError("the parts of a combined data set have different feature widths")

    def _prefixed(self, attr: str) -> list[str]:
        return [f"{n}/{v}" for n, p in zip(self.names, self.parts) for v in getattr(p, attr)]

    @property
    def ids(self) -> list[str]:
        return self._prefixed("ids")

    @property
    def groups(self) -> list[str]:
        return self._prefixed("groups")

    @property
    def texts(self) -> list[str] | None:
        texts = [p.texts for p in self.parts]
        return None if any(t is None for t in texts) else [t for ts in texts for t in ts]

    @property
    def missing(self) -> np.ndarray:
        return np.concatenate([p.missing for p in self.parts])

    @property
    def layers(self) -> list[str]:
        return [n for n in self.parts[0].layers if all(n in p.layers for p in self.parts[1:])]

    def is_complete(self, layer: str | None = None) -> bool:
        return all(p.is_complete(layer) for p in self.parts)

    def read(self, layer: str, dtype=np.float32) -> np.ndarray:
        return np.concatenate([p.read(layer, dtype) for p in self.parts])

    def read_rows(self, layer: str, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
        """``read(layer)[rows]``, each part read chunk by chunk (``FeatureStore.read_rows``)."""
        rows = row_positions(rows, self.rows)
        shape, rows = rows.shape, rows.ravel()  # any shape, as a whole read's [rows] takes
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), self.width), dtype=dtype)
        for k, store in enumerate(self.parts):
            sel = np.flatnonzero(part == k)
            if len(sel):
                out[sel] = store.read_rows(layer, rows[sel] - self.offsets[k], dtype)
        return out.reshape(*shape, self.width)

    def content_sha256(self) -> None:
        """Not recorded for ``a+b``: its identity names each part's data set digest, and a run's
        recorded stores (hence its sweep cell id) stay what they were before this protocol."""
        return None

    @property
    def identity(self) -> dict:
        first = self.parts[0].identity
        return {"encoder": first["encoder"], "dtype": first["dtype"],
                "dataset": {"name": "+".join(self.names), "sha256": "+".join(p.identity["dataset"]["sha256"] for p in self.parts),
                            "parts": [p.identity["dataset"] for p in self.parts]}}

    @property
    def encoder_identity(self) -> dict:
        return self.parts[0].encoder_identity

    @property
    def split_names(self) -> list[str]:
        return sorted(set.intersection(*(set(p.split_names) for p in self.parts)))


def open_store(cache_dir: Path, dataset: str, split: str, side: Side) -> FeatureSource:
    """The checked store of one side of a split (a ConcatStore for ``a+b``), via the cache's read API."""
    if is_combined(dataset):
        parts = combined_parts(dataset)
        stores = [open_store(cache_dir, part, split, side) for part in parts]
        for part, store in zip(parts[1:], stores[1:]):
            lookup.check_same_encoder(stores[0].encoder_identity, store, f"{dataset}: part {part}")
        return ConcatStore(stores, [canonical_name(part) for part in parts])
    return lookup.open_store(cache_dir, side.query(dataset, split))


def extract_hint(store: FeatureSource, layers: str = "all") -> str:
    """The extract command(s) that built ``store``, asking for ``layers``."""
    return "run: " + " && ".join(extract_command(p.attrs, layers, cache_dir=cache_root(p.path)) for p in store.parts)


@dataclass
class PairedFeatures:
    """Pairs (image row, text row) of one split, excluding images recorded as missing."""

    images: FeatureSource
    texts: FeatureSource
    image_rows: np.ndarray
    text_rows: np.ndarray

    def __len__(self) -> int:
        return len(self.image_rows)

    def image(self, layer: str, dtype=np.float32) -> np.ndarray:
        return self.images.read_rows(layer, self.image_rows, dtype)

    def text(self, layer: str, dtype=np.float32) -> np.ndarray:
        return self.texts.read_rows(layer, self.text_rows, dtype)

    def identities(self) -> dict:
        """What a run records of its stores; for image files also the digest of every input's
        bytes, since the identity names them by their listing."""
        content = self.images.content_sha256()
        return {"image": {"path": str(self.images.path), **self.images.identity,
                          **({"content_sha256": content} if content else {})},
                "text": {"path": str(self.texts.path), **self.texts.identity}}

    def subset(self, keep: np.ndarray) -> "PairedFeatures":
        return PairedFeatures(self.images, self.texts, self.image_rows[keep], self.text_rows[keep])

    def carve(self, fraction: float = 0.1, salt: str = "val") -> tuple["PairedFeatures", "PairedFeatures"]:
        """(rest, held out): pairs whose image id hashes below ``fraction`` are held out.

        The rule of the built-in hash splits: by image id, so every caption of an image lands on
        the same side, and the same on every machine.
        """
        ids = self.images.ids
        held = np.asarray([hash_unit(ids[r], salt) < fraction for r in self.image_rows], dtype=bool)
        return self.subset(~held), self.subset(held)


def open_pairs(cache_dir: Path, dataset: str, split: str, image: Side, text: Side) -> PairedFeatures:
    images = open_store(cache_dir, dataset, split, image)
    texts = open_store(cache_dir, dataset, split, text)
    if images.encoder_identity.get("modality", "image") != "image" or texts.encoder_identity.get("modality", "text") != "text":
        raise FeatcacheError(f"{dataset}/{split}: the image model {image.model} and text model {text.model} "
                             "must be an image and a text encoder", "swap --image-model and --text-model")
    row_of = {image_id: i for i, image_id in enumerate(images.ids)}
    missing = images.missing
    text_missing = texts.missing
    pairs = [(row_of[g], j) for j, g in enumerate(texts.groups)
             if g in row_of and not missing[row_of[g]] and not text_missing[j]]
    if not pairs:
        raise FeatcacheError(f"{dataset}/{split}: no caption is linked to a cached image",
                             "is this a pair data set? classification sets are evaluated with featcache eval classify")
    img_rows, txt_rows = (np.asarray(x, dtype=np.int64) for x in zip(*pairs))
    return PairedFeatures(images, texts, img_rows, txt_rows)


def stored_dtype(store: FeatureSource) -> np.dtype:
    """The dtype a store (or every part of a combined one) holds its features in."""
    return np.result_type(*[np.dtype(p.attrs["dtype"]) for p in store.parts])
