"""``featcache verify``: check every finished chunk of a store; ``--repair`` un-finishes bad ones.

A chunk is bad when it is marked done but its data is missing or fails its crc32c, or when
its ``done`` flag or ``missing`` chunk is itself unreadable. Repair clears the done flags of
the bad chunks (all layers, where the shared ``missing`` chunk is bad); the same extract
command then recomputes exactly those chunks, and since extraction is deterministic per chunk
the store ends up bitwise equal to an undamaged one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

import numpy as np
import zarr

from featcache.cache.errors import FeatcacheError
from featcache.cache.location import Location
from featcache.cache.locks import all_writers_locked
from featcache.cache.seals import rows_seal
from featcache.cache.store import (
    ARRAY_OPTIONS,
    FORMAT_VERSION,
    WRITE_EVERY_CHUNK,
    CorruptArray,
    CorruptChunk,
    FeatureStore,
    cache_root,
    rebuild_command,
)


@dataclass(frozen=True)
class BadChunk:
    store: str
    layer: str  # a layer name, or "missing" / "ids" / "groups" / "texts" for the shared arrays
    chunk: int | None  # None: the whole array
    problem: str

    @property
    def repairable(self) -> bool:
        return self.chunk is not None

    def to_dict(self) -> dict:
        return {**asdict(self), "repairable": self.repairable}


@dataclass
class VerifyReport:
    """What one ``featcache verify`` found: the table and ``verify --json`` both read this."""

    stores: list[str]
    bad: list[BadChunk] = field(default_factory=list)
    repair: bool = False  # bad chunks were marked unfinished (the repairable ones)

    @property
    def ok(self) -> bool:
        return not self.bad

    def to_dict(self) -> dict:
        return {"stores": self.stores, "ok": self.ok, "bad": [b.to_dict() for b in self.bad],
                "bad_stores": sorted({b.store for b in self.bad}),
                "repaired_chunks": sum(b.repairable for b in self.bad) if self.repair else 0}


def _done_flags(store: FeatureStore, layer: str) -> tuple[dict[int, int], list[BadChunk]]:
    """The flag (seal, or 1 in format 2) of each chunk marked done, and chunks whose done flag
    itself cannot be read."""
    done, bad = {}, []
    for chunk in range(store.n_chunks):
        try:
            flag = int(store.decoded(f"done/{layer}", chunk))
        except FeatcacheError as err:
            problem = err.problem if isinstance(err, CorruptArray) else "cannot be read"
            bad.append(BadChunk(str(store.path), layer, chunk, f"its done flag {problem}"))
            continue
        if flag:
            done[chunk] = flag
    return done, bad


def _readable_chunks(store: FeatureStore, layer: str, done: dict[int, int], missing: dict,
                     bad: list[BadChunk]) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """``(chunk, flag, missing rows, rows)`` for each chunk in ``done`` whose object is there and
    whose checksums hold (its own and its missing-row chunk's, read once into ``missing``);
    the others go to ``bad``."""
    present = store.stored_chunks(f"layers/{layer}")
    for chunk, flag in done.items():
        if chunk not in present:
            bad.append(BadChunk(str(store.path), layer, chunk, "is marked done but its data is missing"))
            continue
        try:
            if chunk not in missing:
                missing[chunk] = store.raw_chunk("missing", chunk)
            data = store.raw_chunk(f"layers/{layer}", chunk)
        except CorruptChunk as err:
            bad.append(BadChunk(str(store.path), layer, chunk, err.problem))
            continue
        yield chunk, flag, missing[chunk], data


def verify_store(store: FeatureStore) -> list[BadChunk]:
    """Every problem in the finished part of one store."""
    path, bad = str(store.path), []
    for name in ("ids", "groups", "texts", "missing"):
        if name == "texts" and store.texts_absent:
            continue
        try:  # the shared row arrays; a bad chunk of ``missing`` is repairable and found per chunk below
            store.array("missing") if name == "missing" else store.row_values(name)  # checksums and seal
        except FeatcacheError as err:
            bad.append(BadChunk(path, name, None, f"{err.message.split(': ', 1)[-1]} (not repairable: "
                                                  "rebuild the store)"))
    try:
        missing_present = store.stored_chunks("missing")
    except FeatcacheError:
        missing_present = set()
    finished: set[int] = set()
    missing: dict = {}
    for layer in store.layers:
        try:
            store.array(f"layers/{layer}"), store.array(f"done/{layer}")
        except FeatcacheError as err:
            bad.append(BadChunk(path, layer, None, f"{err.message.split(': ', 1)[-1]} (not repairable: "
                                                   "rebuild the store)"))
            continue
        done, flag_bad = _done_flags(store, layer)
        bad += flag_bad
        finished.update(done)
        for chunk, flag, missing_rows, data in _readable_chunks(store, layer, done, missing, bad):
            try:
                store.check_seal(layer, chunk, flag, missing_rows, data)
            except CorruptChunk as err:
                bad.append(BadChunk(path, layer, chunk, err.problem))
    for chunk in sorted(finished):
        if chunk not in missing_present:
            bad.append(BadChunk(path, "missing", chunk, "its data is missing"))
            continue
        try:
            store.read_chunk("missing", chunk)
        except CorruptChunk as err:
            bad.append(BadChunk(path, "missing", chunk, err.problem))
    return bad


def repair_store(store: FeatureStore, bad: list[BadChunk]) -> int:
    """Clear the done flags of bad chunks; returns how many (layer, chunk) flags were cleared."""
    cleared = set()
    for b in bad:
        if not b.repairable:
            continue
        layers = store.layers if b.layer == "missing" else [b.layer]  # the missing chunk is shared
        cleared.update((layer, b.chunk) for layer in layers)
    for layer, chunk in sorted(cleared):
        store.clear_done(layer, [chunk])
    return len(cleared)


def _layer_seals(store: FeatureStore, layer: str, missing: dict, bad: list[BadChunk]) -> np.ndarray:
    """Seals for a format-2 layer's finished chunks, each checked first; 0 for a chunk that is
    unfinished or fails a check (reported in ``bad``, left for extract to recompute). Flags that
    are already seals (a format-3 layer relabelled 2) are checked against their chunk, not redone."""
    already = np.dtype(store.array(f"done/{layer}").dtype) == np.uint64
    seals = np.zeros(store.n_chunks, dtype=np.uint64)
    done, found = _done_flags(store, layer)
    for chunk, flag, missing_rows, data in _readable_chunks(store, layer, done, missing, found):
        try:
            if already:
                store.check_seal(layer, chunk, flag, missing_rows, data)
        except CorruptChunk as err:
            found.append(BadChunk(str(store.path), layer, chunk, err.problem))
            continue
        seals[chunk] = flag if already else store.seal_of(layer, chunk, missing_rows, data)
    bad += [replace(b, problem=f"{b.problem} (left unfinished)") for b in found]
    return seals


def reseal_store(path: Location) -> list[BadChunk]:
    """Bring a format-2 store (checksums, no seals) to format 3 in place, without recomputing it.

    Every finished chunk's checksum is checked before its seal is written; one that fails, or
    whose flag cannot be read, is left unfinished for the same extract command to recompute.
    The seals go to a journal (``reseal/<layer>``, listed in the ``resealed`` attribute) before
    any done flag is replaced, and the format becomes 3 last: a reseal killed at any point is
    finished by the next one, and never loses a flag. It can only vouch for positions as they
    are now: format 2 never recorded them.
    """
    store = FeatureStore.open(path, formats=(2, FORMAT_VERSION))
    if store.attrs["format"] == FORMAT_VERSION and "row_seals" in store.attrs:
        return []
    with all_writers_locked(store.path, str(store.path)):  # never under a running extract
        if store.attrs["format"] == 2:
            missing = {}  # each missing-row chunk read once, for every layer
            for layer in store.layers:
                if layer not in store.attrs.get("resealed", []):
                    _journal_layer(store, layer, missing)
        if "row_seals" not in store.attrs:  # format 2, or a development build of format 3
            names = [n for n in ("ids", "groups", "texts") if not (n == "texts" and store.texts_absent)]
            store.group.attrs["row_seals"] = {n: rows_seal(store.identity, n, store.whole(n)) for n in names}
        if store.attrs["format"] == 2:
            for layer in store.layers:
                store.write_seals(layer, _journaled(store, layer))
        bad = [BadChunk(str(store.path), layer, chunk, problem) for layer, chunk, problem
               in store.group.attrs.get("reseal_bad", [])]
        store.group.attrs["format"] = FORMAT_VERSION
        for name in ("resealed", "reseal_bad"):  # leftovers of a finished reseal are harmless, but tidy
            if name in store.group.attrs:
                del store.group.attrs[name]
        if "reseal" in store.group:
            del store.group["reseal"]
    return bad


def _journal_layer(store: FeatureStore, layer: str, missing: dict) -> None:
    """One layer's seals into the journal, with what it left unfinished; then the layer is listed."""
    bad = []
    seals = _layer_seals(store, layer, missing, bad)
    store.group.require_group("reseal")
    with zarr.config.set(WRITE_EVERY_CHUNK):
        store.group.create_array(f"reseal/{layer}", shape=(max(store.n_chunks, 1),), dtype=np.uint64,
                                 chunks=(max(store.n_chunks, 1),), fill_value=0, overwrite=True,
                                 **ARRAY_OPTIONS)[: store.n_chunks] = seals
    store.group.attrs.update({"resealed": store.attrs.get("resealed", []) + [layer],
                              "reseal_bad": store.attrs.get("reseal_bad", []) + [[b.layer, b.chunk, b.problem]
                                                                                 for b in bad]})
    store.attrs = dict(store.group.attrs)


def _journaled(store: FeatureStore, layer: str) -> np.ndarray:
    """A layer's journaled seals; a journal that is lost or damaged is a clear error, because
    the layer's done flags may already be partly replaced."""
    name, problem = f"reseal/{layer}", None
    if store.n_chunks and 0 not in store.stored_chunks(name):
        problem = "is missing"
    else:
        try:
            seals = store.decoded(name)
        except CorruptArray as err:
            problem = err.problem
        except FeatcacheError:  # its metadata is gone
            problem = "is missing"
        else:
            if seals.shape != (max(store.n_chunks, 1),):
                problem = f"has shape {seals.shape}"
    if problem:
        raise FeatcacheError(f"{store.path}: the reseal journal of layer {layer!r} {problem}, and its done flags "
                             "may already be partly replaced",
                             f"rebuild the store: {rebuild_command(store.attrs, cache_root(store.path))}")
    return seals[: store.n_chunks].astype(np.uint64)


def verify(paths: list[Location], repair: bool = False, reseal: bool = False) -> list[BadChunk]:
    """Verify (and optionally repair, or first reseal) stores; returns every problem found."""
    found = []
    for path in paths:
        try:
            if reseal:
                found += reseal_store(path)
            store = FeatureStore.open(path)
        except FeatcacheError as err:
            found.append(BadChunk(str(path), "store", None, err.message))
            continue
        bad = verify_store(store)
        if repair and bad:
            with all_writers_locked(store.path, str(store.path)):  # never under a running extract
                repair_store(store, bad)
        found += bad
    return found
