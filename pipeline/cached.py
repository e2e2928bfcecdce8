"""Moved to featcache.pipeline.features, featcache.pipeline.common.arrays, featcache.pipeline.common.names, featcache.pipeline.features (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.features', 'featcache.pipeline.common.arrays', 'featcache.pipeline.common.names', 'featcache.pipeline.features'], {})
