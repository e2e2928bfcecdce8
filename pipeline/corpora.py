"""Moved to featcache.pipeline.data.corpora, featcache.pipeline.common.listing (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.data.corpora', 'featcache.pipeline.common.listing'], {})
