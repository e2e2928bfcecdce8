"""Moved to featcache.pipeline.data.rows, featcache.pipeline.data.decode, featcache.pipeline.common.names (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.data.rows', 'featcache.pipeline.data.decode', 'featcache.pipeline.common.names'], {})
