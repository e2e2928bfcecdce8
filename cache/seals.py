"""The seal maths: what ties stored bytes to their store, layer and place.

A checksum says an object is intact, not that it belongs where it lies. A finished chunk's done
flag is therefore its seal, a crc32c of the store's identity, the layer, the chunk's position and
its bytes; the shared row arrays (ids, groups, texts) have seals in the store's attributes. Every
read recomputes them (``FeatureStore.check_seal``, ``FeatureStore.row_values``).
"""

from __future__ import annotations

import hashlib
import json

import google_crc32c
import numpy as np

DONE = 1 << 32  # a seal is this bit and a crc32c: never 0, the value of an unfinished chunk


def identity_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def rows_seal(identity: dict, name: str, values) -> int:
    """The seal of a shared row array (ids, groups, texts; its values as strings), kept in the
    store's attributes: these arrays pair captions with images, so another store's copy must not pass."""
    crc = google_crc32c.value(f"{identity_key(identity)}\0{name}\0".encode())
    return DONE | google_crc32c.extend(crc, json.dumps([str(v) for v in values]).encode())


def chunk_seal(key: str, layer: str, chunk: int, chunk_rows: int, missing: np.ndarray, data: np.ndarray,
               dtype) -> int:
    """The done flag of a finished chunk: binds its bytes (as stored, in ``dtype``) to the store
    (``key``: its :func:`identity_key`), the layer and the position."""
    crc = google_crc32c.value(f"{key}\0{layer}\0{chunk}\0{chunk_rows}\0".encode())
    crc = google_crc32c.extend(crc, np.ascontiguousarray(missing, dtype=bool))
    crc = google_crc32c.extend(crc, np.ascontiguousarray(data, dtype=dtype))
    return DONE | crc
