"""Moved to featcache.pipeline.evaluate.metrics, featcache.pipeline.common.arrays (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.evaluate.metrics', 'featcache.pipeline.common.arrays'], {})
