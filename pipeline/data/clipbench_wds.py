"""A CLIP_benchmark webdataset folder read in place: the layout its ``clip_benchmark_export_wds``
writes and its ``wds/`` data sets read, so a lab's benchmark folders need no conversion.

```
ROOT/classnames.txt                          one class name per line (classification)
ROOT/zeroshot_classification_templates.txt   one template per line, {c} or {} for the name
ROOT/dataset_type.txt                        "retrieval" for caption sets (else classification)
ROOT/<split>/nshards.txt                     how many shards: <split>/0.tar .. <split>/N-1.tar
ROOT/<split>/<n>.tar                         samples: an image and .cls (class index) or .txt
```

A classification sample's ``.cls`` is its class index; a retrieval sample's ``.txt`` holds one
caption per line. Shards are indexed by wds.index_shard (never unpacked), so a row's bytes are
read by seeking, stamped by their shard, exactly as ``wds:`` corpora are. Splits are the folders
that hold shards. The folder is named like any image folder (its stem and a digest of its file
list), so every command finds its stores from the same path.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common import listing
from featcache.pipeline.data import corpora
from featcache.pipeline.data.corpora import RowView, Sample
from featcache.pipeline.data.rows import CLASSES, ImageSide, Split, prompt_side, read_list
from featcache.pipeline.data.wds import ShardReader, index_shard

CLASSNAMES, TEMPLATES, TYPE = "classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt"


OPTIONS = ("templates", "classnames")


HINT = ("a CLIP_benchmark webdataset folder holds classnames.txt (or dataset_type.txt) and <split>/N.tar shards "
        "(clip_benchmark_export_wds writes it)")


def is_layout(path: Path) -> bool:
    """A folder CLIP_benchmark's ``wds/`` reader would take: its metadata file and a split of shards."""
    if not path.is_dir() or not ((path / CLASSNAMES).is_file() or (path / TYPE).is_file()):
        return False
    return any(d.is_dir() and any(d.glob("*.tar")) for d in path.iterdir())


def dataset_type(root: Path) -> str:
    """classification (the default, as CLIP_benchmark assumes), retrieval or multilabel."""
    kind = (root / TYPE).read_text().strip().lower() if (root / TYPE).is_file() else "classification"
    if kind not in ("classification", "retrieval"):
        raise FeatcacheError(f"{root}: dataset_type.txt says {kind!r}; featcache evaluates classification and "
                             "retrieval sets", "use a classification or retrieval benchmark")
    return kind


def shards(split_dir: Path) -> list[str]:
    """The split's shards: 0.tar .. N-1.tar when nshards.txt says N (each must be there), else
    every .tar in numeric order."""
    count = split_dir / "nshards.txt"
    if count.is_file():
        try:
            n = int(count.read_text().strip())
        except ValueError:
            raise FeatcacheError(f"{count} does not hold a number of shards", HINT) from None
        paths = [split_dir / f"{i}.tar" for i in range(n)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FeatcacheError(f"{split_dir}: nshards.txt says {n} shards but {missing[0].name} is missing",
                                 "copy the whole split folder")
    else:
        def order(p: Path):
            return (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem)
        paths = sorted(split_dir.glob("*.tar"), key=order)
    return [str(p) for p in paths]


def _template(line: str) -> str:
    """CLIP_benchmark's templates write the class as {c}; featcache's prompts fill {}."""
    return re.sub(r"\{c\}", "{}", line)


def class_lists(root: Path, options: dict) -> tuple[list[str], list[str], dict]:
    """Class names and templates: the user's files (options) first, then the folder's own, then one
    generic template; and where each came from (recorded with the results)."""
    sources = {}
    if options.get("classnames"):
        names, sources["classnames"] = read_list(Path(options["classnames"]), "classnames"), options["classnames"]
    elif (root / CLASSNAMES).is_file():
        names, sources["classnames"] = read_list(root / CLASSNAMES, "classnames"), str(root / CLASSNAMES)
    else:
        raise FeatcacheError(f"{root}: no {CLASSNAMES} for a classification set", "add it, or pass classnames=FILE")
    if options.get("templates"):
        templates, sources["templates"] = read_list(Path(options["templates"]), "templates"), options["templates"]
    elif (root / TEMPLATES).is_file():
        lines = [t.strip() for t in (root / TEMPLATES).read_text(encoding="utf-8").splitlines() if t.strip()]
        templates, sources["templates"] = [_template(t) for t in lines], str(root / TEMPLATES)
    else:
        templates, sources["templates"] = ["a photo of a {}."], "featcache's default template"
    return names, templates, sources


def load_clipbench_wds(root: Path, options: dict) -> dict[str, Split]:
    listing.check_options("CLIP_benchmark webdataset", options, OPTIONS)
    kind = dataset_type(root)
    split_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and any(d.glob("*.tar"))]
    if not split_dirs:
        raise FeatcacheError(f"{root} holds no split folder of .tar shards", HINT)
    lists = class_lists(root, options) if kind == "classification" else None
    out = {}
    for d in split_dirs:
        split = corpora.split_name(d.name, str(d))
        out[split] = (_classes(root, d, split, lists) if lists else _captions(root, d, split))
    return out


def _index(split_dir: Path, need: str) -> tuple[ShardReader, list]:
    """Every sample with an image, its shard reader, and the sample's ``need`` member (cls or txt)."""
    paths = shards(split_dir)
    stats = listing.stat_files(paths)
    shard_of, offsets, sizes, members, entries = [], [], [], [], []
    for s, (shard, st) in enumerate(zip(paths, stats)):
        for entry in index_shard(shard, st.size):
            if entry.image is None:
                continue  # CLIP_benchmark skips samples its decoder cannot read too
            if getattr(entry, need) is None:
                raise FeatcacheError(f"{shard}:{entry.key}: the sample has no .{need} member", HINT)
            shard_of.append(s)
            offsets.append(entry.image[1])
            sizes.append(entry.image[2])
            members.append(entry.image[0])
            entries.append(entry)
    if not entries:
        raise FeatcacheError(f"the shards of {split_dir} hold no image samples", HINT)
    reader = ShardReader(paths, np.array(shard_of, dtype=np.int64), np.array(offsets, dtype=np.int64),
                         np.array(sizes, dtype=np.int64), members)
    return reader, entries


def _classes(root: Path, split_dir: Path, split: str, lists) -> Split:
    names, templates, sources = lists
    reader, entries = _index(split_dir, "cls")
    groups = []
    for entry in entries:
        try:
            label = int(entry.cls.decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            label = -1
        if not 0 <= label < len(names):
            raise FeatcacheError(f"{split_dir}:{entry.key}.cls is {entry.cls[:20]!r}, not a class index below "
                                 f"{len(names)}", "the .cls member holds the index of a line of classnames.txt")
        groups.append(names[label])
    ids = [e.key for e in entries]
    view = RowView(reader, np.arange(len(entries), dtype=np.int64))
    images = ImageSide(ids, groups, view.load, view.raw, [reader.source(r) for r in range(len(entries))],
                       stamps=view.stamps, decode=view.decode)
    out = Split(root.name, split, CLASSES, images, prompt_side(names, templates), names, templates)
    out.class_sources = sources
    return out


def _captions(root: Path, split_dir: Path, split: str) -> Split:
    reader, entries = _index(split_dir, "txt")
    samples = []
    for row, entry in enumerate(entries):
        where = f"{split_dir}:{entry.key}"
        try:
            lines = [t.strip() for t in entry.txt.decode("utf-8-sig").splitlines() if t.strip()]
        except UnicodeDecodeError as err:
            raise FeatcacheError(f"{where}.txt is not valid UTF-8 (byte {err.start})", "save captions as UTF-8") from None
        if not lines:
            samples.append(Sample(entry.key, split, [None], [f"{where}.txt holds no caption"], where, row))
        else:
            samples.append(Sample(entry.key, split, lines, [None] * len(lines), where, row))
    return corpora.pair_splits(root.name, samples, reader, unique="split")[split]
