"""Moved to featcache.pipeline.common.layerspec (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.common.layerspec'], {})
