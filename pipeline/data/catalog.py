"""The data set catalog: names and paths to splits, and the name each is cached under.

The registry is filled explicitly from ``builtin_data.ENTRIES``; users add their own with
:func:`register_dataset`. The row types live in ``datasets`` and import nothing from here.
"""

from __future__ import annotations

from pathlib import Path

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common import listing
from featcache.pipeline.common.names import REGISTERED, canonical_name, is_combined, parse_spec, with_option
from featcache.pipeline.data import builtin as builtin_data
from featcache.pipeline.data import user as user_data
from featcache.pipeline.data.hfds import load_hfds
from featcache.pipeline.data.rows import DatasetEntry, Split
from featcache.pipeline.data.wds import load_wds

DATASETS: dict[str, DatasetEntry] = {entry.name: entry for entry in builtin_data.ENTRIES}


REGISTERED.update(DATASETS)


def register_dataset(entry: DatasetEntry) -> None:
    DATASETS[entry.name] = entry
    REGISTERED.add(entry.name)


# spec prefix -> its splits (its name is common.names.CORPORA's)
CORPORA = {"wds": load_wds, "hfds": load_hfds}


def load_dataset(spec: str) -> dict[str, Split]:
    """Every split of a data set spec: a registered name, ``a+b``, ``wds:PATTERN``,
    ``hfds:PATH``, or a path for users' data."""
    if is_combined(spec):
        raise FeatcacheError(f"{spec!r} combines data sets: each part is cached on its own",
                             "extract and read it through featcache extract/align, which split it on '+'")
    corpus = listing.split_spec(spec)
    name, options = corpus[1:] if corpus is not None else parse_spec(spec)
    if corpus is not None:
        try:
            splits = CORPORA[corpus[0]](name, options)
        except OSError as err:
            raise FeatcacheError(f"cannot read the data set {name}: {err.strerror or err} ({err.filename})",
                                 "point --dataset at readable files") from None
    elif name in DATASETS:
        splits = DATASETS[name].build(options)
    elif Path(name).exists():
        try:
            splits = user_data.load_path(Path(name), options)
        except OSError as err:
            raise FeatcacheError(f"cannot read the data set {name}: {err.strerror} ({err.filename})",
                                 "point --dataset at a readable file or folder of your data") from None
    else:
        raise FeatcacheError(
            f"unknown data set {name!r}",
            f"known: {', '.join(sorted(DATASETS))}; or a path to a .csv/.jsonl of image,caption rows, "
            "a COCO or Karpathy .json, an image folder with class subfolders, wds:SHARDS-{0..9}.tar "
            "(webdataset shards) or hfds:PATH (a Hugging Face data set on disk)",
        )
    cname = canonical_name(spec)
    for split in splits.values():
        split.dataset = cname
    return splits


# Salts that probe whether a data set's splits are drawn by hash. A row of a hash split stays put
# under a new salt with probability about 0.54 (the sum of the squared split fractions), so n
# rows all stay put under k salts with probability about 0.54**(n*k). Probing until n*k reaches
# PROBE_ROWS puts that below 1e-9: one redraw settles any data set of 34 rows or more (two loads,
# not nine, for a large corpus with its own splits), and a tiny one gets up to eight.
PROBE_SALTS = ("1", "2", "3", "4", "5", "6", "7", "8")
PROBE_ROWS = 34


def salt_redraws(spec: str) -> bool:
    """Whether a split salt moves any row of ``spec`` (one data set, not ``a+b``) to another split.

    The built-in pair sets, a pair table without a 'split' column and corpora without split
    fields draw their splits by hashing ids, so a salt redraws them; a table with a split on every
    row, Karpathy and COCO files and folders of splits keep their own, and a salted copy of them
    would be the same rows extracted again under another name. Asked of the adapters themselves
    (the data set loaded with and without salts, each split's ids compared; no image is decoded),
    so no format is guessed from its name. An adapter that takes no salt option keeps its splits.
    """
    plain = _assignment(load_dataset(spec))
    rows = max(1, sum(len(images) or len(texts) for images, texts in plain.values()))  # a row: an image, or a text
    for salt in PROBE_SALTS[: -(-PROBE_ROWS // rows)]:
        try:
            salted = load_dataset(with_option(spec, "salt", salt))
        except FeatcacheError:
            return False
        if _assignment(salted) != plain:
            return True
    return False


def _assignment(splits: dict[str, Split]) -> dict[str, tuple[frozenset, frozenset]]:
    """Which rows each split holds."""
    return {name: (frozenset(s.images.ids if s.images else ()), frozenset(s.texts.ids if s.texts else ()))
            for name, s in splits.items()}
