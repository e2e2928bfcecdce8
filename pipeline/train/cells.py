"""A cell's identity: what makes two runs the same experiment, so a sweep run twice trains each
cell once and a report never counts a repeat as another seed.

The identity is the resolved training config (every AlignConfig field that changes what is
trained) plus the identities of the stores it reads. Where things are written or shown
(``runs_dir``, the tracker, a name or tags), where the cache sits (``cache_dir``: a copied cache
holds the same stores) and the device are left out: the same cell on a GPU is the same cell.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from featcache.pipeline.train.config import AlignConfig
from featcache.pipeline.train.runs import list_runs, read_json

NOT_IDENTITY = ("runs_dir", "cache_dir", "log", "device", "compile", "name", "tags", "group", "sources")


def cell_id(cfg: AlignConfig, stores: dict) -> str:
    """A short digest of ``cfg`` and the store identities (``RunPlan.config``'s ``cache``)."""
    fields = {k: v for k, v in cfg.to_dict().items() if k not in NOT_IDENTITY}
    where_free = {split: {side: {k: v for k, v in ident.items() if k != "path"} for side, ident in sides.items()}
                  for split, sides in stores.items()}
    doc = json.dumps({"config": fields, "stores": where_free}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def runs_by_cell(runs_dir: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """The finished runs under ``runs_dir`` grouped by cell, each group in run-id order (start
    time first), and the runs recorded before cells had ids (never matched to a cell)."""
    cells: dict[str, list[Path]] = {}
    uncelled: list[Path] = []
    for run in list_runs(runs_dir):  # sorted by run id, which starts with the start time
        cell = read_json(run / "config.json").get("cell")
        if isinstance(cell, str):
            cells.setdefault(cell, []).append(run)
        else:
            uncelled.append(run)
    return cells, uncelled


def finished_cells(runs_dir: Path) -> dict[str, Path]:
    """Cell id -> the latest finished run of that cell under ``runs_dir``."""
    return {cell: runs[-1] for cell, runs in runs_by_cell(runs_dir)[0].items()}
