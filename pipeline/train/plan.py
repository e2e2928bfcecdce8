"""What a run trains on, decided before training: the cached pairs (read once per sweep), the
layer pair, the training rows and batching, the checked tensors and the fresh heads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from featcache.cache.errors import FeatcacheError
from featcache.cache.lookup import check_same_encoder
from featcache.pipeline.common.arrays import require_finite, subsample
from featcache.pipeline.common.device import check_fits, pick_device
from featcache.pipeline.common.layerspec import one_choice, pair_parts, resolve_layers
from featcache.pipeline.features import PairedFeatures, Side, extract_hint, open_pairs, stored_dtype
from featcache.pipeline.select.table import LayerRows, ScoreTable, score_table
from featcache.pipeline.train.cells import cell_id
from featcache.pipeline.train.config import AlignConfig, SelectConfig
from featcache.pipeline.train.heads import AlignmentModel, FixedModel


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

    def stores(self) -> dict:
        """The identities of the stores every run on this data reads (config.json's ``cache``)."""
        return self.memo("stores", lambda: {"train": self.train.identities(), "val": self.val.identities()})

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
    splits = train.images.split_names
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
    parts = pair_parts(one_choice(spec, why="a run trains on one layer pair"))
    if parts is None:
        table = select_layers(data, select)
        return (*table.best(), table)
    image_store, text_store = data.train.images, data.train.texts
    image = _model_layer(parts[0], image_store, [n for n in image_store.layers if image_store.is_complete(n)])
    text = _model_layer(parts[1], text_store, [n for n in text_store.layers if text_store.is_complete(n)])
    return image, text, None


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


def checked_tensors(data: CachedData, layers: tuple[str, str], rows: np.ndarray, device):
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
        stores = data.stores()
        config = self.cfg.to_dict() | {
            "image_layer": self.image_layer, "text_layer": self.text_layer, "train_pairs": int(len(self.rows)),
            "val_pairs": int(val_pairs), "validation": data.validation, "cache": stores,
            "cell": cell_id(self.cfg, stores),
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
    if cfg.method == "heads":
        check_fits(run_bytes(cfg, data.train.images.width, data.train.texts.width, batch), pick_device(cfg.device),
                   f"training heads of width --d-out {cfg.d_out} at batch {batch}",
                   "lower --d-out or --batch-size (or --levels)")
    return RunPlan(cfg, image_layer, text_layer, table, rows, batch, max(1, len(rows) // batch))


# Memory one run needs per step, in B x B float32 matrices (R_S of both sides, forward and
# backward, keeps about this many alive). Measured for clip+structure: about 32 per cell with
# its heads' weights and Adam state (peak RSS of 10 against 2 stacked Tux Paint cells at
# B = 559 on a CPU); 48 leaves room for the allocator. Also bounds how many cells share a stack.
MATRICES_PER_CELL = {"clip": 8, "clip+structure": 48}


def run_bytes(cfg: AlignConfig, d_image: int, d_text: int, batch: int) -> int:
    """An estimate of one run's memory: its heads five times over (weights, gradients, Adam's two
    moments, the best epoch's copy) and the step's B x B matrices."""
    params = (d_image + d_text + 2) * cfg.d_out + (64 * (d_image + d_text + 2 * cfg.d_out) if cfg.head == "mlp" else 0)
    return 4 * (5 * params + MATRICES_PER_CELL[cfg.loss] * cfg.levels * batch * batch)


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
    tensors = checked_tensors(data, (plan.image_layer, plan.text_layer), plan.rows, device)
    model = opt = sched = None  # a training-free method fits its own maps (loop.run_training_free)
    if cfg.method == "heads":
        model = new_model(cfg, tensors[0].shape[1], tensors[1].shape[1], device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas,
                                weight_decay=cfg.weight_decay)
        total_steps = plan.steps_per_epoch * cfg.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, total_steps))
    return RunSetup(cfg, plan.config(data, len(tensors[2])), plan.table, tensors, model, opt, sched, len(plan.rows),
                    plan.batch, plan.steps_per_epoch)
