"""Frozen encoders that return pooled features of many layers in one forward pass.

``load_encoder`` builds what a registry entry (``featcache.pipeline.registry``) names. Every
layer's output is pooled by a forward hook as soon as it is made, so at most one batch's tokens
of one layer are alive at a time beyond the model's own; the hooks are registered once
(``featcache.pipeline.extract.pooling``).

Images travel from the decoding workers as uint8 (a quarter of the bytes of float32) and are
normalised by :meth:`Encoder.normalise` on the device the model runs on, with the formula the
numpy path used, so on a CPU the pixels are bitwise the same.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.layerspec import canonical_layers
from featcache.pipeline.extract.pooling import PooledTaps, Stop, pool, register, stop
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


def square_geometry(w: int, h: int, size: int) -> tuple[float, int, int, int, int]:
    """Where featcache's own preprocessing takes a ``size`` x ``size`` input from a w x h image:
    (scale, resized width, resized height, crop left, crop top), the shorter side resized to
    ``size``. One definition, shared by the PIL path (:func:`pixels_of`) and the GPU decoder
    (``gpu_decode``), so the two can differ only in how they resample, never in where they crop."""
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    return scale, rw, rh, (rw - size) // 2, (rh - size) // 2


def pixels_of(images: list, size: int, processor=None) -> torch.Tensor:
    """PIL images (already RGB on white) as a decoding worker ships them: uint8 (N, 3, S, S) for
    featcache's own preprocessing (the shorter side resized bicubic, the centre cropped), to be
    normalised on the device by :meth:`Encoder.normalise`; float32, already normalised, where
    the model has its own image processor, whose steps are transformers' and not split."""
    if processor is not None:
        pixels = processor(images=list(images), return_tensors="np")["pixel_values"]
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    from PIL import Image

    out = np.empty((len(images), 3, size, size), dtype=np.uint8)
    for i, img in enumerate(images):
        scale, rw, rh, left, top = square_geometry(*img.size, size)
        if max(rw, rh) > 8 * size:  # a 20000 x 1 strip: resample only the part that is kept
            box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
            img = img.resize((size, size), Image.BICUBIC, box=box)
        else:
            img = img.resize((rw, rh), Image.BICUBIC)
            img = img.crop((left, top, left + size, top + size))
        out[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(out)


def dummy_inputs(model: nn.Module, small: bool = False) -> dict:
    """A one-row blank input (zero pixels, or four tokens) that runs any encoder once; ``small``:
    an image of 2 x 2 patches instead of the model's own size, for models that take other sizes."""
    config = model.config
    if "pixel_values" in inspect.signature(model.forward).parameters and hasattr(config, "image_size"):
        patch = getattr(config, "patch_size", 16)
        size = 2 * int(patch[0] if isinstance(patch, (list, tuple)) else patch) if small else config.image_size
        h, w = (size[0], size[-1]) if isinstance(size, (list, tuple)) else (size, size)  # YOLOS, Hiera: [h, w]
        return {"pixel_values": torch.zeros(1, getattr(config, "num_channels", 3), int(h), int(w))}
    ids = torch.ones(1, 4, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def probe_forward(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """One blank forward pass, for probes that ask which modules run, not what they compute.

    An image model gets 2 x 2 patches first: at its own size (518 px for DINOv2, 1,370 tokens)
    the two probes of loading cost as much as a dozen 224 px images on a CPU, about 6% of a
    256-image extraction. A model that refuses another size (a ViT or CLIP tower without
    position interpolation) raises, and gets its own size. ``pooling.Stop`` from a probe's hook
    passes through: it ends the pass on purpose."""
    small, own = dummy_inputs(model, small=True), dummy_inputs(model)
    same = all(small[k].shape == own[k].shape for k in own)  # text, or an image model 2 x 2 patches big
    attempts = [own] if same else [small, own]
    for i, inputs in enumerate(attempts):
        try:
            with torch.inference_mode():
                model(**{k: v.to(device) for k, v in inputs.items()})
            return
        except Stop:
            raise
        except Exception:  # noqa: BLE001 - the small input refused: the model's own size answers
            if i == len(attempts) - 1:
                raise


class Tap(NamedTuple):
    """Where a layer is read: a module's output, or its input (``embed``: what enters block 0)."""

    module: nn.Module
    kind: str  # "output" | "input"


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
    _taps_of: PooledTaps | None = field(default=None, repr=False)  # hooks of the last layer list
    _norm: dict = field(default_factory=dict, repr=False)  # device -> (255, mean, std) tensors

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
        """PIL images (already RGB on white) -> normalised float32 pixel batch on the CPU."""
        return self.normalise(self.prepare_pixels(images))

    def prepare_pixels(self, images: list) -> torch.Tensor:
        """What a decoding worker ships: see :func:`pixels_of`."""
        return self.pixels(images)

    @property
    def pixels(self):
        """:func:`pixels_of` bound to this encoder's preprocessing: picklable, without the model."""
        return functools.partial(pixels_of, size=self.preprocessing.get("image_size"), processor=self.processor)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> float32 ``(x / 255 - mean) / std``, on the pixels' device; float32
        pixels (an image processor's) pass through.

        Every operand is a float32 tensor, never a Python scalar: CUDA divides by a scalar as a
        multiplication by its reciprocal, which is not the correctly rounded division numpy did.
        """
        if pixels.dtype != torch.uint8:
            return pixels
        key = str(pixels.device)
        if key not in self._norm:
            as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=pixels.device)  # noqa: E731
            self._norm[key] = (as_tensor(255.0), as_tensor(self.preprocessing["mean"])[:, None, None],
                               as_tensor(self.preprocessing["std"])[:, None, None])
        full, mean, std = self._norm[key]
        return (pixels.to(torch.float32) / full - mean) / std

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
        stacked = self.forward_stacked(inputs, layers, pooling)
        return {n: stacked[i] for i, n in enumerate(layers)}

    @torch.inference_mode()
    def forward_stacked(self, inputs, layers: list[str], pooling: str) -> torch.Tensor:
        """(layers, batch, width) float32 on the device: one tensor, so that the range check,
        the cast and the copy to the host are one operation each for the whole batch."""
        mask = None
        if self.modality == "text":
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
            mask = inputs["attention_mask"].unsqueeze(-1).float()
        else:
            inputs = self.normalise(inputs.to(self.device, non_blocking=True))
        if self._taps_of is None or self._taps_of.layers != list(layers):
            if self._taps_of is not None:
                self._taps_of.remove()
            self._taps_of = PooledTaps(self.taps, layers)

        def run() -> None:
            with self._autocast():
                self._run(inputs)

        prefix = self.num_prefix_tokens
        return self._taps_of.run(run, lambda tokens: pool(tokens, pooling, self.modality, prefix, mask))

    def _hook(self, name: str, take):
        return register(self.taps[name], lambda tokens: take(name, tokens))

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
        stop_at = []
        try:
            stop_at = [self._hook(max(layers, key=self.layer_names.index), stop)]
            probe_forward(self.model, self.device)
        except Stop:
            pass
        finally:
            for h in handles + stop_at:
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
    if isinstance(size, (list, tuple)):  # a detector's [h, w] (YOLOS): featcache's crops are square
        raise FeatcacheError(f"the model's image size {list(size)} is not square, and featcache's preprocessing "
                             "crops squares", f"pass --image-size N (a multiple of the patch size {patch}) if the "
                             "model takes square inputs of other sizes")
    if size <= 0 or size % patch:
        raise FeatcacheError(f"image size {size} is not a positive multiple of the patch size {patch}",
                             f"try {max(patch, round(size / patch) * patch)}")
