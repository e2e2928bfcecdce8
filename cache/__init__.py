"""Stage one's storage: chunked zarr feature stores keyed by what made the features."""

from featcache.cache.errors import FeatcacheError
from featcache.cache.paths import default_cache_dir, default_home
from featcache.cache.store import FeatureStore, StoreSpec, find_stores, store_path

__all__ = [
    "FeatcacheError",
    "FeatureStore",
    "StoreSpec",
    "default_cache_dir",
    "default_home",
    "find_stores",
    "store_path",
]
