"""``featcache verify``: check every finished block of a store; ``--repair`` un-finishes bad ones.

A block is bad when it is marked done but its chunk is missing or fails its crc32c, or when
its ``done`` flag or ``missing`` chunk is itself unreadable. Repair clears the done flags of
the bad blocks (all layers, where the shared ``missing`` chunk is bad); the same extract
command then recomputes exactly those blocks, and since extraction is deterministic per block
the store ends up bitwise equal to an undamaged one.
"""

from __future__ import annotations

from dataclasses import dataclass

from featcache.cache.errors import FeatcacheError
from featcache.cache.location import Location
from featcache.cache.store import CorruptBlock, FeatureStore


@dataclass(frozen=True)
class BadBlock:
    store: str
    layer: str  # a layer name, or "missing" / "ids" / "groups" / "texts" for the shared arrays
    block: int | None  # None: the whole array
    problem: str

    @property
    def repairable(self) -> bool:
        return self.block is not None


def _done_flags(store: FeatureStore, layer: str) -> tuple[list[int], list[BadBlock]]:
    """Blocks marked done, and blocks whose done flag itself cannot be read."""
    done, bad = [], []
    for block in range(store.n_blocks):
        try:
            if store.block_done(layer, block):
                done.append(block)
        except FeatcacheError:
            bad.append(BadBlock(str(store.path), layer, block, "its done flag fails its checksum"))
    return done, bad


def verify_store(store: FeatureStore) -> list[BadBlock]:
    """Every problem in the finished part of one store."""
    path, bad = str(store.path), []
    for name in ("ids", "groups", "texts"):
        if name in store.group:
            try:
                store._decoded(name)
            except FeatcacheError:
                bad.append(BadBlock(path, name, None, "fails its checksum (not repairable: rebuild the store)"))
    missing_present = store.stored_chunks("missing")
    finished: set[int] = set()
    for layer in store.layers:
        done, flag_bad = _done_flags(store, layer)
        bad += flag_bad
        finished.update(done)
        present = store.stored_chunks(f"layers/{layer}")
        for block in done:
            if block not in present:
                bad.append(BadBlock(path, layer, block, "is marked done but its chunk is missing"))
                continue
            try:
                store.read_block(f"layers/{layer}", block)
            except CorruptBlock as err:
                bad.append(BadBlock(path, layer, block, err.problem))
    for block in sorted(finished):
        if block not in missing_present:
            bad.append(BadBlock(path, "missing", block, "chunk is missing"))
            continue
        try:
            store.read_block("missing", block)
        except CorruptBlock:
            bad.append(BadBlock(path, "missing", block, "fails its checksum"))
    return bad


def repair_store(store: FeatureStore, bad: list[BadBlock]) -> int:
    """Clear the done flags of bad blocks; returns how many (layer, block) flags were cleared."""
    cleared = set()
    for b in bad:
        if not b.repairable:
            continue
        layers = store.layers if b.layer == "missing" else [b.layer]  # the missing chunk is shared
        cleared.update((layer, b.block) for layer in layers)
    for layer, block in sorted(cleared):
        store.clear_done(layer, [block])
    return len(cleared)


def verify(paths: list[Location], repair: bool = False) -> list[BadBlock]:
    """Verify (and optionally repair) stores; returns every problem found."""
    found = []
    for path in paths:
        try:
            store = FeatureStore.open(path)
        except FeatcacheError as err:
            found.append(BadBlock(str(path), "store", None, err.message))
            continue
        bad = verify_store(store)
        if repair and bad:
            repair_store(store, bad)
        found += bad
    return found
