"""Compare runs side by side: one row per config group, mean ± std over seeds.

Every evaluation result a run holds becomes columns (``retrieval/tuxpaint/test i2t R@1`` ...);
rows group runs by any config keys. Tables export to CSV and Markdown, and plots show a
metric per group, against ``pairs`` for a scaling series, and per layer pair.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.runs import list_runs, read_eval_results, read_json

DEFAULT_GROUP = ("dataset", "layers", "loss", "head", "pairs")
SHORT = {"image_to_text": "i2t", "text_to_image": "t2i"}


def _flatten(metrics: dict, prefix: str) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        name = f"{prefix} {SHORT.get(key, key)}"
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = float(value)
    return out


def run_rows(runs_dir: Path, include_baseline: bool = False) -> list[dict]:
    """One flat dict per run: its config keys, summary and every evaluation metric."""
    rows = []
    for run in list_runs(runs_dir):
        cfg, summary = read_json(run / "config.json"), read_json(run / "summary.json")
        row = {k: v for k, v in cfg.items() if not isinstance(v, (dict, list))}
        row.update(run=run.name, image_layer=summary["image_layer"], text_layer=summary["text_layer"],
                   best_val=summary["best_val"], train_pairs=summary["train_pairs"])
        row["layer_pair"] = f"{summary['image_layer']} x {summary['text_layer']}"
        for res in read_eval_results(run):
            tag = f"{res['task']}/{res['dataset']}/{res['split']}"
            if res.get("positive_rule") == "caption":
                tag += "/caption-positives"  # another rule, another column: never averaged together
            row.update(_flatten(res["metrics"], tag))
            if include_baseline and "baseline" in res:
                row.update(_flatten(res["baseline"]["metrics"], f"{tag} [{res['baseline']['method']}]"))
        rows.append(row)
    return rows


@dataclass
class Report:
    group_by: list[str]
    metrics: list[str]
    groups: list[dict] = field(default_factory=list)  # keys..., n, and per metric (mean, std, values)

    def cell(self, group: dict, metric: str, scale: float = 100.0) -> str:
        values = group["values"].get(metric, [])
        if not values:
            return "-"
        m, s = scale * np.mean(values), scale * np.std(values, ddof=1) if len(values) > 1 else 0.0
        return f"{m:.1f} ± {s:.1f}" if len(values) > 1 else f"{m:.1f}"

    def header(self, short: bool = True) -> list[str]:
        return [*self.group_by, "n", *(short_metric(m) if short else m for m in self.metrics)]

    def table_rows(self) -> list[list[str]]:
        return [[str(g[k]) for k in self.group_by] + [str(g["n"])] + [self.cell(g, m) for m in self.metrics]
                for g in self.groups]

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([*self.group_by, "n", *[f"{m} {s}" for m in self.metrics for s in ("mean", "std")]])
        for g in self.groups:
            stats = []
            for m in self.metrics:
                v = g["values"].get(m, [])
                stats += [f"{np.mean(v):.6f}" if v else "", f"{np.std(v, ddof=1):.6f}" if len(v) > 1 else ""]
            w.writerow([g[k] for k in self.group_by] + [g["n"]] + stats)
        return buf.getvalue()

    def to_markdown(self) -> str:
        head = self.header()
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.table_rows()]
        return "\n".join(lines) + "\n"


def build_report(rows: list[dict], group_by: list[str] | None = None, metrics: list[str] | None = None,
                 where: dict | None = None) -> Report:
    group_by = list(group_by or DEFAULT_GROUP)
    rows = [r for r in rows if all(str(r.get(k)) == str(v) for k, v in (where or {}).items())]
    if not rows:
        raise FeatcacheError("no runs match", "train some with featcache align or featcache sweep")
    unknown = [k for k in group_by if all(k not in r for r in rows)]
    if unknown:
        keys = sorted({k for r in rows for k, v in r.items() if not isinstance(v, float)})
        raise FeatcacheError(f"unknown group key(s) {', '.join(unknown)}", f"config keys: {', '.join(keys)}")
    if metrics is None:
        metrics = sorted({k for r in rows for k in r if "/" in k and (" R@" in k or " top1" in k)}, key=_natural)
        metrics = [m for m in metrics if "[" not in m] + [m for m in metrics if "[" in m]
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = tuple(str(r.get(k)) for k in group_by)
        g = groups.setdefault(key, {**dict(zip(group_by, key)), "n": 0, "values": {}, "runs": []})
        g["n"] += 1
        g["runs"].append(r["run"])
        for m in metrics:
            if m in r:
                g["values"].setdefault(m, []).append(r[m])
    return Report(group_by, metrics, list(groups.values()))


def write_outputs(report: Report, out_dir: Path, plot_metric: str | None = None) -> list[Path]:
    """CSV, Markdown and plots of a report into ``out_dir``."""
    from featcache.pipeline.app.plots import metric_bars, metric_lines

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.csv", out_dir / "report.md"]
    written[0].write_text(report.to_csv())
    written[1].write_text(report.to_markdown())
    metric = plot_metric or next((m for m in report.metrics if "R@1" in m or "top1" in m), None)
    if metric is None:
        return written
    labels = [" / ".join(str(g[k]) for k in report.group_by if k not in ("dataset",)) for g in report.groups]
    means = [100 * float(np.mean(g["values"].get(metric, [np.nan]))) for g in report.groups]
    stds = [100 * float(np.std(g["values"].get(metric, [0]), ddof=1)) if len(g["values"].get(metric, [])) > 1 else 0.0
            for g in report.groups]
    written.append(metric_bars(labels, means, stds, out_dir / "report-bars.png", f"{metric} (%)",
                               f"{metric}: mean ± std over seeds"))
    if "pairs" in report.group_by and len({g["pairs"] for g in report.groups}) > 1:
        series: dict[str, tuple[list, list, list]] = {}
        others = [k for k in report.group_by if k != "pairs"]
        for g, m, s in sorted(zip(report.groups, means, stds), key=lambda t: _num(t[0]["pairs"])):
            label = " / ".join(str(g[k]) for k in others)
            xs, ms, ss = series.setdefault(label, ([], [], []))
            xs.append(_num(g["pairs"]))
            ms.append(m)
            ss.append(s)
        written.append(metric_lines(series, out_dir / "report-scaling.png", "training pairs", f"{metric} (%)",
                                    f"{metric} against training pairs"))
    return written


def short_metric(name: str) -> str:
    """'retrieval/tuxpaint/test-sample120 i2t R@1' -> 'tuxpaint i2t R@1' for narrow tables."""
    head, _, tail = name.partition(" ")
    parts = head.split("/")
    dataset = parts[1] if len(parts) > 1 else head
    extra = "/" + parts[3] if len(parts) > 3 else ""
    return f"{dataset}{extra} {tail}".strip()


def _natural(name: str):
    """Sort 'R@5' before 'R@10'."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")  # "None": every pair


def layer_pair_rows(rows: list[dict], metric: str) -> tuple[list[str], list[float], list[float]]:
    """Mean ± std of a metric per trained layer pair (for the per-layer-pair plot)."""
    by: dict[str, list[float]] = {}
    for r in rows:
        if metric in r:
            by.setdefault(r["layer_pair"], []).append(100 * r[metric])
    labels = sorted(by)
    return labels, [float(np.mean(by[l])) for l in labels], [float(np.std(by[l])) for l in labels]
