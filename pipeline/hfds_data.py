"""Moved to featcache.pipeline.data.hfds, featcache.pipeline.common.listing (a shim for one release)."""

from featcache.pipeline.shim import moved

__getattr__ = moved(__name__, ['featcache.pipeline.data.hfds', 'featcache.pipeline.common.listing'], {'OPTIONS': 'HFDS_OPTIONS', 'HINT': 'HFDS_HINT', 'layout': 'hfds_layout', 'dataset_name': 'hfds_name', '_read_json': 'read_json_file', '_arrow_files': 'arrow_files', '_parquet_split': 'parquet_split'})
