"""Moved to featcache.pipeline.evaluate.results (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.evaluate.results'], {})
