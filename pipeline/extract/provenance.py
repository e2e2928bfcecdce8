"""Which input each stored image row was computed from, known without opening the inputs.

A store's identity names its data set by the annotation: row ids and groups (and, for a text
side, the texts themselves). The images are tied to their rows one by one instead: every
finished chunk records each row's *stamp* (size and mtime_ns of the file or shard that holds it)
and the sha256 of the bytes that were decoded, computed while decoding, so hashing costs no
second read. On a rerun, a row whose stamp is unchanged is trusted from the listing; a row whose
stamp changed is read and hashed again, and refused by name if its bytes differ. A no-op rerun on
a finished store therefore opens no image file, and a resume reads only unfinished chunks.

Sides held in memory (MNIST's arrays) have no stamps and are digested by content, as before.

Stores written before per-row sources (their identity has no ``digest`` field) hashed every
image into the identity. They are still read: their content digest is checked once, in full,
and the sources written then, so every later run is a listing again.
"""

from __future__ import annotations

import hashlib

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.cache.store import FeatureStore
from featcache.pipeline.data.rows import BadImage, ImageSide, Split

ROWS_DIGEST = "rows"  # identity.dataset.digest: ids and groups, images checked per row


def tracked(side) -> bool:
    return isinstance(side, ImageSide) and side.stamps is not None


def dataset_identity(split: Split, modality: str, limit: int | None) -> dict:
    side = split.side(modality)
    block = {"name": split.dataset, "split": split.name, "side": modality, "kind": split.kind,
             "rows": len(side), "limit": limit}
    if tracked(side):
        h = hashlib.sha256()
        for i in range(len(side)):
            h.update(side.ids[i].encode() + b"\0" + side.groups[i].encode() + b"\0")
        return {**block, "sha256": h.hexdigest(), "digest": ROWS_DIGEST}
    return {**block, "sha256": split.digest(modality)}


def adopt_legacy(store: FeatureStore | None, identity: dict, side) -> dict:
    """The identity to open the existing ``store`` with: ``identity``, or for a store written
    before per-row sources whose rows are the same data, the stored identity (its seals are
    keyed on it). None: no readable store there, create_or_open decides."""
    if store is None or not tracked(side):
        return identity
    stored = store.identity.get("dataset", {})
    if "digest" in stored:
        return identity
    ours = {k: v for k, v in identity["dataset"].items() if k not in ("sha256", "digest")}
    if {k: v for k, v in stored.items() if k != "sha256"} != ours or store.ids != side.ids \
            or store.groups != side.groups:
        return identity  # another data set: the identity diff names it
    adopted = {**identity, "dataset": dict(stored)}
    if store.has_sources and store.sources()[1].any(axis=1).all():
        return adopted  # sources already recorded: check_rows checks them
    stamps, hashes = side.stamps(), np.zeros((len(side), 32), dtype=np.uint8)
    digest = hashlib.sha256()
    for i in range(len(side)):
        hashes[i] = np.frombuffer(_content_hash(side, i), dtype=np.uint8)
        digest.update(side.ids[i].encode() + b"\0" + side.groups[i].encode() + b"\0" + hashes[i].tobytes())
    if digest.hexdigest() != stored.get("sha256"):
        return identity
    store.ensure_sources()
    store.write_sources(slice(None), stamps, hashes)
    return adopted


def _where(side: ImageSide, row: int) -> str:
    """How a row's input is named in a message: its file or shard member, else its id."""
    return side.sources[row] if side.sources else side.ids[row]


def _content_hash(side: ImageSide, row: int) -> bytes:
    try:
        return hashlib.sha256(side.raw(row)).digest()
    except BadImage:
        return bytes(32)


def finished_rows(store: FeatureStore) -> np.ndarray:
    """Rows of chunks finished in any stored layer: the ones whose inputs are in the store."""
    done = np.zeros(store.n_chunks, dtype=bool)
    for layer in store.layers:
        done |= store.done_chunks(layer)
    rows = np.zeros(store.rows, dtype=bool)
    for chunk in np.flatnonzero(done):
        rows[store.chunk_slice(int(chunk))] = True
    return rows


def check_rows(store: FeatureStore, side, stamps: np.ndarray) -> None:
    """Refuse a store whose finished rows were computed from inputs that have changed since.

    Only rows whose stamp changed are read; a file touched but not changed is accepted and its
    new stamp recorded, so the next run does not read it again.
    """
    if not tracked(side) or not store.has_sources:
        return
    # Done flags first: a chunk's sources are written before its flags, so every chunk seen
    # finished here has its sources, even while other shards are finishing chunks.
    finished = finished_rows(store)
    stored_stamps, stored_hashes = store.sources()
    changed = np.flatnonzero(finished & (stored_stamps != stamps).any(axis=1))
    for row in changed:
        row = int(row)
        now = _content_hash(side, row)
        if not stored_hashes[row].any() or now != stored_hashes[row].tobytes():
            where = _where(side, row)
            if (stamps[row] == -1).all():
                raise FeatcacheError(f"the image {where} (row {side.ids[row]!r}) of a finished chunk of {store.path} "
                                     "is missing or unreadable",
                                     "restore the file, or rebuild the store from the current files with --overwrite")
            raise FeatcacheError(
                f"the image {where} (row {side.ids[row]!r}) changed after its features were stored in {store.path}",
                "restore the file, or rebuild the store from the current files with --overwrite")
    if len(changed):
        store.write_sources(changed, stamps[changed], stored_hashes[changed])


def verify_deep(store: FeatureStore, progress=None) -> list[str]:
    """Re-hash every recorded input against the store (``featcache verify --deep``); problems found.

    The inputs are found again from the data set as the extract command named it (relative
    paths from the folder it ran in)."""
    from featcache.pipeline.data.catalog import load_dataset

    if not store.has_sources:
        return []  # a text side or in-memory data: their content is in the identity itself
    label, data = store.attrs.get("dataset_label"), store.identity["dataset"]
    try:
        side = load_dataset(label)[data["split"]].limited(data.get("limit")).side("image")
    except (FeatcacheError, KeyError) as err:
        return [f"{store.path}: its data set {label!r} cannot be read from here to check its images "
                f"({getattr(err, 'message', err)}); run verify --deep from the folder extract ran in"]
    if side.ids != store.ids:
        return [f"{store.path}: the data set {label!r} now lists other rows than the store"]
    _, hashes = store.sources()
    problems = []
    for row in np.flatnonzero(hashes.any(axis=1)):
        row = int(row)
        if _content_hash(side, row) != hashes[row].tobytes():
            where = _where(side, row)
            problems.append(f"{store.path}: the image {where} (row {side.ids[row]!r}) differs from the one "
                            "its features were computed from")
        if progress is not None:
            progress()
    return problems
