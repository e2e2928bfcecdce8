"""Frozen encoders that return pooled features of many layers in one forward pass.

``load_encoder`` builds what a registry entry (``featcache.pipeline.registry``) names. Every
layer's output is pooled by a forward hook as soon as it is made, so at most one batch's tokens
of one layer are alive at a time beyond the model's own.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.device import pick_device
from featcache.pipeline.layerspec import block_name, canonical_layers
from featcache.pipeline.registry import EncoderEntry, network_error, resolve_entry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VISION_POOLINGS = ("cls", "mean", "cls+mean")
TEXT_POOLINGS = ("mean", "cls")


def weights_digest(model: nn.Module) -> str:
    """sha256 over the parameters' bytes, independent of parameter names and their order."""
    tensor_digests = sorted(
        hashlib.sha256(t.detach().to("cpu").contiguous().numpy().tobytes()).hexdigest()
        for t in model.state_dict().values()
        if t.is_floating_point()
    )
    return hashlib.sha256("".join(tensor_digests).encode()).hexdigest()


class _Stop(Exception):
    """Raised from a hook once every requested layer is pooled, to skip the rest of the model."""


@dataclass
class Encoder:
    """A frozen encoder with its preprocessing and hooked layer modules."""

    entry: EncoderEntry
    model: nn.Module
    modules: dict[str, nn.Module]  # canonical layer name -> module whose output is that layer
    width: int
    num_prefix_tokens: int
    preprocessing: dict
    device: torch.device
    tokenizer: object = None
    native_image_size: int | None = None  # the pretrained input size, what --image-size -1 means
    _digest: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def modality(self) -> str:
        return self.entry.modality

    @property
    def n_blocks(self) -> int:
        return sum(1 for n in self.modules if n.startswith("block."))

    @property
    def has_final(self) -> bool:
        return "final" in self.modules

    @property
    def layer_names(self) -> list[str]:
        return canonical_layers(self.n_blocks, self.has_final)

    @property
    def weights_digest(self) -> str:
        if self._digest is None:
            self._digest = weights_digest(self.model)
        return self._digest

    def pooled_width(self, pooling: str) -> int:
        return self.width * (2 if pooling == "cls+mean" else 1)

    def check_pooling(self, pooling: str) -> None:
        allowed = VISION_POOLINGS if self.modality == "image" else TEXT_POOLINGS
        if pooling not in allowed:
            raise FeatcacheError(f"pooling {pooling!r} is not available for {self.modality} encoders",
                                 f"choose one of: {', '.join(allowed)}")

    # -- inputs ----------------------------------------------------------------------------
    def prepare_images(self, images: list) -> torch.Tensor:
        """PIL images (already RGB on white) -> normalised pixel batch."""
        from PIL import Image

        size = self.preprocessing["image_size"]
        mean = np.asarray(self.preprocessing["mean"], dtype=np.float32)
        std = np.asarray(self.preprocessing["std"], dtype=np.float32)
        out = np.empty((len(images), 3, size, size), dtype=np.float32)
        for i, img in enumerate(images):
            w, h = img.size
            scale = size / min(w, h)
            rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((rw, rh), Image.BICUBIC)
            left, top = (rw - size) // 2, (rh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            arr = np.asarray(img, dtype=np.float32) / 255.0
            out[i] = ((arr - mean) / std).transpose(2, 0, 1)
        return torch.from_numpy(out)

    def prepare_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True,
            max_length=self.preprocessing["max_length"], return_tensors="pt",
        )
        return dict(enc)

    # -- forward ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, inputs, layers: list[str], pooling: str) -> dict[str, torch.Tensor]:
        """Pooled float32 features (batch, width) of each requested layer, in one pass."""
        mask = None
        if self.modality == "text":
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
            mask = inputs["attention_mask"].unsqueeze(-1).float()
        else:
            inputs = inputs.to(self.device, non_blocking=True)
        pooled: dict[str, torch.Tensor] = {}
        wanted = set(layers)

        def pool(tokens: torch.Tensor) -> torch.Tensor:
            tokens = tokens.float()
            if self.modality == "text":
                if pooling == "cls":
                    return tokens[:, 0]
                return (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            cls = tokens[:, 0]
            patches = tokens[:, self.num_prefix_tokens:].mean(1)
            return {"cls": cls, "mean": patches, "cls+mean": torch.cat([cls, patches], -1)}[pooling]

        def make_hook(name: str):
            def hook(_module, _args, output):
                tokens = output[0] if isinstance(output, (tuple, list)) else output
                pooled[name] = pool(tokens)
                if wanted.issubset(pooled):
                    raise _Stop

            return hook

        handles = [self.modules[n].register_forward_hook(make_hook(n)) for n in layers]
        try:
            with self._autocast():
                if self.modality == "text":
                    self.model(**inputs)
                else:
                    self.model(inputs) if self.entry.backend == "timm" else self.model(pixel_values=inputs)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return {n: pooled[n] for n in layers}

    def _autocast(self):
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return torch.autocast("cpu", enabled=False)

    def identity(self, pooling: str) -> dict:
        return {
            "name": self.name,
            "backend": self.entry.backend,
            "modality": self.modality,
            "weights_sha256": self.weights_digest,
            "preprocessing": self.preprocessing,
            "pooling": pooling,
            "layers": self.layer_names,
        }


def load_encoder(spec: str, device: str = "auto", image_size: int | None = None) -> Encoder:
    entry = resolve_entry(spec)
    dev = pick_device(device)
    source = entry.source()
    if entry.backend == "timm":
        enc = _load_timm(entry, source, image_size)
    else:
        enc = _load_hf(entry, source, image_size)
    enc.model.to(dev).eval().requires_grad_(False)
    enc.device = dev
    return enc


def _check_image_size(size: int, patch: int) -> None:
    if size <= 0 or size % patch:
        raise FeatcacheError(f"image size {size} is not a positive multiple of the patch size {patch}",
                             f"try {max(patch, round(size / patch) * patch)}")


def _load_timm(entry: EncoderEntry, name: str, image_size: int | None) -> Encoder:
    import timm

    size = image_size or entry.default_image_size
    try:
        model = timm.create_model(name, pretrained=True, dynamic_img_size=True)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise FeatcacheError(f"unknown timm model {name!r}", "see timm.list_models()") from None
        raise network_error(entry, err) from None
    except OSError as err:  # hub unreachable or offline mode
        raise network_error(entry, err) from None
    if not all(hasattr(model, a) for a in ("blocks", "norm_pre", "norm", "embed_dim", "num_prefix_tokens")):
        raise FeatcacheError(f"{entry.name}: unsupported architecture {type(model).__name__}",
                             "featcache hooks timm vision transformers (.blocks, .norm_pre, .norm)")
    cfg = getattr(model, "pretrained_cfg", None) or {"input_size": (3, 224, 224)}
    if size is None or size == -1:
        size = cfg["input_size"][-1]
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (1,))[0]
    _check_image_size(size, patch)
    modules = {"embed": model.norm_pre}
    modules.update({block_name(i): blk for i, blk in enumerate(model.blocks)})
    if not isinstance(model.norm, nn.Identity):
        modules["final"] = model.norm
    prep = {"image_size": size, "resize": "shorter-side bicubic", "crop": "center",
            "mean": list(cfg.get("mean", IMAGENET_MEAN)), "std": list(cfg.get("std", IMAGENET_STD)),
            "background": "white"}
    return Encoder(entry, model, modules, model.embed_dim, model.num_prefix_tokens, prep, torch.device("cpu"),
                   native_image_size=cfg["input_size"][-1])


def _load_hf(entry: EncoderEntry, source: str, image_size: int | None) -> Encoder:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # featcache draws its own progress

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        model = AutoModel.from_pretrained(source, local_files_only=offline or Path(source).exists())
    except OSError as err:
        raise network_error(entry, err) from None
    except ValueError as err:  # e.g. a model that needs its own code (trust_remote_code)
        raise FeatcacheError(f"{entry.name}: transformers cannot build this model ({str(err).splitlines()[0][:200]})",
                             "featcache loads standard architectures without remote code; see docs/usage.md") from None
    config = model.config
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is None or not hasattr(model, "embeddings"):
        raise FeatcacheError(f"{entry.name}: unsupported architecture {type(model).__name__}",
                             "featcache hooks models with .embeddings and .encoder.layer (BERT, ViT, DINOv2 families)")
    modules = {"embed": model.embeddings}
    modules.update({block_name(i): blk for i, blk in enumerate(layers)})
    final = getattr(model, "layernorm", None)
    if final is not None:
        modules["final"] = final
    if entry.modality == "text":
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline or Path(source).exists())
        prep = {"tokenizer": type(tokenizer).__name__, "max_length": entry.max_length,
                "vocab_size": tokenizer.vocab_size}
        return Encoder(entry, model, modules, config.hidden_size, 0, prep, torch.device("cpu"), tokenizer)
    size = image_size or entry.default_image_size
    if size == -1:
        size = config.image_size
    _check_image_size(size, config.patch_size)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    proc = Path(source) / "preprocessor_config.json"
    if proc.exists():
        import json

        data = json.loads(proc.read_text())
        mean, std = data.get("image_mean", mean), data.get("image_std", std)
    prep = {"image_size": size, "resize": "shorter-side bicubic", "crop": "center",
            "mean": list(mean), "std": list(std), "background": "white"}
    n_prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return Encoder(entry, model, modules, config.hidden_size, n_prefix, prep, torch.device("cpu"),
                   native_image_size=config.image_size)
