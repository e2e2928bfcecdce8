"""Stage two: train alignment heads on cached features with CLIP + STRUCTURE losses.

The trainer reads cached arrays only (never an encoder), uses exactly the configured
learning rate, and restores the weights of the best validation epoch.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from featcache.cache.errors import FeatcacheError
from featcache.cache.paths import default_cache_dir, default_runs_dir
from featcache.cache.lookup import check_same_encoder
from featcache.pipeline.device import pick_device
from featcache.pipeline.cached import (PairedFeatures, Side, dataset_splits, extract_hint, open_pairs, require_finite,
                                       stored_dtype, subsample)
from featcache.pipeline.alignment import K_RULES, METRICS
from featcache.pipeline.heads import AlignmentModel, FixedModel
from featcache.pipeline.layers import LayerRows, ScoreTable, score_table
from featcache.pipeline.layerspec import resolve_layers
from featcache.pipeline.losses import (CENTERINGS, COMPILE, SIMILARITIES, clip_loss, compile_wanted, lambda_at,
                                      core_compiled, maybe_compile, structure_regularizer)
from featcache.pipeline.runs import RunWriter
from featcache.pipeline.trackers import TRACKERS
from featcache.pipeline.workers import grid_worker
from featcache.pipeline.training_free import METHODS, FreeConfig
from featcache.pipeline.training_free import fit as fit_free

LOSSES = ("clip", "clip+structure")


@dataclass
class SelectConfig:
    """Layer selection defaults of the method page."""

    metric: str = "mutual_knn"  # any of featcache.pipeline.alignment.METRICS
    n: int = 5000  # random training pairs scored (fewer if fewer exist)
    k: int | None = None  # None: by k_rule
    k_rule: str = "rice"  # rice | sqrt | sturges
    calibrate: int = 0  # shuffled pairings subtracted (0: raw score)
    seed: int = 0  # fixed, so every training seed selects the same layers
    queries: int | None = None  # mutual/LCS kNN: exact neighbours of this many rows only (None: all rows)

    def validate(self) -> None:
        if self.metric not in METRICS:
            raise FeatcacheError(f"unknown layer metric {self.metric!r}", f"choose one of: {', '.join(METRICS)}")
        if self.k_rule not in K_RULES[1:]:
            raise FeatcacheError(f"unknown k rule {self.k_rule!r}", "choose rice, sqrt or sturges, or give --k")


@dataclass
class AlignConfig:
    image_model: str = "dinov2"
    text_model: str = "minilm"
    image_pooling: str | None = None
    text_pooling: str | None = None
    image_size: int | None = None
    dataset: str = "tuxpaint"
    train_split: str = "train"
    val_split: str = "val"  # a data set without one holds out 10% of train by image-id hash
    layers: str = "auto"  # auto | last | IMG,TXT (layer names or block indices)
    loss: str = "clip+structure"
    levels: int = 1
    weighting: str = "none"
    divergence: str = "reference"
    centering: str = "mean"  # R_S switches of the released code: none | mean | standard
    center_first: bool = False
    similarity: str = "cosine"  # cosine | rbf | spearman
    gamma: float = 1.0  # the rbf similarity's exp(-gamma d^2)
    margin: float = 0.0
    fixed_structure: bool = False  # R_S on one fixed random training batch (a reviewer ablation)
    lam: float = 10.0
    lam_warmup_steps: int = 1000
    temperature: float = 0.05
    learn_temperature: bool = False
    method: str = "heads"  # heads (trained) | procrustes | csa | csa+structure | asif (training-free)
    free: FreeConfig = field(default_factory=FreeConfig)  # options of the training-free methods
    head: str = "linear"
    d_out: int = 512
    pairs: int | None = None  # subsample training pairs (data-scaling studies)
    seed: int = 0
    epochs: int = 1000
    patience: int = 200
    batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    checkpoint_on: str = "val_clip"  # or "val_total"
    log: str = "none"  # experiment tracker: none | tensorboard | wandb (metrics.jsonl is always written)
    # torch.compile: auto compiles R_S's elementwise core from batch 2,048 up (seconds, once per
    # process; eager where it cannot); on compiles the whole R_S (45 s on a CPU, 86 s on an H200,
    # for little more); off is eager throughout (docs/benchmarks.md).
    compile: str = "auto"
    device: str = "cpu"
    select: SelectConfig = field(default_factory=SelectConfig)
    cache_dir: Path = field(default_factory=default_cache_dir)
    runs_dir: Path = field(default_factory=default_runs_dir)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cache_dir"], d["runs_dir"] = str(self.cache_dir), str(self.runs_dir)
        d["betas"] = list(self.betas)
        return d

    def validate(self) -> None:
        if self.log not in TRACKERS:
            raise FeatcacheError(f"unknown tracker {self.log!r}", f"choose one of: {', '.join(TRACKERS)}")
        if self.method != "heads" and self.method not in METHODS:
            raise FeatcacheError(f"unknown method {self.method!r}", f"choose heads or one of: {', '.join(METHODS)}")
        if self.loss not in LOSSES:
            raise FeatcacheError(f"unknown loss {self.loss!r}", f"choose one of: {', '.join(LOSSES)}")
        self.select.validate()
        if self.checkpoint_on not in ("val_clip", "val_total"):
            raise FeatcacheError(f"unknown checkpoint rule {self.checkpoint_on!r}", "use val_clip or val_total")
        for name in ("levels", "epochs", "batch_size", "d_out"):
            if getattr(self, name) < 1:
                raise FeatcacheError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.pairs is not None and self.pairs < 2:
            raise FeatcacheError(f"--pairs must be at least 2, got {self.pairs}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise FeatcacheError(f"--lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise FeatcacheError(f"--temperature must be a finite number > 0, got {self.temperature}")
        if self.lam < 0 or not math.isfinite(self.lam):
            raise FeatcacheError(f"--lam must be a finite number >= 0, got {self.lam}")
        if self.weighting not in ("none", "inverse") or self.divergence not in ("reference", "js"):
            raise FeatcacheError("weighting must be none|inverse and divergence reference|js")
        if self.compile not in COMPILE:
            raise FeatcacheError(f"unknown compile mode {self.compile!r}", f"choose one of: {', '.join(COMPILE)}")
        if self.centering not in CENTERINGS:
            raise FeatcacheError(f"unknown centering {self.centering!r}", f"choose one of: {', '.join(CENTERINGS)}")
        if self.similarity not in SIMILARITIES:
            raise FeatcacheError(f"unknown similarity {self.similarity!r}", f"choose one of: {', '.join(SIMILARITIES)}")
        for name in ("gamma", "margin"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise FeatcacheError(f"--{name} must be a finite number >= 0, got {value}")


@dataclass
class CachedData:
    """Everything a run reads from the cache, loaded once and shared by the cells of a sweep."""

    train: PairedFeatures
    val: PairedFeatures
    validation: dict = field(default_factory=dict)  # where the validation pairs came from
    _memo: dict = field(default_factory=dict)

    def memo(self, key, compute):
        """``compute()`` once per key: arrays and score tables shared by the cells of a sweep."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def features(self, split: str, modality: str, layer: str) -> np.ndarray:
        """One split's rows of one layer, in the dtype the store holds (float16 by default):
        half the memory of float32, and exact, since the heads cast each batch (heads.py)."""
        pf = self.train if split == "train" else self.val
        read, store = (pf.image, pf.images) if modality == "image" else (pf.text, pf.texts)
        return self.memo((split, modality, layer), lambda: read(layer, stored_dtype(store)))


VAL_FRACTION = 0.1


def load_cached(cfg: AlignConfig) -> CachedData:
    """The training and validation pairs, from stores made by one encoder identity per side.

    A data set that has no ``val`` split gets one carved from ``train`` (10% of images, by the
    hash rule of the built-in splits); the run records that it did.
    """
    image = Side(cfg.image_model, cfg.image_pooling, cfg.image_size)
    text = Side(cfg.text_model, cfg.text_pooling)
    train = open_pairs(cfg.cache_dir, cfg.dataset, cfg.train_split, image, text)
    splits = dataset_splits(train.images)
    if cfg.val_split == "val" and splits and "val" not in splits:
        train, val = train.carve(VAL_FRACTION)
        validation = {"split": cfg.train_split, "carved": True, "fraction": VAL_FRACTION, "salt": "val",
                      "rule": "images whose id hashes below the fraction", "pairs": len(val)}
    else:
        val = open_pairs(cfg.cache_dir, cfg.dataset, cfg.val_split, image, text)
        for side in ("images", "texts"):
            check_same_encoder(getattr(train, side).encoder_identity, getattr(val, side),
                               f"{cfg.dataset}/{cfg.val_split} {side[:-1]} features")
        validation = {"split": cfg.val_split, "carved": False, "pairs": len(val)}
    return CachedData(train, val, validation)


def select_layers(data: CachedData, select: SelectConfig) -> ScoreTable:
    """Score every complete (image layer, text layer) pair on up to ``select.n`` training pairs."""
    select.validate()

    def compute() -> ScoreTable:
        train = data.train
        rows = subsample(len(train), select.n, select.seed)
        # only the scored rows of each layer, one layer at a time (see layers.LayerRows)
        img = LayerRows(train.images, [n for n in train.images.layers if train.images.is_complete(n)],
                        train.image_rows[rows])
        txt = LayerRows(train.texts, [n for n in train.texts.layers if train.texts.is_complete(n)],
                        train.text_rows[rows])
        for feats, store in ((img, train.images), (txt, train.texts)):
            if not feats:
                raise FeatcacheError(f"no layer of {store.path} is completely cached", extract_hint(store))
        table = score_table(img, txt, select.metric, select.k, select.calibrate, select.seed, select.k_rule,
                            select.queries)
        if np.isnan(np.asarray(table.scores, dtype=float)).all():
            raise FeatcacheError(f"every layer pair scored NaN under {select.metric} on {len(rows)} pairs "
                                 "(layers constant over rows, or too few pairs)", "extract more layers or data")
        return table

    return data.memo(("table", repr(select)), compute)


def _model_layer(spec: str, store, complete: list[str]) -> str:
    """One layer of the model by name or block index, which must be cached and complete.

    Indices and ``last`` count the model's blocks (recorded in the store), not the blocks that
    happen to be cached, so a name never silently changes meaning.
    """
    layers = store.encoder_identity.get("layers") or store.layers
    n_blocks = sum(1 for n in layers if n.startswith("block."))
    names = resolve_layers(spec, n_blocks, "final" in layers)
    if len(names) != 1:
        raise FeatcacheError(f"--layers names one layer per side, got {spec!r}", "use auto, last, or IMG,TXT")
    name = names[0]
    if name not in complete:
        raise FeatcacheError(f"layer {name} ({spec!r}) of {store.encoder_identity['name']} is not cached "
                             f"completely in {store.path}; cached: {', '.join(complete) or 'none'}",
                             extract_hint(store, name))
    return name


def resolve_pair(spec: str, data: CachedData, select: SelectConfig) -> tuple[str, str, ScoreTable | None]:
    """The (image layer, text layer) to train on, and the score table when one was computed."""
    if spec == "auto":
        table = select_layers(data, select)
        return (*table.best(), table)
    parts = ["last", "last"] if spec == "last" else [p.strip() for p in spec.split(",")]
    if len(parts) != 2 or not all(parts):
        raise FeatcacheError(f"bad --layers {spec!r}", "use auto, last, or IMG,TXT such as block.09,block.05 or 9,-1")
    image_store, text_store = data.train.images, data.train.texts
    image = _model_layer(parts[0], image_store, [n for n in image_store.layers if image_store.is_complete(n)])
    text = _model_layer(parts[1], text_store, [n for n in text_store.layers if text_store.is_complete(n)])
    return image, text, None


def _structure(model, cfg: AlignConfig, xi, xt, zi=None, zt=None) -> torch.Tensor:
    """(R_S(img) + R_S(txt)) / 2 on inputs ``xi, xt`` (head outputs computed when not given)."""
    if zi is None:
        zi, zt = model(xi, xt)
    options = structure_options(cfg) | {"compiled": core_compiled(cfg.compile, len(zi))}
    tau = model.temperature.detach()  # the contrastive loss's tau, learnable or not (method.md); no host read
    rs = structure_function(compile_wanted(cfg.compile))
    return (rs(xi, zi, tau, **options) + rs(xt, zt, tau, **options)) / 2


_STRUCTURE: dict[bool, object] = {}


def structure_function(compiled: bool):
    """structure_regularizer, compiled (once per process) or eager."""
    if compiled not in _STRUCTURE:
        _STRUCTURE[compiled] = maybe_compile(structure_regularizer, compiled)
    return _STRUCTURE[compiled]


def structure_options(cfg: AlignConfig) -> dict:
    """The R_S switches of a config, as structure_regularizer takes them."""
    return dict(levels=cfg.levels, weighting=cfg.weighting, divergence=cfg.divergence, centering=cfg.centering,
                center_first=cfg.center_first, similarity=cfg.similarity, gamma=cfg.gamma, margin=cfg.margin)


def _losses(model, cfg: AlignConfig, xi, xt, lam: float, fixed: tuple | None = None):
    """Total, contrastive and regularizer loss of a batch; ``fixed``: the batch R_S is taken on
    instead (the fixed-structure ablation)."""
    zi, zt = model(xi, xt)
    clip = clip_loss(zi, zt, model.temperature)
    if cfg.loss == "clip":
        return clip, clip, torch.zeros(())
    reg = _structure(model, cfg, *fixed) if fixed is not None else _structure(model, cfg, xi, xt, zi, zt)
    return clip + lam * reg, clip, reg


@torch.no_grad()
def _evaluate(model, cfg, xi, xt) -> dict:
    """Validation losses over batches of the training batch size, weighted by batch length."""
    totals = torch.zeros(3, dtype=torch.float64, device=xi.device)  # summed on the device, read once
    scored = 0
    for s in range(0, len(xi), cfg.batch_size):
        bi, bt = xi[s:s + cfg.batch_size], xt[s:s + cfg.batch_size]
        if len(bi) < 2:  # a last batch of one row has no contrastive loss
            continue
        total, clip, reg = _losses(model, cfg, bi, bt, cfg.lam)
        totals += torch.stack([total, clip, reg.to(total.device)]).double() * len(bi)
        scored += len(bi)
    return dict(zip(("total", "clip", "structure"), (totals / max(scored, 1)).tolist()))


@dataclass
class RunSetup:
    """Everything one run trains from: the chosen layers, the tensors, the model and optimiser."""

    cfg: AlignConfig
    config: dict  # what config.json records
    table: ScoreTable | None
    tensors: tuple  # train image, train text, val image, val text (on the device)
    model: AlignmentModel | FixedModel | None  # None until a training-free method is fitted
    opt: torch.optim.Optimizer | None
    sched: torch.optim.lr_scheduler.LRScheduler | None
    rows: int
    batch: int
    steps_per_epoch: int


def _checked_tensors(data: CachedData, layers: tuple[str, str], rows: np.ndarray, device):
    """The four feature matrices of a run (in the store's dtype), refused if any value is not
    finite. All training rows are used as they are read, not copied."""
    out = []
    for split, modality, layer, pick in (("train", "image", layers[0], rows), ("train", "text", layers[1], rows),
                                         ("val", "image", layers[0], None), ("val", "text", layers[1], None)):
        x = data.features(split, modality, layer)
        store = getattr(data.train if split == "train" else data.val, f"{modality}s")
        if pick is not None and not np.array_equal(pick, np.arange(len(x))):
            x = x[pick]
        x = require_finite(x, store, layer)
        out.append(torch.from_numpy(np.ascontiguousarray(x)).to(device))
    return tuple(out)


@dataclass
class RunPlan:
    """What a run trains on, decided before any tensor is built: layers, training rows, batching."""

    cfg: AlignConfig
    image_layer: str
    text_layer: str
    table: ScoreTable | None
    rows: np.ndarray  # indices into the training pairs
    batch: int
    steps_per_epoch: int

    def config(self, data: CachedData, val_pairs: int) -> dict:
        """What config.json records."""
        config = self.cfg.to_dict() | {
            "image_layer": self.image_layer, "text_layer": self.text_layer, "train_pairs": int(len(self.rows)),
            "val_pairs": int(val_pairs), "validation": data.validation,
            "cache": {"train": data.train.identities(), "val": data.val.identities()},
        }
        if self.table is not None:  # auto: which layers it chose among (complete ones only)
            config["layers_considered"] = {"image": self.table.image_layers, "text": self.table.text_layers}
        return config


def plan_run(cfg: AlignConfig, data: CachedData) -> RunPlan:
    """Choose layers and pairs (the layer table is computed once per sweep)."""
    rows = subsample(len(data.train), cfg.pairs, cfg.seed)
    if len(rows) < 2 or len(data.val) < 2:
        raise FeatcacheError(f"{cfg.dataset}: {len(rows)} training and {len(data.val)} validation pairs; "
                             "training needs at least 2 of each", "use a larger data set or a larger --pairs")
    image_layer, text_layer, table = resolve_pair(cfg.layers, data, cfg.select)
    batch = min(cfg.batch_size, len(rows))
    return RunPlan(cfg, image_layer, text_layer, table, rows, batch, max(1, len(rows) // batch))


def new_model(cfg: AlignConfig, d_image: int, d_text: int, device) -> AlignmentModel:
    """The heads a run starts from: seeded by the run's seed alone, so a batched cell starts
    from exactly the weights its sequential run would."""
    torch.manual_seed(cfg.seed)
    return AlignmentModel(cfg.head, d_image, d_text, cfg.d_out, cfg.temperature, cfg.learn_temperature).to(device)


def cosine_factor(step: int, total_steps: int) -> float:
    """The learning-rate multiplier: cosine decay once over the whole budget (the configured lr is the peak)."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def build_run(cfg: AlignConfig, data: CachedData) -> RunSetup:
    """Choose layers and pairs, load the tensors, and build the model, optimiser and schedule."""
    device = pick_device(cfg.device)
    plan = plan_run(cfg, data)
    torch.manual_seed(cfg.seed)  # as before for every method (a training-free fit may draw from torch)
    tensors = _checked_tensors(data, (plan.image_layer, plan.text_layer), plan.rows, device)
    model = opt = sched = None  # a training-free method fits its own maps (fit_training_free)
    if cfg.method == "heads":
        model = new_model(cfg, tensors[0].shape[1], tensors[1].shape[1], device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas,
                                weight_decay=cfg.weight_decay)
        total_steps = plan.steps_per_epoch * cfg.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, total_steps))
    return RunSetup(cfg, plan.config(data, len(tensors[2])), plan.table, tensors, model, opt, sched, len(plan.rows),
                    plan.batch, plan.steps_per_epoch)


def epoch_record(epoch: int, step: int, lr: float, lam: float, train: dict, val: dict) -> dict:
    """One metrics.jsonl line of a trained run."""
    return {"epoch": epoch, "step": step, "lr": lr, "lambda": lam, **{f"train_{k}": v for k, v in train.items()},
            **{f"val_{k}": v for k, v in val.items()}}


def check_finite(epoch: int, train: dict, val: dict) -> None:
    if not all(math.isfinite(v) for v in (*train.values(), *val.values())):
        raise FeatcacheError(f"the loss became non-finite at epoch {epoch} (train {train['total']}, "
                             f"val {val['total']}); no run was recorded",
                             "lower --lr or --lam, or check the features with featcache verify")


def fit_summary(run_id: str, config: dict, cfg: AlignConfig, best: dict, epochs_run: int, steps: int,
                seconds: float, train_pairs: int) -> dict:
    """summary.json of a trained run."""
    return {
        "run_id": run_id, "image_layer": config["image_layer"], "text_layer": config["text_layer"],
        "best_epoch": best["epoch"], "best_val": best["score"], "checkpoint_on": cfg.checkpoint_on,
        "epochs_run": epochs_run, "steps": steps, "seconds": seconds,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "train_pairs": train_pairs,
    }


def fit(run: RunSetup, writer: RunWriter, progress=None) -> dict:
    """The training loop with early stopping; leaves the best epoch's weights in ``run.model``."""
    cfg, model, opt, sched = run.cfg, run.model, run.opt, run.sched
    xi, xt, vi, vt = run.tensors
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(cfg.seed)
    fixed = None
    if cfg.fixed_structure:  # drawn once per run, from its own generator so batch order is unchanged
        pick = torch.randperm(run.rows, generator=torch.Generator().manual_seed(cfg.seed + 1))[:run.batch]
        fixed = (xi[pick.to(xi.device)], xt[pick.to(xt.device)])
    best = {"epoch": -1, "score": float("inf")}
    best_state = copy.deepcopy(model.state_dict())
    step, start = 0, time.perf_counter()
    layers = f"{run.config['image_layer']}/{run.config['text_layer']}"
    task = progress.add_task(f"align {layers} seed {cfg.seed}", total=cfg.epochs) if progress else None
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(run.rows, generator=gen).to(xi.device)
        sums_t = torch.zeros(3, device=xi.device)  # running sums stay on the device: no sync per step
        for b in range(run.steps_per_epoch):  # the tail that does not fill a batch is dropped this epoch
            idx = order[b * run.batch:(b + 1) * run.batch]
            lam = lambda_at(step, cfg.lam, cfg.lam_warmup_steps)
            total, clip, reg = _losses(model, cfg, xi[idx], xt[idx], lam, fixed)
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            sums_t += torch.stack([total.detach(), clip.detach(), reg.detach().to(total.device)])
        sums = dict(zip(("total", "clip", "structure"), (sums_t / run.steps_per_epoch).tolist()))  # one read
        model.eval()
        val = _evaluate(model, cfg, vi, vt)
        check_finite(epoch, sums, val)
        score = val["clip"] if cfg.checkpoint_on == "val_clip" else val["total"]
        if score < best["score"]:
            best = {"epoch": epoch, "score": score}
            best_state = copy.deepcopy(model.state_dict())
        writer.log(epoch_record(epoch, step, sched.get_last_lr()[0], lambda_at(step, cfg.lam, cfg.lam_warmup_steps),
                                sums, val))
        if task is not None:
            progress.update(task, advance=1)
        if epoch - best["epoch"] >= cfg.patience:
            break
    model.load_state_dict(best_state)
    return fit_summary(writer.run_id, run.config, cfg, best, epoch + 1, step, time.perf_counter() - start, run.rows)


def fit_training_free(run: RunSetup, writer: RunWriter) -> dict:
    """A training-free method: fit its maps on the run's training pairs, score them once on val."""
    cfg, start = run.cfg, time.perf_counter()
    xi, xt, vi, vt = run.tensors
    image, text, facts = fit_free(cfg.method, xi.float().cpu().numpy(), xt.float().cpu().numpy(), cfg.free, cfg.seed)
    run.model = FixedModel(image, text, cfg.temperature).to(xi.device)
    val = _evaluate(run.model, replace(cfg, loss="clip"), vi, vt)
    writer.log({"epoch": 0, "step": 0, **{f"val_{k}": v for k, v in val.items()}})
    return {
        "run_id": writer.run_id, "image_layer": run.config["image_layer"], "text_layer": run.config["text_layer"],
        "method": cfg.method, "fit": facts, "best_epoch": 0, "best_val": val["clip"], "checkpoint_on": "val_clip",
        "epochs_run": 0, "steps": 0, "seconds": time.perf_counter() - start,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "train_pairs": run.rows,
    }


def train(cfg: AlignConfig, data: CachedData | None = None, progress=None) -> Path:
    """Train (or, for a training-free method, fit) one run and write its record; returns the run
    directory (none is left on failure)."""
    cfg.validate()
    run = build_run(cfg, data or load_cached(cfg))
    writer = RunWriter(cfg.runs_dir, run.config, cfg.log)
    try:
        summary = fit(run, writer, progress) if cfg.method == "heads" else fit_training_free(run, writer)
    except BaseException:
        writer.abort()
        raise
    extra = {"layer_scores.json": run.table.to_dict()} if run.table is not None else None
    return writer.finish(summary, run.model.state_dict(), extra)


def sweep(base: AlignConfig, layers: list[str], losses: list[str], seeds: list[int],
          pairs: list[int | None] | None = None, progress=None, grid: dict[str, list] | None = None,
          shard: str | None = None, vectorize: bool = True) -> list[Path]:
    """Train one run per grid cell; the cache is read once and shared by every cell.

    ``grid`` varies any other AlignConfig fields as well (``{"centering": ["none", "mean"]}``),
    so an ablation table is one call. ``shard`` "I/N" (or torchrun / a Slurm array, detected)
    trains only cells c with c mod N == I, in the grid's fixed order, into the shared runs dir.
    ``vectorize`` trains cells that differ only in seed, lambda, tau or pair count as one batched
    model (featcache.pipeline.vectorized); each still writes its own run, equal to its sequential one.
    """
    worker = grid_worker(shard)
    grid = dict(grid or {})
    unknown = [k for k in grid if k not in AlignConfig.__dataclass_fields__]
    if unknown:
        raise FeatcacheError(f"cannot sweep over {', '.join(unknown)}", "name AlignConfig fields")
    reads_cache = [k for k in grid if k in DATA_FIELDS]
    if reads_cache:  # the cache is read once, from base: these would be recorded but not used
        raise FeatcacheError(f"a sweep reads one cache; it cannot vary {', '.join(reads_cache)}",
                             "run one sweep per data set, model or split")
    data = load_cached(base)
    cells = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    configs: dict[str, AlignConfig] = {}
    for n in pairs or [base.pairs]:
        for layer in layers:
            for loss in losses:
                for cell in cells:
                    for seed in seeds:
                        cfg = _effective(replace(base, layers=layer, loss=loss, seed=seed, pairs=n, **cell), seeds)
                        configs.setdefault(repr(cfg), cfg)
    mine = worker.share(list(configs.values()))
    if vectorize:
        from featcache.pipeline.vectorized import train_cells

        return train_cells(mine, data, progress)
    return [train(cfg, data, progress) for cfg in mine]


# What selects the cached features themselves: fixed for a whole sweep.
DATA_FIELDS = ("image_model", "text_model", "image_pooling", "text_pooling", "image_size", "dataset",
               "train_split", "val_split", "cache_dir", "runs_dir")


def _effective(cfg: AlignConfig, seeds: list[int]) -> AlignConfig:
    """A training-free method ignores the loss, and a deterministic one the seed: one run, not
    copies. Not with ``pairs``: the seed draws the training subset, so each seed fits its own."""
    if cfg.method == "heads":
        return cfg
    cfg = replace(cfg, loss="clip")
    seeded = cfg.method == "csa+structure" or cfg.pairs is not None
    return cfg if seeded else replace(cfg, seed=seeds[0])
