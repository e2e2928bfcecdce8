"""Moved to featcache.pipeline.data.wds, featcache.pipeline.common.listing (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.data.wds', 'featcache.pipeline.common.listing'], {'OPTIONS': 'WDS_OPTIONS', 'PATTERN_HINT': 'WDS_HINT', 'shards': 'wds_shards', 'dataset_name': 'wds_name'})
