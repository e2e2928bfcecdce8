"""The read side of the cache: open a store by what is asked, and check it holds exactly that.

Stage two never rebuilds a store's path from an encoder registry. It asks for (data set,
split, encoder, pooling, input size); this module finds the stores of that split, matches the
encoder by the names each store recorded for itself (registry name and aliases, or the exact
``timm:``/``hf:`` spec), and then compares the store's recorded identity with the request.
Any difference is a one-line error naming the field; a missing store names the extract command.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import featcache.cache.location as loc
from featcache.cache.commands import decode_of, extract_command
from featcache.cache.errors import FeatcacheError
from featcache.cache.location import Location
from featcache.cache.naming import safe_component, split_dir, split_label
from featcache.cache.store import FeatureStore


class StoreNotFound(FeatcacheError):
    """Nothing is cached for the query: the hint is the extract command that makes it."""

    def __init__(self, message: str, hint: str, query: "StoreQuery"):
        super().__init__(message, hint)
        self.query = query


@dataclass(frozen=True)
class StoreQuery:
    """What a reader asks for. ``None`` pooling or size means the encoder's default."""

    dataset: str  # the canonical data set name (featcache.pipeline.catalog.canonical_name)
    split: str  # the split label, ``test-sample500`` for a --limit run
    encoder: str  # as the user names it: registry name, alias, timm:<name> or hf:<path>
    pooling: str | None = None
    image_size: int | None = None  # -1: the model's pretrained size
    source: str | None = None  # the data set as the user wrote it, for the extract command

    def extract_command(self, cache_dir: Location | None = None) -> str:
        limited = re.fullmatch(r"(.*)-sample(\d+)", self.split)
        split, sample = limited.groups() if limited else (self.split, None)
        return extract_command(self.encoder, self.source or self.dataset, split, limit=sample, pooling=self.pooling,
                               image_size=self.image_size or None, cache_dir=cache_dir)


def _names(store: FeatureStore) -> set[str]:
    return {store.encoder_identity["name"], *store.attrs.get("names", [])}


def _image_size(store: FeatureStore) -> int | None:
    return store.encoder_identity.get("preprocessing", {}).get("image_size")


def mismatches(store: FeatureStore, query: StoreQuery) -> list[str]:
    """Fields where the store's recorded identity differs from the query."""
    ident, defaults = store.identity, store.attrs.get("defaults", {})
    data, enc = ident["dataset"], ident["encoder"]
    want_pooling = query.pooling or defaults.get("pooling")
    want_size = {None: defaults.get("image_size"), -1: defaults.get("pretrained_image_size")}.get(
        query.image_size, query.image_size)
    checks = [("dataset.name", data["name"], query.dataset),
              ("dataset.split", split_label(data["split"], data.get("limit")), query.split),
              ("encoder.pooling", enc["pooling"], want_pooling)]
    if enc.get("modality") == "image":
        checks.append(("encoder.preprocessing.image_size", _image_size(store), want_size))
    diffs = [f"{field}: stored {have!r}, asked {want!r}" for field, have, want in checks if have != want]
    if query.encoder not in _names(store):
        diffs.insert(0, f"encoder.name: stored {enc['name']!r}, asked {query.encoder!r}")
    return diffs


def open_store(cache_dir: Location, query: StoreQuery) -> FeatureStore:
    """The one store that holds what ``query`` asks for, checked against its recorded identity."""
    folder = split_dir(cache_dir, query.dataset, query.split)
    candidates, unreadable = [], []
    for path in loc.find_groups(folder):
        try:
            store = FeatureStore.open(path)
        except FeatcacheError as err:  # an old or broken store: report it if it is the encoder's own
            if loc.name(str(path).rstrip("/").rsplit("/", 1)[0]) == safe_component(query.encoder):
                unreadable.append(err)
            continue
        if query.encoder in _names(store):
            candidates.append(store)
    hint = f"run: {query.extract_command(cache_dir)}"
    if not candidates and unreadable:
        raise unreadable[0]
    if not candidates:
        raise StoreNotFound(f"no cached features of {query.encoder} for {query.source or query.dataset}/"
                            f"{query.split} under {cache_dir}", hint, query)
    exact = [s for s in candidates if not mismatches(s, query)]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        raise FeatcacheError(f"several stores match {query.encoder} for {query.dataset}/{query.split}: "
                             + ", ".join(str(s.path) for s in exact), "name the pooling and --image-size")
    closest = min(candidates, key=lambda s: len(mismatches(s, query)))
    raise FeatcacheError(f"the cached features of {query.encoder} for {query.dataset}/{query.split} "
                         f"differ from what was asked ({'; '.join(mismatches(closest, query))})", hint)


def check_same_encoder(reference: dict, store: FeatureStore, what: str) -> None:
    """Refuse to compare features made by other weights, preprocessing or pooling."""
    have = store.encoder_identity
    fields = ("weights_sha256", "preprocessing", "pooling")
    fields += ("files_sha256",) if "files_sha256" in reference and "files_sha256" in have else ()  # older stores lack it
    diffs = [f for f in fields if reference.get(f) != have.get(f)]
    if diffs:
        field, want, got = diffs[0], reference.get(diffs[0]), have.get(diffs[0])
        if isinstance(want, dict) and isinstance(got, dict):  # name the setting, not a cut-off dict
            key = next(k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k))
            field, want, got = f"{field} {key}", want.get(key, "(none)"), got.get(key, "(none)")
        hint = "extract every split with the same encoder and options, or retrain on the current cache"
        if field == "preprocessing decode":  # the one setting a flag of extract gives: say which
            hint = (f"extract it again with --decode {decode_of(reference)} --overwrite, as the "
                    "training stores were; or retrain on the current cache")
        raise FeatcacheError(
            f"{what}: the store {store.path} was made with another {field.replace('_', ' ')} "
            f"than the run's training features ({str(want)[:24]} vs {str(got)[:24]})", hint)
