"""Moved to featcache.pipeline.common.device (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.common.device'], {})
