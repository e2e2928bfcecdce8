"""Where a suite's benchmark lives on this machine: a benchmark's source resolved to a featcache
data set spec, or the one line that says what is missing.

``clip_benchmark:NAME`` is looked for under ``--benchmark-root`` in CLIP_benchmark's layouts, in
this order: its webdataset export ``ROOT/wds_NAME`` (``/`` read as ``-``, as CLIP_benchmark's
``{dataset_cleaned}`` root does), its torchvision loader over ``ROOT/NAME`` (classification), and
an image folder ``ROOT/NAME`` of class subfolders. Any other source is a featcache data set spec
(a built-in name, a path, ``wds:``, ``hfds:``), a relative path read from the suite file's folder.
Nothing is downloaded unless asked (``download``), and then only through CLIP_benchmark.

This is the application layer: it loads the data set (stage one's adapters) to know it is there
and which class names and templates it brings, so the evaluation can record them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.names import REGISTERED, is_combined, with_option
from featcache.pipeline.data import clipbench_tv, clipbench_wds
from featcache.pipeline.data.catalog import load_dataset
from featcache.pipeline.data.rows import CLASSES
from featcache.pipeline.evaluate.suite_file import CLIP_BENCHMARK, Benchmark, Suite

# CLIP_benchmark names that its torchvision branch builds without tensorflow or a download script
TORCHVISION = ("cifar10", "cifar100", "food101", "sun397", "cars", "fgvc_aircraft", "dtd", "pets", "caltech101",
               "flowers", "mnist", "stl10", "eurosat", "gtsrb", "country211", "pcam", "renderedsst2", "fer2013",
               "imagenet1k", "voc2007")


@dataclass(frozen=True)
class Located:
    """A benchmark found on disk: the spec every command reads it through, and where its class
    names and templates came from (classification)."""

    spec: str
    class_sources: dict | None = None


@dataclass(frozen=True)
class Missing:
    reason: str  # one line: what was looked for and not found


def locate(bench: Benchmark, suite: Suite, root: Path | None, templates: Path | None = None,
           download: bool = False) -> Located | Missing:
    """The benchmark's data set spec (with ``templates=FILE`` for a classification set when given),
    checked by listing it; or why it cannot be evaluated here."""
    if bench.source.startswith(CLIP_BENCHMARK):
        found = _clip_benchmark(bench, bench.source[len(CLIP_BENCHMARK):].strip(), root, download)
    else:
        found = _featcache(bench, suite)
    if isinstance(found, Missing):
        return found
    spec = found
    if templates is not None and bench.task == "classify":
        spec = with_option(spec, "templates", str(templates))
    try:
        splits = load_dataset(spec)
    except FeatcacheError as err:
        return Missing(err.message)
    if bench.split not in splits:
        return Missing(f"{spec} has no split {bench.split!r} (splits: {', '.join(splits)})")
    split = splits[bench.split]
    wanted = "classes" if bench.task == "classify" else "pairs"
    if split.kind != wanted:
        raise FeatcacheError(f"{bench.name}: {spec} holds {split.kind}, but the suite lists it for {bench.task}",
                             f"a {bench.task} benchmark needs a data set of {wanted}")
    if split.kind != CLASSES:
        return Located(spec)
    return Located(spec, split.class_sources or _own_sources(spec, templates))


def _own_sources(spec: str, templates: Path | None) -> dict:
    """A featcache data set that does not say: its own class file (built-ins) or folder names."""
    name = spec.partition(":")[0]
    own = f"featcache pipeline/data/{name}.json" if name in REGISTERED else "the data set's own (folder names)"
    default = own if name in REGISTERED else "featcache's default template"
    return {"classnames": own, "templates": str(templates) if templates else default}


def _featcache(bench: Benchmark, suite: Suite) -> str | Missing:
    spec = bench.source
    name = spec.partition(":")[0]
    if (suite.folder is not None and name not in REGISTERED and not is_combined(spec) and not Path(name).is_absolute()
            and ":" not in spec and (suite.folder / spec).exists()):
        spec = str(suite.folder / spec)  # a relative path in a suite file: from the file's folder
    return spec


def _clip_benchmark(bench: Benchmark, name: str, root: Path | None, download: bool) -> str | Missing:
    if root is None:
        return Missing(f"no --benchmark-root to look for CLIP_benchmark's {name} in")
    wds = root / f"wds_{name.replace('/', '-')}"
    if clipbench_wds.is_layout(wds):
        return str(wds)
    folder = root / name.replace("/", "-")
    looked = [f"{wds} (CLIP_benchmark webdataset)"]
    if bench.task == "classify" and name in TORCHVISION:
        looked.append(f"{folder} (its torchvision files)")
        if folder.is_dir() or download:
            try:
                clipbench_tv.build(name, folder, bench.split, download=download)
            except FeatcacheError as err:
                return Missing(err.message)
            else:
                spec = f"{folder}:clip_benchmark={name}"
                return spec if bench.split == "test" else f"{spec},split={bench.split}"
    elif bench.task == "classify" and folder.is_dir() and any(d.is_dir() for d in folder.iterdir()):
        return str(folder)  # an image folder of class subfolders
    if bench.task == "classify" and name not in TORCHVISION:
        looked.append(f"{folder} (an image folder of class subfolders)")
    return Missing(f"not on disk (looked for {' and '.join(looked)})")
