"""Experiment trackers behind one small interface; ``metrics.jsonl`` stays the record of truth.

A run's tracker receives what ``metrics.jsonl`` receives (per epoch: losses, lambda, lr), under
``train/``, ``val/`` and plain names, and evaluation adds its results under ``eval/``.
TensorBoard is supported (``pip install tensorboard``); others plug in by the same two methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from featcache.cache.errors import FeatcacheError

TRACKERS = ("none", "tensorboard")


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """An event file under ``<run>/tensorboard`` (read it with ``tensorboard --logdir runs``)."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FeatcacheError("--log tensorboard needs the tensorboard package",
                                 "pip install tensorboard, or log with --log none") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


def make_tracker(kind: str, run_dir: Path) -> Tracker:
    if kind == "none":
        return NullTracker()
    if kind == "tensorboard":
        return TensorBoardTracker(Path(run_dir) / "tensorboard")
    raise FeatcacheError(f"unknown tracker {kind!r}", f"choose one of: {', '.join(TRACKERS)}")


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: train_clip -> train/clip, val_total -> val/total."""
    out = {}
    for key, value in record.items():
        if key in ("epoch", "step") or not isinstance(value, (int, float)):
            continue
        split, _, name = key.partition("_")
        out[f"{split}/{name}" if split in ("train", "val") and name else key] = float(value)
    return out
