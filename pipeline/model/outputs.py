"""Embeddings to a file, with the ids that say which row is which: ``.npy`` (ids beside it in
``NAME.ids.json``, since an array holds no strings) or ``.parquet`` (one table)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.cache.files import open_new, write_text


def write_embeddings(path: Path, ids: list[str], embeddings: np.ndarray, texts: list[str] | None = None) -> list[Path]:
    """``.npy`` (with the ids beside it, ``NAME.ids.json``) or ``.parquet`` (columns id, [text,]
    embedding); returns the files written."""
    path = Path(path)
    if path.suffix not in (".npy", ".parquet"):
        raise FeatcacheError(f"cannot write embeddings to {path.name}", "name the output .npy or .parquet")
    if path.suffix == ".npy":  # every file through open_new: a link planted there is refused, not followed
        with open_new(path, "wb") as f:
            np.save(f, np.ascontiguousarray(embeddings, dtype=np.float32))
        return [path, write_text(path.with_suffix(".ids.json"), json.dumps(ids) + "\n")]
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    columns = {"id": pa.array(ids, pa.string())}
    if texts is not None:
        columns["text"] = pa.array(texts, pa.string())
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    with open_new(path, "wb") as f:
        pq.write_table(pa.table(columns), f)
    return [path]
