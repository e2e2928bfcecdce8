"""Moved to featcache.pipeline.train.stacked (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.train.stacked'], {'_checked_tensors': 'checked_tensors'})
