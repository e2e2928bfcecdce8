"""Experiment trackers behind one small interface; ``metrics.jsonl`` stays the record of truth.

A run's tracker receives what ``metrics.jsonl`` receives (per epoch: losses, lambda, lr), under
``train/``, ``val/`` and plain names, and evaluation adds its results under ``eval/``.
TensorBoard and wandb are supported (``pip install featcache[trackers]``); others plug in by the
same two methods.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from featcache.cache.errors import FeatcacheError

TRACKERS = ("none", "tensorboard", "wandb")


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

    def __init__(self, log_dir: Path, config: dict | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:
            raise FeatcacheError("--log tensorboard needs the tensorboard package",
                                 "pip install tensorboard, or log with --log none") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))
        if config:  # the HPARAMS tab: this run's settings beside the metrics its scalars log
            for summary in hparams(hyperparameters(config), {"val/clip": 0.0, "val/total": 0.0}):
                self.writer.file_writer.add_summary(summary)

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run under ``<run>/wandb``, with the featcache run id as its id.

    Offline unless ``WANDB_MODE`` says otherwise: a lab syncs the runs it wants with
    ``wandb sync runs/*/wandb/offline-run-*``, and a sweep on a cluster node never needs the
    network. Offline, nothing is sent anywhere: system metrics and machine probes (which query
    cloud metadata addresses) and error reporting are off, and so are git and code capture. The
    curves are what featcache logs; a CPU head's system metrics would be noise anyway.

    Evaluation reopens the same id (``resume="allow"``), so its results land beside the curves
    as TensorBoard's do; offline, wandb writes them to a second ``offline-run-*`` folder of that id.
    """

    def __init__(self, log_dir: Path, name: str, config: dict | None = None):
        mode = os.environ.get("WANDB_MODE", "offline")
        if mode in ("offline", "dryrun", "disabled"):
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # its crash reports go online
        try:
            import wandb
        except ImportError:
            raise FeatcacheError("--log wandb needs the wandb package",
                                 "pip install wandb, or log with --log tensorboard or none") from None
        log_dir.mkdir(parents=True, exist_ok=True)
        quiet = dict(mode=mode, silent=True, console="off", disable_git=True, save_code=False, x_disable_stats=True,
                     x_disable_meta=True, x_disable_machine_info=True, x_save_requirements=False)
        # Only the switches this wandb knows: its Settings refuse unknown fields, and they come and go.
        settings = wandb.Settings(**{k: v for k, v in quiet.items() if k in wandb.Settings.model_fields})
        try:
            self.run = wandb.init(dir=str(log_dir), project=os.environ.get("WANDB_PROJECT") or "featcache",
                                  id=name, name=name, config=config, resume="allow", settings=settings,
                                  group=(config or {}).get("group"), tags=tag_list(config),
                                  reinit="create_new")
        except Exception as err:  # wandb raises its own error types for login, network and settings
            raise FeatcacheError(f"wandb could not start a run ({type(err).__name__}: {err})",
                                 "log offline (unset WANDB_MODE, or WANDB_MODE=offline), or use --log tensorboard") from None

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def make_tracker(kind: str, run_dir: Path, name: str | None = None, config: dict | None = None) -> Tracker:
    """The tracker of one run; ``name`` is the run id (the run dir may still be ``.partial-<id>``)."""
    if kind == "none":
        return NullTracker()
    if kind == "tensorboard":
        return TensorBoardTracker(Path(run_dir) / "tensorboard", config)
    if kind == "wandb":
        return WandbTracker(Path(run_dir), name or Path(run_dir).name, config)
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


def hyperparameters(config: dict) -> dict:
    """A run's config as TensorBoard hparams: its scalar settings, tags as ``tag.KEY``."""
    out = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool)) and k not in ("cache_dir", "runs_dir")}
    out.update({f"tag.{k}": v for k, v in (config.get("tags") or {}).items()})
    return out


def tag_list(config: dict | None) -> list[str] | None:
    """wandb's tags: the run's name and its KEY=VALUE tags."""
    config = config or {}
    tags = [f"{k}={v}" for k, v in (config.get("tags") or {}).items()] + ([config["name"]] if config.get("name") else [])
    return tags or None
