"""Figures people would rather look at than tables: layer heatmaps, scaling curves, grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.cache.files import open_new


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_heatmap(table, out: Path, title: str = "") -> Path:
    """Score of every (image layer, text layer) pair; the best pair boxed, the last pair circled."""
    plt = _pyplot()
    scores = np.asarray(table.scores)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(table.text_layers), 1.0 + 0.4 * len(table.image_layers)))
    im = ax.imshow(scores, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(table.text_layers)), table.text_layers, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(table.image_layers)), table.image_layers, fontsize=8)
    ax.set_xlabel("text layer")
    ax.set_ylabel("image layer")
    bi, bt = table.best()
    li, lt = table.last()
    ax.add_patch(plt.Rectangle((table.text_layers.index(bt) - 0.5, table.image_layers.index(bi) - 0.5), 1, 1,
                               fill=False, edgecolor="red", linewidth=2, label="best"))
    ax.plot(table.text_layers.index(lt), table.image_layers.index(li), "o", color="magenta", markersize=9,
            markerfacecolor="none", markeredgewidth=2, label="last")
    ax.legend(loc="upper left", fontsize=7, framealpha=0.6)
    metric = table.metric + (" (calibrated)" if table.calibrated else "") + (f", k={table.k}" if table.k else "")
    ax.set_title(title or f"{metric}, n={table.n}", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open_new(out, "wb") as f:  # never through a link planted at the output path
        fig.savefig(f, dpi=120, format=Path(out).suffix.lstrip(".") or "png")
    plt.close(fig)
    return out


def metric_bars(labels: list[str], means: list[float], stds: list[float], out: Path, ylabel: str, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.6))
    ax.bar(range(len(labels)), means, yerr=stds, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open_new(out, "wb") as f:  # never through a link planted at the output path
        fig.savefig(f, dpi=120, format=Path(out).suffix.lstrip(".") or "png")
    plt.close(fig)
    return out


def metric_lines(series: dict[str, tuple[list[float], list[float], list[float]]], out: Path, xlabel: str,
                 ylabel: str, title: str) -> Path:
    """series: label -> (x, mean, std)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, (x, m, s) in series.items():
        m, s = np.asarray(m), np.asarray(s)
        ax.plot(x, m, marker="o", label=label)
        ax.fill_between(x, m - s, m + s, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open_new(out, "wb") as f:  # never through a link planted at the output path
        fig.savefig(f, dpi=120, format=Path(out).suffix.lstrip(".") or "png")
    plt.close(fig)
    return out
