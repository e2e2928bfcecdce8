"""How much of a difference is real? Splits x seeds, with paired bootstrap intervals.

With a few hundred test pairs a Recall@K moves several points between seeds and more between
splits. The study redraws the Tux Paint hash split with several salts, trains the grid
layers {last, auto} x loss {clip, clip+structure} x seeds on each, and reports:

- mean ± std over every (split, seed) cell per configuration;
- paired differences between configurations with a 95% bootstrap interval that resamples
  splits, seeds within a split, and test items within a split.

Selection uses the validation split only (layers on train pairs, checkpoints on validation loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.cache.paths import default_cache_dir
from featcache.pipeline.evaluate import RetrievalConfig, eval_retrieval
from featcache.pipeline.extract import ExtractConfig, extract
from featcache.pipeline.runs import read_json, write_json
from featcache.pipeline.train import AlignConfig, load_cached, sweep

CONFIGS = [("last", "clip"), ("last", "clip+structure"), ("auto", "clip"), ("auto", "clip+structure")]
COMPARISONS = [
    ("STRUCTURE vs without (auto layers)", ("auto", "clip+structure"), ("auto", "clip")),
    ("selected vs last layers (clip+structure)", ("auto", "clip+structure"), ("last", "clip+structure")),
    ("full recipe vs last-layer CLIP", ("auto", "clip+structure"), ("last", "clip")),
]


@dataclass
class StudyConfig:
    out: Path = Path("results/study")
    dataset: str = "tuxpaint"
    salts: tuple[str, ...] = ("", "1", "2")  # "" is the default split
    seeds: tuple[int, ...] = (0, 1, 2)
    ks: tuple[int, ...] = (1, 10)
    epochs: int = 300
    patience: int = 50
    batch_size: int = 128
    checkpoint_on: str = "val_clip"
    n_boot: int = 2000
    cache_dir: Path = field(default_factory=default_cache_dir)
    device: str = "auto"


def _spec(dataset: str, salt: str) -> str:
    return dataset if not salt else f"{dataset}:salt={salt}"


def collect(cfg: StudyConfig, progress_factory=None) -> dict:
    """Train and evaluate every (split salt, layers, loss, seed); returns first-correct ranks."""
    ranks: dict = {}
    for salt in cfg.salts:
        spec = _spec(cfg.dataset, salt)
        for model in ("dinov2", "minilm"):
            if progress_factory:
                with progress_factory() as p:
                    extract(ExtractConfig(model=model, dataset=spec, cache_dir=cfg.cache_dir, device=cfg.device), p)
            else:
                extract(ExtractConfig(model=model, dataset=spec, cache_dir=cfg.cache_dir, device=cfg.device))
        runs_dir = cfg.out / "runs" / (salt or "default")
        base = AlignConfig(dataset=spec, epochs=cfg.epochs, patience=cfg.patience, batch_size=cfg.batch_size,
                           checkpoint_on=cfg.checkpoint_on, cache_dir=cfg.cache_dir, runs_dir=runs_dir)
        load_cached(base)  # fail early with the extract command if something is missing
        runs = sweep(base, ["last", "auto"], ["clip", "clip+structure"], list(cfg.seeds))
        for run in runs:
            c = read_json(run / "config.json")
            res = eval_retrieval(RetrievalConfig(run=str(run), split="test", cache_dir=cfg.cache_dir,
                                                 runs_dir=runs_dir, ks=tuple(sorted(set(cfg.ks) | {10}))))
            key = (c["layers"], c["loss"])
            ranks.setdefault(key, {}).setdefault(salt, {})[c["seed"]] = {
                d: np.asarray(v) for d, v in res["first_correct_rank"].items()}
    return ranks


def _hits(r: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
    return (r["image_to_text"] < k).astype(float), (r["text_to_image"] < k).astype(float)


def summarise(ranks: dict, cfg: StudyConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    salts, seeds = list(cfg.salts), list(cfg.seeds)
    table = []
    for key in CONFIGS:
        row = {"layers": key[0], "loss": key[1]}
        for k in cfg.ks:
            for d, name in ((0, "i2t"), (1, "t2i")):
                vals = [100 * _hits(ranks[key][s][r], k)[d].mean() for s in salts for r in seeds]
                row[f"{name} R@{k}"] = (float(np.mean(vals)), float(np.std(vals, ddof=1)))
        table.append(row)

    comparisons = []
    for label, a, b in COMPARISONS:
        for k in cfg.ks:
            # per (salt, seed): per-item paired differences, both directions
            diffs = {s: {r: [ha - hb for ha, hb in zip(_hits(ranks[a][s][r], k), _hits(ranks[b][s][r], k))]
                         for r in seeds} for s in salts}
            point = float(np.mean([np.mean(np.concatenate(diffs[s][r])) for s in salts for r in seeds]))
            boot = np.empty(cfg.n_boot)
            for i in range(cfg.n_boot):
                vals = []
                for s in rng.choice(salts, size=len(salts)):
                    n_i2t, n_t2i = len(diffs[s][seeds[0]][0]), len(diffs[s][seeds[0]][1])
                    items = (rng.integers(0, n_i2t, n_i2t), rng.integers(0, n_t2i, n_t2i))
                    for r in rng.choice(seeds, size=len(seeds)):
                        d = diffs[s][r]
                        vals.append((d[0][items[0]].mean() + d[1][items[1]].mean()) / 2)
                boot[i] = np.mean(vals)
            lo, hi = np.percentile(boot, [2.5, 97.5])
            comparisons.append({"comparison": label, "a": list(a), "b": list(b), "metric": f"mean R@{k} (i2t, t2i)",
                                "difference_points": 100 * point, "ci95": [100 * float(lo), 100 * float(hi)]})
    return {"table": table, "comparisons": comparisons, "salts": salts, "seeds": seeds,
            "checkpoint_on": cfg.checkpoint_on, "epochs": cfg.epochs, "patience": cfg.patience,
            "batch_size": cfg.batch_size, "n_boot": cfg.n_boot,
            "test_items": {s or "default": int(len(ranks[CONFIGS[0]][s][seeds[0]]["image_to_text"])) for s in salts}}


def to_markdown(summary: dict) -> str:
    ks = sorted({int(c.split("@")[1]) for row in summary["table"] for c in row if "@" in c})
    cols = [f"{d} R@{k}" for k in ks for d in ("i2t", "t2i")]
    lines = ["| layers | loss | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for row in summary["table"]:
        lines.append(f"| {row['layers']} | {row['loss']} | "
                     + " | ".join(f"{row[c][0]:.1f} ± {row[c][1]:.1f}" for c in cols) + " |")
    lines += ["", "| comparison | metric | difference (points) | 95% bootstrap CI |", "|---|---|---|---|"]
    for c in summary["comparisons"]:
        lines.append(f"| {c['comparison']} | {c['metric']} | {c['difference_points']:+.1f} | "
                     f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] |")
    return "\n".join(lines) + "\n"


def run_study(cfg: StudyConfig, progress_factory=None) -> dict:
    ranks = collect(cfg, progress_factory)
    summary = summarise(ranks, cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_json(cfg.out / "study.json", summary)
    (cfg.out / "study.md").write_text(to_markdown(summary))
    return summary
