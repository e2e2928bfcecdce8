"""Moved to featcache.pipeline.data.catalog, featcache.pipeline.common.names (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.data.catalog', 'featcache.pipeline.common.names'], {})
