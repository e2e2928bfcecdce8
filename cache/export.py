"""Export a feature store to HDF5 for tools that do not read zarr."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.cache.files import refuse_link
from featcache.cache.store import FeatureStore


def export_hdf5(store: FeatureStore, out: Path | str, force: bool = False) -> Path:
    """One dataset per finished layer, plus ids, groups, missing rows and the identity as JSON.

    Written to a temporary file beside ``out`` and renamed into place, so a failed export
    leaves neither a partial file nor the temporary one; an existing file is kept unless
    ``force``.
    """
    out = Path(out)
    if out.is_dir():
        raise FeatcacheError(f"{out} is a folder", "name the HDF5 file to write, e.g. features.h5")
    if not out.parent.is_dir():
        raise FeatcacheError(f"the folder {out.parent} does not exist", "create it first, or write elsewhere")
    if out.resolve().is_relative_to(Path(str(store.path)).resolve()):
        raise FeatcacheError(f"{out} is inside the store {store.path}", "write the HDF5 file outside the store")
    if out.exists() and not force:
        raise FeatcacheError(f"{out} already exists; it was left untouched", "pass --force to replace it")
    complete = [name for name in store.layers if store.is_complete(name)]
    if not complete:
        raise FeatcacheError(f"{store.path} has no finished layer to export", "run the extract command first")
    tmp = refuse_link(out.with_name(f".{out.name}.tmp"))
    try:
        with h5py.File(tmp, "w") as f:
            str_dt = h5py.string_dtype()
            f.create_dataset("ids", data=np.asarray(store.ids, dtype=object), dtype=str_dt)
            f.create_dataset("groups", data=np.asarray(store.groups, dtype=object), dtype=str_dt)
            if store.texts is not None:
                f.create_dataset("texts", data=np.asarray(store.texts, dtype=object), dtype=str_dt)
            f.create_dataset("missing", data=store.missing)
            grp = f.create_group("layers")
            for name in complete:
                grp.create_dataset(name, data=store.read(name, dtype=np.dtype(store.attrs["dtype"])),
                                   chunks=(min(store.chunk_rows, max(store.rows, 1)), store.width),
                                   compression="gzip")
            f.attrs["identity"] = json.dumps(store.identity, sort_keys=True)
            f.attrs["versions"] = json.dumps(store.attrs.get("versions", {}), sort_keys=True)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
