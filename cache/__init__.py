"""Stage one's storage: chunked, checksummed zarr feature stores keyed by what made the features.

The single source of truth for what a store holds: its address (``naming``), the read API that
checks identities (``lookup``), writer locks (``locks``) and ``verify``.
"""

from featcache.cache.errors import FeatcacheError
from featcache.cache.lookup import StoreQuery, open_store
from featcache.cache.naming import StoreSpec, split_label, store_path
from featcache.cache.paths import default_cache_dir, default_home
from featcache.cache.store import FeatureStore, find_stores

__all__ = [
    "FeatcacheError",
    "FeatureStore",
    "StoreQuery",
    "StoreSpec",
    "default_cache_dir",
    "default_home",
    "find_stores",
    "open_store",
    "split_label",
    "store_path",
]
