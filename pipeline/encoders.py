"""Moved to featcache.pipeline.extract.encoders (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.extract.encoders', 'featcache.pipeline.extract.loading', 'featcache.pipeline.extract.timm_encoder'], {})
