"""``wds:PATTERN``: image-caption pairs in webdataset tar shards (the img2dataset layout).

A sample is the members of a shard that share a key, webdataset's rule: the member name up to
the first dot of its base name (``part/000123.jpg`` -> ``part/000123``, extension ``jpg``).
Featcache reads one image member (.jpg .jpeg .png .webp .bmp .gif .svg), the caption
``.txt`` and the metadata ``.json`` (whose ``split`` field, if any, sets the split); other
members are ignored. Shards are never unpacked: each is indexed once when the data set is
listed (member offsets and sizes; captions and metadata read then), and an image's bytes are
read by seeking into its shard.
"""

from __future__ import annotations

import json
import os
import re
import tarfile

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common import listing
from featcache.pipeline.common.listing import WDS_HINT, WDS_OPTIONS, wds_shards
from featcache.pipeline.common.names import hash_split
from featcache.pipeline.data import corpora
from featcache.pipeline.data.corpora import Sample
from featcache.pipeline.data.decode import decode_image
from featcache.pipeline.data.rows import BadImage, Split

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "svg")


# webdataset's base_plus_ext: everything up to the first dot of the base name is the key.
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skipped metadata members


CORRUPT_HINT = "re-create or re-download the shard (an interrupted copy or write truncates it)"


# -- reading --------------------------------------------------------------------------------
class _LocalFile:
    """A shard opened for positional reads: os.pread shares no file offset between threads."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)

    def pread(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        os.close(self.fd)


class _RemoteFile:
    def __init__(self, url: str):
        import threading

        import fsspec

        self.file = fsspec.open(url, "rb").open()
        self.lock = threading.Lock()

    def pread(self, offset: int, size: int) -> bytes:
        with self.lock:
            self.file.seek(offset)
            return self.file.read(size)

    def close(self) -> None:
        self.file.close()


def _open_shard(path: str):
    return _RemoteFile(path) if listing.is_url(path) else _LocalFile(listing.local(path))


_HANDLES = corpora.Handles(_open_shard)


class ShardReader:
    """Every image row of a shard set: its shard, byte offset, size and member name."""

    def __init__(self, wds_shards: list[str], shard_of: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                 members: list[str]):
        self.shards, self.shard_of, self.offsets, self.sizes, self.members = wds_shards, shard_of, offsets, sizes, members

    def name(self, row: int) -> str:
        """``/data/shard-00001.tar:000123.jpg``: names shard and key, ends with the extension."""
        return f"{self.shards[self.shard_of[row]]}:{self.members[row]}"

    def source(self, row: int) -> str:
        member = self.members[row]
        return f"{self.shards[self.shard_of[row]]}:{_KEY.match(member).group(1)}"

    def raw(self, row: int) -> bytes:
        shard, size = self.shards[self.shard_of[row]], int(self.sizes[row])
        try:
            data = _HANDLES.get(shard).pread(int(self.offsets[row]), size)
        except OSError as err:
            raise BadImage(f"cannot read image {self.name(row)}: {err.strerror or err}",
                           "check that the shard is readable, or pass --skip-bad to record it as a missing "
                           "row") from None
        if len(data) != size:
            raise BadImage(f"cannot read image {self.name(row)}: the shard ends before it (changed since it was "
                           "listed?)", CORRUPT_HINT)
        return data

    def decode(self, row: int, data: bytes):
        return decode_image(data, self.name(row))

    def load(self, row: int):
        return self.decode(row, self.raw(row))

    def stamps(self) -> np.ndarray:
        return listing.stamps_array(listing.stat_files(self.shards), self.shard_of)


# -- listing --------------------------------------------------------------------------------
class _Entry:
    __slots__ = ("key", "members", "image", "txt", "json", "cls")

    def __init__(self, key: str):
        self.key, self.members = key, []
        self.image: tuple[str, int, int] | None = None  # member, offset, size
        self.txt: bytes | None = None
        self.json: bytes | None = None
        self.cls: bytes | None = None  # a class index (CLIP_benchmark's classification shards)


def _open_for_index(shard: str):
    if listing.is_url(shard):
        import fsspec

        return fsspec.open(shard, "rb").open()
    return open(listing.local(shard), "rb")


def _corrupt(shard: str, last: str | None, err: Exception) -> FeatcacheError:
    where = f"after the sample {last!r}" if last is not None else "at its start"
    return FeatcacheError(f"{shard}: not a readable tar shard ({type(err).__name__}: {err}) {where}", CORRUPT_HINT)


def index_shard(shard: str, size: int) -> list[_Entry]:
    """The samples of one shard in tar order; reads headers, captions and metadata only."""
    try:
        f = _open_for_index(shard)
    except OSError as err:
        raise FeatcacheError(f"cannot open the shard {shard}: {err.strerror or err}", WDS_HINT) from None
    with f:
        if f.read(2) == b"\x1f\x8b":
            raise FeatcacheError(f"{shard}: the shard is gzip-compressed; featcache reads images by their offset in "
                                 "an uncompressed tar",
                                 "decompress the wds_shards (gunzip) and point wds: at the .tar files")
        f.seek(0)
        entries: dict[str, _Entry] = {}
        last: str | None = None
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
            for m in tf:
                if not m.isreg() or _META.match(m.name):
                    continue
                match = _KEY.match(m.name)
                if not match:  # no extension, or a hidden name (._x): not part of any sample
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if 0 <= size < m.offset_data + m.size:
                    raise tarfile.ReadError(f"the member {m.name} runs past the end of the file ({size} bytes)")
                if key != last:
                    if key in entries:
                        raise FeatcacheError(
                            f"{shard}:{key}: the key appears twice in the shard (its members are not consecutive, "
                            "so webdataset reads two samples)", "write each sample's members together, under one key")
                    entries[key] = _Entry(key)
                    last = key
                entry = entries[key]
                if ext in entry.members:
                    raise FeatcacheError(f"{shard}:{key}: the member {m.name} appears twice in the shard",
                                         "write each member once")
                entry.members.append(ext)
                if ext in IMAGE_EXTS:
                    if entry.image is not None:
                        raise FeatcacheError(f"{shard}:{key}: the sample has two images ({entry.image[0]} and "
                                             f"{m.name})", "keep one image member per sample")
                    entry.image = (m.name, m.offset_data, m.size)
                elif ext in ("txt", "json", "cls"):
                    f.seek(m.offset_data)
                    data = f.read(m.size)
                    if len(data) != m.size:
                        raise tarfile.ReadError(f"unexpected end of data in {m.name}")
                    setattr(entry, ext, data)
            # tarfile ends quietly at a bad header past the first member, or at the end of the
            # file: what follows the last member must be the end-of-archive zero block, which
            # every tar writer adds (a copy cut at a member boundary lacks it).
            f.seek(tf.offset)
            block = f.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"the file ends at byte {tf.offset + len(block)} without the end-of-archive "
                                        "block: truncated")
            if block.strip(b"\0"):
                raise tarfile.ReadError(f"bad tar header at byte {tf.offset}")
        except FeatcacheError:
            raise
        except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError, ValueError) as err:
            raise _corrupt(shard, last, err) from None
    return list(entries.values())


def _caption(entry: _Entry, where: str) -> tuple[str | None, str | None]:
    if entry.txt is None:
        return None, f"{where}: the sample has no caption ({entry.key}.txt)"
    try:
        text = entry.txt.decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        return None, f"{where}: the caption {entry.key}.txt is not valid UTF-8 (byte {err.start})"
    return (text, None) if text else (None, f"{where}: the caption {entry.key}.txt is empty")


def _split(entry: _Entry, where: str, salt: str) -> str:
    if entry.json is not None:
        try:
            meta = json.loads(entry.json.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FeatcacheError(f"{where}: the metadata {entry.key}.json is not valid JSON ({err})",
                                 "fix or drop the .json member") from None
        if not isinstance(meta, dict):
            raise FeatcacheError(f"{where}: the metadata {entry.key}.json must be a JSON object, "
                                 f"got {type(meta).__name__}")
        if meta.get("split") not in (None, ""):
            return corpora.split_name(meta["split"], f"{where} ({entry.key}.json)")
    return hash_split(entry.key, salt)


def load_wds(pattern: str, options: dict) -> dict[str, Split]:
    listing.check_options("wds", options, WDS_OPTIONS)
    salt = options.get("salt", "")
    paths, stats = wds_shards(pattern)
    samples: list[Sample] = []
    shard_of, offsets, sizes, members = [], [], [], []
    for s, (shard, st) in enumerate(zip(paths, stats)):
        for entry in index_shard(shard, st.size):
            where = f"{shard}:{entry.key}"
            if entry.image is None:
                if entry.txt is None and entry.json is None:
                    continue  # only members featcache does not read (.cls, .npy ...)
                raise FeatcacheError(f"{where}: the sample has no image (members: "
                                     f"{', '.join(entry.key + '.' + e for e in entry.members)})",
                                     f"every sample needs one image member ({', '.join('.' + e for e in IMAGE_EXTS)})")
            caption, problem = _caption(entry, where)
            samples.append(Sample(entry.key, _split(entry, where, salt), [caption], [problem], where, len(members)))
            shard_of.append(s)
            offsets.append(entry.image[1])
            sizes.append(entry.image[2])
            members.append(entry.image[0])
    if not samples:
        raise FeatcacheError(f"the wds_shards of {pattern} hold no image samples", WDS_HINT)
    reader = ShardReader(paths, np.array(shard_of, dtype=np.int64), np.array(offsets, dtype=np.int64),
                         np.array(sizes, dtype=np.int64), members)
    return corpora.pair_splits(listing.readable_stem(pattern, "wds"), samples, reader, unique="all",
                               duplicate_hint="keys must be unique across the shard set (img2dataset numbers "
                                              "them per shard: give each download its own key range)")
