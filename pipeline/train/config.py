"""What a run is asked to do: ``AlignConfig`` (with ``SelectConfig`` for layer choice), and
its validation. Every run directory records the resolved config in config.json."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from featcache.cache.errors import FeatcacheError
from featcache.cache.paths import default_cache_dir, default_runs_dir
from featcache.pipeline.common.losses import CENTERINGS, COMPILE, SIMILARITIES
from featcache.pipeline.select.metrics import K_RULES, METRICS
from featcache.pipeline.train.trackers import TRACKERS
from featcache.pipeline.train.training_free import METHODS, FreeConfig

LOSSES = ("clip", "clip+structure")


MAX_CALIBRATE = 1000

FLOAT32_MAX = 3.4028234663852886e38


# R_S's random walk of L steps: by a few dozen steps P^L is the walk's stationary distribution
# on both sides and further levels add nothing but time (each is a B x B product, forward and
# back: --levels 4199 kept a 16-pair run busy for minutes).
MAX_LEVELS = 64


def check_seed(seed) -> None:
    """Seeds seed numpy and torch generators, which take 0 <= seed < 2**32."""
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise FeatcacheError(f"the seed must be a whole number from 0 to {2**32 - 1}, got {seed}",
                             "pass --seed 0, 1, 2, ...")


TAG_KEY = re.compile(r"[A-Za-z0-9_.-]+")


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
        check_seed(self.seed)
        if self.metric not in METRICS:
            raise FeatcacheError(f"unknown layer metric {self.metric!r}", f"choose one of: {', '.join(METRICS)}")
        if self.k_rule not in K_RULES[1:]:
            raise FeatcacheError(f"unknown k rule {self.k_rule!r}", "choose rice, sqrt or sturges, or give --k")
        if self.calibrate > MAX_CALIBRATE:  # each shuffled pairing scores the whole table once more
            raise FeatcacheError(f"--calibrate {self.calibrate} would score the table {self.calibrate} more times",
                                 f"use at most {MAX_CALIBRATE} shuffled pairings (10 to 100 is usual)")


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
    layers: str = "auto"  # one layer choice (common/layerspec.py): auto | last | a layer | IMAGE,TEXT
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
    # Bookkeeping: recorded and shown, never part of what is trained (train/cells.py leaves them out).
    name: str | None = None  # a label the user chooses (runs shows it; report can filter on it)
    tags: dict[str, str] = field(default_factory=dict)  # --tag KEY=VALUE
    group: str | None = None  # the sweep a run belongs to (wandb groups by it)
    sources: dict[str, str] = field(default_factory=dict)  # option -> command line, a settings file, default

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cache_dir"], d["runs_dir"] = str(self.cache_dir), str(self.runs_dir)
        d["betas"] = list(self.betas)
        return d

    def validate(self) -> None:
        check_seed(self.seed)
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
        if self.levels > MAX_LEVELS:
            raise FeatcacheError(f"--levels {self.levels} is more random-walk steps than change anything",
                                 f"use at most {MAX_LEVELS} (1 to 3 is usual)")
        if self.pairs is not None and self.pairs < 2:
            raise FeatcacheError(f"--pairs must be at least 2, got {self.pairs}")
        for name in ("lr", "temperature", "lam", "gamma", "margin"):  # torch holds them as float32
            if math.isfinite(getattr(self, name)) and abs(getattr(self, name)) > FLOAT32_MAX:
                raise FeatcacheError(f"--{name} {getattr(self, name):g} is beyond float32 (at most {FLOAT32_MAX:.3g}), "
                                     "where training computes", "use a value of the usual size (see featcache align --help)")
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
        for key, value in self.tags.items():
            if not key or not TAG_KEY.fullmatch(key) or not isinstance(value, str):
                raise FeatcacheError(f"bad --tag {key}={value}", "write KEY=VALUE, the key in letters, digits, '_', '-' "
                                                                 "and '.'")
