"""A feature store: one zarr group per (dataset, split, encoder, pooling, resolution).

Layout of a store (see docs/design.md)::

    zarr.json            attrs: identity, versions, rows, width, block_rows, layers
    ids      (rows,)     stable row ids of the data set split
    groups   (rows,)     what a row belongs to: its image for a caption, its class for an image
    texts    (rows,)     the strings encoded (text stores only)
    missing  (rows,)     rows whose input could not be decoded (--skip-bad); never zero-filled
    layers/<name>        (rows, width) float16, one chunk per row block
    done/<name>          (n_blocks,) bool, one chunk per block: the block of <name> is final

Writers fill whole row blocks and flip ``done`` only after a block's data is written, so a
killed run leaves finished blocks intact and readers never see a half-written block. Blocks
are disjoint chunks, so several processes can fill one store side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import zarr

from featcache.cache import location as loc
from featcache.cache.errors import FeatcacheError
from featcache.cache.location import Location

FORMAT_VERSION = 1
_MIN_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class StoreSpec:
    """Names that place a store in the cache directory."""

    dataset: str
    split: str
    encoder: str
    pooling: str
    image_size: int | None = None

    @property
    def variant(self) -> str:
        return self.pooling if self.image_size is None else f"{self.pooling}-{self.image_size}px"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


def store_path(cache_dir: Location, spec: StoreSpec) -> Location:
    """``<cache-dir>/<dataset>/<split>/<encoder>/<variant>.zarr``; cache_dir may be an fsspec URL."""
    root = loc.as_location(cache_dir)
    return loc.join(root, _safe(spec.dataset), _safe(spec.split), _safe(spec.encoder), f"{_safe(spec.variant)}.zarr")


def default_block_rows(width: int, itemsize: int = 2) -> int:
    """Rows per chunk so that each layer chunk holds at least 1 MiB, in multiples of 64."""
    rows = -(-_MIN_CHUNK_BYTES // (width * itemsize))
    return int(-(-rows // 64) * 64)


def _identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _identity_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: stored {a!r}, requested {b!r}")
    return diffs


class FeatureStore:
    """Read and write access to one store. Open with :meth:`open` or :meth:`create_or_open`."""

    def __init__(self, path: Location, group: zarr.Group):
        self.path = loc.as_location(path)
        self.group = group
        self.attrs = dict(group.attrs)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Location) -> "FeatureStore":
        path = loc.as_location(path)
        if not loc.has_group(path):
            raise FeatcacheError(f"no feature store at {path}")
        group = zarr.open_group(str(path), mode="r+")
        if not group.attrs.get("created"):
            raise FeatcacheError(
                f"feature store {path} was never fully created",
                "run the extract command again; it will rebuild it",
            )
        return cls(path, group)

    @classmethod
    def create_or_open(
        cls,
        path: Location,
        *,
        identity: dict,
        versions: dict,
        ids: list[str],
        groups: list[str],
        texts: list[str] | None,
        width: int,
        dtype: str = "float16",
        block_rows: int | None = None,
        overwrite: bool = False,
    ) -> "FeatureStore":
        """Open the store at ``path`` if it has this identity; create it if absent.

        A store with another identity is never reused or mixed: it is an error unless
        ``overwrite`` asks to replace it.
        """
        path = loc.as_location(path)
        block_rows = block_rows or default_block_rows(width, np.dtype(dtype).itemsize)
        if loc.has_group(path):
            group = zarr.open_group(str(path), mode="r+")
            attrs = dict(group.attrs)
            if not attrs.get("created"):
                loc.remove(path)  # a creation that was killed holds no finished block
            elif overwrite:
                loc.remove(path)
            else:
                diffs = _identity_diff(attrs.get("identity", {}), identity)
                if attrs.get("block_rows") != block_rows:
                    diffs.append(
                        f"block_rows: stored {attrs.get('block_rows')}, requested {block_rows}"
                    )
                if diffs:
                    raise FeatcacheError(
                        f"the cache at {path} was built with a different identity "
                        f"({'; '.join(diffs[:3])}); it was left untouched",
                        "pass --overwrite to rebuild it, or use another --cache-dir",
                    )
                return cls(path, group)
        loc.make_parent(path)
        group = zarr.open_group(str(path), mode="w")
        n = len(ids)
        chunk = max(1, min(block_rows, n))
        group.create_array("ids", shape=(n,), dtype=str, chunks=(max(n, 1),))[:] = np.asarray(ids)
        group.create_array("groups", shape=(n,), dtype=str, chunks=(max(n, 1),))[:] = np.asarray(
            groups
        )
        if texts is not None:
            group.create_array("texts", shape=(n,), dtype=str, chunks=(max(n, 1),))[:] = (
                np.asarray(texts)
            )
        group.create_array("missing", shape=(n,), dtype=bool, chunks=(chunk,), fill_value=False)
        group.create_group("layers")
        group.create_group("done")
        group.attrs.update(
            {
                "format": FORMAT_VERSION,
                "identity": identity,
                "versions": versions,
                "rows": n,
                "width": width,
                "dtype": dtype,
                "block_rows": block_rows,
                "layers": [],
            }
        )
        group.attrs["created"] = True  # last: marks the skeleton as complete
        return cls(path, group)

    # -- shape -----------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return int(self.attrs["rows"])

    @property
    def width(self) -> int:
        return int(self.attrs["width"])

    @property
    def block_rows(self) -> int:
        return int(self.attrs["block_rows"])

    @property
    def n_blocks(self) -> int:
        return -(-self.rows // self.block_rows)

    @property
    def identity(self) -> dict:
        return self.attrs["identity"]

    def block_slice(self, block: int) -> slice:
        start = block * self.block_rows
        return slice(start, min(self.rows, start + self.block_rows))

    @property
    def layers(self) -> list[str]:
        """Layers with an array in the store, in the order they were first requested."""
        return list(self.attrs.get("layers", []))

    def _text(self, name: str) -> list[str]:
        return [str(s) for s in self.group[name][:]] if self.rows else []

    @property
    def ids(self) -> list[str]:
        return self._text("ids")

    @property
    def groups(self) -> list[str]:
        return self._text("groups")

    @property
    def texts(self) -> list[str] | None:
        return self._text("texts") if "texts" in self.group else None

    @property
    def missing(self) -> np.ndarray:
        return np.asarray(self.group["missing"][:], dtype=bool)

    # -- writing ---------------------------------------------------------------------------
    def ensure_layers(self, names: list[str]) -> None:
        """Create arrays for layers not yet in the store (one writer does this before work)."""
        chunk = max(1, min(self.block_rows, self.rows))
        fill = np.nan
        new = [n for n in names if n not in self.layers]
        for name in new:
            self.group.create_array(
                f"layers/{name}",
                shape=(self.rows, self.width),
                dtype=self.attrs["dtype"],
                chunks=(chunk, self.width),
                fill_value=fill,
                overwrite=True,
            )
            self.group.create_array(
                f"done/{name}",
                shape=(max(self.n_blocks, 1),),
                dtype=bool,
                chunks=(1,),
                fill_value=False,
                overwrite=True,
            )
        if new:
            self.group.attrs["layers"] = self.layers + new
            self.attrs = dict(self.group.attrs)

    def done_blocks(self, layer: str) -> np.ndarray:
        if layer not in self.layers:
            return np.zeros(self.n_blocks, dtype=bool)
        return np.asarray(self.group[f"done/{layer}"][: self.n_blocks], dtype=bool)

    def pending_blocks(self, layers: list[str]) -> list[int]:
        pending = np.zeros(self.n_blocks, dtype=bool)
        for layer in layers:
            pending |= ~self.done_blocks(layer)
        return [int(b) for b in np.flatnonzero(pending)]

    def write_block(
        self, block: int, features: dict[str, np.ndarray], missing: np.ndarray
    ) -> None:
        """Write one block's rows for the given layers, then mark them done.

        The data goes first and the done flags last, so a kill between the two only costs
        recomputing this block.
        """
        sl = self.block_slice(block)
        self.group["missing"][sl] = missing
        for name, values in features.items():
            self.group[f"layers/{name}"][sl] = values
        for name in features:
            self.group[f"done/{name}"][block] = True

    def block_done(self, layer: str, block: int) -> bool:
        return bool(self.group[f"done/{layer}"][block])

    # -- reading ---------------------------------------------------------------------------
    def is_complete(self, layer: str | None = None) -> bool:
        layers = [layer] if layer else self.layers
        return bool(layers) and all(self.done_blocks(name).all() for name in layers)

    def read(self, layer: str, dtype=np.float32) -> np.ndarray:
        """All rows of one layer. Refuses a layer with unfinished blocks."""
        if layer not in self.layers:
            raise FeatcacheError(
                f"layer {layer!r} is not in the store {self.path}",
                f"stored layers: {', '.join(self.layers) or 'none'}",
            )
        if not self.is_complete(layer):
            done = int(self.done_blocks(layer).sum())
            raise FeatcacheError(
                f"layer {layer!r} of {self.path} is incomplete ({done}/{self.n_blocks} blocks)",
                "run the extract command again to finish it",
            )
        return np.asarray(self.group[f"layers/{layer}"][:], dtype=dtype)

    def read_finished(self, layer: str, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Rows of finished blocks only, with their row indices; for readers racing a writer."""
        done = self.done_blocks(layer)
        idx = np.concatenate(
            [np.arange(self.block_slice(b).start, self.block_slice(b).stop) for b in np.flatnonzero(done)]
            or [np.zeros(0, dtype=np.int64)]
        )
        arr = self.group[f"layers/{layer}"]
        parts = [np.asarray(arr[self.block_slice(b)], dtype=dtype) for b in np.flatnonzero(done)]
        data = np.concatenate(parts) if parts else np.zeros((0, self.width), dtype=dtype)
        return idx, data

    def nbytes_on_disk(self) -> int:
        return loc.size(self.path)


def find_stores(cache_dir: Location) -> Iterator[Location]:
    return iter(loc.find_groups(loc.as_location(cache_dir)))
