"""Where a store lives: a local path, or an fsspec URL (``s3://``, ``gs://``, ``file://``, ``memory://``).

Stores are opened through zarr, which understands both; the few file operations featcache
needs besides (exists, remove, size, find) go through this module so the rest of the code does
not care which it is.

Object-store options (an S3-compatible endpoint, credentials, a profile) come the usual fsspec
and boto ways: ``AWS_ENDPOINT_URL`` and the other ``AWS_*`` variables, fsspec's own
``FSSPEC_S3_ENDPOINT_URL``-style configuration, or ``featcache --storage-option KEY=VALUE``,
which :func:`set_storage_options` records for every filesystem this process opens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

Location = Path | str

# Options for URL filesystems, from the command line (``--storage-option``); empty: fsspec's and
# boto's own configuration alone decide.
_STORAGE_OPTIONS: dict = {}


def parse_storage_options(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs; a value that reads as JSON (true, 3, {"a": 1}) is taken as such."""
    from featcache.cache.errors import FeatcacheError

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FeatcacheError(f"bad --storage-option {item!r}",
                                 "write KEY=VALUE, e.g. --storage-option endpoint_url=http://127.0.0.1:9000")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def set_storage_options(options: dict) -> None:
    """Use ``options`` for every URL filesystem opened from now on (the CLI sets them per command)."""
    _STORAGE_OPTIONS.clear()
    _STORAGE_OPTIONS.update(options)


def storage_options(location: Location) -> dict | None:
    """What zarr and fsspec are given for ``location``: None for a local path."""
    return dict(_STORAGE_OPTIONS) if is_url(location) else None


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
    """The filesystem and path of ``url``, with listings fresh: other processes write the same
    bucket, and s3fs would otherwise answer ``exists`` from a listing it cached earlier."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url, **_STORAGE_OPTIONS)
    fs.invalidate_cache()
    return fs, path


def filesystem(url: str):
    """The fsspec filesystem and bucket-relative path behind a URL (for leases)."""
    return _fs(url)


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
