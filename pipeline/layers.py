"""Moved to featcache.pipeline.select.table (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.select.table'], {})
