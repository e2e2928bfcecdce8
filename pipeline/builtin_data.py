"""Moved to featcache.pipeline.data.builtin (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.data.builtin'], {})
