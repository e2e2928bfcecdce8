"""Moved to featcache.pipeline.train.heads (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.train.heads'], {})
