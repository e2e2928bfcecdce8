"""featcache's own public names: ``from featcache import AlignedModel``.

The repository's top-level folders are the subpackages (``featcache.cache``, ``featcache.pipeline``,
``featcache.cli``); this folder is the package itself. Its names are resolved on first use, so
``import featcache.cache`` (which runs this file first) loads neither torch nor the encoders.
"""

from __future__ import annotations

__all__ = ["AlignedModel", "export_model"]


def __getattr__(name: str):
    if name in __all__:
        from featcache.pipeline import model

        return getattr(model, name)
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
