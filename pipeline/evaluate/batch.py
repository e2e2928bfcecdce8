"""Many runs evaluated in one process: which runs a ``--run`` value names, and a loop that scores
each while the cache reads are shared (``reads.Reads``). Evaluating a sweep this way costs its
start-up and its stores once, not once per run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.evaluate.reads import Reads
from featcache.pipeline.train.runs import find_run, list_runs, matching_runs


def select_runs(runs_dir: Path, spec: str) -> list[Path]:
    """The runs ``spec`` names: ``latest``, ``all``, a run folder, or a comma list of run ids and
    prefixes (a prefix takes every run it starts; an exact id only itself)."""
    spec = (spec or "").strip()
    if spec in ("latest", "") or (Path(spec).is_dir() and (Path(spec) / "summary.json").exists()):
        return [find_run(runs_dir, spec or "latest")]
    runs = list_runs(runs_dir)
    if not runs:
        raise FeatcacheError(f"no finished runs under {runs_dir}", "train one first: featcache align")
    if spec == "all":
        return runs
    chosen: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise FeatcacheError(f"bad --run {spec!r}: an empty run id", "write run ids or prefixes separated by ','")
        matches = matching_runs(runs, part)
        if not matches:
            raise FeatcacheError(f"no run under {runs_dir} matches {part!r}", "list them with featcache runs")
        chosen += [r for r in matches if r not in chosen]
    return chosen


def evaluate_runs(score: Callable[..., dict], cfg, runs: list[Path], progress=None,
                  reads: Reads | None = None) -> list[dict]:
    """``score(cfg, reads, run_dir)`` (``eval_retrieval`` or ``eval_classify``) for each run, one
    result each (written beside the run as a single evaluation writes it); ``reads``: a memo the
    caller reads on with afterwards (the ``--html`` page), else one of its own."""
    reads = reads or Reads()
    task = progress.add_task(f"evaluate {len(runs)} runs", total=len(runs)) if progress else None
    results = []
    for run in runs:
        results.append(score(replace(cfg, run=run.name), reads, run))
        if task is not None:
            progress.update(task, advance=1)
    return results


def evaluation(spec: str, cache_dir: Path, runs_dir: Path) -> tuple[Callable[..., dict], object]:
    """An evaluation named on a command line (``sweep --eval``): ``retrieval`` (the run's own
    data set, test split) or ``classify:DATASET`` (zero-shot, test split), as (score, config)."""
    from featcache.pipeline.evaluate.classify import ClassifyConfig, eval_classify
    from featcache.pipeline.evaluate.retrieval import RetrievalConfig, eval_retrieval

    task, _, dataset = spec.strip().partition(":")
    if task == "retrieval" and not dataset:
        return eval_retrieval, RetrievalConfig(cache_dir=cache_dir, runs_dir=runs_dir)
    if task == "classify" and dataset:
        return eval_classify, ClassifyConfig(dataset=dataset, cache_dir=cache_dir, runs_dir=runs_dir)
    raise FeatcacheError(f"bad evaluation {spec!r}", "use retrieval or classify:DATASET (e.g. classify:fashion-mnist)")
