"""Moved to featcache.pipeline.common.workers (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.common.workers'], {})
