"""Which device a stage runs on: ``auto`` prefers CUDA; asking for CUDA without one is an error."""

from __future__ import annotations

import torch

from featcache.cache.errors import FeatcacheError


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FeatcacheError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeatcacheError(f"device {device!r} was asked for but CUDA is not available", "use --device cpu")
    return dev
