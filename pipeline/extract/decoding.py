"""Which decoder makes an extraction's pixels (``featcache extract --decode``), and the identity
each gives its stores.

- ``cpu`` (the default): PIL decodes every file whole in the workers. Its identity is the one
  stores always had.
- ``gpu``: plain JPEGs decoded and resized on the CUDA device (:mod:`.gpu_decode`).
- ``draft``: JPEGs decoded by libjpeg at a reduced scale (1/2, 1/4 or 1/8, the smallest that keeps
  the shorter side at least the input size; :func:`featcache.pipeline.data.decode.jpeg_draft`),
  then resized as usual. Decoding a 640 x 480 photo for a 224 px model does half the IDCT work,
  a 1080p one a sixteenth, so a CPU-bound decode runs 1.7x and more as fast
  (docs/benchmarks.md). Other formats are decoded whole.

``gpu`` and ``draft`` give pixels close to the whole decode's, not equal, so each is recorded as
``preprocessing.decode`` and its stores are never mixed with the ``cpu`` path's. Both follow
featcache's own resize: a model with its own image processor (which may resize to another size
first) is refused with them.
"""

from __future__ import annotations

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.extract import gpu_decode
from featcache.pipeline.extract.encoders import Encoder

DECODES = ("cpu", "gpu", "draft")
DRAFT_LABEL = "pil-draft"  # preprocessing.decode of a draft store


def check_config(decode: str, device: str) -> None:
    """Refuse an unknown ``--decode`` (and ``gpu`` without CUDA) before a model is loaded."""
    if decode not in DECODES:
        raise FeatcacheError(f"--decode {decode!r} is not one of: {', '.join(DECODES)}",
                             "use --decode cpu (whole), draft (JPEGs at reduced scale) or gpu (nvJPEG)")
    if decode == "gpu":
        gpu_decode.check_device(device)


def apply(encoder: Encoder, decode: str) -> None:
    """Give ``encoder`` the identity of ``decode``'s features; refuse encoders it cannot serve.
    Captions are not decoded: a text encoder's identity stays as it is."""
    if decode == "cpu" or encoder.modality != "image":
        return
    if encoder.processor is not None or "processor" in encoder.preprocessing:
        raise FeatcacheError(f"--decode {decode} follows featcache's own resize and crop, but {encoder.name} prepares "
                             f"images with its own {encoder.preprocessing.get('processor', 'image processor')}",
                             f"drop --decode {decode} for this model")
    label = gpu_decode.decoder_label(encoder.device) if decode == "gpu" else DRAFT_LABEL
    encoder.preprocessing = {**encoder.preprocessing, "decode": label}


def draft_size(encoder: Encoder) -> int | None:
    """The shorter side a store's JPEGs are drafted to: its input size when the encoder's identity
    says draft (an extraction with ``--decode draft``, or an AlignedModel trained on one)."""
    if encoder.preprocessing.get("decode") == DRAFT_LABEL:
        return encoder.preprocessing.get("image_size")
    return None

