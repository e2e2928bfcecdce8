"""CLIP_benchmark's torchvision classification sets (cifar10, food101, pets, ...) from a folder
on disk: ``FOLDER:clip_benchmark=NAME[,split=test]``.

CLIP_benchmark's ``build_dataset`` knows where each set's files lie under its root and which
class names and templates to use (its ``en_classnames.json`` and
``en_zeroshot_classification_templates.json``), so featcache asks it rather than keeping a
second copy of that knowledge. It is always called with ``download=False``: a benchmark missing
from disk is an error here, and only ``eval suite --download`` fetches one, before this runs.
Only ``clip_benchmark.datasets.builder`` is imported (its own dependencies, open_clip and
webdataset among them, are not needed for it; .ci/setup.sh installs it with --no-deps).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common import listing
from featcache.pipeline.data.rows import CLASSES, ImageSide, Split, prompt_side, read_list

OPTIONS = ("clip_benchmark", "split", "templates", "classnames")


INSTALL = "pip install --no-deps clip-benchmark==1.6.2"


def _builder():
    try:
        from clip_benchmark.datasets import builder
    except ImportError as err:
        raise FeatcacheError(f"CLIP_benchmark is not installed ({err})", f"run: {INSTALL}") from None
    return builder


def packaged(kind: str) -> dict:
    """CLIP_benchmark's English class names (``classnames``) or templates (``templates``)."""
    name = {"classnames": "en_classnames.json", "templates": "en_zeroshot_classification_templates.json"}[kind]
    try:
        return json.loads(resources.files("clip_benchmark.datasets").joinpath(name).read_text())
    except ModuleNotFoundError:
        raise FeatcacheError("CLIP_benchmark is not installed", f"run: {INSTALL}") from None


def build(name: str, root: Path, split: str, download: bool = False):
    """CLIP_benchmark's data set object (images as PIL, no transform); a missing set is one line."""
    builder = _builder()
    try:
        return builder.build_dataset(name, root=str(root), transform=None, split=split, download=download,
                                     task="zeroshot_classification")
    except (RuntimeError, FileNotFoundError, AssertionError, ValueError, OSError) as err:
        raise FeatcacheError(f"CLIP_benchmark cannot read {name}/{split} from {root}: "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__}",
                             f"put the data set's files under {root} as torchvision expects them, "
                             "or let featcache eval suite --download fetch them") from None


def labels_of(ds) -> list[int]:
    """Each row's class index, from the list torchvision keeps, without decoding an image (a
    data set keeping none is read row by row)."""
    target = getattr(ds, "target_transform", None) or (lambda y: y)
    for attr in ("targets", "_labels", "labels", "y"):
        values = getattr(ds, attr, None)
        if values is not None and len(values) == len(ds):
            return [int(target(int(v))) for v in np.asarray(values).reshape(-1)]
    for attr in ("_samples", "samples"):
        values = getattr(ds, attr, None)
        if values is not None and len(values) == len(ds):
            return [int(target(int(v[1]))) for v in values]
    return [int(ds[i][1]) for i in range(len(ds))]


def _fill(template: str) -> str:
    return re.sub(r"\{c\}", "{}", template)


def load_clipbench_tv(root: Path, options: dict) -> dict[str, Split]:
    listing.check_options("clip_benchmark", options, OPTIONS)
    name, split = options["clip_benchmark"], options.get("split", "test")
    ds = build(name, root, split)
    classnames, templates = packaged("classnames"), packaged("templates")
    sources = {}
    if options.get("classnames"):
        names, sources["classnames"] = read_list(Path(options["classnames"]), "classnames"), options["classnames"]
    else:
        names = list(ds.classes)
        sources["classnames"] = (f"clip_benchmark en_classnames.json[{name}]" if name in classnames
                                 else f"the data set's own ({type(ds).__name__}.classes)")
    if options.get("templates"):
        fill, sources["templates"] = read_list(Path(options["templates"]), "templates"), options["templates"]
    else:
        key = name if name in templates else "imagenet1k"  # CLIP_benchmark's own fallback
        fill = [_fill(t) for t in templates[key]]
        sources["templates"] = f"clip_benchmark en_zeroshot_classification_templates.json[{key}]"
    labels = labels_of(ds)
    ids = [f"{split}/{i:06d}" for i in range(len(ds))]
    groups = [names[y] for y in labels]

    def load(i: int):
        return ds[i][0].convert("RGB")

    def raw(i: int) -> bytes:  # the decoded pixels: what the store's digest covers
        image = ds[i][0]
        return f"{image.mode}{image.size}".encode() + image.tobytes()

    images = ImageSide(ids, groups, load, raw)
    out = Split(name, split, CLASSES, images, prompt_side(names, fill), names, fill, sources)
    return {split: out}
