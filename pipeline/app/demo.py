"""The main job on the embedded offline assets, end to end (``featcache demo``).

1. extract DINOv2-S/14 and MiniLM on Tux Paint and OpenMoji (all splits), Tux Paint categories
   and fixed subsets of Fashion-MNIST and MNIST;
2. score every layer pair on the training pairs of ``tuxpaint+openmoji`` and save the heatmap;
3. train the grid layers {last, auto} x loss {clip, clip+structure} x seeds on ``tuxpaint+openmoji``
   (1,887 pairs, over three times Tux Paint's alone), with TensorBoard curves when installed;
4. evaluate retrieval on each part's test split and on their union, and zero-shot classification
   on every class set;
5. write the full comparison table with plots to ``out``, and return narrow per-task views of it
   (metrics as rows, configurations as columns) that fit a 100-column terminal.

Everything after step 1 reads the cache only; a second run reuses every finished store.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from featcache.cache.errors import FeatcacheError
from featcache.cache.naming import split_label
from featcache.cache.paths import default_cache_dir
from featcache.pipeline.app.plots import layer_heatmap, metric_bars
from featcache.pipeline.app.report import build_report, default_columns, layer_pair_rows, run_rows, write_outputs
from featcache.pipeline.evaluate.classify import ClassifyConfig, eval_classify
from featcache.pipeline.evaluate.results import Column
from featcache.pipeline.evaluate.retrieval import RetrievalConfig, eval_retrieval
from featcache.pipeline.extract.run import ExtractConfig, extract
from featcache.pipeline.train.config import AlignConfig
from featcache.pipeline.train.plan import load_cached, select_layers
from featcache.pipeline.train.runs import write_json
from featcache.pipeline.train.sweep import sweep


@dataclass
class DemoConfig:
    out: Path = Path("results")
    cache_dir: Path = field(default_factory=default_cache_dir)
    image_model: str = "dinov2"
    text_model: str = "minilm"
    image_pooling: str | None = None  # None: each encoder's default
    text_pooling: str | None = None
    image_size: int | None = None  # None: the image encoder's default; -1: its pretrained size
    # Tux Paint alone keeps the main job at a few minutes on two cores; ``with_openmoji`` trains on
    # the union (1,887 pairs), which encodes 1,565 more images and trains on three times the pairs.
    train_dataset: str = "tuxpaint"
    # (data set, splits, --limit). Extraction is most of the job's time (about 0.1 s per image on
    # two idle cores), so Fashion-MNIST and MNIST, near chance here, are fixed 100-image subsets.
    extracts: tuple = (("tuxpaint", None, None), ("openmoji", ("test",), None),
                       ("tuxpaint-categories", ("test",), None),
                       ("fashion-mnist", ("test",), 100), ("mnist", ("test",), 100))
    retrieval_sets: tuple = ("tuxpaint", "openmoji")  # in domain, and out of domain
    classify_sets: tuple = (("tuxpaint-categories", None), ("fashion-mnist", 100), ("mnist", 100))
    layers: tuple = ("last", "auto")
    losses: tuple = ("clip", "clip+structure")
    seeds: tuple = (0, 1, 2)
    epochs: int = 300  # the paper's 1,000 with patience 200 is the default of featcache align
    patience: int = 50
    # Batches of 128 give about four optimiser steps per epoch on Tux Paint, so the lambda ramp
    # (1,000 steps) completes; at 4,096 one epoch is one step and STRUCTURE barely switches on.
    batch_size: int = 128
    device: str = "auto"
    log: str = "auto"  # tensorboard when the package is installed, else none


@dataclass
class TableView:
    """One task's slice of the report, transposed: a row per metric, a column per configuration."""

    title: str
    header: list[str]
    rows: list[list[str]]


def demo_metrics(rows: list[dict]) -> list[Column]:
    """The columns worth a glance: R@1 and R@10 both ways per pair set, top-1 per class set."""
    cols = default_columns(rows)
    return ([c for c in cols if c.task == "retrieval" and c.k in (1, 10)]
            + [c for c in cols if c.task == "classify" and c.metric == "top1"])


def task_views(report) -> list[TableView]:
    """The wide report as narrow tables, one per task: 13 metric columns side by side wrap even
    in a 140-column terminal, while four configurations side by side fit in 100."""
    configs = ["\n".join(str(g[k]) for k in report.group_by) for g in report.groups]
    views = []
    for task, title in (("retrieval", "retrieval, Recall@K"), ("classify", "zero-shot classification")):
        metrics = [m for m in report.metrics if m.task == task]
        if metrics:
            views.append(TableView(f"{title} (%, mean ± std over seeds)", ["metric", *configs],
                                   [[m.short, *(report.cell(g, m) for g in report.groups)] for m in metrics]))
    return views


def split_limit(cfg: DemoConfig, dataset: str) -> int | None:
    """The --limit a data set was extracted with; the parts of ``a+b`` must share it (one split label)."""
    limits = {name: lim for name, _, lim in cfg.extracts}
    parts = {limits.get(part) for part in dataset.split("+")}
    if len(parts) != 1:
        raise FeatcacheError(f"the parts of {dataset} are extracted with different --limit values ({parts})",
                             "give every part of a combined data set the same limit in DemoConfig.extracts")
    return parts.pop()


def tracker(cfg: DemoConfig) -> str:
    if cfg.log != "auto":
        return cfg.log
    return "tensorboard" if importlib.util.find_spec("tensorboard") else "none"


def with_openmoji(cfg: DemoConfig) -> DemoConfig:
    """Train on ``tuxpaint+openmoji`` and evaluate on each part and on the union: about 2,700
    images to encode and 1,887 training pairs, so several times the default's time."""
    extracts = tuple((name, None, limit) if name == "openmoji" else (name, splits, limit)
                     for name, splits, limit in cfg.extracts)
    return replace(cfg, train_dataset="tuxpaint+openmoji", extracts=extracts,
                   retrieval_sets=("tuxpaint", "openmoji", "tuxpaint+openmoji"))


def quick(cfg: DemoConfig) -> DemoConfig:
    """A short smoke version: small subsets (120 rows per split of each pair set) and one seed."""
    return replace(cfg, extracts=(("tuxpaint", None, 120), ("openmoji", None, 120),
                                  ("fashion-mnist", ("test",), 100), ("mnist", ("test",), 100)),
                   classify_sets=(("fashion-mnist", 100), ("mnist", 100)), seeds=(0,), epochs=60, patience=20)


def encoders_line(cfg: DemoConfig) -> str:
    """The encoders a demo ran, as the user wrote them, for its report and plots."""
    def one(model, pooling, size=None):
        details = [f"{word} {v}" for word, v in (("pooling", pooling), ("size", size)) if v is not None]
        return model + (f" ({', '.join(details)})" if details else "")
    return (f"Image encoder {one(cfg.image_model, cfg.image_pooling, cfg.image_size)}, "
            f"text encoder {one(cfg.text_model, cfg.text_pooling)}, trained on {cfg.train_dataset}")


def run_demo(cfg: DemoConfig, console, progress_factory, show_scores=None) -> dict:
    """Run the main job; ``show_scores(table)`` renders the layer table (the CLI passes a rich view)."""
    start = time.perf_counter()
    times = {}
    runs_dir = cfg.out / "runs"
    if runs_dir.exists():  # the demo's own runs: a rerun replaces them rather than doubling n
        shutil.rmtree(runs_dir)
    split = lambda s, dataset=cfg.train_dataset: split_label(s, split_limit(cfg, dataset))
    log = tracker(cfg)

    console.print(encoders_line(cfg), highlight=False, soft_wrap=True)
    console.rule("1. extract every layer once")
    t = time.perf_counter()
    for model, pooling, size in ((cfg.image_model, cfg.image_pooling, cfg.image_size),
                                 (cfg.text_model, cfg.text_pooling, None)):
        for dataset, splits, limit in cfg.extracts:
            with progress_factory() as progress:
                results = extract(ExtractConfig(model=model, dataset=dataset, splits=list(splits) if splits else None,
                                                limit=limit, layers="all", cache_dir=cfg.cache_dir, pooling=pooling,
                                                image_size=size, device=cfg.device), progress)
            done = sum(r.computed_rows for r in results)
            console.print(f"  {model:>7} on {dataset:<20} {sum(r.rows for r in results):>5} rows "
                          f"({'cached' if not done else f'{done} computed'})", highlight=False)
    times["extract_s"] = time.perf_counter() - t

    console.rule("2. layer similarity (mutual kNN)")
    base = AlignConfig(image_model=cfg.image_model, text_model=cfg.text_model, image_pooling=cfg.image_pooling,
                       text_pooling=cfg.text_pooling, image_size=cfg.image_size, dataset=cfg.train_dataset,
                       train_split=split("train"), val_split=split("val"), epochs=cfg.epochs, patience=cfg.patience,
                       batch_size=cfg.batch_size, cache_dir=cfg.cache_dir, runs_dir=runs_dir, log=log,
                       device=cfg.device)
    data = load_cached(base)
    table = select_layers(data, base.select)
    layer_heatmap(table, cfg.out / "layers.png", f"mutual kNN, {cfg.train_dataset} train, n={table.n}, k={table.k}\n"
                  f"{cfg.image_model} x {cfg.text_model}")
    write_json(cfg.out / "layers.json", table.to_dict())
    if show_scores is not None:
        show_scores(table)
    console.print(f"  best pair {table.best()} ({table.score(*table.best()):.3f}); "
                  f"last pair {table.last()} ({table.score(*table.last()):.3f})", highlight=False)

    console.rule("3. ablation grid from the cache")
    t = time.perf_counter()
    with progress_factory() as progress:
        runs = sweep(base, list(cfg.layers), list(cfg.losses), list(cfg.seeds), progress=progress)
    times["grid_s"] = time.perf_counter() - t
    console.print(f"  {len(runs)} runs in {times['grid_s']:.0f} s", highlight=False)

    console.rule("4. evaluate")
    t = time.perf_counter()
    for run in runs:
        for dataset in cfg.retrieval_sets:
            eval_retrieval(RetrievalConfig(run=str(run), dataset=dataset, split=split("test", dataset),
                                           cache_dir=cfg.cache_dir, runs_dir=runs_dir))
        for dataset, limit in cfg.classify_sets:
            eval_classify(ClassifyConfig(dataset=dataset, run=str(run), limit=limit, cache_dir=cfg.cache_dir,
                                         runs_dir=runs_dir))
    times["eval_s"] = time.perf_counter() - t

    console.rule("5. comparison (mean ± std over seeds, %)")
    rows = run_rows(runs_dir, include_baseline=False)
    report = build_report(rows, ["layers", "loss"], demo_metrics(rows))
    first = next(m for m in report.metrics if m.is_headline() and m.dataset == cfg.train_dataset)
    written = write_outputs(report, cfg.out, first)
    markdown = cfg.out / "report.md"  # the report names what it compares: the demo's encoders
    markdown.write_text(f"{encoders_line(cfg)}.\n\n{markdown.read_text()}")
    labels, means, stds = layer_pair_rows(rows, first)
    written.append(metric_bars(labels, means, stds, cfg.out / "report-layer-pairs.png", f"{first.short} (%)",
                               f"{first.label} per trained layer pair"))
    times["total_s"] = time.perf_counter() - start
    write_json(cfg.out / "timings.json", times)
    return {"report": report, "views": task_views(report), "written": written, "times": times, "table": table,
            "tensorboard": runs_dir if log == "tensorboard" else None}
