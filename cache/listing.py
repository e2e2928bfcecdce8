"""What ``featcache ls`` shows of each store, as data: the table and ``ls --json`` are two views
of the same ``StoreEntry``, so a script never parses a table (whose columns fold with long
``hf:`` paths) to learn a store's path, encoder or completeness."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

from featcache.cache.errors import FeatcacheError
from featcache.cache.location import Location
from featcache.cache.store import FeatureStore, find_stores


@dataclass
class StoreEntry:
    path: str
    dataset_label: str = ""  # the data set as the user wrote it
    dataset: str = ""  # its canonical (stored) name
    split: str = ""
    encoder: str = ""
    variant: str = ""  # pooling and input size: the store folder's name, plus the decode when not whole
    rows: int = 0
    width: int = 0
    layers: int = 0
    complete_layers: int = 0
    lost_chunks: int = 0  # finished chunks whose object is gone: featcache verify names them
    complete: bool = False
    bytes_on_disk: int = 0
    weights_sha256: str = ""
    broken: str | None = None  # why the store could not be opened; the other fields are empty then

    def to_dict(self) -> dict:
        return asdict(self)


def describe(path: Location) -> StoreEntry:
    """One store's entry; a store that cannot be opened is an entry saying why, never an error,
    so one broken store does not hide the others."""
    try:
        s = FeatureStore.open(path)
        ident = s.identity
        done = sum(s.is_complete(name) for name in s.layers)
        lost = sum(len(s.lost_chunks(name)) for name in s.layers)
    except FeatcacheError as err:
        return StoreEntry(str(path), broken=str(err))
    parts = str(path).rstrip("/").split("/")
    variant = parts[-1].removesuffix(".zarr")
    decode = (ident["encoder"].get("preprocessing") or {}).get("decode")
    if decode:  # a draft or GPU-decoded store has the folder name of a whole-decoded one
        variant += f" {decode}"
    return StoreEntry(str(path), s.attrs.get("dataset_label", ""), ident["dataset"]["name"], parts[-3],
                      ident["encoder"]["name"], variant, s.rows, s.width, len(s.layers),
                      done, lost, s.is_complete() and not lost, s.nbytes_on_disk(),
                      ident["encoder"]["weights_sha256"])


def list_stores(cache_dir: Location) -> Iterator[StoreEntry]:
    """Every store under ``cache_dir``, described."""
    return (describe(path) for path in find_stores(cache_dir))
