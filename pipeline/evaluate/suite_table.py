"""A suite's table: per benchmark the run's metric, the baseline run's and the relative
improvement; per task the average relative improvement with a bootstrap interval over
benchmarks; and the benchmarks skipped because their data are not on disk.

The paper's headline is an average over benchmarks of (run - baseline) / baseline, so the
interval resamples benchmarks, not images: it says how much the average depends on which
benchmarks happen to be in the suite. Each benchmark counts once per task, on its headline
number: top-1 for classification, and for retrieval the mean of R@1 image->text and
text->image (one number per benchmark, so a retrieval set does not weigh twice).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import numpy as np

# (label, path in an evaluation's metrics) of the numbers the table shows, per task
TABLE_METRICS = {
    "classify": (("top1", ("top1",)), ("top5", ("top5",)), ("mean per-class recall", ("mean_per_class_recall",))),
    "retrieval": tuple((f"{short} R@{k}", (direction, f"R@{k}")) for direction, short in
                       (("image_to_text", "i→t"), ("text_to_image", "t→i")) for k in (1, 5, 10)),
}


def headline(task: str, metrics: dict) -> float:
    """The one number per benchmark that the suite's average is taken over."""
    if task == "classify":
        return float(metrics["top1"])
    return float((metrics["image_to_text"]["R@1"] + metrics["text_to_image"]["R@1"]) / 2)


def metric(metrics: dict, path: tuple[str, ...]) -> float | None:
    value = metrics
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value)


def relative(run: float | None, base: float | None) -> float | None:
    """(run - base) / base; None when either is absent or the baseline is 0 (no ratio)."""
    if run is None or base is None or base == 0:
        return None
    return (run - base) / base


@dataclass
class Outcome:
    """One benchmark of a suite: evaluated (metrics of the run, and of the baseline run if any),
    or skipped with the reason."""

    name: str
    task: str
    metrics: dict | None = None
    baseline: dict | None = None
    skipped: str | None = None
    notes: dict = field(default_factory=dict)


def bootstrap_mean(values: list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """The mean and a percentile bootstrap interval over ``values`` (benchmarks) resampled with
    replacement; one value gives a zero-width interval, which the table shows as it is."""
    x = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(x.mean()), float(lo), float(hi)


def averages(outcomes: list[Outcome], n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Per task: the average relative improvement of the headline number over the benchmarks that
    have both runs, its bootstrap interval, and how many benchmarks it covers."""
    out = {}
    for task in TABLE_METRICS:
        done = [o for o in outcomes if o.task == task and o.metrics is not None]
        gains = [relative(headline(task, o.metrics), headline(task, o.baseline)) for o in done
                 if o.baseline is not None]
        gains = [g for g in gains if g is not None]
        if not gains:
            continue
        mean, lo, hi = bootstrap_mean(gains, n_boot, seed)
        out[task] = {"mean": mean, "low": lo, "high": hi, "benchmarks": len(gains), "n_boot": n_boot,
                     "metric": "top1" if task == "classify" else "mean of i→t and t→i R@1"}
    return out


def table_rows(outcomes: list[Outcome]) -> list[dict]:
    """One row per (benchmark, metric) evaluated, one per benchmark skipped."""
    rows = []
    for o in outcomes:
        if o.metrics is None:
            rows.append({"benchmark": o.name, "task": o.task, "metric": "", "run": None, "baseline": None,
                         "relative": None, "note": f"skipped: {o.skipped}"})
            continue
        for label, path in TABLE_METRICS[o.task]:
            run = metric(o.metrics, path)
            if run is None:
                continue  # top5 with fewer than 5 classes
            base = metric(o.baseline, path) if o.baseline is not None else None
            rows.append({"benchmark": o.name, "task": o.task, "metric": label, "run": run, "baseline": base,
                         "relative": relative(run, base), "note": ""})
    return rows


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def _signed(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f}%"


def to_markdown(title: str, run: str, baseline: str | None, outcomes: list[Outcome], avg: dict) -> str:
    lines = [f"# {title}", "", f"Run `{run}`" + (f" against the baseline run `{baseline}`" if baseline else "")
             + ". Metrics in %; relative improvement = (run - baseline) / baseline.", ""]
    header = ["benchmark", "task", "metric", "run"] + (["baseline", "relative"] if baseline else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table_rows(outcomes):
        if r["note"]:
            cells = [r["benchmark"], r["task"], r["note"], ""] + (["", ""] if baseline else [])
        else:
            cells = [r["benchmark"], r["task"], r["metric"], _pct(r["run"])]
            cells += [_pct(r["baseline"]), _signed(r["relative"])] if baseline else []
        lines.append("| " + " | ".join(cells) + " |")
    if baseline:
        lines += ["", "Average relative improvement per task (headline metric; 95% bootstrap interval over "
                      "benchmarks):", ""]
        for task, a in avg.items():
            lines.append(f"- {task} ({a['metric']}, {a['benchmarks']} benchmark{'s' * (a['benchmarks'] != 1)}): "
                         f"{_signed(a['mean'])} [{_signed(a['low'])}, {_signed(a['high'])}]")
        for task in TABLE_METRICS:
            if task not in avg and any(o.task == task and o.metrics is not None for o in outcomes):
                lines.append(f"- {task}: n/a (no benchmark with a non-zero baseline to divide by)")
        if not any(o.metrics is not None for o in outcomes):
            lines.append("- none: no benchmark was evaluated")
    skipped = [o for o in outcomes if o.metrics is None]
    if skipped:
        lines += ["", f"{len(skipped)} of {len(outcomes)} benchmarks skipped (data not on disk); the averages "
                      "cover the others only."]
    return "\n".join(lines) + "\n"


def to_csv(outcomes: list[Outcome]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["benchmark", "task", "metric", "run", "baseline", "relative", "note"],
                            lineterminator="\n")
    writer.writeheader()
    for r in table_rows(outcomes):
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()
