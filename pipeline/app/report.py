"""Compare runs side by side: one row per config group, mean ± std over seeds.

Every typed result a run holds (``featcache.pipeline.results``) becomes a column; rows group
runs by any config keys. The spread is the sample standard deviation over the runs of a group
(``ddof=1``), everywhere: tables, CSV and plots. Tables export to CSV and Markdown, and plots
show a metric per group, against ``pairs`` for a scaling series, and per layer pair.
"""

from __future__ import annotations

import csv
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.cache.files import write_text
from featcache.pipeline.evaluate.results import Column, rows_of
from featcache.pipeline.train.cells import runs_by_cell
from featcache.pipeline.train.runs import RepeatedCellWarning, read_eval_results, read_json

DEFAULT_GROUP = ("dataset", "layers", "method", "loss", "head", "pairs")
STD = "sample std over seeds (ddof=1)"


def spread(values) -> float:
    """The one convention for ± in featcache: the sample standard deviation; 0 for one value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def distinct_runs(runs_dir: Path) -> list[Path]:
    """The finished runs, one per cell: of two runs of one cell (a sweep run again with
    ``--rerun``, or copied runs), the latest is kept and the others named in a warning, so a
    repeat never counts as another seed. Runs from before cells had ids are all kept."""
    cells, uncelled = runs_by_cell(runs_dir)
    for cell, runs in cells.items():
        for earlier in runs[:-1]:
            warnings.warn(f"{earlier.name} and {runs[-1].name} are runs of one cell ({cell}); only "
                          f"{runs[-1].name}, the later, is counted", RepeatedCellWarning, stacklevel=2)
    return sorted(uncelled + [runs[-1] for runs in cells.values()])


def run_rows(runs_dir: Path, include_baseline: bool = False) -> list[dict]:
    """One dict per run (one run per cell): its config keys, summary, and ``values`` (Column -> number)."""
    rows = []
    for run in distinct_runs(runs_dir):
        cfg, summary = read_json(run / "config.json"), read_json(run / "summary.json")
        row = {k: v for k, v in cfg.items() if not isinstance(v, (dict, list))}
        row.update({f"tag.{k}": v for k, v in (cfg.get("tags") or {}).items()})  # --where tag.KEY=VALUE
        row.setdefault("method", "heads")  # runs from before training-free methods
        row.update(run=run.name, image_layer=summary["image_layer"], text_layer=summary["text_layer"],
                   best_val=summary["best_val"], train_pairs=summary["train_pairs"])
        row["layer_pair"] = f"{summary['image_layer']} x {summary['text_layer']}"
        row["values"] = {r.column: r.value for res in read_eval_results(run) for r in rows_of(res)
                         if include_baseline or r.column.model == "run"}
        rows.append(row)
    return rows


def default_columns(rows: list[dict]) -> list[Column]:
    """Every recall@K and top-1 column, the run's before the references'."""
    cols = {c for r in rows for c in r["values"] if c.metric in ("recall", "top1")}
    key = lambda c: (c.model != "run", c.task, c.dataset, c.split, c.positives, c.direction, c.metric, c.k or 0,
                     c.model)
    return sorted(cols, key=key)


def pick_columns(rows: list[dict], wanted: list[str]) -> list[Column]:
    """Columns named on the command line, by their full label or short form."""
    known = {c for r in rows for c in r["values"]}
    out = []
    for name in wanted:
        match = [c for c in known if name in (c.label, c.short)]
        if not match:
            raise FeatcacheError(f"no results for the metric {name!r}",
                                 f"known: {', '.join(sorted(c.label for c in known)) or 'none (run featcache eval)'}")
        out += sorted(match, key=lambda c: c.label)
    return out


@dataclass
class Report:
    group_by: list[str]
    metrics: list[Column]
    groups: list[dict] = field(default_factory=list)  # keys..., n, runs, values: Column -> [numbers]

    def cell(self, group: dict, metric: Column, scale: float = 100.0) -> str:
        values = group["values"].get(metric, [])
        if not values:
            return "-"
        m = scale * float(np.mean(values))
        return f"{m:.1f} ± {scale * spread(values):.1f}" if len(values) > 1 else f"{m:.1f}"

    def header(self, short: bool = True) -> list[str]:
        return [*self.group_by, "n", *(m.short if short else m.label for m in self.metrics)]

    def table_rows(self) -> list[list[str]]:
        return [[str(g[k]) for k in self.group_by] + [str(g["n"])] + [self.cell(g, m) for m in self.metrics]
                for g in self.groups]

    def headline(self) -> Column | None:
        return next((m for m in self.metrics if m.is_headline()), None)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([*self.group_by, "n", *[f"{m.label} {s}" for m in self.metrics for s in ("mean", "std")]])
        for g in self.groups:
            stats = []
            for m in self.metrics:
                v = g["values"].get(m, [])
                stats += [f"{np.mean(v):.6f}" if v else "", f"{spread(v):.6f}" if len(v) > 1 else ""]
            w.writerow([g[k] for k in self.group_by] + [g["n"]] + stats)
        return buf.getvalue()

    def to_dict(self) -> dict:
        """The report as data (``report --json``): per group its keys, n, runs, and per metric
        the values over seeds with their mean and sample std (None where there are none)."""
        def stats(values: list) -> dict:
            return {"mean": float(np.mean(values)) if values else None,
                    "std": spread(values) if len(values) > 1 else None, "values": [float(v) for v in values]}

        return {"group_by": self.group_by, "std": STD,
                "metrics": [{"label": m.label, "short": m.short} for m in self.metrics],
                "groups": [{**{k: g[k] for k in self.group_by}, "n": g["n"], "runs": g["runs"],
                            "metrics": {m.label: stats(g["values"].get(m, [])) for m in self.metrics}}
                           for g in self.groups]}

    def to_markdown(self) -> str:
        head = self.header()
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.table_rows()]
        return "\n".join(lines) + f"\n\nValues in %, mean ± {STD}.\n"


# Keys that differ between runs of one setting, or say nothing about it: never grouped on by default.
NOT_SETTINGS = {"seed", "run", "runs_dir", "cache_dir", "best_val", "train_pairs", "image_layer", "text_layer",
                "layer_pair", "values", "val_pairs", "device", "cell", "log", "compile", "group", "name"}


def is_setting(key: str) -> bool:
    """A config key that, when it varies, separates groups: not bookkeeping (names, tags, the
    sweep a run came from), which --group-by and --where can still use."""
    return key not in NOT_SETTINGS and not key.startswith("tag.")


def default_group(rows: list[dict]) -> list[str]:
    """DEFAULT_GROUP plus every other setting that varies across the runs, so runs of different
    ablations are never averaged together as if they were seeds."""
    varying = sorted(k for k in {k for r in rows for k in r} - set(DEFAULT_GROUP)
                     if is_setting(k) and len({str(r.get(k)) for r in rows}) > 1)
    return [k for k in DEFAULT_GROUP if any(k in r for r in rows)] + varying


def build_report(rows: list[dict], group_by: list[str] | None = None, metrics: list[Column] | list[str] | None = None,
                 where: dict | None = None) -> Report:
    rows = [r for r in rows if all(str(r.get(k)) == str(v) for k, v in (where or {}).items())]
    if not rows:
        raise FeatcacheError("no runs match", "train some with featcache align or featcache sweep")
    group_by = list(group_by or default_group(rows))
    unknown = [k for k in group_by if all(k not in r for r in rows)]
    if unknown:
        keys = sorted({k for r in rows for k, v in r.items() if not isinstance(v, (float, dict))})
        raise FeatcacheError(f"unknown group key(s) {', '.join(unknown)}", f"config keys: {', '.join(keys)}")
    if metrics is None:
        metrics = default_columns(rows)
    elif metrics and isinstance(metrics[0], str):
        metrics = pick_columns(rows, list(metrics))
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = tuple(str(r.get(k)) for k in group_by)
        g = groups.setdefault(key, {**dict(zip(group_by, key)), "n": 0, "values": {}, "runs": []})
        g["n"] += 1
        g["runs"].append(r["run"])
        for m in metrics:
            if m in r["values"]:
                g["values"].setdefault(m, []).append(r["values"][m])
    return Report(group_by, list(metrics), list(groups.values()))


def write_outputs(report: Report, out_dir: Path, plot_metric: Column | None = None) -> list[Path]:
    """CSV, Markdown and plots of a report into ``out_dir``."""
    from featcache.pipeline.app.plots import metric_bars, metric_lines

    out_dir.mkdir(parents=True, exist_ok=True)  # the folder the user chose; the files in it are checked
    written = [write_text(out_dir / "report.csv", report.to_csv()), write_text(out_dir / "report.md", report.to_markdown())]
    metric = plot_metric or report.headline()
    if metric is None:
        return written
    labels = [" / ".join(str(g[k]) for k in report.group_by if k not in ("dataset",)) for g in report.groups]
    means = [100 * float(np.mean(g["values"].get(metric, [np.nan]))) for g in report.groups]
    stds = [100 * spread(g["values"].get(metric, [])) for g in report.groups]
    written.append(metric_bars(labels, means, stds, out_dir / "report-bars.png", f"{metric.short} (%)",
                               f"{metric.label}: mean ± {STD}"))
    if "pairs" in report.group_by and len({g["pairs"] for g in report.groups}) > 1:
        series: dict[str, tuple[list, list, list]] = {}
        others = [k for k in report.group_by if k != "pairs"]
        for g, m, s in sorted(zip(report.groups, means, stds), key=lambda t: _num(t[0]["pairs"])):
            label = " / ".join(str(g[k]) for k in others)
            xs, ms, ss = series.setdefault(label, ([], [], []))
            xs.append(_num(g["pairs"]))
            ms.append(m)
            ss.append(s)
        written.append(metric_lines(series, out_dir / "report-scaling.png", "training pairs", f"{metric.short} (%)",
                                    f"{metric.label} against training pairs"))
    return written


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")  # "None": every pair


def layer_pair_rows(rows: list[dict], metric: Column) -> tuple[list[str], list[float], list[float]]:
    """Mean ± std of a metric per trained layer pair (for the per-layer-pair plot)."""
    by: dict[str, list[float]] = {}
    for r in rows:
        if metric in r["values"]:
            by.setdefault(r["layer_pair"], []).append(100 * r["values"][metric])
    labels = sorted(by)
    return labels, [float(np.mean(by[l])) for l in labels], [spread(by[l]) for l in labels]
