"""Where featcache keeps things by default, each overridable by an environment variable."""

import os
from pathlib import Path


def default_home() -> Path:
    """Root for converted weights and other one-time artefacts."""
    env = os.environ.get("FEATCACHE_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "featcache"


def default_cache_dir():
    """Root of the feature stores; every command that reads caches shares it (a path or fsspec URL)."""
    from featcache.cache.location import as_location

    env = os.environ.get("FEATCACHE_CACHE_DIR")
    return as_location(env) if env else default_home() / "features"


def default_runs_dir() -> Path:
    env = os.environ.get("FEATCACHE_RUNS_DIR")
    return Path(env).expanduser() if env else Path("runs")
