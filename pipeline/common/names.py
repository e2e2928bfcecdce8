"""Data set names: the spec grammar (``name:key=value``, ``a+b``, ``wds:``/``hfds:``), the name
a spec's caches are stored under, and the hash rule behind every hash split.

Both stages need these: stage one to write a store, stage two to find it. They live here so that
stage two never loads a data set adapter to learn a name.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common import listing
from featcache.pipeline.common.listing import hfds_name, wds_name

# Names the catalog has registered (pipeline.data.catalog adds them): a registered name is
# never read as a path, even if a folder of that name exists here.
REGISTERED: set[str] = set()


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


def with_option(spec: str, key: str, value: str) -> str:
    """``spec`` (one data set, not ``a+b``) with one more option, in the grammar its kind reads:
    a corpus takes a trailing ``:key=value`` segment (its target may hold ':'), a name or a path
    one ``:key=value,key=value`` list. Appending ``:salt=1`` to ``pairs.jsonl:outside=allow``
    would read as the option ``outside=allow:salt=1``."""
    if listing.is_corpus(spec):
        return f"{spec}:{key}={value}"
    name, options = parse_spec(spec)
    options[key] = value
    return name + ":" + ",".join(f"{k}={v}" for k, v in options.items())


# The corpus formats: spec prefix -> the name its caches are stored under (a listing, no read).
CORPORA = {"wds": wds_name, "hfds": hfds_name}


def is_combined(spec: str) -> bool:
    """``a+b``: the union of two data sets, each cached on its own (a path with '+' is not one,
    nor is a ``wds:``/``hfds:`` spec, whose pattern may hold a '+')."""
    return "+" in spec and not listing.is_corpus(spec) and not Path(spec).exists()


def combined_parts(spec: str) -> list[str]:
    """The parts of ``a+b``, each named once: an empty part (``+``, ``a+``) would read the working
    folder as a data set, and a repeated one (``a+a``) would count every pair twice."""
    parts = [p.strip() for p in spec.split("+")]
    if not all(parts):
        raise FeatcacheError(f"bad data set name {spec!r}: a '+' with nothing on one side",
                             "write a+b with a data set on each side of every '+'")
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        raise FeatcacheError(f"the data set {repeated[0]!r} appears twice in {spec!r}; its pairs would count twice",
                             "name each part once")
    return parts


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
    corpus = listing.split_spec(spec)
    if corpus is not None:  # wds:PATTERN / hfds:PATH: named by the file listing, no file read
        fmt, target, options = corpus
        name = CORPORA[fmt](target, options)
    else:
        name, options = parse_spec(spec)
        path = Path(name)
        if name not in REGISTERED and (path.suffix in (".csv", ".jsonl", ".json") or path.is_dir()) and path.exists():
            name = f"{path.resolve().stem}.{_content_digest(path)}"

    def short(value: str) -> str:  # a file option is named by its stem and content hash
        path = Path(value)
        if path.is_file():
            return f"{path.stem}.{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}"
        return value

    return name + "".join(f"-{k}{short(v)}" for k, v in sorted(options.items()))


def dataset_key(spec: str) -> str:
    """The name the stores of a data set spec record: canonical, part by part for ``a+b``."""
    return "+".join(canonical_name(p) for p in combined_parts(spec)) if is_combined(spec) else canonical_name(spec)


def hash_unit(key: str, salt: str = "") -> float:
    """A deterministic number in [0, 1) for a row key; the basis of every hash split."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(key: str, salt: str = "", test: float = 0.2, val: float = 0.1) -> str:
    u = hash_unit(key, salt)
    return "test" if u < test else "val" if u < test + val else "train"
