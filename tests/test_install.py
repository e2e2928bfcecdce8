"""The featcache under test is this checkout's: a second clone's setup must never re-point it."""

from pathlib import Path

import featcache.cache
import featcache.pipeline


def test_featcache_resolves_inside_this_checkout():
    root = Path(__file__).resolve().parents[1]
    for package in (featcache.pipeline, featcache.cache):
        assert all(Path(p).resolve().is_relative_to(root) for p in package.__path__), package.__path__
