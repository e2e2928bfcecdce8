"""Build an :class:`~featcache.pipeline.extract.encoders.Encoder` from a timm vision transformer:
``timm:NAME``, ``timm:NAME:pretrained=False``, ``timm:NAME:checkpoint=FILE`` or timm's own
``timm:local-dir:PATH``."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.layerspec import block_name
from featcache.pipeline.extract.encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, Tap, check_image_size
from featcache.pipeline.extract.registry import EncoderEntry, network_error


def load(entry: EncoderEntry, name: str, image_size: int | None) -> Encoder:
    import timm

    name, options = parse_timm_source(entry, name)
    size = image_size or entry.default_image_size
    try:
        with _seeded(not options["pretrained"]):
            model = timm.create_model(name, dynamic_img_size=True, **options)
    except Exception as err:  # noqa: BLE001 - timm and the hub raise many types; each is named below
        first = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        if "Unknown model" in str(err) or "Invalid model" in str(err):
            raise FeatcacheError(f"unknown timm model {name!r}", "see timm.list_models()") from None
        if isinstance(err, TypeError) and "dynamic_img_size" in str(err):  # a CNN: no token layers to hook
            raise FeatcacheError(f"{entry.name}: unsupported architecture (not a vision transformer)",
                                 "featcache hooks timm vision transformers (.blocks, .norm_pre, .norm)") from None
        if options.get("pretrained_cfg_overlay"):
            raise FeatcacheError(f"{entry.name}: cannot load the checkpoint file into {name} "
                                 f"({type(err).__name__}: {first})",
                                 "checkpoint= takes a .safetensors, .pth or .bin file of this timm model") from None
        if isinstance(err, (OSError, RuntimeError, ValueError)):
            raise network_error(entry, err) from None
        raise
    if not all(hasattr(model, a) for a in ("blocks", "norm_pre", "norm", "embed_dim", "num_prefix_tokens")):
        raise FeatcacheError(f"{entry.name}: unsupported architecture {type(model).__name__}",
                             "featcache hooks timm vision transformers (.blocks, .norm_pre, .norm)")
    cfg = getattr(model, "pretrained_cfg", None) or {"input_size": (3, 224, 224)}
    if size is None or size == -1:
        size = cfg["input_size"][-1]
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (1,))[0]
    check_image_size(size, patch)
    taps = {"embed": Tap(model.norm_pre, "output")}
    taps.update({block_name(i): Tap(blk, "output") for i, blk in enumerate(model.blocks)})
    if not isinstance(model.norm, nn.Identity):
        taps["final"] = Tap(model.norm, "output")
    prep = {"image_size": size, "resize": "shorter-side bicubic", "crop": "center",
            "mean": list(cfg.get("mean", IMAGENET_MEAN)), "std": list(cfg.get("std", IMAGENET_STD)),
            "background": "white"}
    return Encoder(entry, model, taps, model.embed_dim, model.num_prefix_tokens, prep, torch.device("cpu"),
                   native_image_size=cfg["input_size"][-1],
                   default_image_size=entry.default_image_size or cfg["input_size"][-1])


def parse_timm_source(entry: EncoderEntry, source: str) -> tuple[str, dict]:
    """``NAME``, ``NAME:pretrained=False`` or ``NAME:checkpoint=FILE`` (NAME may be timm's own
    ``local-dir:PATH`` or ``hf-hub:ID``) -> the model name and ``timm.create_model`` options."""
    name, options = source, {}
    head, sep, tail = source.rpartition(":")
    if sep and re.fullmatch(r"\w+=[^,]*(,\w+=[^,]*)*", tail):
        name = head
        options = dict(item.split("=", 1) for item in tail.split(","))
    unknown = set(options) - {"pretrained", "checkpoint"}
    if unknown:
        raise FeatcacheError(f"{entry.name}: unknown timm option {sorted(unknown)[0]!r}",
                             "timm:NAME takes pretrained=False or checkpoint=FILE")
    pretrained = options.get("pretrained", "true").lower()
    if pretrained not in ("true", "false", "1", "0"):
        raise FeatcacheError(f"{entry.name}: pretrained={options['pretrained']!r} is not true or false")
    out: dict = {"pretrained": pretrained in ("true", "1")}
    if "checkpoint" in options:
        path = Path(options["checkpoint"]).expanduser()
        if not path.is_file():
            raise FeatcacheError(f"{entry.name}: the checkpoint file {path} does not exist",
                                 "checkpoint= takes a local .safetensors, .pth or .bin file")
        # Loaded as the model's pretrained weights, so timm's own key conversions apply.
        out = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path.resolve())}}
    return name, out


class _seeded:
    """``pretrained=False``: the same random weights on every load, so the cache is reused."""

    def __init__(self, active: bool):
        self.active = active

    def __enter__(self):
        if self.active:
            self.rng = torch.random.fork_rng(devices=[])
            self.rng.__enter__()
            torch.manual_seed(0)

    def __exit__(self, *exc):
        if self.active:
            self.rng.__exit__(*exc)
