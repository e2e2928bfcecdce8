"""Where a store lives: a local path, or an fsspec URL (``s3://``, ``gs://``, ``file://``, ``memory://``).

Stores are opened through zarr, which understands both; the few file operations featcache
needs besides (exists, remove, size, find) go through this module so the rest of the code does
not care which it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

Location = Path | str


def is_url(location: Location) -> bool:
    return isinstance(location, str) and "://" in location


def as_location(value: str | Path) -> Location:
    """A CLI or environment value: URLs stay strings (Path would fold their '//')."""
    text = str(value)
    if text.startswith("file://"):  # local after all: keep file locks and directory creation
        return Path(text[len("file://"):]).expanduser()
    return text.rstrip("/") if "://" in text else Path(text).expanduser()


def join(root: Location, *parts: str) -> Location:
    if is_url(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return Path(root).joinpath(*parts)


def name(location: Location) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def _fs(url: str):
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def has_group(location: Location) -> bool:
    """Whether a zarr group's metadata exists at ``location``."""
    if is_url(location):
        fs, path = _fs(str(location))
        return fs.exists(f"{path}/zarr.json")
    return (Path(location) / "zarr.json").exists()


def remove(location: Location) -> None:
    if is_url(location):
        fs, path = _fs(str(location))
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        shutil.rmtree(location, ignore_errors=True)


def make_parent(location: Location) -> None:
    if not is_url(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)


def size(location: Location) -> int:
    if is_url(location):
        fs, path = _fs(str(location))
        return int(fs.du(path))
    return sum(p.stat().st_size for p in Path(location).rglob("*") if p.is_file())


def find_groups(root: Location, suffix: str = ".zarr") -> list[Location]:
    """Every ``*<suffix>`` group below ``root``."""
    if is_url(root):
        fs, path = _fs(str(root))
        found = sorted({m[: -len("/zarr.json")] for m in fs.glob(f"{path}/**/*{suffix}/zarr.json")})
        return [fs.unstrip_protocol(p) for p in found]
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.rglob(f"*{suffix}") if (p / "zarr.json").exists())
