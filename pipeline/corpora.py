"""What the corpus formats ``wds:`` (webdataset tar shards) and ``hfds:`` (Hugging Face data
sets on disk) share: the spec grammar, file listings and stamps, per-process open files, and
building paired splits from samples.

A corpus side holds no open file: readers open what they need in the process that reads
(``Handles``), so an image side pickles into DataLoader workers as plain lists and arrays.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.datasets import PAIRS, ImageSide, Split, TextSide

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
    """Eight hex digits over the resolved file list and each file's size, mtime and tag."""
    h = hashlib.sha256(f"{fmt}\0".encode())
    for path, st in zip(paths, stats):
        shown = path if is_url(path) else str(Path(local(path)).resolve())
        h.update(f"{shown}\0{st.size}\0{st.mtime_ns}\0{st.tag}\0".encode())
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


# -- per-process open files -----------------------------------------------------------------
class Handles:
    """Files this process has open, the least recently used closed past ``size``.

    Keyed by process: a forked DataLoader worker inherits the parent's objects, whose file
    offsets it would share, so it opens its own. Nothing here is ever pickled.
    """

    def __init__(self, opener: Callable[[str], object], size: int = 32):
        self.opener, self.size = opener, size
        self.pid = os.getpid()
        self.items: OrderedDict[str, object] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str):
        with self.lock:
            if self.pid != os.getpid():
                self.pid, self.items = os.getpid(), OrderedDict()  # the parent's stay the parent's
            item = self.items.get(key)
            if item is not None:
                self.items.move_to_end(key)
                return item
        item = self.opener(key)
        with self.lock:
            self.items[key] = item
            while len(self.items) > self.size:
                _, old = self.items.popitem(last=False)
                close = getattr(old, "close", None)
                if close is not None:
                    close()
        return item


# -- paired splits --------------------------------------------------------------------------
@dataclass(slots=True)
class Sample:
    """One image and its captions, as a format lists it."""

    id: str
    split: str
    captions: list[str | None]  # None: missing or unusable (a flagged text row)
    problems: list[str | None]  # why each None caption is unusable, naming where it is
    where: str  # where the sample is, for messages (shard:key, file row n)
    row: int  # the reader's row of its image


class RowView:
    """One split's rows of a reader, as an ImageSide's callables. Holds only the reader (lists
    and arrays) and the row numbers, so it pickles without any open file."""

    def __init__(self, reader, rows: np.ndarray):
        self.reader, self.rows = reader, rows

    def load(self, i: int):
        return self.reader.load(int(self.rows[i]))

    def raw(self, i: int) -> bytes:
        return self.reader.raw(int(self.rows[i]))

    def decode(self, i: int, data: bytes):
        return self.reader.decode(int(self.rows[i]), data)

    def stamps(self) -> np.ndarray:
        return self.reader.stamps()[self.rows]


SPLIT_NAMES = {"validation": "val"}


def split_name(value, where: str) -> str:
    """A split named by the data (a json field, a column, a folder): validation -> val."""
    if not isinstance(value, str) or not value.strip():
        raise FeatcacheError(f"{where}: the split must be a non-empty string such as train, val or test, "
                             f"got {value!r}")
    value = value.strip()
    if re.search(r"-sample\d+$", value):
        raise FeatcacheError(f"{where}: the split name {value!r} is reserved for --limit subsets", "rename the split")
    return SPLIT_NAMES.get(value, value)


def pair_splits(dataset: str, samples: list[Sample], reader, unique: str = "all",
                duplicate_hint: str = "give every image a unique id") -> dict[str, Split]:
    """Splits of PAIRS rows: one image row per sample (id and group its id), one text row per
    caption (id ``{image}#{n}``, n counting the split's captions, as the pair-file adapter does).

    ``unique``: "all" refuses an id seen twice anywhere (an image in two splits would leak the
    test split into training); "split" only within a split (splits numbered on their own).
    """
    first: dict[tuple, Sample] = {}
    for s in samples:
        key = (s.id,) if unique == "all" else (s.split, s.id)
        other = first.setdefault(key, s)
        if other is not s:
            where = (f"in the splits {other.split!r} and {s.split!r}" if other.split != s.split else "twice")
            raise FeatcacheError(f"the image id {s.id!r} appears {where}: {other.where} and {s.where}", duplicate_hint)
    if not samples:
        raise FeatcacheError(f"{dataset} holds no samples", "see docs/data.md for the layout featcache reads")
    out = {}
    for split in sorted({s.split for s in samples}):
        mine = [s for s in samples if s.split == split]
        ids = [s.id for s in mine]
        rows = np.array([s.row for s in mine], dtype=np.int64)
        view = RowView(reader, rows)
        images = ImageSide(ids, list(ids), view.load, view.raw, [reader.source(int(r)) for r in rows],
                           stamps=view.stamps, decode=view.decode)
        cap_ids, cap_groups, texts, problems = [], [], [], {}
        for s in mine:
            for caption, problem in zip(s.captions, s.problems):
                if caption is None:
                    problems[len(cap_ids)] = problem or f"{s.where}: the caption of {s.id} is missing, null or empty"
                cap_ids.append(f"{s.id}#{len(cap_ids)}")
                cap_groups.append(s.id)
                texts.append(caption or "")
        out[split] = Split(dataset, split, PAIRS, images, TextSide(cap_ids, cap_groups, texts, problems))
    return out
