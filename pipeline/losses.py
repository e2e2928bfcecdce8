"""Moved to featcache.pipeline.common.losses (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.common.losses'], {'_walk': 'walk', '_multilevel': 'multilevel'})
