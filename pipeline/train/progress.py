"""One run's progress through its epochs: what each epoch records, the best validation epoch and
its weights, early stopping and the summary. The same whether the run trains alone
(``loop.fit``) or as a cell of a stack (``stacked``): the rules a researcher changes most, the
checkpoint score, patience, the finiteness check and the record, have this one home.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.losses import lambda_at
from featcache.pipeline.train.config import AlignConfig
from featcache.pipeline.train.runs import RunWriter

LOSS_NAMES = ("total", "clip", "structure")


def epoch_record(epoch: int, step: int, lr: float, lam: float | None, train: dict, val: dict) -> dict:
    """One metrics.jsonl line of a trained run (``lam`` None: the loss has no λ, so none is logged)."""
    return {"epoch": epoch, "step": step, "lr": lr, **({"lambda": lam} if lam is not None else {}),
            **{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()}}


def check_finite(epoch: int, train: dict, val: dict) -> None:
    if not all(math.isfinite(v) for v in (*train.values(), *val.values())):
        raise FeatcacheError(f"the loss became non-finite at epoch {epoch} (train {train['total']}, "
                             f"val {val['total']}); no run was recorded",
                             "lower --lr or --lam, or check the features with featcache verify")


class RunProgress:
    """Epoch by epoch: record, keep the best validation epoch's weights, say when to stop."""

    def __init__(self, cfg: AlignConfig, writer: RunWriter, config: dict, weights: dict):
        self.cfg, self.writer, self.config = cfg, writer, config
        self.best = {"epoch": -1, "score": float("inf")}
        self.best_weights = weights  # the starting weights until an epoch beats them
        self.epochs_run = 0
        self.start = time.perf_counter()

    def end_epoch(self, epoch: int, step: int, lr: float, train: dict, val: dict,
                  weights: Callable[[], dict]) -> bool:
        """Record one epoch and keep its weights (``weights()``, called only then) if it is the
        best so far; True when patience has run out."""
        check_finite(epoch, train, val)
        cfg = self.cfg
        score = val["clip"] if cfg.checkpoint_on == "val_clip" else val["total"]
        lam = lambda_at(step, cfg.lam, cfg.lam_warmup_steps) if cfg.loss != "clip" else None
        if score < self.best["score"]:
            self.best = {"epoch": epoch, "score": score, "step": step, "lambda": lam}
            self.best_weights = weights()
        self.writer.log(epoch_record(epoch, step, lr, lam, train, val))
        self.epochs_run = epoch + 1
        return epoch - self.best["epoch"] >= cfg.patience

    def summary(self, steps: int, train_pairs: int) -> dict:
        """summary.json of a trained run."""
        return {
            "run_id": self.writer.run_id, "image_layer": self.config["image_layer"],
            "text_layer": self.config["text_layer"], "best_epoch": self.best["epoch"], "best_val": self.best["score"],
            "checkpoint_on": self.cfg.checkpoint_on, "epochs_run": self.epochs_run, "steps": steps,
            "seconds": time.perf_counter() - self.start, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "train_pairs": train_pairs, **self.warmup_note(),
        }

    def warmup_note(self) -> dict:
        """When the kept checkpoint comes before λ's ramp ends, the run is mostly a CLIP run
        with a little R_S: said in summary.json (and by align), never silently."""
        lam = self.best.get("lambda")
        if lam is None or self.best.get("step", 0) >= self.cfg.lam_warmup_steps or lam >= self.cfg.lam:
            return {}
        return {"best_before_lambda_warmup": {
            "step": self.best["step"], "lambda": lam, "lam": self.cfg.lam, "lam_warmup_steps": self.cfg.lam_warmup_steps,
            "note": f"the best epoch (step {self.best['step']}) came before the λ ramp ended "
                    f"(step {self.cfg.lam_warmup_steps}): it was trained at λ ≈ {lam:.3g} of {self.cfg.lam:g}; "
                    "a longer run, a shorter --lam-warmup or --checkpoint-on val_total changes that"}}
