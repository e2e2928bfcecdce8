"""Run records: one directory per run with config.json, heads, metrics.jsonl and summary.json.

A run is written under ``runs/.partial-<id>`` and renamed into place only when finished, so a
killed run never looks like a result. Nothing is pickled: weights are safetensors, the rest JSON.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from featcache.cache.errors import FeatcacheError
from featcache.cache.files import open_new


def new_run_id(config: dict) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return time.strftime("%Y%m%d-%H%M%S") + f"-{digest}"


class RunWriter:
    def __init__(self, runs_dir: Path, config: dict, tracker: str = "none"):
        self.runs_dir = Path(runs_dir)
        base, n = new_run_id(config), 0
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        while True:  # the id is reserved by creating its .partial folder: exclusive, so two identical
            self.run_id = base if n == 0 else f"{base}.{n}"  # runs started in one second never share one
            self.final, self.tmp = self.runs_dir / self.run_id, self.runs_dir / f".partial-{self.run_id}"
            n += 1
            if self.final.exists():
                continue
            try:
                self.tmp.mkdir()
                break
            except FileExistsError:
                continue
        write_json(self.tmp / "config.json", config)
        self._metrics = open(self.tmp / "metrics.jsonl", "w")
        from featcache.pipeline.train.trackers import make_tracker

        # inside the run dir, renamed with it; named by the final id, not the .partial folder
        self.tracker = make_tracker(tracker, self.tmp, name=self.run_id, config=config)

    def log(self, record: dict) -> None:
        """One metrics.jsonl line (the record of truth), mirrored to the run's tracker."""
        from featcache.pipeline.train.trackers import scalars

        self._metrics.write(json.dumps(record) + "\n")
        self.tracker.log(int(record.get("epoch", 0)), scalars(record))

    def finish(self, summary: dict, tensors: dict, extra_files: dict[str, dict] | None = None) -> Path:
        from safetensors.torch import save_file

        self._metrics.close()
        self.tracker.close()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(self.tmp / "heads.safetensors"))
        for name, data in (extra_files or {}).items():
            write_json(self.tmp / name, data)
        write_json(self.tmp / "summary.json", summary)
        self.tmp.rename(self.final)
        return self.final

    def abort(self) -> None:
        self._metrics.close()
        self.tracker.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open_new(tmp) as f:  # never through a link planted at the temporary name
        f.write(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    tmp.replace(path)  # a rename replaces a link at ``path`` itself, never its target


def read_json(path: Path):
    return json.loads(Path(path).read_text())


class RunsWarning(UserWarning):
    """Something about the runs a command read that the user should see (the CLI prints these)."""


class BrokenRunWarning(RunsWarning):
    """A run directory that cannot be read: it is skipped, never fatal to listing the others."""


class RepeatedCellWarning(RunsWarning):
    """Two finished runs of one cell (``cells.cell_id``): one is kept, never counted as two seeds."""


def _readable(run: Path) -> bool:
    for name in ("config.json", "summary.json"):
        try:
            if not isinstance(read_json(run / name), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            warnings.warn(f"skipping the run {run}: its {name} cannot be read ({type(err).__name__})",
                          BrokenRunWarning, stacklevel=3)
            return False
    return True


def list_runs(runs_dir: Path) -> list[Path]:
    """Finished, readable runs; a broken one is skipped with a BrokenRunWarning."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    finished = sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and (p / "summary.json").exists())
    return [p for p in finished if _readable(p)]


@dataclass
class RunEntry:
    """One finished run as ``featcache runs`` lists it, read from its config and summary, so the
    table and ``runs --json`` show the same facts and the id is the folder's name, whole."""

    run_id: str
    path: str
    dataset: str
    layers: str  # as asked: auto, last, IMG,TXT
    image_layer: str
    text_layer: str
    method: str
    loss: str
    head: str
    train_pairs: int
    seed: int
    best_val: float
    best_epoch: int
    evals: list[str]  # the stems of its eval/ results
    name: str | None = None  # --name
    tags: dict = field(default_factory=dict)  # --tag KEY=VALUE

    @classmethod
    def of(cls, run: Path) -> "RunEntry":
        c, s = read_json(run / "config.json"), read_json(run / "summary.json")
        evals = sorted(p.stem for p in (run / "eval").glob("*.json")) if (run / "eval").is_dir() else []
        return cls(run.name, str(run), c["dataset"], str(c["layers"]), s["image_layer"], s["text_layer"],
                   c.get("method", "heads"), c["loss"], c["head"], s["train_pairs"], c["seed"], s["best_val"],
                   s["best_epoch"], evals, c.get("name"), c.get("tags") or {})

    def label(self) -> str:
        """The name and tags as one cell: ``first try (ablation=lambda)``."""
        tags = ", ".join(f"{k}={v}" for k, v in self.tags.items())
        return " ".join(x for x in (self.name or "", f"({tags})" if tags else "") if x)

    def to_dict(self) -> dict:
        return asdict(self)


def read_eval_results(run: Path) -> list[dict]:
    """The evaluation results of a run; an unreadable file is skipped with a warning."""
    results = []
    for path in sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []:
        try:
            res = read_json(path)
            if not isinstance(res, dict) or not {"task", "dataset", "split", "metrics"} <= set(res):
                raise ValueError("not an evaluation result")
        except (OSError, ValueError) as err:
            warnings.warn(f"skipping {path}: it cannot be read as an evaluation result ({type(err).__name__})",
                          BrokenRunWarning, stacklevel=2)
            continue
        results.append(res)
    return results


def partial_runs(runs_dir: Path) -> list[Path]:
    """Folders of runs that were killed before they finished (``.partial-*``)."""
    runs_dir = Path(runs_dir)
    return sorted(runs_dir.glob(".partial-*")) if runs_dir.is_dir() else []


def matching_runs(runs: list[Path], name: str) -> list[Path]:
    """The runs a run id names: the run of that exact id, else every run whose id starts with it."""
    return [p for p in runs if p.name == name] or [p for p in runs if p.name.startswith(name)]


def find_run(runs_dir: Path, run: str = "latest") -> Path:
    runs = list_runs(runs_dir)
    if not runs:
        raise FeatcacheError(f"no finished runs under {runs_dir}", "train one first: featcache align")
    if run == "latest":
        return max(runs, key=lambda p: (read_json(p / "summary.json").get("finished_at", ""), p.name))
    path = Path(run)
    if path.is_dir() and (path / "summary.json").exists():
        return path
    matches = matching_runs(runs, run)
    if len(matches) != 1:
        raise FeatcacheError(f"run {run!r} {'is ambiguous' if matches else 'was not found'} under {runs_dir}",
                             "see featcache runs")
    return matches[0]


def load_heads(run_dir: Path):
    """The trained alignment model of a run, rebuilt from config.json and heads.safetensors."""
    from safetensors.torch import load_file

    from featcache.pipeline.train.heads import AlignmentModel, fixed_model_from_state

    cfg = read_json(run_dir / "config.json")
    try:
        state = load_file(str(run_dir / "heads.safetensors"))
        if cfg.get("method", "heads") != "heads":  # a training-free method's fitted maps
            return fixed_model_from_state(state, cfg["temperature"]).eval(), cfg
        model = AlignmentModel(cfg["head"], state_dim(state, "image_head"), state_dim(state, "text_head"),
                               cfg["d_out"], cfg["temperature"], cfg["learn_temperature"])
        model.load_state_dict(state)
    except Exception as err:  # safetensors, torch and a damaged config raise many types
        raise FeatcacheError(f"the heads of the run {run_dir} cannot be loaded ({type(err).__name__})",
                             "retrain it with the command in its config.json, or evaluate another run") from None
    return model.eval(), cfg


def state_dim(state: dict, prefix: str) -> int:
    key = f"{prefix}.weight" if f"{prefix}.weight" in state else f"{prefix}.proj.weight"
    return int(state[key].shape[1])
