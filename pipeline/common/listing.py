"""Where a corpus's files are and what they are called, known from a listing alone: the
``wds:``/``hfds:`` spec grammar, brace patterns and globs over local paths and fsspec URLs, one
stat per file, and the name a corpus's caches are stored under. Nothing here reads a shard or a
table: stage two names a corpus with it, and stage one lists it before reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from featcache.cache.errors import FeatcacheError

FORMATS = {"wds": "webdataset tar shards", "hfds": "a Hugging Face data set on disk"}


# The last ':'-segment of a corpus spec is options when it reads key=value[,key=value...].
_OPTIONS = re.compile(r"^\w+=[^,]*(,\w+=[^,]*)*$")


_GLOB = re.compile(r"[*?\[]")


def is_corpus(spec: str) -> bool:
    """``wds:...`` or ``hfds:...``: recognised before the ``name:options`` grammar splits on ':'."""
    return spec.strip().partition(":")[0] in FORMATS and ":" in spec


def split_spec(spec: str) -> tuple[str, str, dict] | None:
    """``fmt:TARGET[:key=value,...]`` -> (fmt, TARGET, options); None for any other spec.

    TARGET may hold ':' itself (``s3://bucket/x-{0..9}.tar``): only trailing segments that read
    as options are options. Several such segments (``...:salt=1`` appended to a spec that has
    options already) merge, the later winning.
    """
    if not is_corpus(spec):
        return None
    fmt, _, target = spec.strip().partition(":")
    options: dict[str, str] = {}
    while True:
        head, sep, tail = target.rpartition(":")
        if not sep or not _OPTIONS.match(tail):
            break
        parsed = {}
        for item in tail.split(","):
            key, _, value = item.partition("=")
            parsed[key.strip()] = value.strip()
        options = {**parsed, **options}
        target = head
    target = target.strip()
    if not target:
        raise FeatcacheError(f"{spec!r} names no data", f"write {fmt}:PATH (see docs/data.md)")
    if "\0" in spec:
        raise FeatcacheError(f"{spec!r} holds a NUL character", "no path can hold one")
    return fmt, target, options


def check_options(fmt: str, options: dict, known: tuple[str, ...]) -> None:
    for key in options:
        if key not in known:
            raise FeatcacheError(f"unknown option {key!r} for {fmt}: data sets",
                                 f"options: {', '.join(known)} (write {fmt}:PATH:key=value,key=value)")


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def filesystem(url: str):
    """(fsspec file system, path within it) of a URL; a protocol fsspec cannot serve is a clear error."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise FeatcacheError(f"cannot open {url}: {err}",
                             "install the fsspec package of that protocol (s3fs for s3://, gcsfs for gs://)") from None


def has_glob(path: str) -> bool:
    return bool(_GLOB.search(path))


def expand(pattern: str, what: str, hint: str) -> list[str]:
    """A brace pattern (``{00000..00099}``, ``{a,b}``) and, for each result, a glob: the
    files in pattern order, globs sorted; local paths made absolute."""
    from braceexpand import braceexpand

    try:
        expanded = list(braceexpand(local(pattern)))
    except Exception as err:  # braceexpand raises its own error type for unbalanced braces
        raise FeatcacheError(f"bad {what} pattern {pattern!r}: {err}", hint) from None
    out: list[str] = []
    for item in expanded:
        if has_glob(item):
            if is_url(item):
                fs, path = filesystem(item)
                try:
                    matches = [fs.unstrip_protocol(p) for p in sorted(fs.glob(path))]
                except Exception as err:  # noqa: BLE001 - fsspec back ends raise many types
                    raise FeatcacheError(f"cannot list {item}: {type(err).__name__}: {err}", hint) from None
            else:
                import glob

                matches = sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(item)))
            if not matches:
                raise FeatcacheError(f"the {what} pattern {item!r} matches no file", hint)
            out += matches
        else:
            out.append(item if is_url(item) else os.path.abspath(os.path.expanduser(item)))
    if not out:
        raise FeatcacheError(f"the {what} pattern {pattern!r} names no file", hint)
    seen: set[str] = set()
    for item in out:
        if item in seen:
            raise FeatcacheError(f"the {what} pattern {pattern!r} names {item} twice",
                                 "each file must appear once: its rows would be listed twice")
        seen.add(item)
    return out


# -- listings: one stat per file, no content read -------------------------------------------
@dataclass(frozen=True)
class Stat:
    size: int
    mtime_ns: int
    tag: str = ""  # a remote object's ETag or checksum, when the store gives one


MISSING = Stat(-1, -1)


def _mtime_ns(info: dict) -> int:
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, (int, float)):
            return int(value * 1e9)
        if isinstance(value, str):
            try:
                return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
            except ValueError:
                continue
    return -1


def stat_files(paths: list[str]) -> list[Stat]:
    """(size, mtime_ns) of each file, MISSING where it cannot be stat'ed. Local files: one
    os.stat each. Remote objects: one listing per folder (falling back to one info each)."""
    out = [MISSING] * len(paths)
    remote: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        if is_url(path):
            remote.setdefault(path.rsplit("/", 1)[0], []).append(i)
            continue
        try:
            st = os.stat(local(path))
        except OSError:
            continue
        out[i] = Stat(st.st_size, st.st_mtime_ns)
    for parent, rows in remote.items():
        fs, _ = filesystem(paths[rows[0]])
        try:
            listing = {fs._strip_protocol(e["name"]): e for e in fs.ls(fs._strip_protocol(parent), detail=True)}
        except Exception:  # noqa: BLE001 - a listing refused: stat one by one
            listing = {}
        for i in rows:
            key = fs._strip_protocol(paths[i])
            try:
                info = listing.get(key) or fs.info(key)
            except Exception:  # noqa: BLE001 - fsspec back ends raise many types
                continue
            if info.get("size") is None:
                continue
            tag = str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("crc32c") or "")
            out[i] = Stat(int(info["size"]), _mtime_ns(info), tag)
    return out


def stamps_array(stats: list[Stat], file_of: np.ndarray) -> np.ndarray:
    """The (rows, 2) int64 (size, mtime_ns) of the file holding each row."""
    per_file = np.array([(s.size, s.mtime_ns) for s in stats], dtype=np.int64).reshape(-1, 2)
    return per_file[file_of]


def listing_digest(fmt: str, paths: list[str], stats: list[Stat]) -> str:
    """Eight hex digits over the resolved file list and each file's size and tag (an object
    store's ETag). Not the mtime: a copy without ``-t`` or a ``touch`` must not make a new data
    set (a trained run could no longer find it); changed bytes in finished rows are caught per
    row (``featcache.pipeline.extract.provenance``)."""
    h = hashlib.sha256(f"{fmt}\0".encode())
    for path, st in zip(paths, stats):
        shown = path if is_url(path) else str(Path(local(path)).resolve())
        h.update(f"{shown}\0{st.size}\0{st.tag}\0".encode())
    return h.hexdigest()[:8]


def readable_stem(pattern: str, fallback: str) -> str:
    """A short readable name for a path or pattern: a file's or folder's own name; for a
    pattern, its folder's name and the file name up to the first brace or glob
    (``/data/cc3m/shard-{00000..00099}.tar`` -> ``cc3m-shard``)."""
    text = local(pattern).rstrip("/")
    cut = re.search(r"[{*?\[]", text)
    if cut is None:
        stem = re.sub(r"\.(tar|parquet|arrow)$", "", text.rpartition("/")[2])
    else:
        folder, _, prefix = text[: cut.start()].rpartition("/")
        folder = folder.rstrip("/").rpartition("/")[2]
        prefix = prefix.strip("-_.")
        stem = f"{folder}-{prefix}" if folder and prefix else folder or prefix
    return re.sub(r"[^A-Za-z0-9._+-]", "_", stem).strip(".") or fallback


WDS_OPTIONS = ("salt",)


WDS_HINT = "write wds:/path/shard-{00000..00099}.tar (a brace pattern or glob of .tar files)"


def wds_shards(pattern: str) -> tuple[list[str], list[Stat]]:
    """The expanded shard list and one stat of each; a shard that is not there is an error."""
    paths = expand(pattern, "shard", WDS_HINT)
    stats = stat_files(paths)
    for path, st in zip(paths, stats):
        if st is MISSING:
            raise FeatcacheError(f"the shard {path} does not exist or cannot be read (from the pattern {pattern})",
                                 WDS_HINT)
    return paths, stats


def wds_name(pattern: str, options: dict) -> str:
    """``{stem}.{digest8}``: the digest covers the shard list and each shard's size and mtime,
    so another shard set, or a rewritten shard, is another data set. No shard is opened."""
    check_options("wds", options, WDS_OPTIONS)
    paths, stats = wds_shards(pattern)
    return f"{readable_stem(pattern, 'wds')}.{listing_digest('wds', paths, stats)}"


RESAVE = "save the data set again with save_to_disk"
HFDS_OPTIONS = ("image_column", "text_column", "salt")


HFDS_HINT = "PATH: a save_to_disk folder (Dataset or DatasetDict), a parquet file or a folder of parquet files"


_SHARD_NAME = re.compile(r"^([^-]+)-\d+-of-\d+")


_SPLIT_WORD = re.compile(r"^(train|test|validation|val|valid|dev)[-.]")


ARROW, PARQUET = "arrow", "parquet"


# -- hfds_layout: which files, of which split ------------------------------------------------------
def read_json_file(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FeatcacheError(f"{path} cannot be read as JSON ({type(err).__name__}: {err})",
                             RESAVE) from None


def arrow_files(folder: Path) -> list[str]:
    state = read_json_file(folder / "state.json")
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not files or not all(isinstance(f, dict) and "filename" in f for f in files):
        raise FeatcacheError(f"{folder / 'state.json'} lists no '_data_files'", RESAVE)
    return [str(folder / f["filename"]) for f in files]


def parquet_split(path: str) -> str | None:
    name = Path(path).name
    match = _SHARD_NAME.match(name) or _SPLIT_WORD.match(name)
    return match.group(1) if match else None


def hfds_layout(target: str) -> tuple[list[tuple[str | None, str, str]], list[str]]:
    """([(split or None, data file, ARROW|PARQUET)], the metadata files) of an hfds PATH.

    Reads only the small save_to_disk JSON files: no arrow or parquet file is opened.
    """
    if is_url(target):
        raise FeatcacheError(f"hfds: reads local files, not {target}", "download or mount the data set first")
    path = Path(os.path.abspath(os.path.expanduser(local(target))))
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        meta = read_json_file(path / "dataset_dict.json")
        names = meta.get("splits") if isinstance(meta, dict) else None
        if not isinstance(names, list) or not names:
            raise FeatcacheError(f"{path / 'dataset_dict.json'} lists no 'splits'", RESAVE)
        files, extra = [], [str(path / "dataset_dict.json")]
        for name in names:
            files += [(str(name), f, ARROW) for f in arrow_files(path / str(name))]
            extra += [str(path / str(name) / n) for n in ("state.json", "dataset_info.json")]
        return files, extra
    if path.is_dir() and (path / "state.json").is_file():
        meta = [str(path / n) for n in ("state.json", "dataset_info.json")]
        return [(None, f, ARROW) for f in arrow_files(path)], meta
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*.parquet") if p.is_file())
        if not found:
            raise FeatcacheError(f"{path} holds no dataset_dict.json, state.json or .parquet files", HFDS_HINT)
    elif path.is_file():
        if path.suffix != ".parquet":
            raise FeatcacheError(f"hfds: cannot read {path}: not a .parquet file", HFDS_HINT)
        found = [str(path)]
    elif has_glob(target) or "{" in target:
        found = expand(target, "parquet", HFDS_HINT)
        bad = [f for f in found if not f.endswith(".parquet")]
        if bad:
            raise FeatcacheError(f"the pattern {target} matches {bad[0]}, not a .parquet file", HFDS_HINT)
    else:
        raise FeatcacheError(f"the data set {path} does not exist", HFDS_HINT)
    named = [parquet_split(f) for f in found]
    if any(named) and not all(named):
        i = named.index(None)
        raise FeatcacheError(f"{found[i]} is not named for a split (train-00000-of-00001.parquet) but "
                             f"{found[named.index(next(n for n in named if n))]} is",
                             "name every file for its split, or none (then the rows are split by a hash of their id)")
    return [(n, f, PARQUET) for n, f in zip(named, found)], []


def hfds_name(target: str, options: dict) -> str:
    """``{stem}.{digest8}`` over the data and metadata files with each one's size and mtime."""
    check_options("hfds", options, HFDS_OPTIONS)
    files, extra = hfds_layout(target)
    paths = [f for _, f, _ in files] + extra
    stats = stat_files(paths)
    for path, st in zip(paths, stats):
        if st is MISSING and path not in extra:
            raise FeatcacheError(f"the data file {path} of {target} does not exist or cannot be read", HFDS_HINT)
    return f"{readable_stem(target, 'hfds')}.{listing_digest('hfds', paths, stats)}"
