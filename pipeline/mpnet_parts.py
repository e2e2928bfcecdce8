"""Moved to featcache.pipeline.extract.mpnet_parts (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.extract.mpnet_parts'], {})
