"""Old module paths of the flat ``pipeline/`` (before the stage packages) stay importable for one
release: each is a shim whose names resolve in the new modules, with a DeprecationWarning that
names the new path. The architecture test (tests/test_architecture.py) ignores shims."""

from __future__ import annotations

import importlib
import warnings


def moved(old: str, new: list[str], renames: dict[str, str] | None = None):
    """A module ``__getattr__`` for the shim ``old``: a name is looked up in ``new`` in order
    (under its new name when it was renamed)."""
    renames = renames or {}

    def __getattr__(name: str):
        target = renames.get(name, name)
        for module in new:
            mod = importlib.import_module(module)
            if hasattr(mod, target):
                warnings.warn(f"{old} moved: import {target} from {module}", DeprecationWarning, stacklevel=2)
                return getattr(mod, target)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved to {', '.join(new)})")

    return __getattr__
