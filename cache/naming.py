"""Where a store lives in the cache directory, derived from what makes it unique.

``<cache-dir>/<dataset>/<split>/<encoder>/<pooling>[-<size>px].zarr``. Every component goes
through :func:`safe_component`, so no name a user brings (a file called ``...jsonl``, a split
called ``..``, a model path with separators) can place a store outside the cache directory.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import featcache.cache.location as loc
from featcache.cache.location import Location

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def safe_component(name: str) -> str:
    """One path component that is a plain, visible name, and distinct for distinct inputs.

    A name that is already safe is kept as it is, so registered names stay readable. Anything
    else (separators, control characters, a leading dot, ``..``, empty) is replaced by ``_``
    and a short digest of the original is appended, so ``a/b`` and ``a_b`` never share a store.
    """
    cleaned = _UNSAFE.sub("_", name)
    cleaned = re.sub(r"^\.", "_", cleaned)
    if cleaned == name and name not in ("", ".", ".."):
        return name
    return f"{cleaned or '_'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def encoder_key(spec: str) -> str:
    """The name an encoder's stores answer to: ``hf:./model`` is ``hf:/abs/path/model``.

    A relative local path means another model in another folder; resolving it on both the write
    and the read side keeps a store from being read for a different model of the same spelling.
    """
    spec = spec.strip()
    if spec.startswith("hf:") and len(spec) > 3:
        local = Path(spec[3:]).expanduser()
        if local.exists():
            return f"hf:{local.resolve()}"
    return spec


def split_label(split: str, limit: int | None) -> str:
    """A ``--limit`` run is its own store: it must never be mistaken for the full split."""
    return split if not limit else f"{split}-sample{limit}"


@dataclass(frozen=True)
class StoreSpec:
    """The names that place a store: data set, split label, encoder, pooling, input size."""

    dataset: str
    split: str
    encoder: str
    pooling: str
    image_size: int | None = None

    @property
    def variant(self) -> str:
        return self.pooling if self.image_size is None else f"{self.pooling}-{self.image_size}px"


def store_path(cache_dir: Location, spec: StoreSpec) -> Location:
    root = loc.as_location(cache_dir)
    return loc.join(root, *(safe_component(p) for p in (spec.dataset, spec.split, spec.encoder)),
                    f"{safe_component(spec.variant)}.zarr")


def split_dir(cache_dir: Location, dataset: str, split: str) -> Location:
    """The folder holding every encoder's stores of one data set split."""
    return loc.join(loc.as_location(cache_dir), safe_component(dataset), safe_component(split))
