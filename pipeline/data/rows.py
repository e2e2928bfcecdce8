"""Data sets as named splits of rows: an image side and/or a text side, linked by groups.

Every row has a stable id and a group. A caption's group is its image's id; an image's group
in a classification set is its class name, and so is a prompt's. Pairing, retrieval
positives and class labels all follow from equal groups, so later stages need only the cache.
"""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.names import hash_unit
from featcache.pipeline.data.decode import BadImage, decode_image  # noqa: F401 - BadImage: rows' error type too

PAIRS, CLASSES = "pairs", "classes"




@dataclass
class ImageSide:
    ids: list[str]
    groups: list[str]
    load: Callable[[int], "object"]  # row -> RGB PIL image on white; raises BadImage
    raw: Callable[[int], bytes]  # row -> the bytes that define it, for the content digest
    sources: list[str] = field(default_factory=list)  # where each row's bytes live (a file, shard:key)
    # The listing of what holds each row's bytes: () -> (rows, 2) int64 of size and mtime_ns of
    # its file or shard. Reading it opens no image, so a rerun can tell unchanged rows from the
    # listing alone (featcache.pipeline.provenance). None: rows held in memory, digested by content.
    stamps: Callable[[], np.ndarray] | None = None
    # (row, bytes) -> image: decoding bytes already read, so a row's content hash costs no second
    # read. None: ``load`` reads them again.
    decode: Callable[[int, bytes], "object"] | None = None

    def load_hashed(self, row: int):
        """The row's image and the sha256 of the bytes it was decoded from."""
        data = self.raw(row)
        image = self.decode(row, data) if self.decode is not None else self.load(row)
        return image, hashlib.sha256(data).digest()

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TextSide:
    ids: list[str]
    groups: list[str]
    texts: list[str]
    problems: dict[int, str] = field(default_factory=dict)  # row -> why it cannot be encoded

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Split:
    dataset: str
    name: str
    kind: str  # PAIRS | CLASSES
    images: ImageSide | None
    texts: TextSide | None
    classnames: list[str] | None = None
    templates: list[str] | None = None
    # Where the class names and templates came from ({"classnames": ..., "templates": ...}), for
    # results that say which were used; None where the data set has one fixed source.
    class_sources: dict | None = None

    def side(self, modality: str) -> ImageSide | TextSide:
        side = self.images if modality == "image" else self.texts
        if side is None:
            raise FeatcacheError(f"data set {self.dataset!r} split {self.name!r} has no {modality} side")
        return side

    def digest(self, modality: str) -> str:
        """sha256 over the rows of one side: ids, groups and content."""
        side = self.side(modality)
        h = hashlib.sha256()
        for i in range(len(side)):
            h.update(side.ids[i].encode() + b"\0" + side.groups[i].encode() + b"\0")
            if isinstance(side, TextSide):
                h.update(side.texts[i].encode() + b"\0")
            else:
                h.update(hashlib.sha256(side.raw(i)).digest())
        return h.hexdigest()

    def limited(self, limit: int | None) -> "Split":
        """A fixed subset of ``limit`` images (with their captions) for quick runs.

        The rows with the smallest hash of their id, kept in their original order: the same
        subset on every machine, and not biased by a file sorted by class (as MNIST 5k is).
        """
        if not limit or self.images is None or limit >= len(self.images):
            return self
        im = self.images
        rows = sorted(sorted(range(len(im)), key=lambda i: hash_unit(im.ids[i], "limit"))[:limit])
        images = ImageSide([im.ids[i] for i in rows], [im.groups[i] for i in rows],
                           lambda i: im.load(rows[i]), lambda i: im.raw(rows[i]),
                           [im.sources[i] for i in rows] if im.sources else [],
                           (lambda: im.stamps()[rows]) if im.stamps is not None else None,
                           (lambda i, data: im.decode(rows[i], data)) if im.decode is not None else None)
        keep = set(images.ids)
        texts = self.texts
        if texts is not None and self.kind == PAIRS:
            idx = [i for i, g in enumerate(texts.groups) if g in keep]
            texts = TextSide([texts.ids[i] for i in idx], [texts.groups[i] for i in idx],
                             [texts.texts[i] for i in idx],
                             {new: texts.problems[old] for new, old in enumerate(idx) if old in texts.problems})
        return Split(self.dataset, self.name, self.kind, images, texts, self.classnames, self.templates,
                     self.class_sources)


def file_images(paths: list[Path], ids: list[str], groups: list[str]) -> ImageSide:
    def raw(i: int) -> bytes:
        try:
            if not stat.S_ISREG(paths[i].stat().st_mode):  # a FIFO or device would block the read
                raise BadImage(f"cannot read image {paths[i]}: not a regular file",
                               "point the data set at image files, or pass --skip-bad to record a missing row")
            return paths[i].read_bytes()
        except OSError as err:
            raise BadImage(f"cannot read image {paths[i]}: {err.strerror}")

    return ImageSide(ids, groups, lambda i: decode_image(raw(i), str(paths[i])), raw,
                     [str(p) for p in paths], lambda: file_stamps(paths), lambda i, data: decode_image(data, str(paths[i])))


def file_stamps(paths: list[Path]) -> np.ndarray:
    """(size, mtime_ns) of each file: one stat each, no file opened. A file that cannot be
    stat'ed gets (-1, -1): it never matches a stored stamp, so its row is read and fails there."""

    out = np.full((len(paths), 2), -1, dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            st = path.stat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):  # refused here, at listing: reading a FIFO would never return
            raise FeatcacheError(f"the image {path} is not a regular file (a FIFO, device, socket or folder)",
                                 "point the data set at image files")
        out[i] = (st.st_size, st.st_mtime_ns)
    return out


def prompt_side(classnames: list[str], templates: list[str]) -> TextSide:
    ids, groups, texts = [], [], []
    for c in classnames:
        for t, template in enumerate(templates):
            ids.append(f"{c}/{t}")
            groups.append(c)
            texts.append(template.format(c))
    return TextSide(ids, groups, texts)


def read_list(path: Path, what: str) -> list[str]:
    """A user list file: a JSON list of strings, or one entry per line."""
    if not path.is_file():
        raise FeatcacheError(f"{what} file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
        items = json.loads(text) if path.suffix == ".json" else [l.strip() for l in text.splitlines() if l.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FeatcacheError(f"{what} file {path} cannot be read ({type(err).__name__}: {err})",
                             "write a JSON list of strings, or one entry per line, in UTF-8") from None
    if not items or not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise FeatcacheError(f"{what} file {path} must list strings (JSON list or one per line)")
    if what == "templates":
        for t in items:
            try:
                t.format("x")
            except (IndexError, KeyError, ValueError):
                raise FeatcacheError(f"the template {t!r} in {path} is not a format string with one {{}}",
                                     "use {} for the class name and {{ }} for literal braces") from None
            if "{}" not in t:
                raise FeatcacheError(f"every template in {path} needs a {{}} for the class name, not {t!r}")
    return items


@dataclass(frozen=True)
class DatasetEntry:
    """A registered data set: how to build its splits from spec options."""

    name: str
    kind: str
    build: Callable[[dict], dict[str, Split]]  # options -> splits
    description: str
