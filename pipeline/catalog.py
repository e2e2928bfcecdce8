"""The data set catalog: names and paths to splits, and the name each is cached under.

The registry is filled explicitly from ``builtin_data.ENTRIES``; users add their own with
:func:`register_dataset`. The row types live in ``datasets`` and import nothing from here.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from featcache.cache.errors import FeatcacheError
from featcache.pipeline import builtin_data, corpora, hfds_data, user_data, wds_data
from featcache.pipeline.datasets import DatasetEntry, Split

DATASETS: dict[str, DatasetEntry] = {entry.name: entry for entry in builtin_data.ENTRIES}


def register_dataset(entry: DatasetEntry) -> None:
    DATASETS[entry.name] = entry


def parse_spec(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` (e.g. ``tuxpaint:salt=1``)."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise FeatcacheError(f"bad data set option {item!r} in {spec!r}", "write name:key=value")
        options[key.strip()] = value.strip()
    return name.strip(), options


# The corpus formats: spec prefix -> (the name its caches are stored under, its splits).
CORPORA = {"wds": (wds_data.dataset_name, wds_data.load_wds), "hfds": (hfds_data.dataset_name, hfds_data.load_hfds)}


def is_combined(spec: str) -> bool:
    """``a+b``: the union of two data sets, each cached on its own (a path with '+' is not one,
    nor is a ``wds:``/``hfds:`` spec, whose pattern may hold a '+')."""
    return "+" in spec and not corpora.is_corpus(spec) and not Path(spec).exists()


def _content_digest(path: Path) -> str:
    """A short digest of a user data set's resolved path and content (a folder: its file list).

    The full content digest is checked when extracting; this one only has to keep different
    data sets with the same name apart when stage two reads, without decoding anything (a folder
    costs one stat per file).
    """
    try:
        if path.is_dir():
            h = hashlib.sha256(str(path.resolve()).encode() + b"\0")
            for f in sorted(path.rglob("*")):
                if f.is_file():
                    h.update(f"{f.relative_to(path)}\0{f.stat().st_size}\0".encode())
            return h.hexdigest()[:8]
        st = path.stat()  # a file is hashed once per (path, mtime, size): stage two asks several times
        return _file_digest(str(path.resolve()), st.st_mtime_ns, st.st_size)
    except OSError as err:
        raise FeatcacheError(f"cannot read the data set {path}: {err.strerror} ({err.filename})",
                             "point --dataset at a readable file or folder of your data") from None


@lru_cache(maxsize=64)
def _file_digest(resolved: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256(resolved.encode() + b"\0")
    h.update(Path(resolved).read_bytes())
    return h.hexdigest()[:8]


def canonical_name(spec: str) -> str:
    """The name a spec's caches are stored under: options are part of it.

    A registered set keeps its readable name. A user's file or folder is named by its stem and
    a digest of its resolved path and content, so two different ``pairs.jsonl`` never share a
    store, and an edited file is a new data set rather than a stale cache.
    """
    corpus = corpora.split_spec(spec)
    if corpus is not None:  # wds:PATTERN / hfds:PATH: named by the file listing, no file read
        fmt, target, options = corpus
        name = CORPORA[fmt][0](target, options)
    else:
        name, options = parse_spec(spec)
        path = Path(name)
        if name not in DATASETS and (path.suffix in (".csv", ".jsonl", ".json") or path.is_dir()) and path.exists():
            name = f"{path.resolve().stem}.{_content_digest(path)}"

    def short(value: str) -> str:  # a file option is named by its stem and content hash
        path = Path(value)
        if path.is_file():
            return f"{path.stem}.{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}"
        return value

    return name + "".join(f"-{k}{short(v)}" for k, v in sorted(options.items()))


def load_dataset(spec: str) -> dict[str, Split]:
    """Every split of a data set spec: a registered name, ``a+b``, ``wds:PATTERN``,
    ``hfds:PATH``, or a path for users' data."""
    if is_combined(spec):
        raise FeatcacheError(f"{spec!r} combines data sets: each part is cached on its own",
                             "extract and read it through featcache extract/align, which split it on '+'")
    corpus = corpora.split_spec(spec)
    name, options = corpus[1:] if corpus is not None else parse_spec(spec)
    if corpus is not None:
        try:
            splits = CORPORA[corpus[0]][1](name, options)
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
