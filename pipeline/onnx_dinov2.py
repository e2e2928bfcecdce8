"""Moved to featcache.pipeline.extract.onnx_dinov2 (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.extract.onnx_dinov2'], {})
