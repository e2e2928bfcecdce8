"""``load_encoder``: a registry name, ``timm:`` or ``hf:`` spec to a frozen encoder on its device."""

from __future__ import annotations

from featcache.pipeline.common.device import pick_device
from featcache.pipeline.extract import hf_encoder, timm_encoder
from featcache.pipeline.extract.encoders import Encoder
from featcache.pipeline.extract.registry import resolve_entry


def load_encoder(spec: str, device: str = "auto", image_size: int | None = None) -> Encoder:
    entry = resolve_entry(spec)
    dev = pick_device(device)
    source = entry.source()
    loader = timm_encoder if entry.backend == "timm" else hf_encoder
    enc = loader.load(entry, source, image_size)
    enc.model.to(dev).eval().requires_grad_(False)
    enc.device = dev
    return enc


