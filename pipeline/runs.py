"""Run records: one directory per run with config.json, heads, metrics.jsonl and summary.json.

A run is written under ``runs/.partial-<id>`` and renamed into place only when finished, so a
killed run never looks like a result. Nothing is pickled: weights are safetensors, the rest JSON.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from featcache.cache.errors import FeatcacheError


def new_run_id(config: dict) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return time.strftime("%Y%m%d-%H%M%S") + f"-{digest}"


class RunWriter:
    def __init__(self, runs_dir: Path, config: dict):
        self.runs_dir = Path(runs_dir)
        self.run_id = new_run_id(config)
        self.final = self.runs_dir / self.run_id
        n = 1
        while self.final.exists():
            self.final = self.runs_dir / f"{self.run_id}.{n}"
            n += 1
        self.run_id = self.final.name
        self.tmp = self.runs_dir / f".partial-{self.run_id}"
        self.tmp.mkdir(parents=True)
        write_json(self.tmp / "config.json", config)
        self._metrics = open(self.tmp / "metrics.jsonl", "w")

    def log(self, record: dict) -> None:
        self._metrics.write(json.dumps(record) + "\n")

    def finish(self, summary: dict, tensors: dict, extra_files: dict[str, dict] | None = None) -> Path:
        from safetensors.torch import save_file

        self._metrics.close()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(self.tmp / "heads.safetensors"))
        for name, data in (extra_files or {}).items():
            write_json(self.tmp / name, data)
        write_json(self.tmp / "summary.json", summary)
        self.tmp.rename(self.final)
        return self.final

    def abort(self) -> None:
        self._metrics.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def list_runs(runs_dir: Path) -> list[Path]:
    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        return []
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and (p / "summary.json").exists())


def find_run(runs_dir: Path, run: str = "latest") -> Path:
    runs = list_runs(runs_dir)
    if not runs:
        raise FeatcacheError(f"no finished runs under {runs_dir}", "train one first: featcache align")
    if run == "latest":
        return max(runs, key=lambda p: (read_json(p / "summary.json").get("finished_at", ""), p.name))
    path = Path(run)
    if path.is_dir() and (path / "summary.json").exists():
        return path
    matches = [p for p in runs if p.name == run] or [p for p in runs if p.name.startswith(run)]
    if len(matches) != 1:
        raise FeatcacheError(f"run {run!r} {'is ambiguous' if matches else 'was not found'} under {runs_dir}",
                             "see featcache runs")
    return matches[0]


def load_heads(run_dir: Path):
    """The trained alignment model of a run, rebuilt from config.json and heads.safetensors."""
    from safetensors.torch import load_file

    from featcache.pipeline.heads import AlignmentModel

    cfg = read_json(run_dir / "config.json")
    state = load_file(str(run_dir / "heads.safetensors"))
    model = AlignmentModel(cfg["head"], state_dim(state, "image_head"), state_dim(state, "text_head"),
                           cfg["d_out"], cfg["temperature"], cfg["learn_temperature"])
    model.load_state_dict(state)
    return model.eval(), cfg


def state_dim(state: dict, prefix: str) -> int:
    key = f"{prefix}.weight" if f"{prefix}.weight" in state else f"{prefix}.proj.weight"
    return int(state[key].shape[1])
