"""What the corpus readers (``wds:``, ``hfds:``) share: per-process open files, samples,
row views, and paired splits built from samples. Their listing is common.listing's."""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.data.rows import PAIRS, ImageSide, Split, TextSide


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
    value = value.strip().lower()  # TRAIN and train are one split, never two
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
