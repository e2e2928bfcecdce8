"""How much of a difference is real? Splits x seeds, with paired bootstrap intervals.

With a few hundred test pairs a Recall@K moves several points between seeds and more between
splits. The study redraws a hash split (Tux Paint's by default) with several salts, trains every variant
(by default the recipe grid layers {last, auto} x loss {clip, clip+structure}; the ablation sets
add the training-free methods and the R_S switches) x seeds on each, and reports:

- mean ± std over every (split, seed) cell per variant;
- paired differences between variants with a 95% bootstrap interval that resamples splits,
  seeds within a split, and test items within a split.

On data with explicit splits a salt redraws nothing, so the study uses the one split and the
interval resamples seeds and test items (study_splits.py). It extracts and trains the encoders
it is given, and every table, plot and JSON it writes names them and the data set as written.

Selection uses the validation split only (layers on train pairs, checkpoints on validation loss).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.cache.files import write_text
from featcache.cache.naming import safe_component
from featcache.cache.paths import default_cache_dir
from featcache.pipeline.app.study_splits import SplitPlan, parts_of, plan_splits, salted_spec, split_note
from featcache.pipeline.evaluate.retrieval import RetrievalConfig, eval_retrieval
from featcache.pipeline.extract.run import ExtractConfig, extract
from featcache.pipeline.features import Side, open_store
from featcache.pipeline.train.config import AlignConfig
from featcache.pipeline.train.runs import read_json, write_json
from featcache.pipeline.train.sweep import sweep


@dataclass(frozen=True)
class Variant:
    """One row of a study: a name and the AlignConfig fields it sets (layers, loss, method, R_S
    switches...). Everything it does not set comes from the study's base config."""

    name: str
    fields: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str | None = None, **fields) -> "Variant":
        return cls(name or f"{fields['layers']}/{fields['loss']}", tuple(sorted(fields.items())))

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.fields)


def recipe(layers: str, loss: str) -> Variant:
    return Variant.of(layers=layers, loss=loss)


CONFIGS = tuple(recipe(layers, loss) for layers, loss in
                [("last", "clip"), ("last", "clip+structure"), ("auto", "clip"), ("auto", "clip+structure")])
FULL = "auto/clip+structure"  # the paper's recipe: the reference row of the ablations
COMPARISONS = [
    ("STRUCTURE vs without (auto layers)", FULL, "auto/clip"),
    ("selected vs last layers (clip+structure)", FULL, "last/clip+structure"),
    ("full recipe vs last-layer CLIP", FULL, "last/clip"),
]
# The ablation rows: the methods of the paper's comparison (training-free ones at the selected
# layers), and one row per R_S switch of the released code's ablation configs (method.md).
METHODS = (recipe("last", "clip"), recipe("auto", "clip"), recipe("auto", "clip+structure"),
           *(Variant.of(name, layers="auto", loss="clip", method=name)
             for name in ("csa", "csa+structure", "asif", "procrustes")))
SWITCHES = (recipe("auto", "clip+structure"),
            *(Variant.of(f"R_S {name}", layers="auto", loss="clip+structure", **fields) for name, fields in [
                ("centering=none", {"centering": "none"}), ("centering=standard", {"centering": "standard"}),
                ("centre first", {"center_first": True}), ("similarity=rbf", {"similarity": "rbf"}),
                ("similarity=spearman", {"similarity": "spearman"}), ("fixed structure", {"fixed_structure": True})]))
VARIANT_SETS = {"recipe": CONFIGS, "methods": METHODS, "switches": SWITCHES}


def variant_set(names: list[str]) -> tuple[Variant, ...]:
    """The union of named variant sets, in order, each variant once."""
    unknown = [n for n in names if n not in VARIANT_SETS]
    if unknown or not names:
        raise FeatcacheError(f"unknown variant set {', '.join(unknown) or '(none)'}",
                             f"choose from: {', '.join(VARIANT_SETS)}")
    chosen = {v.name: v for n in names for v in VARIANT_SETS[n]}
    return tuple(chosen.values())


def comparisons_for(names: list[str]) -> list[tuple[str, str, str]]:
    """The recipe's three paired comparisons, and every other row against the full recipe."""
    pairs = [c for c in COMPARISONS if c[1] in names and c[2] in names]
    seen = {(a, b) for _, a, b in pairs}
    for name in names:
        if name != FULL and FULL in names and (FULL, name) not in seen:
            pairs.append((f"full recipe vs {name}", FULL, name))
    return pairs


@dataclass
class StudyConfig:
    out: Path = Path("results/study")
    dataset: str = "tuxpaint"
    # "" is the default split. None: ("", "1", "2") where the splits are drawn by hash, the data
    # set's own split where they are not (study_splits.plan_splits).
    salts: tuple[str, ...] | None = None
    # The parts of the data set a salt redraws, once planned; () where its splits are its own.
    # None: not planned yet (and in studies that predate the plan, where every part was salted).
    salted_parts: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    ks: tuple[int, ...] = (1, 10)
    epochs: int = 300
    patience: int = 50
    batch_size: int = 128
    checkpoint_on: str = "val_clip"
    n_boot: int = 2000
    cache_dir: Path = field(default_factory=default_cache_dir)
    device: str = "auto"
    pairs: tuple[int | None, ...] = ()  # a scaling study over training-pair counts (None: all)
    image_model: str = "dinov2"
    text_model: str = "minilm"
    image_pooling: str | None = None  # None: each encoder's default
    text_pooling: str | None = None
    image_size: int | None = None  # None: the image encoder's default; -1: its pretrained size
    configs: tuple[Variant, ...] = CONFIGS  # the rows compared
    # None keeps the trainer's ramp (1,000 steps, the paper's). A scaling study may set 0 (full
    # lambda from the first step): a ramp counted in steps is a different share of a short run
    # at each size, which confounds the gain with the ramp.
    lam_warmup_steps: int | None = None


def pooling_pair(value: str | None) -> tuple[str | None, str | None]:
    """``--pooling`` of a command that reads both encoders: one pooling for both sides (``cls``,
    ``mean``) or ``IMAGE,TEXT`` (``cls+mean,mean``), as ``--layers`` names a pair; an empty side
    keeps that encoder's default (``cls+mean,``). Each encoder checks its own when it loads."""
    if value is None:
        return None, None
    parts = [v.strip() for v in value.split(",")]
    if len(parts) > 2 or not any(parts):
        raise FeatcacheError(f"bad --pooling {value!r}",
                             "write one pooling for both encoders (mean) or IMAGE,TEXT (cls+mean,mean)")
    image, text = parts if len(parts) == 2 else parts * 2
    return image or None, text or None


def plan(cfg: StudyConfig, say=None) -> StudyConfig:
    """``cfg`` with its salts and salted parts settled (a no-op once they are); ``say(line)``
    hears where the splits are not all redrawn."""
    if cfg.salted_parts is not None:
        return cfg
    chosen = plan_splits(cfg.dataset, cfg.salts)
    note = split_note(chosen, cfg.dataset)
    if note and say is not None:
        say(note)
    return replace(cfg, salts=chosen.salts, salted_parts=chosen.salted_parts)


def sides(cfg: StudyConfig) -> tuple[Side, Side]:
    """The image and text features a study reads: its encoders, poolings and input size."""
    return Side(cfg.image_model, cfg.image_pooling, cfg.image_size), Side(cfg.text_model, cfg.text_pooling)


def _cached(cfg: StudyConfig, spec: str, side: Side) -> bool:
    """Whether the splits a study reads (train, test, and val where the data set has one) are
    cached, complete, for ``side``. Read as stage two reads, by the names the stores recorded:
    neither the encoder's weights nor the data set's files are needed to find out."""
    try:
        train = open_store(cfg.cache_dir, spec, "train", side)
        splits = ["train", "test"] + (["val"] if "val" in train.split_names else [])
        for split in splits:
            store = open_store(cfg.cache_dir, spec, split, side)
            parts = getattr(store, "parts", [store])  # a+b: each part's own store
            for p in parts:  # every layer `--layers all` gives, not only those an earlier extract asked for
                wanted = [n for n in p.encoder_identity.get("layers") or p.layers if n != "final"]
                if any(layer not in p.layers or not p.is_complete(layer) for layer in wanted):
                    return False
    except FeatcacheError:
        return False
    return True


def _ensure_cached(cfg: StudyConfig, spec: str, progress_factory=None) -> None:
    """Extract what is not cached yet. A machine that holds a copied cache but not the weights
    (a GPU node, say) runs the study without loading an encoder."""
    for side in sides(cfg):
        if _cached(cfg, spec, side):
            continue
        with progress_factory() if progress_factory else nullcontext() as p:
            extract(ExtractConfig(model=side.model, pooling=side.pooling, image_size=side.image_size, dataset=spec,
                                  cache_dir=cfg.cache_dir, device=cfg.device), p)


def collect(cfg: StudyConfig, progress_factory=None) -> dict:
    """Train and evaluate every (pairs, variant, split salt, seed); returns first-correct ranks
    keyed ``ranks[(pairs, variant name)][salt][seed]``. A deterministic training-free method is
    fitted once per split and stands for every seed."""
    cfg = plan(cfg)
    ranks: dict = {}
    for salt in cfg.salts:
        spec = salted_spec(cfg.dataset, salt, cfg.salted_parts)
        _ensure_cached(cfg, spec, progress_factory)
        runs_dir = cfg.out / "runs" / safe_component(salt or "default")  # a salt like '../..' stays inside
        base = AlignConfig(dataset=spec, image_model=cfg.image_model, text_model=cfg.text_model,
                           image_pooling=cfg.image_pooling, text_pooling=cfg.text_pooling,
                           image_size=cfg.image_size, epochs=cfg.epochs,
                           patience=cfg.patience, batch_size=cfg.batch_size, checkpoint_on=cfg.checkpoint_on,
                           cache_dir=cfg.cache_dir, runs_dir=runs_dir, device=cfg.device)
        if cfg.lam_warmup_steps is not None:
            base = replace(base, lam_warmup_steps=cfg.lam_warmup_steps)
        for variant in cfg.configs:
            fields = variant.settings
            layers, loss = fields.pop("layers"), fields.pop("loss")
            # shard 0/1: every cell here, even inside a Slurm array or torchrun, whose variables
            # sweep would otherwise read and train only a share of the seeds
            runs = sweep(replace(base, **fields), [layers], [loss], list(cfg.seeds), list(cfg.pairs) or None,
                         shard="0/1")
            per_seed: dict = {}
            for run in runs:
                c = read_json(run / "config.json")
                res = eval_retrieval(RetrievalConfig(run=str(run), split="test", cache_dir=cfg.cache_dir,
                                                     runs_dir=runs_dir, ks=tuple(sorted(set(cfg.ks) | {10}))))
                per_seed.setdefault(c["pairs"], {})[c["seed"]] = {
                    d: np.asarray(v) for d, v in res["first_correct_rank"].items()}
            for n, by_seed in per_seed.items():
                if len(by_seed) == 1 and n is None and fields.get("method", "heads") not in ("heads", "csa+structure"):
                    by_seed = dict.fromkeys(cfg.seeds, next(iter(by_seed.values())))  # deterministic: one fit
                missing = [r for r in cfg.seeds if r not in by_seed]
                if missing:
                    raise FeatcacheError(f"the study has no run of {variant.name} for seed {missing[0]}",
                                         "report this: every seed of every variant should have trained")
                ranks.setdefault((n, variant.name), {})[salt] = {r: by_seed[r] for r in cfg.seeds}
    return ranks


def describe(cfg: StudyConfig) -> dict:
    """What a study compared, as the user wrote it: the encoders (pooling and input size, None
    for the encoder's default), the data set, and how its splits were drawn."""
    salted = parts_of(cfg.dataset) if cfg.salted_parts is None else list(cfg.salted_parts)
    return {"dataset": cfg.dataset, "image_model": cfg.image_model, "text_model": cfg.text_model,
            "image_pooling": cfg.image_pooling, "text_pooling": cfg.text_pooling, "image_size": cfg.image_size,
            "splits": {"rule": "hash" if salted else "explicit", "salted_parts": salted,
                       "note": split_note(SplitPlan(tuple(cfg.salts or ()), tuple(salted)), cfg.dataset)}}


def header(summary: dict) -> str:
    """The markdown's first lines: the encoders, the data set and the splits a table is about."""
    d = summary["study"]

    def encoder(side: str) -> str:
        details = [f"{word} {d[key]}" for word, key in (("pooling", f"{side}_pooling"), ("size", f"{side}_size"))
                   if d.get(key) is not None]
        return f"`{d[side + '_model']}`" + (f" ({', '.join(details)})" if details else "")

    splits = d["splits"]
    if splits["rule"] == "explicit":
        how = "the data set's own split (explicit); intervals resample seeds and test items"
    else:
        how = (f"hash splits redrawn with salts {', '.join(repr(s) for s in summary['salts'])}"
               + (f" ({splits['note']})" if splits.get("note") else "")
               + "; intervals resample splits, seeds and test items")
    return (f"Image encoder {encoder('image')}, text encoder {encoder('text')}, "
            f"data set `{d['dataset']}`.\nSplits: {how}.\n\n")


def _hits(r: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
    return (r["image_to_text"] < k).astype(float), (r["text_to_image"] < k).astype(float)


def _bootstrap(diffs: dict, salts: list, seeds: list, n_boot: int, rng) -> tuple[float, float, float]:
    """Point and 95% interval of the mean of per-item values ``diffs[salt][seed] = (i2t, t2i)``,
    resampling splits, seeds within a split, and test items within a split."""
    point = float(np.mean([np.mean(np.concatenate(diffs[s][r])) for s in salts for r in seeds]))
    boot = np.empty(n_boot)
    for i in range(n_boot):
        vals = []
        for s in rng.choice(salts, size=len(salts)):
            n_i2t, n_t2i = len(diffs[s][seeds[0]][0]), len(diffs[s][seeds[0]][1])
            items = (rng.integers(0, n_i2t, n_i2t), rng.integers(0, n_t2i, n_t2i))
            for r in rng.choice(seeds, size=len(seeds)):
                d = diffs[s][r]
                vals.append((d[0][items[0]].mean() + d[1][items[1]].mean()) / 2)
        boot[i] = np.mean(vals)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return point, float(lo), float(hi)


def summarise(ranks: dict, cfg: StudyConfig, seed: int = 0) -> dict:
    """Mean ± std per variant and paired differences with bootstrap intervals; keys of ``ranks``
    are variant names."""
    rng = np.random.default_rng(seed)
    salts, seeds = list(cfg.salts), list(cfg.seeds)
    names = [v.name for v in cfg.configs if v.name in ranks]
    table = []
    for variant in [v for v in cfg.configs if v.name in ranks]:
        row = {"variant": variant.name, **{k: v for k, v in variant.fields}}
        for k in cfg.ks:
            for d, name in ((0, "i2t"), (1, "t2i")):
                vals = [100 * _hits(ranks[variant.name][s][r], k)[d].mean() for s in salts for r in seeds]
                # one (split, seed) cell, as with --seeds 0 on explicit splits, has no spread: None, not NaN
                row[f"{name} R@{k}"] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else None)
        table.append(row)

    comparisons = []
    for label, a, b in comparisons_for(names):
        for k in cfg.ks:
            # per (salt, seed): per-item paired differences, both directions
            diffs = {s: {r: [ha - hb for ha, hb in zip(_hits(ranks[a][s][r], k), _hits(ranks[b][s][r], k))]
                         for r in seeds} for s in salts}
            point, lo, hi = _bootstrap(diffs, salts, seeds, cfg.n_boot, rng)
            base = float(np.mean([np.mean(np.concatenate(_hits(ranks[b][s][r], k))) for s in salts for r in seeds]))
            comparisons.append({"comparison": label, "a": a, "b": b, "metric": f"mean R@{k} (i2t, t2i)",
                                "difference_points": 100 * point, "ci95": [100 * lo, 100 * hi],
                                "relative_gain_percent": 100 * point / base if base else float("nan")})
    first = next(iter(ranks))
    return {"study": describe(cfg), "table": table, "comparisons": comparisons, "salts": salts, "seeds": seeds,
            "checkpoint_on": cfg.checkpoint_on, "epochs": cfg.epochs, "patience": cfg.patience,
            "batch_size": cfg.batch_size, "n_boot": cfg.n_boot, "lam_warmup_steps": cfg.lam_warmup_steps,
            "test_items": {s or "default": int(len(ranks[first][s][seeds[0]]["image_to_text"])) for s in salts}}


def summarise_scaling(ranks: dict, cfg: StudyConfig, seed: int = 0) -> dict:
    """One summary per training-pair count, each with a 95% interval of every configuration's
    mean R@K (for the bands of the scaling plot)."""
    rng = np.random.default_rng(seed)
    salts, seeds = list(cfg.salts), list(cfg.seeds)
    sizes = []
    for n in sorted({key[0] for key in ranks}, key=lambda v: float("inf") if v is None else v):
        sub = {key[1]: v for key, v in ranks.items() if key[0] == n}
        summary = summarise(sub, cfg, seed)
        bands = {}
        for key, per in sub.items():
            for k in cfg.ks:
                hits = {s: {r: list(_hits(per[s][r], k)) for r in seeds} for s in salts}
                point, lo, hi = _bootstrap(hits, salts, seeds, cfg.n_boot, rng)
                bands[f"{key} R@{k}"] = [100 * point, 100 * lo, 100 * hi]
        sizes.append({"pairs": "all" if n is None else n, **summary, "bands": bands})
    return {"sizes": sizes, "dataset": cfg.dataset, "study": describe(cfg), "salts": salts}


def to_markdown(summary: dict, with_header: bool = True) -> str:
    ks = sorted({int(c.split("@")[1]) for row in summary["table"] for c in row if "@" in c})
    cols = [f"{d} R@{k}" for k in ks for d in ("i2t", "t2i")]
    lines = ([header(summary)] if with_header and "study" in summary else []) + [
        "| variant | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row in summary["table"]:
        lines.append(f"| {row['variant']} | "
                     + " | ".join(f"{row[c][0]:.1f}" + ("" if row[c][1] is None else f" ± {row[c][1]:.1f}")
                                  for c in cols) + " |")
    lines += ["", "| comparison | metric | difference (points) | 95% bootstrap CI |", "|---|---|---|---|"]
    for c in summary["comparisons"]:
        lines.append(f"| {c['comparison']} | {c['metric']} | {c['difference_points']:+.1f} | "
                     f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] |")
    return "\n".join(lines) + "\n"


def scaling_markdown(scaling: dict) -> str:
    parts = [header(scaling)] if "study" in scaling else []
    for size in scaling["sizes"]:
        parts.append(f"### {size['pairs']} training pairs\n\n" + to_markdown(size, with_header=False))
        gains = [c for c in size["comparisons"] if c["comparison"].startswith("STRUCTURE")]
        parts.append("".join(f"Relative gain of STRUCTURE ({c['metric']}): {c['relative_gain_percent']:+.0f}%\n"
                             for c in gains))
    return "\n".join(parts)


def scaling_plot(scaling: dict, path: Path, k: int = 1) -> Path:
    from featcache.pipeline.app.plots import metric_lines

    series: dict[str, tuple[list, list, list]] = {}
    counts = [s["pairs"] for s in scaling["sizes"] if s["pairs"] != "all"]
    x_all = 2 * max(counts) if counts else 1  # "all" has no single count across splits: drawn rightmost
    for size in scaling["sizes"]:
        x = x_all if size["pairs"] == "all" else size["pairs"]
        for label, (point, lo, hi) in size["bands"].items():
            if label.endswith(f"R@{k}"):
                xs, ms, ss = series.setdefault(label.removesuffix(f" R@{k}"), ([], [], []))
                xs.append(x)
                ms.append(point)
                ss.append((hi - lo) / 2)
    return metric_lines(series, path, "training pairs (log; rightmost: all)", f"mean R@{k} (%), 95% interval",
                        f"{scaling['dataset']}: R@{k} against training pairs" + _encoders_line(scaling))


def _encoders_line(scaling: dict) -> str:
    d = scaling.get("study")
    return f"\nimage {d['image_model']}, text {d['text_model']}" if d else ""


RANKS_FILE = "ranks.json"


SETTINGS = ("dataset", "image_model", "text_model", "image_pooling", "text_pooling", "image_size", "salted_parts",
            "epochs", "patience", "batch_size", "checkpoint_on",
            "lam_warmup_steps", "pairs", "ks")  # what studies must share to be merged


def _settings(cfg: StudyConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(cfg, k)) for k in SETTINGS)}


def save_ranks(ranks: dict, cfg: StudyConfig, path: Path) -> None:
    """A study's raw result, the first-correct rank of every test item per (pairs, variant,
    salt, seed), as plain JSON with the settings that made it: studies run apart (one split
    salt per machine) are then summarised together by :func:`merge_ranks`."""
    rows = [{"pairs": n, "variant": name, "salt": salt, "seed": seed, **{d: v.tolist() for d, v in dirs.items()}}
            for (n, name), per_salt in ranks.items() for salt, per_seed in per_salt.items()
            for seed, dirs in per_seed.items()]
    write_json(path, {"settings": _settings(cfg), "rows": rows})


def load_ranks(path: Path) -> tuple[dict, dict]:
    """(ranks, settings) of one study's ranks.json."""
    ranks: dict = {}
    try:
        data = read_json(path)
        for r in data["rows"]:
            ranks.setdefault((r["pairs"], r["variant"]), {}).setdefault(r["salt"], {})[r["seed"]] = {
                d: np.asarray(r[d]) for d in ("image_to_text", "text_to_image")}
        settings = data["settings"]
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise FeatcacheError(f"cannot read study ranks from {path}: {err}",
                             "point --merge at folders written by featcache study") from None
    return ranks, settings


def merge_ranks(dirs: list[Path], cfg: StudyConfig) -> tuple[dict, StudyConfig]:
    """The union of several studies' ranks, and the config they were run with (their shared
    settings, the salts they cover). The studies must agree on every setting that changes a
    result; each (pairs, variant, salt, seed) may come from one study only, and every variant
    of ``cfg`` must be there for every salt and seed."""
    if any(Path(d).resolve() == Path(cfg.out).resolve() for d in dirs):
        raise FeatcacheError(f"--out {cfg.out} is one of the merged studies", "write the merged summary elsewhere")
    ranks: dict = {}
    salts: list[str] = []
    shared: dict | None = None
    for d in dirs:
        part, settings = load_ranks(Path(d) / RANKS_FILE)
        if shared is None:
            shared, first = settings, d
        elif settings != shared:
            diff = sorted(k for k in set(settings) | set(shared) if settings.get(k) != shared.get(k))
            raise FeatcacheError(f"the studies in {first} and {d} differ in {', '.join(diff)}",
                                 "merge only studies run with the same settings (they differ only in --salts)")
        for key, per_salt in part.items():
            for salt, per_seed in per_salt.items():
                mine = ranks.setdefault(key, {}).setdefault(salt, {})
                twice = set(mine) & set(per_seed)
                if twice:
                    raise FeatcacheError(f"{key[1]} salt {salt!r} seed {min(twice)} is in more than one of the "
                                         "merged studies", "merge studies of different salts or seeds")
                mine.update(per_seed)
                salts += [] if salt in salts else [salt]
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (shared or {}).items()}
    merged = replace(cfg, salts=tuple(salts), **values)
    for v in merged.configs:
        for n in (merged.pairs or (None,)):
            for salt in salts:
                missing = [r for r in merged.seeds if r not in ranks.get((n, v.name), {}).get(salt, {})]
                if missing:
                    raise FeatcacheError(f"the merged studies lack {v.name} (pairs {n or 'all'}) for salt "
                                         f"{salt!r}, seed {missing[0]}", "merge studies run with the same "
                                         "--variants, --pairs and --seeds")
    return ranks, merged


def run_study(cfg: StudyConfig, progress_factory=None, merge: list[Path] | None = None, say=None) -> dict:
    """Train and evaluate (or, with ``merge``, read the ranks of studies run apart), then
    summarise into ``cfg.out``; ``say(line)`` hears where a salt redraws nothing."""
    if merge:
        ranks, cfg = merge_ranks(merge, cfg)
    else:
        cfg = plan(cfg, say)
        ranks = collect(cfg, progress_factory)
    cfg.out.mkdir(parents=True, exist_ok=True)
    save_ranks(ranks, cfg, cfg.out / RANKS_FILE)
    if cfg.pairs:
        summary = summarise_scaling(ranks, cfg)
        write_json(cfg.out / "scaling.json", summary)
        write_text(cfg.out / "scaling.md", scaling_markdown(summary))
        scaling_plot(summary, cfg.out / "scaling.png")
        return summary
    summary = summarise({key[1]: v for key, v in ranks.items()}, cfg)
    write_json(cfg.out / "study.json", summary)
    write_text(cfg.out / "study.md", to_markdown(summary))
    return summary
