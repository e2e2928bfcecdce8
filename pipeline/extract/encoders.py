"""Frozen encoders that return pooled features of many layers in one forward pass.

``load_encoder`` builds what a registry entry (``featcache.pipeline.registry``) names. Every
layer's output is pooled by a forward hook as soon as it is made, so at most one batch's tokens
of one layer are alive at a time beyond the model's own.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.layerspec import canonical_layers
from featcache.pipeline.extract.registry import EncoderEntry

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


VISION_POOLINGS = ("cls", "mean", "cls+mean")


TEXT_POOLINGS = ("mean", "cls")


def weights_digest(model: nn.Module, skip: tuple[str, ...] = ()) -> str:
    """sha256 over the parameters' bytes, independent of parameter names and their order.

    ``skip``: parameters the checkpoint lacked, which the loader filled with fresh random values.
    They are left out so the identity is what was read from disk: the same checkpoint gives the
    same digest on every load, and any changed tensor in it a new one.
    """
    left_out = set(skip)
    tensor_digests = sorted(
        hashlib.sha256(t.detach().to("cpu").contiguous().numpy().tobytes()).hexdigest()
        for name, t in model.state_dict().items()
        if t.is_floating_point() and name not in left_out
    )
    return hashlib.sha256("".join(tensor_digests).encode()).hexdigest()


def dummy_inputs(model: nn.Module) -> dict:
    """A one-row blank input (zero pixels, or four tokens) that runs any encoder once."""
    config = model.config
    if "pixel_values" in inspect.signature(model.forward).parameters and hasattr(config, "image_size"):
        size = config.image_size
        return {"pixel_values": torch.zeros(1, getattr(config, "num_channels", 3), size, size)}
    ids = torch.ones(1, 4, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class Tap(NamedTuple):
    """Where a layer is read: a module's output, or its input (``embed``: what enters block 0)."""

    module: nn.Module
    kind: str  # "output" | "input"


class _Stop(Exception):
    """Raised from a hook once every requested layer is pooled, to skip the rest of the model."""


def _stop(*_args) -> None:
    raise _Stop


@dataclass
class Encoder:
    """A frozen encoder with its preprocessing and the taps its layers are read from."""

    entry: EncoderEntry
    model: nn.Module
    taps: dict[str, Tap]  # canonical layer name -> where that layer is read
    width: int
    num_prefix_tokens: int
    preprocessing: dict
    device: torch.device
    tokenizer: object = None
    native_image_size: int | None = None  # the pretrained input size, what --image-size -1 means
    default_image_size: int | None = None  # what no --image-size means: the registry's or the processor's
    uninitialised: list[str] = field(default_factory=list)  # parameters the checkpoint lacked
    forward_kwargs: dict = field(default_factory=dict)  # e.g. interpolate_pos_encoding at another size
    processor: object = None  # transformers' image processor, where the model has one (hf_encoder)
    files_digest: str | None = None  # config and tokenizer (hf_encoder.config_digest)
    _digest: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def modality(self) -> str:
        return self.entry.modality

    @property
    def n_blocks(self) -> int:
        return sum(1 for n in self.taps if n.startswith("block."))

    @property
    def has_final(self) -> bool:
        return "final" in self.taps

    @property
    def layer_names(self) -> list[str]:
        return canonical_layers(self.n_blocks, self.has_final)

    @property
    def weights_digest(self) -> str:
        if self._digest is None:
            self._digest = weights_digest(self.model, tuple(self.uninitialised))
        return self._digest

    def pooled_width(self, pooling: str) -> int:
        return self.width * (2 if pooling == "cls+mean" else 1)

    def check_pooling(self, pooling: str) -> None:
        allowed = VISION_POOLINGS if self.modality == "image" else TEXT_POOLINGS
        if self.modality == "image" and self.num_prefix_tokens == 0:
            allowed = ("mean",)  # SigLIP: no CLS token to pool
        if pooling not in allowed:
            raise FeatcacheError(f"pooling {pooling!r} is not available for {self.modality} encoders",
                                 f"choose one of: {', '.join(allowed)}")

    # -- inputs ----------------------------------------------------------------------------
    def prepare_images(self, images: list) -> torch.Tensor:
        """PIL images (already RGB on white) -> normalised pixel batch: the model's own image
        processor where it has one; else the shorter side resized (bicubic) and the centre cropped."""
        if self.processor is not None:
            pixels = self.processor(images=list(images), return_tensors="np")["pixel_values"]
            return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        from PIL import Image

        size = self.preprocessing["image_size"]
        mean = np.asarray(self.preprocessing["mean"], dtype=np.float32)
        std = np.asarray(self.preprocessing["std"], dtype=np.float32)
        out = np.empty((len(images), 3, size, size), dtype=np.float32)
        for i, img in enumerate(images):
            w, h = img.size
            scale = size / min(w, h)
            rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
            left, top = (rw - size) // 2, (rh - size) // 2
            if max(rw, rh) > 8 * size:  # a 20000 x 1 strip: resample only the part that is kept
                box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
                img = img.resize((size, size), Image.BICUBIC, box=box)
            else:
                img = img.resize((rw, rh), Image.BICUBIC)
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

        def take(name: str, tokens) -> None:
            tokens = tokens[0] if isinstance(tokens, (tuple, list)) else tokens
            pooled[name] = pool(tokens)
            if wanted.issubset(pooled):
                raise _Stop

        handles = [self._hook(n, take) for n in layers]
        try:
            with self._autocast():
                self._run(inputs)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return {n: pooled[n] for n in layers}

    def _hook(self, name: str, take):
        tap = self.taps[name]
        if tap.kind == "input":
            return tap.module.register_forward_pre_hook(
                lambda _m, args, kwargs: take(name, args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        return tap.module.register_forward_hook(lambda _m, _args, output: take(name, output))

    def _run(self, inputs) -> None:
        if self.modality == "text":
            self.model(**inputs, **self.forward_kwargs)
        elif self.entry.backend == "timm":
            self.model(inputs)
        else:
            self.model(pixel_values=inputs, **self.forward_kwargs)

    def check_initialised(self, layers: list[str]) -> str | None:
        """Refuse to extract layers that use parameters the checkpoint lacked; otherwise return
        the one-line note about them (None when the checkpoint was complete).

        Which parameters a layer uses is read off one forward pass of a blank input that stops at
        the last requested layer, as extraction does: a pooler after the last block never runs.
        """
        if not self.uninitialised:
            return None
        owners = {n.rsplit(".", 1)[0] for n in self.uninitialised}
        ran: set[str] = set()
        handles = [m.register_forward_pre_hook(lambda _m, _a, name=name: ran.add(name))
                   for name, m in self.model.named_modules() if name in owners]
        stop = []
        try:
            stop = [self._hook(max(layers, key=self.layer_names.index), _stop)]
            inputs = {k: v.to(self.device) for k, v in dummy_inputs(self.model).items()}
            with torch.inference_mode():
                self.model(**inputs)
        except _Stop:
            pass
        finally:
            for h in handles + stop:
                h.remove()
        shown = ", ".join(self.uninitialised[:3]) + (", ..." if len(self.uninitialised) > 3 else "")
        used = sorted(n for n in self.uninitialised if n.rsplit(".", 1)[0] in ran)
        if used:
            raise FeatcacheError(
                f"{self.name}: the checkpoint lacks {len(used)} parameters that the requested layers use "
                f"({', '.join(used[:3])}{', ...' if len(used) > 3 else ''}); they would be random",
                "use a complete checkpoint, or extract only layers before them with --layers")
        return (f"{self.name}: {len(self.uninitialised)} parameters are not in the checkpoint ({shown}); "
                "the requested layers do not use them, and the cache's identity leaves them out")

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
            **({"files_sha256": self.files_digest} if self.files_digest else {}),
            "preprocessing": self.preprocessing,
            "pooling": pooling,
            "layers": self.layer_names,
        }


def check_image_size(size: int, patch: int) -> None:
    if size <= 0 or size % patch:
        raise FeatcacheError(f"image size {size} is not a positive multiple of the patch size {patch}",
                             f"try {max(patch, round(size / patch) * patch)}")
