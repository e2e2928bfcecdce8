"""``featcache eval suite``: a run (and a baseline run) on every benchmark of a suite, one table.

Each benchmark is located on disk (``suite_sources``), its images and prompts are extracted
once per encoder into the cache like any data set (only the stores that are not there yet, so
a second suite, or another run of the same encoders, extracts nothing), and it is scored by the
very functions behind ``eval classify`` and ``eval retrieval`` with one shared ``Reads``: the
suite's numbers are those commands' numbers, not a second implementation. A benchmark whose
data are not on disk is skipped with one line, and the table says so. This is the application
layer because it runs both stages: extraction (stage one) and evaluation (stage two).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from featcache.cache.commands import run_decode
from featcache.cache.errors import FeatcacheError
from featcache.cache.files import real_folder, write_text
from featcache.cache.lookup import StoreNotFound
from featcache.cache.naming import safe_component, split_label
from featcache.cache.paths import default_cache_dir, default_runs_dir
from featcache.pipeline.app.suite_sources import Missing, locate
from featcache.pipeline.evaluate.batch import select_runs
from featcache.pipeline.evaluate.classify import ClassifyConfig, eval_classify
from featcache.pipeline.evaluate.reads import Reads
from featcache.pipeline.evaluate.retrieval import RetrievalConfig, eval_retrieval
from featcache.pipeline.evaluate.run_view import run_sides
from featcache.pipeline.evaluate.suite_file import Benchmark, load_suite
from featcache.pipeline.evaluate.suite_table import Outcome, averages, to_csv, to_markdown
from featcache.pipeline.extract.run import ExtractConfig, extract
from featcache.pipeline.features import Side, open_store
from featcache.pipeline.train.runs import read_json, write_json


@dataclass
class SuiteConfig:
    run: str = "latest"
    baseline: str | None = None  # another run the relative improvements are measured against
    suite: str = "offline"  # a built-in suite's name or a suite file
    benchmark_root: Path | None = None  # where CLIP_benchmark's data sets lie
    extract: bool = False  # extract the stores a benchmark lacks (else it is skipped, said aloud)
    download: bool = False  # let CLIP_benchmark download a torchvision set that is missing
    templates: Path | None = None  # prompt templates for every classification benchmark
    limit: int | None = None  # a fixed subset of each benchmark's images (quick runs)
    out: Path | None = None  # [default: results/suite-<suite>]
    n_boot: int = 2000
    device: str = "auto"
    cache_dir: Path = field(default_factory=default_cache_dir)
    runs_dir: Path = field(default_factory=default_runs_dir)


def one_run(runs_dir: Path, spec: str, option: str) -> Path:
    runs = select_runs(runs_dir, spec)
    if len(runs) != 1:
        raise FeatcacheError(f"{option} {spec!r} names {len(runs)} runs; a suite compares one run with one baseline",
                             "name one run id (featcache runs lists them)")
    return runs[0]


def _sides(run_dirs: list[Path]) -> list[tuple[Side, str]]:
    """Each encoder side the runs read, once, with every layer the runs need of it."""
    out: dict[Side, list[str]] = {}
    for run in run_dirs:
        cfg = read_json(run / "config.json")
        image, text = run_sides(cfg)
        out.setdefault(image, []).append(cfg["image_layer"])
        out.setdefault(text, []).append(cfg["text_layer"])
    return [(side, layer) for side, layers in out.items() for layer in dict.fromkeys(layers)]


def _decodes(run_dirs: list[Path]) -> dict[Side, str]:
    """The ``--decode`` of each image side's training stores (``draft``: the runs' stores were
    drafted, and a whole-decoded benchmark store would be refused as another preprocessing)."""
    out: dict[Side, str] = {}
    for run in run_dirs:
        cfg = read_json(run / "config.json")
        out.setdefault(run_sides(cfg)[0], run_decode(cfg))
    return out


def _cached(cfg: SuiteConfig, spec: str, label: str, side: Side, layer: str) -> bool:
    try:
        store = open_store(cfg.cache_dir, spec, label, side)
    except StoreNotFound:
        return False
    return layer in store.layers and store.is_complete(layer)


def _to_extract(cfg: SuiteConfig, spec: str, split: str, run_dirs: list[Path]) -> list[Side]:
    label = split_label(split, cfg.limit)
    sides = [side for side, layer in _sides(run_dirs) if not _cached(cfg, spec, label, side, layer)]
    return list(dict.fromkeys(sides))


def _score(bench: Benchmark, spec: str, cfg: SuiteConfig, reads: Reads, run_dir: Path) -> dict:
    """The result ``eval classify`` or ``eval retrieval`` gives (written beside the run as they write it)."""
    if bench.task == "classify":
        return eval_classify(ClassifyConfig(dataset=spec, run=run_dir.name, split=bench.split, limit=cfg.limit,
                                            baseline=False, cache_dir=cfg.cache_dir, runs_dir=cfg.runs_dir),
                             reads, run_dir)
    return eval_retrieval(RetrievalConfig(run=run_dir.name, dataset=spec, split=split_label(bench.split, cfg.limit),
                                          baseline=False, cache_dir=cfg.cache_dir, runs_dir=cfg.runs_dir),
                          reads, run_dir)


def clip_benchmark_record(suite: str, bench: Benchmark, spec: str, result: dict, class_sources: dict | None) -> dict:
    """One (run, benchmark, task) as CLIP_benchmark writes it (dataset, model, task, metrics under
    its names), with what featcache adds: split, k, template count, sources and the full result."""
    m = result["metrics"]
    if bench.task == "classify":
        task = "zeroshot_classification"
        metrics = {"acc1": m["top1"], "mean_per_class_recall": m["mean_per_class_recall"]}
        if "top5" in m:
            metrics["acc5"] = m["top5"]
        extra = {"classes": result["classes"], "templates": result["templates"], "class_sources": class_sources}
    else:
        task = "zeroshot_retrieval"
        metrics = {}
        for k in result["ks"]:  # CLIP_benchmark: image retrieval is text -> image
            metrics[f"image_retrieval_recall@{k}"] = m["text_to_image"][f"R@{k}"]
            metrics[f"text_retrieval_recall@{k}"] = m["image_to_text"][f"R@{k}"]
        extra = {"captions": result["captions"], "positive_rule": result["positive_rule"]}
    return {"dataset": bench.name, "model": result["run_id"], "task": task, "metrics": metrics, "language": "en",
            "suite": suite, "source": bench.source, "spec": spec, "split": result["split"], "ks": result["ks"],
            "images": result["images"], "layers": result["layers"], "featcache_result": result["path"], **extra}


def run_suite(cfg: SuiteConfig, progress_factory: Callable | None = None,
              say: Callable[[str], None] = print) -> dict:
    """Evaluate, tabulate and write; returns the outcomes, averages, what was extracted and written."""
    start = time.perf_counter()
    suite = load_suite(cfg.suite)
    run_dir = one_run(cfg.runs_dir, cfg.run, "--run")
    base_dir = one_run(cfg.runs_dir, cfg.baseline, "--baseline") if cfg.baseline else None
    run_dirs = [run_dir] + ([base_dir] if base_dir is not None else [])
    out = real_folder(cfg.out or Path("results") / f"suite-{safe_component(suite.name)}")
    reads, outcomes, extracted, written = Reads(), [], [], []
    for bench in suite.benchmarks:
        found = locate(bench, suite, cfg.benchmark_root, cfg.templates, cfg.download)
        if isinstance(found, Missing):
            say(f"skipped {bench.name} ({bench.task}): {found.reason}")
            outcomes.append(Outcome(bench.name, bench.task, skipped=found.reason))
            continue
        todo = _to_extract(cfg, found.spec, bench.split, run_dirs)
        if todo and not cfg.extract:
            encoders = ", ".join(s.model for s in todo)
            reason = f"not extracted yet for {encoders}; pass --extract"
            say(f"skipped {bench.name} ({bench.task}): {reason}")
            outcomes.append(Outcome(bench.name, bench.task, skipped=reason))
            continue
        for side in todo:
            with progress_factory() if progress_factory else nullcontext() as progress:
                extract(ExtractConfig(model=side.model, pooling=side.pooling, image_size=side.image_size,
                                      dataset=found.spec, splits=[bench.split], limit=cfg.limit, layers="all",
                                      cache_dir=cfg.cache_dir, device=cfg.device,
                                      decode=_decodes(run_dirs).get(side, "cpu")), progress)
            extracted.append({"benchmark": bench.name, "spec": found.spec, "model": side.model})
        results = [_score(bench, found.spec, cfg, reads, r) for r in run_dirs]
        for r in results:
            folder = real_folder(out / "json" / safe_component(r["run_id"]))
            path = folder / f"{safe_component(bench.name)}-{bench.task}.json"
            write_json(path, clip_benchmark_record(suite.name, bench, found.spec, r, found.class_sources))
            written.append(path)
        outcomes.append(Outcome(bench.name, bench.task, results[0]["metrics"],
                                results[1]["metrics"] if base_dir is not None else None,
                                notes={"spec": found.spec, "class_sources": found.class_sources}))
    avg = averages(outcomes, cfg.n_boot) if base_dir is not None else {}
    title = f"Suite {suite.name}: run {run_dir.name}" + (f" vs {base_dir.name}" if base_dir is not None else "")
    markdown = to_markdown(title, run_dir.name, base_dir.name if base_dir is not None else None, outcomes, avg)
    for name, text in (("suite.md", markdown), ("suite.csv", to_csv(outcomes))):
        written.append(write_text(out / name, text))
    summary = {"suite": suite.name, "run": run_dir.name, "baseline": base_dir.name if base_dir is not None else None,
               "limit": cfg.limit, "templates": str(cfg.templates) if cfg.templates else None,
               "benchmarks": [{"name": o.name, "task": o.task, "metrics": o.metrics, "baseline": o.baseline,
                               "skipped": o.skipped, **o.notes} for o in outcomes],
               "averages": avg, "extracted": extracted, "seconds": round(time.perf_counter() - start, 1)}
    write_json(out / "suite.json", summary)
    written.append(out / "suite.json")
    return {**summary, "outcomes": outcomes, "markdown": markdown, "written": written}
