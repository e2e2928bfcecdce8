"""Moved to featcache.pipeline.extract.registry (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.extract.registry'], {})
